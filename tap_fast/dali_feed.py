"""Image-folder feed (PNEU / KNEE layouts): an NVIDIA DALI pipeline, or torchvision's decoders without DALI.

Both backends produce exactly the images of the reference loader :func:`tap_fast.datasets.load_dataset`
for lossless files (PNG): the greyscale conversion is Pillow's integer ITU-R 601-2 luma, and the centre
square crop and resize reproduce Pillow's antialiased bilinear ``Image.resize`` bit for bit (fixed-point
coefficients, rounding between the horizontal and the vertical pass) as batched integer gathers on the
device. DALI reads, decodes (``device="mixed"`` on a GPU, "cpu" when ``device_id`` is None) and converts to
greyscale; the crop-resize follows on the device, because DALI's resize is not bit-exact with Pillow's.
JPEG decoders may differ (nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's), so JPEG images
are only guaranteed to match within a few grey levels.

The contamination and its masks equal ``contaminate(reference images, labels, kind, ..., seed=seed)``
indexed by file: the feed draws the same :func:`~tap_fast.contamination.signal_placement` for the whole
set once (a template and a value per file) and applies each batch's share on the device.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from tap_fast.contamination import KINDS, VARIANTS, signal_placement
from tap_fast.datasets import list_folder, stratified_take
from tap_fast.feeds import check_normalisation, check_sharding, contaminate_and_normalise, epoch_order

BACKENDS = ("auto", "dali", "torchvision")
FOLDER_DATASETS = ("pneu", "knee")
PRECISION_BITS = 22  # Pillow's fixed-point resampling precision (32 - 8 - 2)


def folder_split(name: str, data_dir: str | os.PathLike, split: str, *, val_fraction: float = 0.1,
                 limit_train: int | None = None, seed: int = 0) -> tuple[list[Path], torch.Tensor]:
    """Files and labels of ``load_dataset(name, data_dir, ...)``'s split ``split`` ("train", "val" or
    "test"), in the same order, so that sample i of the feed is image i of the reference split."""
    if name not in FOLDER_DATASETS:
        raise ValueError(f"name must be one of {FOLDER_DATASETS}, got {name!r}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    listing = {s: ([p for p, _ in items], torch.tensor([y for _, y in items], dtype=torch.int64))
               for s, items in list_folder(name, Path(data_dir)).items()}
    generator = torch.Generator().manual_seed(seed)
    files, labels = listing["train"]
    if "val" not in listing:  # as load_dataset: hold out val_fraction of train, stratified
        held, rest = stratified_take(labels, round(val_fraction * len(labels)), generator)
        listing["val"] = ([files[i] for i in held], labels[held])
        listing["train"] = ([files[i] for i in rest], labels[rest])
    if limit_train is not None and limit_train < len(listing["train"][1]):
        files, labels = listing["train"]
        keep = stratified_take(labels, limit_train, generator)[0]
        listing["train"] = ([files[i] for i in keep], labels[keep])
    return listing[split]


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
        images: (B, H_max, W_max) uint8 greyscale images, image b in its top-left sizes[b] = (h_b, w_b).
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


def _dali_pipeline(files: Sequence[Path], *, batch_size: int, num_threads: int, device_id: int | None,
                   rank: int, world_size: int, shuffle: bool, seed: int, decode: bool = True):
    """DALI: read (sharded; one global reshuffle per epoch, the same on every shard), decode, Pillow-exact
    greyscale, pad to the batch's largest image. Outputs (padded images, (h, w) sizes, file index), or only
    the file index without ``decode`` (the reader's order alone, which depends on neither seed nor device)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def pipeline():
        encoded, index = fn.readers.file(
            files=[str(f) for f in files], labels=list(range(len(files))), shard_id=rank, num_shards=world_size,
            random_shuffle=False, shuffle_after_epoch=shuffle, pad_last_batch=True, name="reader")
        if not decode:
            return index
        # Pillow's Image.open ignores EXIF orientation; (h, w) is read on the CPU from the file header
        size = fn.peek_image_shape(encoded, adjust_orientation=False)[0:2]
        rgb = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB,
                                adjust_orientation=False)
        rgb = fn.cast(rgb, dtype=types.INT32)
        grey = (rgb[:, :, 0] * 19595 + rgb[:, :, 1] * 38470 + rgb[:, :, 2] * 7471 + 32768) // 65536
        return fn.pad(fn.cast(grey, dtype=types.UINT8), fill_value=0), size, index

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


def _read(path: Path, decode: bool) -> torch.Tensor:
    """A file's bytes, or its Pillow-exact greyscale (H, W) uint8 decode on the CPU (ValueError naming
    the file, as :func:`tap_fast.datasets.load_dataset`'s, when it cannot be decoded)."""
    from torchvision.io import ImageReadMode, decode_image
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    if not decode:
        return data
    try:
        return pil_grey(decode_image(data, mode=ImageReadMode.RGB))
    except RuntimeError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _undecodable(files: Sequence[Path], error: Exception) -> ValueError:
    """The error for a batch of ``files`` that failed to decode together (in DALI or nvJPEG): decoding them
    one by one on the CPU names the first unreadable file, else the error names the whole batch."""
    for path in dict.fromkeys(files):  # a padded batch repeats files
        try:
            _read(path, decode=True)
        except ValueError as e:
            return e
    return ValueError(f"cannot read the images of the batch {[str(f) for f in dict.fromkeys(files)]}: {error}")


class FolderFeed:
    """Shuffled batches ``(x, y, mask)`` of an image-folder split, decoded by DALI or torchvision.

    Args:
        files, labels: the split's image paths and (N,) integer labels (see :func:`folder_split`).
        kind: "tag" or "stripe" (any of ``KINDS``), or None for no contamination (zero masks).
        num_classes, variant, tags: as :func:`tap_fast.contamination.contaminate`.
        batch_size, mean, std, seed, rank, world_size, shuffle, drop_last: as :class:`tap_fast.feeds.DeviceFeed`.
        image_size: side of the square output images (the reference's 224).
        device_id: CUDA device index; None decodes and works on the CPU.
        backend: "dali", "torchvision" or "auto" (DALI when it imports, else torchvision with a warning).
        num_threads: DALI CPU threads, or torchvision's file-reading / decoding threads.

    Iterating reads the epoch set by :meth:`set_epoch` (then the next one) and gives x float32
    (B, 1, S, S) normalised (uint8 when mean and std are None), y int64 (B,) and mask float32 (B, 1, S, S).
    Rank r of world_size reads a disjoint share of the epoch: DALI's shard r of its epoch-reshuffled list
    (shard sizes differ by at most one; every rank yields floor(N // world_size / B) batches with
    drop_last), or with torchvision :func:`tap_fast.feeds.epoch_order`'s share. The two backends shuffle
    differently.
    """

    def __init__(self, files: Sequence[str | os.PathLike], labels: torch.Tensor, *, kind: str | None,
                 num_classes: int, variant: str = "contaminated", batch_size: int, mean: float | None,
                 std: float | None, seed: int = 0, image_size: int = 224, device_id: int | None = None, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool = True,
                 tags: Sequence[str] | None = None, backend: str = "auto", num_threads: int = 4) -> None:
        self.files = [Path(f) for f in files]
        missing = [str(f) for f in self.files if not f.is_file()]
        if not self.files or missing:
            raise ValueError(f"files must name existing image files, got {len(self.files)} files"
                             + (f", missing {missing[:3]}" if missing else ""))
        if not isinstance(labels, torch.Tensor) or labels.shape != (len(self.files),) \
                or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be a ({len(self.files)},) integer tensor, one per file, got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for arg, value in (("batch_size", batch_size), ("image_size", image_size), ("num_threads", num_threads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if device_id is not None and (not isinstance(device_id, int) or device_id < 0):
            raise ValueError(f"device_id must be a CUDA device index (int >= 0) or None for the CPU, "
                             f"got {device_id!r}")
        check_sharding(rank, world_size)
        self.mean, self.std = check_normalisation(mean, std)
        n = len(self.files)
        if drop_last and batch_size > n // world_size:
            raise ValueError(f"batch_size={batch_size} exceeds this rank's share of {n // world_size} files "
                             "(drop_last=True would give no batches)")
        if backend == "auto":
            backend = "dali" if dali_available() else "torchvision"
            if backend == "torchvision":
                warnings.warn("NVIDIA DALI is not installed: FolderFeed falls back to torchvision's decoders",
                              stacklevel=2)
        self.backend, self.image_size, self.batch_size = backend, image_size, batch_size
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        self.seed, self.epoch = int(seed), 0
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        self.labels = labels.to(self.device, torch.int64)
        self.placement = None if kind is None else signal_placement(
            labels, kind, num_classes, height=image_size, width=image_size, variant=variant, seed=self.seed,
            tags=tags)
        if self.placement is not None:
            self.placement = self.placement.to(self.device)
        # DALI shard r holds files [n r // w, n (r + 1) // w); pad_last_batch pads every shard to as many
        # batches as the largest, so each reader epoch is ceil(ceil(n / w) / B) batches on every rank.
        self._shard = n * (rank + 1) // world_size - n * rank // world_size
        self._reader_batches = _ceil_div(_ceil_div(n, world_size), batch_size)
        self._pending, self._runs, self._threads, self._pipe = 0, 0, num_threads, None
        if backend == "dali":
            self._pipe = _dali_pipeline(self.files, batch_size=batch_size, num_threads=num_threads,
                                        device_id=device_id, rank=rank, world_size=world_size, shuffle=shuffle,
                                        seed=self.seed)

    def __len__(self) -> int:
        share = len(self.files) // self.world_size
        if self.drop_last:
            return share // self.batch_size
        return _ceil_div(self._shard if self.backend == "dali" else share, self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration reads (iterating advances it by one). DALI's reader
        reshuffles once per epoch read, so with DALI ``epoch`` must be the next one in sequence."""
        if self.backend == "dali" and int(epoch) != self.epoch:
            raise ValueError(f"epoch must be {self.epoch} (the DALI reader's next epoch), got {epoch}")
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for _, x, y, mask in self.indexed():
            yield x, y, mask

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Like iterating, with each batch's file indices (B,) int64 first."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        batches = self._dali_batches() if self.backend == "dali" else self._torchvision_batches(epoch)
        for index, images, sizes in batches:
            index = index.to(self.device)
            x = centre_square_resize(images, sizes, self.image_size)
            x, mask = contaminate_and_normalise(x, index, self.placement, self.mean, self.std)
            yield index, x, self.labels[index], mask

    def _dali_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for _ in range(self._pending):  # finish an epoch left part-read, to start at an epoch boundary
            self._run_dali()
        self._pending = self._reader_batches
        cpu = torch.device("cpu")
        for b in range(len(self)):
            self._pending -= 1
            images, sizes, index = self._run_dali()
            real = min(self.batch_size, self._shard - b * self.batch_size)  # the rest is padding
            yield (_dali_to_torch(index, cpu)[:real, 0].long(), _dali_to_torch(images, self.device)[:real],
                   _dali_to_torch(sizes, cpu)[:real])

    def _run_dali(self):
        """The pipeline's next batch. When it fails (DALI names no file), a reader-only pipeline replays the
        reader's order up to the failed batch, whose files are then decoded one by one on the CPU."""
        try:
            out = self._pipe.run()
        except RuntimeError as e:
            replay = _dali_pipeline(self.files, batch_size=self.batch_size, num_threads=1, device_id=None,
                                    rank=self.rank, world_size=self.world_size, shuffle=self.shuffle, seed=0,
                                    decode=False)
            for _ in range(self._runs):
                replay.run()
            index = replay.run()[0].as_array().ravel().tolist()
            raise _undecodable([self.files[i] for i in index], e) from e
        self._runs += 1
        return out

    def _torchvision_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.files), epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                            rank=self.rank, world_size=self.world_size)
        batches = order[:len(self) * self.batch_size].split(self.batch_size)
        on_gpu = self.device.type == "cuda"
        with ThreadPoolExecutor(self._threads) as pool:
            def submit(index):  # JPEGs are decoded on the GPU (nvJPEG) in one batch, the rest on CPU threads
                return [pool.submit(_read, self.files[i], not (on_gpu and _is_jpeg(self.files[i])))
                        for i in index.tolist()]

            pending = submit(batches[0]) if batches else []
            for k, index in enumerate(batches):
                loaded = [f.result() for f in pending]
                if k + 1 < len(batches):
                    pending = submit(batches[k + 1])  # prefetch the next batch while this one is used
                yield (index, *pad_batch(self._decoded(loaded, index)))

    def _decoded(self, loaded: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """Greyscale images on the feed's device; decodes the JPEG bytes of a GPU feed with nvJPEG."""
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
        return [pil_grey(next(rgb)) if j else im.to(self.device, non_blocking=True) for im, j in zip(loaded, is_jpeg)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _is_jpeg(path: Path) -> bool:
    return path.suffix.lower() in (".jpg", ".jpeg")
