"""Users' own data: an image folder ``DIR/{train,val,test}/<class>/<image>`` and the masks of its spurious
pixels, from a mask folder (one PNG per image, nonzero = spurious) or a CSV of boxes.

Images are decoded as the paper's folder sets are (:mod:`tap_fast.datasets`): greyscale or RGB, centre square
crop, bilinear antialiased resize (Pillow). Each mask takes its image's crop and resize; a binary mask is then
1 wherever any spurious source pixel contributes to the output pixel (so no spurious pixel is lost to the
resize), a soft mask (``soft_masks``) keeps its grey level / 255. An image without a mask has no spurious
pixels. Everything is checked before any image is decoded: each bad input is one ValueError naming its file.
"""
from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
BOX_COLUMNS = ("path", "x0", "y0", "x1", "y1")
Box = tuple[int, int, int, int]


@dataclass
class FolderListing:
    """The checked listing of a user folder: class names (sorted) and (image, label) per split, with each
    image's mask file or boxes (``masks`` / ``boxes`` keyed by the image path; absent = no spurious pixels)."""
    root: Path
    class_names: tuple[str, ...]
    splits: dict[str, list[tuple[Path, int]]]
    masks: dict[Path, Path] = field(default_factory=dict)
    boxes: dict[Path, list[Box]] = field(default_factory=dict)

    def images(self) -> list[Path]:
        return [p for items in self.splits.values() for p, _ in items]

    def unmasked(self, split: str) -> int:
        """How many images of ``split`` have neither a mask file nor a box."""
        return sum(p not in self.masks and p not in self.boxes for p, _ in self.splits[split])


def visible_entries(folder: Path) -> list[Path]:
    """A folder's entries, sorted, without hidden ones (names starting with a dot)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def list_user_folder(data_dir: str | os.PathLike) -> FolderListing:
    """Check and list ``data_dir``: train/ and test/ required, val/ optional, each holding one folder per
    class (any names; every split's classes must be train's) with PNG or JPEG images."""
    root = Path(data_dir)
    layout = "DIR/{train,val,test}/<class>/<image>.{png,jpg,jpeg} (val/ optional)"
    if not root.is_dir():
        raise ValueError(f"--data-dir {root} is not a directory; expected {layout}")
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise ValueError(f"--data-dir {root} lacks the split folders {missing}; expected {layout}")
    splits: dict[str, list[tuple[Path, int]]] = {}
    class_names: tuple[str, ...] = ()
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        classes = [p for p in visible_entries(folder) if p.is_dir()]
        if not classes:
            raise ValueError(f"split folder {folder} holds no class folders; expected {layout}")
        if split == "train":
            class_names = tuple(p.name for p in classes)
        unknown = [p.name for p in classes if p.name not in class_names]
        if unknown:
            raise ValueError(f"split folder {folder} has classes {unknown} that train/ lacks "
                             f"(train/ has {list(class_names)})")
        items = []
        for cls in classes:
            files = visible_entries(cls)
            bad = [p.name for p in files if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES]
            if bad:
                raise ValueError(f"class folder {cls} holds entries that are not {IMAGE_SUFFIXES} images: {bad[:5]}")
            if not files:
                raise ValueError(f"class folder {cls} holds no images")
            items += [(p, class_names.index(cls.name)) for p in files]
        splits[split] = items
    return FolderListing(root, class_names, splits)


def attach_masks(listing: FolderListing, masks_dir: str | os.PathLike) -> None:
    """Pair each image with ``masks_dir``/<its path relative to the data dir, suffix .png> when that exists;
    a mask file naming no image is an error."""
    mroot = Path(masks_dir)
    if not mroot.is_dir():
        raise ValueError(f"--masks-dir {mroot} is not a directory")
    by_mask = {(mroot / p.relative_to(listing.root)).with_suffix(".png"): p for p in listing.images()}
    found = [p for p in mroot.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                      p.relative_to(mroot).parts)]
    orphans = [str(p) for p in found if p not in by_mask]
    if orphans:
        raise ValueError(f"--masks-dir {mroot}: mask files that name no image of --data-dir {listing.root} "
                         f"(a mask is <split>/<class>/<image stem>.png): {orphans[:3]}")
    listing.masks = {img: m for m, img in by_mask.items() if m.is_file()}


def read_size(path: Path) -> tuple[int, int]:
    """An image's (width, height) from its header (ValueError naming the file when it cannot be read)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def attach_boxes(listing: FolderListing, boxes_csv: str | os.PathLike) -> None:
    """Read ``boxes_csv`` (columns path,x0,y0,x1,y1; path relative to the data dir; pixels of the original
    image, x0 <= x < x1 and y0 <= y < y1; any number of rows per image) and check every box lies in its image."""
    path = Path(boxes_csv)
    images = {str(p.relative_to(listing.root).as_posix()): p for p in listing.images()}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"--boxes {path}: cannot read it as a CSV file: {e}") from e
    if not rows or tuple(c.strip() for c in rows[0]) != BOX_COLUMNS:
        raise ValueError(f"--boxes {path}: the first line must be the header {','.join(BOX_COLUMNS)}, got "
                         f"{','.join(rows[0]) if rows else 'an empty file'}")
    boxes: dict[Path, list[Box]] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        where = f"--boxes {path} line {line}"
        if len(row) != len(BOX_COLUMNS):
            raise ValueError(f"{where}: expected {len(BOX_COLUMNS)} columns {BOX_COLUMNS}, got {row}")
        name = row[0].strip()
        if name not in images:
            raise ValueError(f"{where}: {name!r} names no image of --data-dir {listing.root} (paths are relative "
                             "to it, e.g. train/<class>/<image>)")
        try:
            x0, y0, x1, y1 = (int(c) for c in row[1:])
        except ValueError:
            raise ValueError(f"{where}: x0,y0,x1,y1 must be integers (pixels), got {row[1:]}") from None
        image = images[name]
        w, h = sizes.setdefault(image, read_size(image))
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"{where}: box ({x0},{y0})-({x1},{y1}) is not inside {name} ({w}x{h} px); expected "
                             f"0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
        boxes.setdefault(image, []).append((x0, y0, x1, y1))
    listing.boxes = boxes


def _crop_resize(img, size: int):
    """Pillow image -> its centre square, resized (bilinear, antialiased) to size x size."""
    from PIL import Image
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)


def read_image(path: Path, size: int, channels: int = 1) -> tuple[np.ndarray, tuple[int, int]]:
    """An 8-bit image file as uint8 pixels, greyscale (size, size) or RGB (size, size, 3), centre-cropped to
    a square and resized (bilinear, antialiased); and its original (width, height). ValueError naming the
    file when it cannot be read or is 16-bit or float."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(f"mode {img.mode!r} (16-bit or float) is not supported; convert to 8-bit")
            full = img.size
            return np.asarray(_crop_resize(img.convert("L" if channels == 1 else "RGB"), size), dtype=np.uint8), full
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def decode_pair(path: Path, size: int, channels: int, *, mask_file: Path | None = None,
                boxes: list[Box] = (), soft: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An image (channels, size, size) uint8 and its mask (1, size, size): uint8 0/1, or float32 in [0, 1]
    with ``soft``. The mask comes from ``mask_file`` (same size as the image; binary unless ``soft``) or
    ``boxes``; neither gives an all-zero mask."""
    from PIL import Image
    pixels, full = read_image(path, size, channels)
    image = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy()
    source = mask_pixels(full, mask_file, boxes, soft)
    if not source.any():
        return image, np.zeros((1, size, size), dtype=np.float32 if soft else np.uint8)
    resized = np.asarray(_crop_resize(Image.fromarray(source, mode="L"), size))
    if soft:
        return image, (resized.astype(np.float32) / 255)[None]
    return image, (resized > 0).astype(np.uint8)[None]


def mask_pixels(image_size: tuple[int, int], mask_file: Path | None = None, boxes: list[Box] = (),
                soft: bool = False) -> np.ndarray:
    """The spurious pixels of an image of ``image_size`` (width, height) before its crop and resize, (height,
    width) uint8: its mask file's 0/255 (grey levels with ``soft``), with ``boxes`` set to 255."""
    w, h = image_size
    source = np.zeros((h, w), dtype=np.uint8) if mask_file is None else _read_mask(mask_file, image_size, soft)
    for x0, y0, x1, y1 in boxes:
        source[y0:y1, x0:x1] = 255
    return source


def _read_mask(mask_file: Path, image_size: tuple[int, int], soft: bool) -> np.ndarray:
    """A mask PNG as uint8 grey levels: nonzero = spurious (binary masks become 0/255)."""
    from PIL import Image
    try:
        with Image.open(mask_file) as m:
            if m.size != image_size:
                raise ValueError(f"its size {m.size[0]}x{m.size[1]} differs from its image's "
                                 f"{image_size[0]}x{image_size[1]}")
            grey = np.array(m.convert("L"), dtype=np.uint8)  # writable: boxes are drawn into it
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"mask {mask_file}: {e}") from e
    if soft:
        return grey
    levels = np.unique(grey)
    if len(levels) > 2 or (len(levels) == 2 and levels[0] != 0):
        raise ValueError(f"mask {mask_file} is not binary (grey levels {levels[:6].tolist()}...; expected 0 and "
                         "one nonzero level, nonzero = spurious); pass --soft-masks to use grey levels as weights")
    return np.where(grey > 0, 255, 0).astype(np.uint8)


def decode_split(listing: FolderListing, split: str, size: int, channels: int, *, soft: bool = False,
                 threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, channels, size, size) uint8, labels (N,) int64 and masks (N, 1, size, size) of ``split``."""
    items = listing.splits[split]

    def one(item):
        p, _ = item
        return decode_pair(p, size, channels, mask_file=listing.masks.get(p), boxes=listing.boxes.get(p, []),
                           soft=soft)

    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        pairs = list(pool.map(one, items))
    return (np.stack([im for im, _ in pairs]), np.array([y for _, y in items], dtype=np.int64),
            np.stack([m for _, m in pairs]))
