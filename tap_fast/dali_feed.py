"""Image-folder feed: shuffled (x, y, mask) batches of image files, decoded by an NVIDIA DALI pipeline or, without
DALI, by torchvision's decoders.

Both backends read each epoch in :func:`tap_fast.feeds.epoch_order` order, as
:class:`~tap_fast.feeds.DeviceFeed` does (DALI takes each batch's encoded files from an ``external_source``),
and for lossless files (PNG) give exactly the images of the in-memory loaders, :func:`tap_fast.datasets.load_dataset`
(greyscale) and :func:`tap_fast.folder_dataset.decode_pair` (greyscale or RGB): a memory feed and a streaming
feed give the same batches for the same seed and epoch. The greyscale conversion is Pillow's integer ITU-R
601-2 luma, and the centre square crop and resize reproduce Pillow's antialiased bilinear ``Image.resize`` bit
for bit (fixed-point coefficients, rounding between the horizontal and the vertical pass) as batched integer
gathers on the device, per channel. DALI decodes (``device="mixed"`` on a GPU, "cpu" when ``device_id`` is
None) and converts to greyscale; the crop-resize follows on the device, because DALI's resize is not bit-exact
with Pillow's. JPEG decoders may differ (nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's), so JPEG
images are only guaranteed to match within a few grey levels.

A batch's mask is the union (elementwise max) of two sources, each optional. The user's masks (mask PNGs or
boxes, :mod:`tap_fast.folder_dataset`) are read at full size with Pillow on CPU threads, a batch ahead, and take
their image's crop-resize on the device: equal to ``decode_pair``'s. A contamination (``kind``) equals
``contaminate(reference images, labels, kind, ..., seed=seed)`` indexed by file: the feed draws the same
:func:`~tap_fast.contamination.signal_placement` for the whole set once (a template and a value per file) and
applies each batch's share on the device.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from tap_fast.contamination import KINDS, VARIANTS, signal_placement
from tap_fast.feeds import check_normalisation, check_sharding, contaminate_and_normalise, epoch_order
from tap_fast.folder_dataset import Box, mask_pixels, read_size

BACKENDS = ("auto", "dali", "torchvision")
PRECISION_BITS = 22  # Pillow's fixed-point resampling precision (32 - 8 - 2)


@functools.lru_cache(maxsize=4096)
def pil_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` (Resample.c) for in_size -> out_size.

    Returns the first input index of each output (out_size,) int64 and the fixed-point weights
    (out_size, taps) int32 of inputs first, first + 1, ... (zero past each output's support).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # bilinear filter support 1.0
    taps = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    tap = np.arange(taps)
    w = np.abs(((tap[None, :] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where((w < 1.0) & (tap[None, :] < count[:, None]), 1.0 - w, 0.0)
    total = np.zeros(out_size)
    for t in range(taps):  # sequential sum, as Pillow's loop
        total = total + w[:, t]
    w = np.where(total[:, None] != 0, w / np.where(total == 0, 1.0, total)[:, None], w)
    return first, np.floor(0.5 + w * (1 << PRECISION_BITS)).astype(np.int32)


def _pass(images: torch.Tensor, first: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """One Pillow resampling pass of uint8 (B, H, W) images along ``dim`` (1 or 2) to out = first.shape[1]
    samples: sum_t in[first + t] * w_t in int32, rounded and clipped to 0..255 as Pillow's clip8."""
    b, out = first.shape
    limit = images.shape[dim] - 1
    acc = torch.full((), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=images.device)
    shape = (b, out, images.shape[2]) if dim == 1 else (b, images.shape[1], out)
    for t in range(weights.shape[-1]):
        index = (first + t).clamp_(max=limit)
        w = weights[:, :, t]
        index, w = (index[:, :, None], w[:, :, None]) if dim == 1 else (index[:, None, :], w[:, None, :])
        acc = acc + images.gather(dim, index.expand(shape)) * w
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def centre_square_resize(images: torch.Tensor, sizes: torch.Tensor | Sequence[Sequence[int]],
                         size: int) -> torch.Tensor:
    """Pillow-exact ``img.crop(centre square).resize((size, size), BILINEAR)`` of a padded batch.

    The square is side = min(h, w) at ((h - side) // 2, (w - side) // 2). Pillow resizes a square
    horizontally first (also from version 13, which goes vertically first only when the height shrinks
    more than twice as much as the width) and rounds to uint8 between the passes.

    Args:
        images: (B, H_max, W_max) uint8 planes (greyscale images, or one channel each of colour ones), plane
            b in its top-left sizes[b] = (h_b, w_b).
        sizes: (B, 2) heights and widths.
        size: output side.
    Returns:
        (B, 1, size, size) uint8 on the images' device.
    """
    rows, cols = [], []
    for h, w in torch.as_tensor(sizes, dtype=torch.int64).cpu().tolist():
        side = min(h, w)
        first, weights = pil_coefficients(side, size)
        rows.append((first + (h - side) // 2, weights))
        cols.append((first + (w - side) // 2, weights))

    def stack(coeffs):
        taps = max(k.shape[1] for _, k in coeffs)
        first = torch.from_numpy(np.stack([f for f, _ in coeffs]))
        weights = torch.from_numpy(np.stack([np.pad(k, ((0, 0), (0, taps - k.shape[1]))) for _, k in coeffs]))
        return first.to(images.device, non_blocking=True), weights.to(images.device, non_blocking=True)

    x = _pass(images, *stack(cols), dim=2)  # horizontal pass first, rounded to uint8 as Pillow's
    return _pass(x, *stack(rows), dim=1).unsqueeze(1)


def pil_grey(rgb: torch.Tensor) -> torch.Tensor:
    """Pillow's ``convert("L")``: (R * 19595 + G * 38470 + B * 7471 + 2^15) >> 16 of (3, H, W) uint8."""
    r, g, b = rgb.to(torch.int32).unbind(0)
    return ((r * 19595 + g * 38470 + b * 7471 + (1 << 15)) >> 16).to(torch.uint8)


def pad_batch(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (H_b, W_b) images into a zero-padded (B, H_max, W_max) tensor; also return the (B, 2) sizes."""
    sizes = torch.tensor([tuple(im.shape) for im in images], dtype=torch.int64)
    out = images[0].new_zeros(len(images), *sizes.max(0).values.tolist())
    for b, im in enumerate(images):
        out[b, :im.shape[0], :im.shape[1]] = im
    return out, sizes


def dali_available() -> bool:
    """Whether ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class _EncodedBatches:
    """A DALI external source: the encoded files of the planned batches (lists of file indices), in order, then
    StopIteration; ``in_flight`` holds the batches handed to DALI whose outputs are not yet taken, oldest first."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files, self.plan, self.in_flight = files, deque(), deque()

    def __call__(self) -> list[np.ndarray]:
        if not self.plan:
            raise StopIteration
        index = self.plan.popleft()
        self.in_flight.append(index)
        return [np.fromfile(self.files[i], dtype=np.uint8) for i in index]


def _dali_pipeline(source: _EncodedBatches, *, batch_size: int, num_threads: int, device_id: int | None,
                   channels: int):
    """DALI: decode the batches ``source`` gives, Pillow-exact greyscale for one channel, pad to the batch's
    largest image. Outputs the padded images (B, H, W) or (B, H, W, 3) and their (B, 2) (h, w) sizes."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id)
    def pipeline():
        encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1)
        # Pillow's Image.open ignores EXIF orientation; (h, w) is read on the CPU from the file header
        size = fn.peek_image_shape(encoded, adjust_orientation=False)[0:2]
        rgb = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB,
                                adjust_orientation=False)
        if channels == 3:
            return fn.pad(rgb, fill_value=0), size
        rgb = fn.cast(rgb, dtype=types.INT32)
        grey = (rgb[:, :, 0] * 19595 + rgb[:, :, 1] * 38470 + rgb[:, :, 2] * 7471 + 32768) // 65536
        return fn.pad(fn.cast(grey, dtype=types.UINT8), fill_value=0), size

    pipe = pipeline()
    pipe.build()
    return pipe


def _dali_to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A uniform DALI TensorList (CPU or GPU) copied into a torch tensor on ``device``."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    tensor = tensor_list.as_tensor()
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(tensor, out, cuda_stream=stream)


def _read_bytes(path: Path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor."""
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def _as_channels(rgb: torch.Tensor, channels: int) -> torch.Tensor:
    """A decoded (3, H, W) uint8 image as (channels, H, W): Pillow's greyscale for one channel."""
    return pil_grey(rgb)[None] if channels == 1 else rgb


def _decode(path: Path, channels: int) -> torch.Tensor:
    """A file's Pillow-exact (channels, H, W) uint8 decode on the CPU (ValueError naming the file, as
    :func:`tap_fast.datasets.load_dataset`'s, when it cannot be decoded)."""
    from torchvision.io import ImageReadMode, decode_image
    try:
        rgb = decode_image(_read_bytes(path), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    if rgb.dtype != torch.uint8:
        raise ValueError(f"cannot read image {path}: {rgb.dtype} pixels (16-bit) are not supported; convert to 8-bit")
    return _as_channels(rgb, channels)


def _undecodable(files: Sequence[Path], error: Exception) -> ValueError:
    """The error for a batch of ``files`` that failed to decode together (in DALI or nvJPEG): decoding them
    one by one on the CPU names the first unreadable file, else the error names the whole batch."""
    for path in files:
        try:
            _decode(path, 3)
        except ValueError as e:
            return e
    return ValueError(f"cannot read the images of the batch {[str(f) for f in files]}: {error}")


def _prefetched(pool: ThreadPoolExecutor, batches: Sequence[torch.Tensor], read: Callable[[int], object]
                ) -> Iterator[list]:
    """``[read(i) for i in batch]`` for each batch of file indices in turn, on ``pool``'s threads; the next
    batch is submitted before this one is returned."""
    def submit(index):
        return [pool.submit(read, i) for i in index.tolist()]

    pending = submit(batches[0]) if batches else []
    for k in range(len(batches)):
        following = submit(batches[k + 1]) if k + 1 < len(batches) else []
        yield [f.result() for f in pending]
        pending = following


def _check_masks(masks: Sequence[str | os.PathLike | None] | None, n: int) -> list[Path | None]:
    if masks is None:
        return [None] * n
    masks = [None if m is None else Path(m) for m in masks]
    missing = [str(m) for m in masks if m is not None and not m.is_file()]
    if len(masks) != n or missing:
        raise ValueError(f"masks must give one mask file (or None) per file, got {len(masks)} for {n} files"
                         + (f", missing {missing[:3]}" if missing else ""))
    return masks


def _check_boxes(boxes: Sequence[Sequence[Box]] | None, files: Sequence[Path]) -> list[list[Box]]:
    if boxes is None:
        return [[]] * len(files)
    if len(boxes) != len(files):
        raise ValueError(f"boxes must give one list of boxes per file, got {len(boxes)} for {len(files)} files")
    for path, per_file in zip(files, boxes):
        for box in per_file:
            if len(box) != 4 or not all(isinstance(v, (int, np.integer)) for v in box) \
                    or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
                raise ValueError(f"boxes of {path} must be (x0, y0, x1, y1) integer pixels with 0 <= x0 < x1 and "
                                 f"0 <= y0 < y1, got {tuple(box)}")
    return [[tuple(int(v) for v in box) for box in per_file] for per_file in boxes]


class FolderFeed:
    """Shuffled batches ``(x, y, mask)`` of image files, decoded by DALI or torchvision.

    Args:
        files, labels: the image paths and (N,) integer labels (see :func:`tap_fast.datasets.folder_split`, or a split of
            :func:`tap_fast.folder_dataset.list_user_folder`).
        kind: "tag" or "stripe" (any of ``KINDS``), or None for no contamination.
        num_classes, variant, tags, permute, tag_mask, tag_style: as :func:`tap_fast.contamination.contaminate`.
        masks: per file, its mask PNG (the image's size; nonzero = spurious) or None; None: no mask files.
        boxes: per file, its spurious boxes (x0, y0, x1, y1) in the original image's pixels (x0 <= x < x1,
            y0 <= y < y1; inside the image, as :func:`~tap_fast.folder_dataset.attach_boxes` checks); None: none.
        soft_masks: the user's masks keep grey level / 255 (else mask files must be binary), as ``decode_pair``.
        channels: 1 (Pillow's greyscale) or 3 (RGB).
        batch_size, mean, std, seed, contamination_seed, rank, world_size, shuffle, drop_last: as
            :class:`tap_fast.feeds.DeviceFeed`.
        image_size: side of the square output images (the reference's 224).
        device_id: CUDA device index; None decodes and works on the CPU.
        backend: "dali", "torchvision" or "auto" (DALI when it imports, else torchvision with a warning).
        num_threads: DALI CPU threads, and the threads that read masks (and, with torchvision, images).

    Iterating reads the epoch set by :meth:`set_epoch` (then the next one) in :meth:`order`, DeviceFeed's
    order (rank r of world_size reads :func:`tap_fast.feeds.epoch_order`'s disjoint equal share), the next
    batch read while this one is used, and gives on the device x float32 (B, channels, S, S) normalised
    (uint8 when mean and std are None), y int64 (B,) and mask float32 (B, 1, S, S): the union of the file's
    mask and boxes (``decode_pair``'s) and the contamination's, zero without either.
    """

    def __init__(self, files: Sequence[str | os.PathLike], labels: torch.Tensor, *, kind: str | None,
                 num_classes: int, variant: str = "contaminated", batch_size: int, mean: float | None,
                 std: float | None, seed: int = 0, contamination_seed: int | None = None, image_size: int = 224,
                 channels: int = 1, masks: Sequence[str | os.PathLike | None] | None = None,
                 boxes: Sequence[Sequence[Box]] | None = None, soft_masks: bool = False,
                 device_id: int | None = None, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True, tags: Sequence[str] | None = None,
                 backend: str = "auto", num_threads: int = 4, permute: str = "random",
                 tag_mask: str = "box", tag_style: str = "font") -> None:
        self.files = [Path(f) for f in files]
        missing = [str(f) for f in self.files if not f.is_file()]
        if not self.files or missing:
            raise ValueError(f"files must name existing image files, got {len(self.files)} files"
                             + (f", missing {missing[:3]}" if missing else ""))
        n = len(self.files)
        if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be a ({n},) integer tensor, one per file, got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        for arg, value in (("batch_size", batch_size), ("image_size", image_size), ("num_threads", num_threads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if device_id is not None and (not isinstance(device_id, int) or device_id < 0):
            raise ValueError(f"device_id must be a CUDA device index (int >= 0) or None for the CPU, "
                             f"got {device_id!r}")
        check_sharding(rank, world_size)
        self.mean, self.std = check_normalisation(mean, std)
        self._masks, self._boxes = _check_masks(masks, n), _check_boxes(boxes, self.files)
        self.soft_masks, self._masked = bool(soft_masks), masks is not None or boxes is not None
        if drop_last and batch_size > n // world_size:
            raise ValueError(f"batch_size={batch_size} exceeds this rank's share of {n // world_size} files "
                             "(drop_last=True would give no batches)")
        if backend == "auto":
            backend = "dali" if dali_available() else "torchvision"
            if backend == "torchvision":
                warnings.warn("NVIDIA DALI is not installed: FolderFeed falls back to torchvision's decoders",
                              stacklevel=2)
        self.backend, self.image_size, self.channels, self.batch_size = backend, image_size, channels, batch_size
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        self.seed, self.epoch, self._threads, self._device_id = int(seed), 0, num_threads, device_id
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self.labels = labels.to(self.device, torch.int64)
        placement = None if kind is None else signal_placement(
            labels, kind, num_classes, height=image_size, width=image_size, variant=variant,
            seed=self.seed if contamination_seed is None else int(contamination_seed), tags=tags, permute=permute,
            tag_mask=tag_mask, tag_style=tag_style)  # None for variant "clean"
        self.placement = None if placement is None else placement.to(self.device)
        self._source = self._pipe = None
        self._dali_epochs = 0  # epochs started on the pipeline
        if backend == "dali":
            self._build_dali()

    def __len__(self) -> int:
        share = len(self.files) // self.world_size
        return share // self.batch_size if self.drop_last else -(-share // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration reads (any epoch; iterating advances it by one)."""
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        """Indices (into ``files``) of the files this rank reads in the next epoch, in batch order."""
        idx = epoch_order(len(self.files), epoch=self.epoch, seed=self.seed, shuffle=self.shuffle,
                          rank=self.rank, world_size=self.world_size)
        return idx[:len(self) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for _, x, y, mask in self.indexed():
            yield x, y, mask

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Like iterating, with each batch's file indices (B,) int64 first."""
        batches = self.order().split(self.batch_size)
        self.epoch += 1
        size = self.image_size
        with ThreadPoolExecutor(self._threads) as pool:
            decoded = self._dali_batches(batches) if self.backend == "dali" else \
                self._torchvision_batches(batches, pool)
            masks = _prefetched(pool, batches, self._mask_pixels) if self._masked else itertools.repeat(None)
            for index, (planes, sizes), pixels in zip(batches, decoded, masks):
                index = index.to(self.device)
                x = centre_square_resize(planes, sizes, size).view(len(index), self.channels, size, size)
                x, mask = contaminate_and_normalise(x, index, self.placement, self.mean, self.std,
                                                    self._user_masks(pixels))
                yield index, x, self.labels[index], mask

    def _mask_pixels(self, i: int) -> torch.Tensor | None:
        """File i's spurious pixels at full size (h, w) uint8 (``mask_pixels``), None when it has none."""
        if self._masks[i] is None and not self._boxes[i]:
            return None
        return torch.from_numpy(mask_pixels(read_size(self.files[i]), self._masks[i], self._boxes[i],
                                            self.soft_masks))

    def _user_masks(self, pixels: list[torch.Tensor | None] | None) -> torch.Tensor | None:
        """A batch's (B, 1, S, S) float32 masks from its files' full-size ones (None: no spurious pixel), with
        ``decode_pair``'s crop-resize and then > 0, or / 255 with ``soft_masks``; None when none has any."""
        if pixels is None or all(p is None for p in pixels):
            return None
        none = torch.zeros(1, 1, dtype=torch.uint8)  # resizes to zeros
        planes, sizes = pad_batch([none if p is None else p for p in pixels])
        resized = centre_square_resize(planes.to(self.device, non_blocking=True), sizes, self.image_size)
        return resized.float().div_(255) if self.soft_masks else (resized > 0).float()

    def _build_dali(self) -> None:
        self._source = _EncodedBatches(self.files)
        self._pipe = _dali_pipeline(self._source, batch_size=self.batch_size, num_threads=self._threads,
                                    device_id=self._device_id, channels=self.channels)

    def _rewind_dali(self) -> None:
        """Discard what the pipeline still holds of the last epoch (read to its end or left part-read) and
        rewind it; a fresh pipeline when that fails or the last epoch failed."""
        if self._pipe is not None:
            self._source.plan.clear()
            try:
                while True:
                    self._pipe.run()
            except StopIteration:
                self._pipe.reset()
                self._source.in_flight.clear()
                return
            except RuntimeError:
                pass
        self._build_dali()

    def _dali_batches(self, batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each batch's decoded planes (B * channels, H, W) on the device and their (h, w) sizes. When DALI
        fails (it names no file), the failed batch's files are decoded one by one on the CPU. The pipeline reads
        one epoch at a time: a later epoch started meanwhile ends this one."""
        self._rewind_dali()
        self._source.plan.extend(index.tolist() for index in batches)
        self._dali_epochs += 1
        epoch, cpu = self._dali_epochs, torch.device("cpu")
        for _ in batches:
            if epoch != self._dali_epochs:
                raise RuntimeError("FolderFeed: a later epoch was started while this one was being read; with DALI "
                                   "read one epoch at a time")
            try:
                images, sizes = self._pipe.run()
            except RuntimeError as e:
                failed, self._pipe = self._source.in_flight[0], None
                raise _undecodable([self.files[i] for i in failed], e) from e
            self._source.in_flight.popleft()
            images, sizes = _dali_to_torch(images, self.device), _dali_to_torch(sizes, cpu)
            if self.channels == 3:
                images, sizes = images.permute(0, 3, 1, 2).flatten(0, 1), sizes.repeat_interleave(3, 0)
            yield images, sizes

    def _torchvision_batches(self, batches: Sequence[torch.Tensor], pool: ThreadPoolExecutor
                             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each batch's decoded planes (B * channels, H_max, W_max) on the device and their (h, w) sizes."""
        on_gpu = self.device.type == "cuda"

        def read(i):  # JPEGs are decoded on the GPU (nvJPEG) in one batch, the rest on CPU threads
            path = self.files[i]
            return _read_bytes(path) if on_gpu and _is_jpeg(path) else _decode(path, self.channels)

        for index, loaded in zip(batches, _prefetched(pool, batches, read)):
            yield pad_batch([plane for image in self._decoded(loaded, index) for plane in image])

    def _decoded(self, loaded: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """(channels, H, W) images on the feed's device; decodes the JPEG bytes of a GPU feed with nvJPEG."""
        if self.device.type == "cpu":
            return loaded
        from torchvision.io import ImageReadMode, decode_jpeg
        is_jpeg = [_is_jpeg(self.files[i]) for i in index.tolist()]
        jpegs = [data for data, j in zip(loaded, is_jpeg) if j]
        if jpegs:
            # nvJPEG may write its outputs before work already queued on this stream has run, into blocks the
            # caching allocator recycled from that work (pytorch/vision#9606): let the queue drain first.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            rgb = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device) if jpegs else [])
        except RuntimeError as e:
            raise _undecodable([self.files[i] for i, j in zip(index.tolist(), is_jpeg) if j], e) from e
        return [_as_channels(next(rgb), self.channels) if j else im.to(self.device, non_blocking=True)
                for im, j in zip(loaded, is_jpeg)]


def _is_jpeg(path: Path) -> bool:
    return path.suffix.lower() in (".jpg", ".jpeg")
