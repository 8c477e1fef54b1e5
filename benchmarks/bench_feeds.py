"""Images/s of the data feeds: the GPU-resident in-memory feed (tap_fast.feeds.DeviceFeed) and the image-folder
feed (tap_fast.dali_feed.FolderFeed, DALI and torchvision backends), against the reference Pillow loader.

    python -m pytest benchmarks/bench_feeds.py                       # pytest-benchmark, small sets
    python benchmarks/bench_feeds.py --out $OUT/feeds_table.md        # markdown table (GPU when present)

Each feed is timed end to end over whole epochs after one warm-up epoch: index gather, decode, crop-resize,
contamination, masks and normalisation, synchronised with the device. The folder sets are generated here:
a KNEE layout of 224x224 PNGs, a PNEU layout of chest-X-ray-sized greyscale JPEGs, and a users' folder of
odd-sized greyscale PNGs with mask PNGs, read both ways: decoded into memory once (``decode_split``, timed
on its own) and fed by a DeviceFeed, or streamed by a FolderFeed (the same batches).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tap_fast.dali_feed import FolderFeed, dali_available  # noqa: E402
from tap_fast.datasets import folder_split, load_dataset  # noqa: E402
from tap_fast.feeds import DeviceFeed  # noqa: E402
from tap_fast.folder_dataset import FolderListing, attach_masks, decode_split, list_user_folder  # noqa: E402

LAYOUTS = {  # name: (split folders, class folders, suffix, (min, max) side in px)
    "knee": (("train", "val", "test"), tuple("01234"), ".png", (224, 224)),
    "pneu": (("train", "test"), ("NORMAL", "PNEUMONIA"), ".jpeg", (900, 1400)),
}


def write_folder(root: Path, name: str, n_train: int, seed: int = 0) -> Path:
    """A ``name`` layout with about n_train training images (and one per class in the other splits)."""
    splits, classes, suffix, (lo, hi) = LAYOUTS[name]
    rng = np.random.default_rng(seed)
    for split in splits:
        per_class = max(1, n_train // len(classes)) if split == "train" else 1
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
                yy, xx = np.ogrid[0:h, 0:w]
                smooth = 120 + 80 * np.sin(xx / 37.0 + k) * np.cos(yy / 53.0)
                img = np.clip(smooth + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)
                options = {"quality": 90} if suffix == ".jpeg" else {}
                Image.fromarray(img).save(folder / f"{k:05d}{suffix}", **options)
    return root


USER_SIDES = (200, 320)  # users' folder: (min, max) side in px


def write_user_folder(root: Path, n_train: int, seed: int = 0) -> FolderListing:
    """A users' folder DIR/{train,test}/{a,b}/*.png of about n_train training images with a mask PNG (a
    rectangle) for every other image; returns its listing with the masks attached."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", 2)):
        for k in range(n):
            h, w = (int(v) for v in rng.integers(USER_SIDES[0], USER_SIDES[1] + 1, 2))
            rel = Path(split) / "ab"[k % 2] / f"{k:05d}.png"
            for folder in ("data", "masks") if k % 2 else ("data",):
                (root / folder / rel).parent.mkdir(parents=True, exist_ok=True)
            yy, xx = np.ogrid[0:h, 0:w]
            img = np.clip(120 + 80 * np.sin(xx / 23.0 + k) * np.cos(yy / 31.0) + rng.normal(0, 12, (h, w)), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(root / "data" / rel)
            if k % 2:
                mask = np.zeros((h, w), dtype=np.uint8)
                mask[h // 5: h // 2, w // 4: w // 2] = 255
                Image.fromarray(mask).save(root / "masks" / rel)
    listing = list_user_folder(root / "data")
    attach_masks(listing, root / "masks")
    return listing


def user_feed(listing: FolderListing, backend: str, batch: int, device: torch.device, threads: int):
    """The training split of a users' folder with its masks and a stripe contamination: "memory" decodes it
    once into a DeviceFeed, "dali" or "torchvision" streams it through a FolderFeed."""
    files = [p for p, _ in listing.splits["train"]]
    labels = torch.tensor([y for _, y in listing.splits["train"]])
    kw = {"kind": "stripe", "num_classes": 2, "batch_size": batch, "mean": 0.5, "std": 0.25}
    if backend == "memory":
        images, _, masks = decode_split(listing, "train", 224, 1, threads=threads)
        return DeviceFeed(torch.from_numpy(images), labels, masks=torch.from_numpy(masks), device=device, **kw)
    return FolderFeed(files, labels, masks=[listing.masks.get(p) for p in files], backend=backend,
                      device_id=(device.index or 0) if device.type == "cuda" else None, num_threads=threads, **kw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_epoch(feed) -> int:
    """Read one epoch; return the number of images."""
    n = 0
    for x, y, mask in feed:
        n += x.shape[0]
    return n


def images_per_s(feed, device: torch.device, epochs: int) -> float:
    run_epoch(feed)  # warm-up: caches, DALI's first batches, CUDA context
    sync(device)
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        n += run_epoch(feed)
    sync(device)
    return n / (time.perf_counter() - start)


def device_feed(n: int, size: int, kind: str, num_classes: int, batch: int, device: torch.device) -> DeviceFeed:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return DeviceFeed(images, labels, kind=kind, num_classes=num_classes, batch_size=batch, mean=0.5, std=0.25,
                      device=device)


def folder_feed(root: Path, name: str, backend: str, batch: int, device: torch.device, threads: int) -> FolderFeed:
    files, labels = folder_split(name, root, "train")
    num_classes = len(LAYOUTS[name][1])
    device_id = (device.index or 0) if device.type == "cuda" else None
    return FolderFeed(files, labels, kind="tag", num_classes=num_classes, batch_size=batch, mean=0.5, std=0.25,
                      device_id=device_id, backend=backend, num_threads=threads)


def folder_backends() -> list[str]:
    return (["dali"] if dali_available() else []) + ["torchvision"]


# --- pytest-benchmark (small sets; CPU here, the GPU when there is one) -----------------------------------

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    n = 64 if DEVICE.type == "cuda" else 16
    return {name: write_folder(tmp_path_factory.mktemp(name), name, n) for name in LAYOUTS}


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    return write_user_folder(tmp_path_factory.mktemp("user"), 64 if DEVICE.type == "cuda" else 16)


def time_epochs(benchmark, feed) -> int:
    """pytest-benchmark of whole epochs of ``feed`` after one warm-up epoch; returns the images of one."""
    run_epoch(feed)

    def epoch():
        images = run_epoch(feed)
        sync(DEVICE)
        return images

    return benchmark(epoch)


@pytest.mark.parametrize("n,size,kind,classes,batch", [(8192, 28, "decoy", 10, 256), (512, 224, "tag", 2, 32)],
                         ids=["mnist28", "xray224"])
def test_device_feed(benchmark, n, size, kind, classes, batch):
    assert time_epochs(benchmark, device_feed(n, size, kind, classes, batch, DEVICE)) == n // batch * batch


@pytest.mark.parametrize("backend", folder_backends())
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_folder_feed(benchmark, folders, name, backend):
    feed = folder_feed(folders[name], name, backend, 4, DEVICE, threads=2)
    assert time_epochs(benchmark, feed) == len(feed) * 4


@pytest.mark.parametrize("backend", ["memory", *folder_backends()])
def test_user_folder_feed(benchmark, user_folder, backend):
    """One users' folder with masks, held in memory (DeviceFeed) or streamed (FolderFeed)."""
    feed = user_feed(user_folder, backend, 4, DEVICE, threads=2)
    assert time_epochs(benchmark, feed) == len(feed) * 4


# --- markdown table ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, help="training images per folder set (default 256 on a GPU, "
                                                    "48 on the CPU)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    return parser


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n_folder = args.images or (256 if gpu else 48)
    rows = []

    def add(feed_name, data, backend, batch, rate):
        rows.append(f"| {feed_name} | {data} | {backend} | {batch} | {rate:,.0f} |")
        print(rows[-1], flush=True)

    print(f"device {device} ({torch.cuda.get_device_name(device) if gpu else 'CPU'}), torch {torch.__version__}, "
          f"DALI {'yes' if dali_available() else 'no'}", flush=True)
    for n, size, kind, classes, batch in [(60000 if gpu else 8192, 28, "decoy", 10, 512),
                                          (4096 if gpu else 256, 224, "tag", 2, 64)]:
        feed = device_feed(n, size, kind, classes, batch, device)
        add("DeviceFeed", f"{n} x {size}x{size} uint8, {kind}", "in memory", batch,
            images_per_s(feed, device, args.epochs))
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(LAYOUTS):
            root = write_folder(Path(tmp) / name, name, n_folder)
            lo, hi = LAYOUTS[name][3]
            data = f"{name}: {n_folder} {LAYOUTS[name][2][1:].upper()} {lo}-{hi} px, tag"
            batch = 32 if n_folder >= 128 else 4
            for backend in folder_backends():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29's decoders
                    feed = folder_feed(root, name, backend, batch, device, args.threads)
                    add("FolderFeed", data, backend, batch, images_per_s(feed, device, args.epochs))
            start = time.perf_counter()
            ds = load_dataset(name, root)
            n = len(ds.train) + len(ds.val) + len(ds.test)
            add("load_dataset (reference)", data, "Pillow, CPU threads", "-", n / (time.perf_counter() - start))
        listing = write_user_folder(Path(tmp) / "user", n_folder)
        data = f"users' folder: {n_folder} PNG {USER_SIDES[0]}-{USER_SIDES[1]} px, half masked, stripe"
        batch = 32 if n_folder >= 128 else 4
        start = time.perf_counter()
        decode_split(listing, "train", 224, 1, threads=args.threads)
        add("decode_split (into memory)", data, "Pillow, CPU threads", "-",
            len(listing.splits["train"]) / (time.perf_counter() - start))
        for backend in ["memory", *folder_backends()]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                feed = user_feed(listing, backend, batch, device, args.threads)
                add("DeviceFeed" if backend == "memory" else "FolderFeed", data,
                    "in memory" if backend == "memory" else backend, batch, images_per_s(feed, device, args.epochs))
    header = (f"### Data feeds, images/s ({device}"
              f"{', ' + torch.cuda.get_device_name(device) if gpu else ''}, torch {torch.__version__})\n\n"
              "| feed | data | backend | batch | images/s |\n|---|---|---|---|---|")
    table = "\n".join([header, *rows]) + "\n"
    if args.out is not None:
        args.out.write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
