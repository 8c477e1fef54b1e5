"""The paper's data sets (section 5.1) as uint8 tensors, read from local files only (nothing downloads).

- ``digits``: scikit-learn's embedded 8x8 digits, scaled to 0..255 and resized to 28x28, with a fixed
  stratified 80/20 train/test split (seed 0, so the test set does not change with ``seed``).
- ``mnist``: ``mnist.npz`` (x_train, y_train, x_test, y_test) or the four IDX files (optionally .gz), in
  data_dir or data_dir/MNIST/raw.
- ``pneumoniamnist``: the MedMNIST npz (train/val/test_images, *_labels (N, 1)), with its own val split.
- ``pneu``: Kermany et al.'s chest X-rays, ``{train,test}/{NORMAL,PNEUMONIA}/*.jpeg``; a published
  ``val/`` folder (16 images) is merged into train, as the paper counts 5,232 = 5,216 + 16 training images.
- ``knee``: Chen et al.'s KL-graded knee X-rays, ``{train,val,test}/{0,1,2,3,4}/*.png``; the published
  val folder is the val split (train + val + test = the paper's 8,260 images).

Except where a published val split is used (pneumoniamnist, knee), ``val_fraction`` of train is held out
for validation, stratified by class; ``limit_train`` then subsamples train, also stratified. Both use
``seed``. Image folders are decoded with Pillow to greyscale, centre-cropped to a square and resized
(bilinear, antialiased) to ``image_size`` (default 224).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import struct
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tap_fast.choices import DATASETS
from tap_fast.folder_dataset import (IMAGE_SUFFIXES, FolderListing, attach_boxes, attach_masks, decode_split,
                                     list_user_folder, read_image, visible_entries)

logger = logging.getLogger(__name__)
STATS_SAMPLE = 512  # "folder": training images (a fixed stratified sample) that mean and std are computed from



@dataclass(frozen=True)
class _Spec:
    num_classes: int
    metric: str
    contamination: str | None  # None: the user's data, contaminated only when asked
    class_names: tuple[str, ...]
    mean_std: tuple[float, float] | None  # None: computed from the train split


_SPECS = {
    "digits": _Spec(10, "accuracy", "decoy", tuple("0123456789"), None),
    "mnist": _Spec(10, "accuracy", "decoy", tuple("0123456789"), (0.1307, 0.3081)),
    "pneumoniamnist": _Spec(2, "f1", "tag", ("normal", "pneumonia"), None),
    "pneu": _Spec(2, "f1", "tag", ("NORMAL", "PNEUMONIA"), (0.5711, 0.1523)),
    "knee": _Spec(5, "mae", "tag", ("0", "1", "2", "3", "4"), (0.5549, 0.2232)),
}

# Image-folder layouts: the splits that must exist and, per dataset, a split merged into another.
_FOLDER_SPLITS = {"pneu": ("train", "test"), "knee": ("train", "val", "test")}
_FOLDER_MERGE = {"pneu": {"val": "train"}, "knee": {}}
FOLDER_DATASETS = tuple(_FOLDER_SPLITS)  # the paper's image-folder sets


@dataclass
class Split:
    """Images (N, C, H, W) uint8 (C = 1 or 3), labels (N,) int64 and, for users' own folders, the masks of
    their spurious pixels (N, 1, H, W): uint8 0/1, or float32 in [0, 1] for soft masks (None: none given)."""
    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 \
                or self.images.dim() != 4 or self.images.shape[1] not in (1, 3):
            got = (self.images.dtype, tuple(self.images.shape)) if isinstance(self.images, torch.Tensor) \
                else type(self.images).__name__
            raise ValueError(f"images must be a uint8 tensor of shape (N, C, H, W) with C = 1 or 3, got {got}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 \
                or self.labels.shape != self.images.shape[:1]:
            got = (self.labels.dtype, tuple(self.labels.shape)) if isinstance(self.labels, torch.Tensor) \
                else type(self.labels).__name__
            raise ValueError(f"labels must be an int64 tensor of shape ({self.images.shape[0]},), got {got}")
        expected = (self.images.shape[0], 1, *self.images.shape[2:])
        if self.masks is not None and (not isinstance(self.masks, torch.Tensor)
                                       or tuple(self.masks.shape) != expected):
            raise ValueError(f"masks must be a tensor of shape {expected}, got "
                             f"{tuple(getattr(self.masks, 'shape', ())) or type(self.masks).__name__}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index], None if self.masks is None else self.masks[index])


@dataclass
class Dataset:
    """A data set's splits and the facts training needs about it (section 5.1)."""
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: float  # normalisation of images / 255
    std: float
    metric: str  # "accuracy", "f1" or "mae"
    contamination: str | None  # default contamination kind: "decoy", "tag", or None (the user's own data)
    class_names: tuple[str, ...] = ()
    unmasked: dict[str, int] | None = None  # "folder" with masks or boxes: per split, images given no mask
    streamed_train: FileSplit | None = None  # "folder" streamed: the training split's files (see load_dataset)

    @property
    def train_size(self) -> int:
        """Images in the training split (streamed or in memory)."""
        return len(self.streamed_train.labels) if self.streamed_train is not None else len(self.train)

    def summary(self) -> str:
        """One line per split with its size and per-class counts."""
        h, w = self.train.images.shape[-2:]
        lines = [f"{self.name}: {self.num_classes} classes {self.class_names}, {h}x{w} px, "
                 f"mean {self.mean:.4f} std {self.std:.4f}"]
        for part in ("train", "val", "test"):
            split = self.streamed_train if part == "train" and self.streamed_train else getattr(self, part)
            counts = torch.bincount(split.labels.cpu(), minlength=self.num_classes).tolist()
            lines.append(f"  {part}: {len(split.labels)} images{' (streamed)' if split is self.streamed_train else ''}, "
                         f"per class {counts}")
        if self.unmasked is not None:
            lines.append(f"  images without a mask (no spurious pixels), per folder split: {self.unmasked}")
        return "\n".join(lines)


def stratified_take(labels: torch.Tensor, n_take: int, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (sorted) of a random class-stratified subset of size n_take, and of the rest.

    Each class contributes n_take * count / N images, rounded by largest remainder."""
    labels = labels.cpu()
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * n_take / len(labels)
    take = quota.floor().long()
    extra = int(n_take - take.sum())
    take[torch.argsort(take - quota, stable=True)[:extra]] += 1
    taken = [torch.zeros(0, dtype=torch.long)]
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = (labels == c).nonzero().flatten()
        taken.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    taken = torch.cat(taken).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[taken] = False
    return taken, keep.nonzero().flatten()


def clean_split(split: Split, fraction: float, *, seed: int = 0) -> tuple[Split, Split]:
    """(a class-stratified held-out split of round(fraction * N) images, the rest): the small clean data
    set a teacher is pre-trained on (section 4.2 and 5.4: 10% or 1% of the data)."""
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
    n = round(fraction * len(split))
    if not 0 < n < len(split):
        raise ValueError(f"fraction {fraction} of {len(split)} images leaves an empty part ({n} held out)")
    held, rest = stratified_take(split.labels, n, torch.Generator().manual_seed(seed))
    return split.subset(held), split.subset(rest)


def _resize(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 (N, 1, H, W) images to size x size, in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
           .round_().clamp_(0, 255).to(torch.uint8) for c in images.split(chunk)]
    return torch.cat(out) if out else images.new_zeros(0, 1, size, size)


def _pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of images / 255."""
    total = total_sq = 0.0
    for c in images.flatten().split(1 << 22):
        c = c.double() / 255
        total += float(c.sum())
        total_sq += float((c * c).sum())
    n = images.numel()
    mean = total / n
    return mean, max(total_sq / n - mean * mean, 0.0) ** 0.5


def _as_split(images: np.ndarray, labels: np.ndarray, source: str, num_classes: int) -> Split:
    """A Split from (N, H, W) uint8 images and (N,) or (N, 1) integer labels, checked."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{source}: images must be uint8 of shape (N, H, W), got {images.dtype} {images.shape}")
    labels = np.asarray(labels).reshape(len(labels), -1)
    if labels.shape != (len(images), 1) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{source}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return Split(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),
                 torch.from_numpy(labels[:, 0].astype(np.int64)))


def _error_reason(error: Exception) -> str:
    """An exception as "Type: first line" (cut short), for one-line messages about unreadable files."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:100]}" if text else type(error).__name__


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the npz file ``path``; a truncated, foreign or incomplete file is a ValueError
    naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            files = sorted(data.files)
            arrays = {k: data[k] for k in keys if k in files}
    # TypeError: an .npy file (np.load returns an array, which is no context manager)
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"cannot read {path} as an npz file ({_error_reason(e)}): it is truncated or not an "
                         "npz archive; replace it with a complete copy") from e
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"{path} lacks arrays {missing}; it holds {files}")
    return arrays


def write_saved(path: Path, state: dict) -> None:
    """``torch.save`` of ``state`` to ``path`` atomically (a temporary file, then a rename), creating its
    folder: a run killed while writing leaves the previous file whole. :func:`read_saved` reads it back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_saved(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """The dict ``torch.save`` wrote to ``path``, loaded onto the CPU with weights only. A file that is
    unreadable, truncated, foreign, not a dict or without one of ``keys`` is a ValueError "cannot read PATH
    (...)"."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # on foreign bytes: RuntimeError, UnpicklingError, EOFError, KeyError, IndexError, ...
        raise ValueError(f"cannot read {path} ({_error_reason(e)})") from e
    if not isinstance(saved, dict):
        raise ValueError(f"cannot read {path} (it holds a {type(saved).__name__}, not a dict)")
    missing = [k for k in keys if k not in saved]
    if missing:
        raise ValueError(f"cannot read {path} (it lacks the entries {missing})")
    return saved


# --- digits ---------------------------------------------------------------------------------------------

def _load_digits() -> tuple[Split, Split]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("dataset 'digits' needs scikit-learn (pip install scikit-learn, or the "
                          "tap_fast[digits] extra)") from e
    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    full = _as_split(images, bunch.target, "sklearn load_digits", 10)
    full = Split(_resize(full.images, 28), full.labels)
    test, train = stratified_take(full.labels, round(0.2 * len(full)), torch.Generator().manual_seed(0))
    return full.subset(train), full.subset(test)


# --- MNIST ----------------------------------------------------------------------------------------------

_MNIST_IDX = {"x_train": ("train-images", "idx3"), "y_train": ("train-labels", "idx1"),
              "x_test": ("t10k-images", "idx3"), "y_test": ("t10k-labels", "idx1")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file of unsigned bytes (LeCun's MNIST format; gzip-compressed if it ends in .gz)."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()!r}, "
                         "expected 000008xx)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    payload = data[4 + 4 * ndim:]
    if len(payload) != int(np.prod(dims)):
        raise ValueError(f"{path}: header says shape {dims} ({int(np.prod(dims))} bytes) but it holds "
                         f"{len(payload)} bytes of data")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims).copy()


def _find_idx(folder: Path, stem: str, kind: str) -> Path | None:
    for sep in ("-", "."):
        for gz in ("", ".gz"):
            path = folder / f"{stem}{sep}{kind}-ubyte{gz}"
            if path.is_file():
                return path
    return None


def _mnist_splits(arrays: dict[str, np.ndarray], source: str) -> tuple[Split, Split]:
    return (_as_split(arrays["x_train"], arrays["y_train"], f"{source} (train)", 10),
            _as_split(arrays["x_test"], arrays["y_test"], f"{source} (test)", 10))


def _load_mnist(root: Path) -> tuple[Split, Split]:
    if root.is_file():
        return _mnist_splits(_load_npz(root, tuple(_MNIST_IDX)), str(root))
    folders = [root, root / "MNIST" / "raw"]
    for folder in folders:
        if (folder / "mnist.npz").is_file():
            return _mnist_splits(_load_npz(folder / "mnist.npz", tuple(_MNIST_IDX)), str(folder / "mnist.npz"))
        paths = {k: _find_idx(folder, *v) for k, v in _MNIST_IDX.items()}
        if all(paths.values()):
            return _mnist_splits({k: read_idx(p) for k, p in paths.items()}, f"IDX files in {folder}")
        if any(paths.values()):
            missing = ["-".join(_MNIST_IDX[k]) + "-ubyte" for k, p in paths.items() if p is None]
            raise FileNotFoundError(f"mnist: {folder} holds only some of the IDX files; missing {missing}")
    raise FileNotFoundError(
        f"mnist: no data in {root}: expected mnist.npz (x_train, y_train, x_test, y_test) or the IDX files "
        f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
        f"(optionally .gz) in {' or '.join(str(f) for f in folders)}. tap_fast never downloads data: copy "
        "the files there first")


# --- PneumoniaMNIST -------------------------------------------------------------------------------------

def _load_pneumoniamnist(root: Path) -> tuple[Split, Split, Split]:
    path = root if root.is_file() else root / "pneumoniamnist.npz"
    if not path.is_file():
        raise FileNotFoundError(f"pneumoniamnist: expected the MedMNIST file {path} (train_images, "
                                "train_labels, val_*, test_*); tap_fast never downloads data")
    keys = tuple(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))
    arrays = _load_npz(path, keys)
    return tuple(_as_split(arrays[f"{s}_images"], arrays[f"{s}_labels"], f"{path} ({s})", 2)
                 for s in ("train", "val", "test"))


# --- image folders (pneu, knee) -------------------------------------------------------------------------

def _layout(name: str) -> str:
    classes = ",".join(_SPECS[name].class_names)
    merge = "".join(f" (an optional {a}/ is merged into {b}/)" for a, b in _FOLDER_MERGE[name].items())
    return f"{{{','.join(_FOLDER_SPLITS[name])}}}/{{{classes}}}/*{{{','.join(IMAGE_SUFFIXES)}}}{merge}"


def list_folder(name: str, root: Path) -> dict[str, list[tuple[Path, int]]]:
    """(path, label) per split of an image-folder data set; any deviation from the layout raises."""
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: data_dir {root} is not a directory; expected the layout {_layout(name)}")
    found = [p.name for p in visible_entries(root)]
    splits = {s: s for s in _FOLDER_SPLITS[name]}
    splits.update({a: b for a, b in _FOLDER_MERGE[name].items() if (root / a).is_dir()})
    missing = [s for s in _FOLDER_SPLITS[name] if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{name}: {root} lacks the split folders {missing}; expected the layout "
                                f"{_layout(name)}, found {found}")
    classes = _SPECS[name].class_names
    out: dict[str, list[tuple[Path, int]]] = {s: [] for s in _FOLDER_SPLITS[name]}
    for folder_name, split in splits.items():
        folder = root / folder_name
        entries = [p.name for p in visible_entries(folder)]
        if sorted(entries) != sorted(classes):
            kind = FileNotFoundError if set(classes) - set(entries) else ValueError
            raise kind(f"{name}: {folder} must hold exactly the class folders {list(classes)} "
                       f"(layout {_layout(name)}), found {entries}")
        for label, cls in enumerate(classes):
            files = visible_entries(folder / cls)
            bad = [p.name for p in files if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES]
            if bad:
                raise ValueError(f"{name}: {folder / cls} holds entries that are not {IMAGE_SUFFIXES} images: "
                                 f"{bad[:5]}")
            if not files:
                raise ValueError(f"{name}: class folder {folder / cls} holds no images")
            out[split] += [(p, label) for p in files]
    return out


def folder_split(name: str, data_dir: str | os.PathLike, split: str, *, val_fraction: float = 0.1,
                 limit_train: int | None = None, seed: int = 0) -> tuple[list[Path], torch.Tensor]:
    """Files and labels of ``load_dataset(name, data_dir, ...)``'s split ``split`` ("train", "val" or
    "test"), in the same order, so that sample i of a feed over them is image i of the reference split."""
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


def _cache_path(name: str, root: Path, size: int, files: dict, cache_dir: Path) -> Path:
    listing = [[s, str(p.relative_to(root)), y, p.stat().st_size, p.stat().st_mtime_ns]
               for s, items in files.items() for p, y in items]
    digest = hashlib.sha256(json.dumps([name, str(root.resolve()), size, listing]).encode()).hexdigest()
    return cache_dir / f"{name}-{size}px-{digest[:16]}.pt"


def _load_folder(name: str, root: Path, size: int, cache_dir: str | os.PathLike | None) -> dict[str, Split]:
    files = list_folder(name, root)
    cache = _cache_path(name, root, size, files, Path(cache_dir)) if cache_dir is not None else None
    if cache is not None and cache.is_file():
        logger.info("%s: reading decoded images from cache %s", name, cache)
        try:
            saved = read_saved(cache, tuple(files))
            return {s: Split(saved[s]["images"], saved[s]["labels"]) for s in files}
        except ValueError as e:
            print(f"{name}: decoded-image cache unusable, {e}; decoding the images again to rebuild it",
                  file=sys.stderr)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        splits = {s: Split(torch.from_numpy(np.stack(list(pool.map(lambda p: read_image(p, size)[0],
                                                                     [p for p, _ in items])))).unsqueeze(1),
                           torch.tensor([y for _, y in items], dtype=torch.int64))
                  for s, items in files.items()}
    if cache is not None:
        write_saved(cache, {s: {"images": v.images, "labels": v.labels} for s, v in splits.items()})
    return splits


# --- the user's own folders ----------------------------------------------------------------------------

@dataclass
class FileSplit:
    """A training split left on disk for a streaming feed: its image files in the order the memory loader
    decodes them, their labels, and each file's mask file (or None) and boxes (users' folders)."""
    files: list[Path]
    labels: torch.Tensor
    masks: list[Path | None]
    boxes: list[list[tuple[int, int, int, int]]]


def user_folder_listing(root: Path, masks_dir=None, boxes=None) -> FolderListing:
    """The user's folder checked (layout, masks, boxes) before any image is decoded."""
    listing = list_user_folder(root)
    if len(listing.class_names) < 2:
        raise ValueError(f"--data-dir {root}: train/ must hold at least 2 class folders, got "
                         f"{list(listing.class_names)}")
    if masks_dir is not None:
        attach_masks(listing, masks_dir)
    if boxes is not None:
        attach_boxes(listing, boxes)
    return listing


def _load_user_dataset(root: Path, size: int, channels: int, masks_dir, boxes, soft: bool, *, val_fraction: float,
                       limit_train: int | None, seed: int, stream_train: bool) -> Dataset:
    """The user's folder as a Dataset. The val split (when val/ is absent) and ``limit_train`` are drawn from the
    file listing, as :func:`load_dataset` draws them for the other sets; mean and std come from a fixed
    stratified sample of at most ``STATS_SAMPLE`` training images. So the memory path (every split decoded)
    and ``stream_train`` (train left on disk as ``Dataset.streamed_train``, ``train`` holding that sample)
    normalise and train alike."""
    listing = user_folder_listing(root, masks_dir, boxes)
    generator = torch.Generator().manual_seed(seed)
    train = listing.splits["train"]
    labels = torch.tensor([y for _, y in train], dtype=torch.int64)
    if "val" not in listing.splits:
        held, rest = stratified_take(labels, round(val_fraction * len(train)), generator)
        if len(held) == 0:
            raise ValueError(f"--data-dir {root}: train/ holds {len(train)} images, too few to hold out "
                             f"{val_fraction:.0%} for validation; add a val/ folder")
        listing.splits["val"] = [train[i] for i in held]
        train, labels = [train[i] for i in rest], labels[rest]
    if limit_train is not None and limit_train < len(train):
        keep = stratified_take(labels, limit_train, generator)[0]
        train, labels = [train[i] for i in keep], labels[keep]
    listing.splits["train"] = train
    sample = stratified_take(labels, min(STATS_SAMPLE, len(train)), torch.Generator().manual_seed(0))[0]

    def decoded(split: str) -> Split:
        images, ys, masks = decode_split(listing, split, size, channels, soft=soft)
        return Split(torch.from_numpy(images), torch.from_numpy(ys), torch.from_numpy(masks))

    streamed = None
    if stream_train:
        streamed = FileSplit([p for p, _ in train], labels, [listing.masks.get(p) for p, _ in train],
                             [listing.boxes.get(p, []) for p, _ in train])
        listing.splits["sample"] = [train[i] for i in sample]
        train_split = decoded("sample")
        stats = train_split.images
    else:
        train_split = decoded("train")
        stats = train_split.images[sample]
    mean, std = _pixel_stats(stats)
    unmasked = ({s: listing.unmasked(s) for s in ("train", "val", "test")} if masks_dir or boxes else None)
    return Dataset("folder", train_split, decoded("val"), decoded("test"), len(listing.class_names), mean, std,
                   "accuracy", None, listing.class_names, unmasked, streamed)


def _streamed_folder_dataset(name: str, root: Path, size: int, *, val_fraction: float, limit_train: int | None,
                             seed: int) -> Dataset:
    """PNEU / KNEE with the training split left on disk (``streamed_train``; ``train`` holds no images): the
    files :func:`folder_split` lists, val and test decoded as the memory path decodes them."""
    spec = _SPECS[name]
    parts = {s: folder_split(name, root, s, val_fraction=val_fraction, limit_train=limit_train, seed=seed)
             for s in ("train", "val", "test")}

    def decoded(split: str) -> Split:
        files, labels = parts[split]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = list(pool.map(lambda p: read_image(p, size)[0], files))
        return Split(torch.from_numpy(np.stack(images)).unsqueeze(1), labels)

    files, labels = parts["train"]
    empty = Split(torch.zeros(0, 1, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    dataset = Dataset(name, empty, decoded("val"), decoded("test"), spec.num_classes, *spec.mean_std, spec.metric,
                      spec.contamination, spec.class_names, None, FileSplit(files, labels, None, None))
    logger.info("%s", dataset.summary())
    return dataset


# --- entry point ----------------------------------------------------------------------------------------

def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, image_size: int | None = None,
                 limit_train: int | None = None, val_fraction: float = 0.1, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None, channels: int = 1,
                 masks_dir: str | os.PathLike | None = None, boxes: str | os.PathLike | None = None,
                 soft_masks: bool = False, stream_train: bool = False) -> Dataset:
    """Load data set ``name`` (one of DATASETS) from ``data_dir`` (not needed for "digits").

    image_size: side of the returned square images; default 28 for digits and mnist, the file's for
        pneumoniamnist, 224 for pneu and knee. Resizing is bilinear and antialiased.
    limit_train: keep at most this many training images (stratified, after the val split).
    val_fraction: share of train held out for validation; unused for pneumoniamnist and knee, which have
        published val splits.
    seed: seeds the val split and ``limit_train``.
    cache_dir: pneu and knee only: keep decoded tensors there, keyed by the file listing and image_size.
    channels, masks_dir, boxes, soft_masks: "folder" only (the user's own ``DIR/{train,val,test}/<class>/``,
        see :mod:`tap_fast.folder_dataset`): 1 (greyscale) or 3 (RGB) channels, and the spurious pixels from a
        mask folder or a box CSV (at most one of them), kept soft with ``soft_masks``. The data set has no
        contamination of its own and metric "accuracy".
    stream_train: "folder" only: leave the training split on disk for a streaming feed
        (``Dataset.streamed_train``; ``train`` then holds the decoded sample its mean and std come from).
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)
                                   or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    if limit_train is not None and (not isinstance(limit_train, int) or isinstance(limit_train, bool)
                                    or limit_train < 1):
        raise ValueError(f"limit_train must be a positive int or None, got {limit_train!r}")
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
    if name != "digits" and data_dir is None:
        raise ValueError(f"data_dir is required for dataset {name!r} (only 'digits' is embedded)")
    if channels not in (1, 3) or (channels == 3 and name != "folder"):
        raise ValueError(f"channels must be 1, or 3 for dataset 'folder', got {channels!r} for {name!r}")
    if name != "folder" and (masks_dir is not None or boxes is not None):
        raise ValueError(f"masks_dir and boxes apply to dataset 'folder' only, got dataset {name!r}")
    if masks_dir is not None and boxes is not None:
        raise ValueError("give masks_dir or boxes, not both")
    if stream_train and name not in ("folder", *FOLDER_DATASETS):
        raise ValueError(f"streaming the training split (--feed dali|torchvision) is for image folders "
                         f"({('folder', *FOLDER_DATASETS)}); {name!r} loads into memory (--feed memory or auto)")
    spec = _SPECS.get(name)
    if stream_train and name in FOLDER_DATASETS:
        return _streamed_folder_dataset(name, Path(data_dir), image_size or 224, val_fraction=val_fraction,
                                        limit_train=limit_train, seed=seed)
    root = Path(data_dir) if data_dir is not None else None
    val = None
    if name == "digits":
        train, test = _load_digits()
    elif name == "mnist":
        train, test = _load_mnist(root)
    elif name == "pneumoniamnist":
        train, val, test = _load_pneumoniamnist(root)
    elif name == "folder":
        dataset = _load_user_dataset(root, image_size or 224, channels, masks_dir, boxes, soft_masks,
                                     val_fraction=val_fraction, limit_train=limit_train, seed=seed,
                                     stream_train=stream_train)
        logger.info("%s", dataset.summary())
        return dataset
    else:
        splits = _load_folder(name, root, image_size or 224, cache_dir)
        train, val, test = splits["train"], splits.get("val"), splits["test"]
    if image_size is not None:
        train, test = (Split(_resize(s.images, image_size), s.labels) for s in (train, test))
        val = Split(_resize(val.images, image_size), val.labels) if val is not None else None
    generator = torch.Generator().manual_seed(seed)
    if val is None:
        held, rest = stratified_take(train.labels, round(val_fraction * len(train)), generator)
        train, val = train.subset(rest), train.subset(held)
    mean, std = spec.mean_std or _pixel_stats(train.images)
    if limit_train is not None and limit_train < len(train):
        train = train.subset(stratified_take(train.labels, limit_train, generator)[0])
    dataset = Dataset(name, train, val, test, spec.num_classes, mean, std, spec.metric, spec.contamination,
                      spec.class_names)
    logger.info("%s", dataset.summary())
    return dataset
