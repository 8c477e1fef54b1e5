"""Data set loaders (section 5.1): embedded digits, MNIST (npz / IDX), PneumoniaMNIST and the two published
image-folder layouts, written here as small folders of generated images."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA
from PIL import Image

from tap_fast import datasets
from tap_fast.datasets import DATASETS, Split, clean_split, load_dataset, read_idx

MNIST_DIR = os.path.join(SHARED_DATA, "mnist")
PNEUMONIAMNIST_DIR = os.path.join(SHARED_DATA, "pneumoniamnist")
needs_mnist = pytest.mark.skipif(not os.path.isfile(os.path.join(MNIST_DIR, "mnist.npz")),
                                 reason=f"shared MNIST not found in {MNIST_DIR}")
needs_pneumoniamnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(PNEUMONIAMNIST_DIR, "pneumoniamnist.npz")),
    reason=f"shared PneumoniaMNIST not found in {PNEUMONIAMNIST_DIR}")


def _check_split(split, size):
    assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, size, size)
    assert split.labels.dtype == torch.int64 and split.labels.shape == (len(split.images),)


def class_counts(split, num_classes: int = 10) -> list[int]:
    return torch.bincount(split.labels, minlength=num_classes).tolist()


# --- digits ---------------------------------------------------------------------------------------------

def test_digits_is_embedded_with_a_fixed_stratified_test_split():
    ds = load_dataset("digits")
    other_seed = load_dataset("digits", seed=1, limit_train=100)
    assert (ds.num_classes, ds.metric, ds.contamination) == (10, "accuracy", "decoy")
    for split in (ds.train, ds.val, ds.test):
        _check_split(split, 28)
        assert min(class_counts(split)) > 0
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1294, 144, 359)  # 1797: 20% test, then 10% val
    assert int(ds.train.images.max()) == 255
    totals = np.add(np.add(class_counts(ds.train), class_counts(ds.val)), class_counts(ds.test))
    assert np.all(np.abs(np.array(class_counts(ds.test)) - 0.2 * totals) <= 1)  # stratified
    assert torch.equal(other_seed.test.images, ds.test.images)  # the test split does not move with seed
    assert not torch.equal(other_seed.val.images, ds.val.images)
    assert len(other_seed.train) == 100 and min(class_counts(other_seed.train)) >= 9
    x = ds.train.images.double() / 255
    assert ds.mean == pytest.approx(float(x.mean()), abs=1e-9)
    assert ds.std == pytest.approx(float(x.std(unbiased=False)), abs=1e-9)
    assert load_dataset("digits", image_size=32, limit_train=10).train.images.shape == (10, 1, 32, 32)


# --- MNIST ----------------------------------------------------------------------------------------------

@needs_mnist
def test_mnist_from_shared_npz():
    ds = load_dataset("mnist", MNIST_DIR, seed=0)
    for split in (ds.train, ds.val, ds.test):
        _check_split(split, 28)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54000, 6000, 10000)
    official = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.add(class_counts(ds.train), class_counts(ds.val)).tolist() == official
    assert ds.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    with np.load(os.path.join(MNIST_DIR, "mnist.npz")) as f:
        assert torch.equal(ds.test.images[:, 0], torch.from_numpy(f["x_test"]))
    assert (ds.mean, ds.std) == (0.1307, 0.3081)
    assert (ds.num_classes, ds.metric, ds.contamination) == (10, "accuracy", "decoy")


def _write_idx(path, array, gz):
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 8, array.ndim, *array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_mnist(seed=0, n_train=60, n_test=20):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "y_train": np.arange(n_train, dtype=np.uint8) % 10,
            "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "y_test": rng.integers(0, 10, n_test).astype(np.uint8)}


IDX_NAMES = {"x_train": "train-images{}idx3-ubyte", "y_train": "train-labels{}idx1-ubyte",
             "x_test": "t10k-images{}idx3-ubyte", "y_test": "t10k-labels{}idx1-ubyte"}


@pytest.mark.parametrize("gz, sep, subdir", [(False, "-", ""), (True, "-", ""), (True, ".", "MNIST/raw")])
def test_mnist_from_generated_idx_files(tmp_path, gz, sep, subdir):
    arrays = _fake_mnist()
    folder = tmp_path / subdir
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in IDX_NAMES.items():
        _write_idx(folder / (name.format(sep) + (".gz" if gz else "")), arrays[key], gz)
    ds = load_dataset("mnist", tmp_path, val_fraction=0.1, seed=3)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54, 6, 20)
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(arrays["x_test"]))
    assert torch.equal(ds.test.labels, torch.from_numpy(arrays["y_test"]).long())
    # train + val is a partition of the file's train rows, with each image keeping its label
    rows = {arrays["x_train"][i].tobytes(): int(arrays["y_train"][i]) for i in range(60)}
    both = [(x[0].numpy().tobytes(), int(y)) for s in (ds.train, ds.val) for x, y in zip(s.images, s.labels)]
    assert len({b for b, _ in both}) == 60 and all(rows[b] == y for b, y in both)
    assert class_counts(ds.val) == [1] * 6 + [0] * 4  # stratified; ties go to the lower classes
    small = load_dataset("mnist", tmp_path, image_size=14, limit_train=20)
    assert small.train.images.shape == (20, 1, 14, 14) and small.test.images.shape == (20, 1, 14, 14)


def test_mnist_without_files_fails_fast_with_the_expected_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist.npz") as err:
        load_dataset("mnist", tmp_path)
    assert str(tmp_path) in str(err.value) and "train-images-idx3-ubyte" in str(err.value)
    arrays = _fake_mnist()
    _write_idx(tmp_path / "train-images-idx3-ubyte", arrays["x_train"], False)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def test_idx_reader_rejects_corrupt_files(tmp_path):
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)  # float32 IDX: not supported
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(bad)
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + bytes(7))
    with pytest.raises(ValueError, match="holds 7 bytes"):
        read_idx(short)
    garbage = tmp_path / "g-idx1-ubyte.gz"
    garbage.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read IDX file"):
        read_idx(garbage)


def test_npz_with_wrong_keys_or_labels_is_rejected(tmp_path):
    arrays = _fake_mnist()
    np.savez(tmp_path / "mnist.npz", **{k: v for k, v in arrays.items() if k != "y_test"})
    with pytest.raises(ValueError, match=r"lacks arrays \['y_test'\]"):
        load_dataset("mnist", tmp_path)
    arrays["y_train"][3] = 10
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        load_dataset("mnist", tmp_path)


# --- PneumoniaMNIST -------------------------------------------------------------------------------------

@needs_pneumoniamnist
def test_pneumoniamnist_from_shared_npz():
    ds = load_dataset("pneumoniamnist", PNEUMONIAMNIST_DIR, val_fraction=0.5)  # own val split: unused
    assert [len(ds.train), len(ds.val), len(ds.test)] == [4708, 524, 624]
    assert class_counts(ds.train, 2) == [1214, 3494] and class_counts(ds.val, 2) == [135, 389]
    assert class_counts(ds.test, 2) == [234, 390]
    with np.load(os.path.join(PNEUMONIAMNIST_DIR, "pneumoniamnist.npz")) as f:
        assert torch.equal(ds.val.images[:, 0], torch.from_numpy(f["val_images"]))
        assert torch.equal(ds.test.labels, torch.from_numpy(f["test_labels"][:, 0].astype(np.int64)))
    assert ds.mean == pytest.approx(0.5719, abs=1e-4) and ds.std == pytest.approx(0.1684, abs=1e-4)
    assert (ds.num_classes, ds.metric, ds.contamination) == (2, "f1", "tag")
    big = load_dataset("pneumoniamnist", os.path.join(PNEUMONIAMNIST_DIR, "pneumoniamnist.npz"),
                       image_size=64, limit_train=200)
    for split in (big.train, big.val, big.test):
        _check_split(split, 64)
    assert len(big.train) == 200 and class_counts(big.train, 2) == [52, 148]  # stratified: 1214/4708 -> 52


def test_pneumoniamnist_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pneumoniamnist.npz"):
        load_dataset("pneumoniamnist", tmp_path)


# --- image folders --------------------------------------------------------------------------------------

SIZES = [(40, 30), (30, 52), (64, 64), (33, 47), (80, 45)]  # (width, height): landscape, portrait, square


def _image(value, width, height, rgb):
    """A centre square of ``value`` framed (outside the centre crop) by 255 - value."""
    arr = np.full((height, width), 255 - value, dtype=np.uint8)
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    arr[top:top + side, left:left + side] = value
    return Image.fromarray(np.stack([arr] * 3, -1) if rgb else arr)


def _write_folder(root, splits, classes, suffixes=(".jpeg", ".png", ".jpg")):
    """Write a few images per split/class; return {split: [(value, label), ...]} in file order."""
    written, i = {}, 0
    for split, per_class in splits.items():
        written[split] = []
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for j in range(per_class):
                value = 20 + (37 * i) % 200
                width, height = SIZES[i % len(SIZES)]
                suffix = suffixes[i % len(suffixes)]
                _image(value, width, height, rgb=i % 3 == 0).save(root / split / cls / f"img{j:03d}{suffix}",
                                                                  **({"quality": 95} if suffix != ".png" else {}))
                written[split].append((value, label))
                i += 1
    return written


def _check_images_match(split, written, tol):
    """Each image is uniform at its centre-square value (the frame was cropped away) with its label."""
    assert len(split) == len(written)
    for img, label, (value, want) in zip(split.images, split.labels, written):
        assert int(label) == want
        assert (img.int() - value).abs().max() <= tol, (value, img.min(), img.max())


def test_pneu_folder_layout_merges_val_into_train(tmp_path):
    written = _write_folder(tmp_path, {"train": 4, "test": 3, "val": 1}, ("NORMAL", "PNEUMONIA"))
    (tmp_path / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\x00junk")  # hidden files are ignored
    ds = load_dataset("pneu", tmp_path, image_size=24, val_fraction=0)
    for split in (ds.train, ds.test):
        _check_split(split, 24)
    assert len(ds.val) == 0
    _check_images_match(ds.train, written["train"] + written["val"], tol=4)
    _check_images_match(ds.test, written["test"], tol=4)
    assert class_counts(ds.train, 2) == [5, 5] and class_counts(ds.test, 2) == [3, 3]
    assert (ds.num_classes, ds.metric, ds.contamination, ds.mean, ds.std) == (2, "f1", "tag", 0.5711, 0.1523)
    held = load_dataset("pneu", tmp_path, image_size=24, val_fraction=0.2)
    assert (len(held.train), len(held.val)) == (8, 2) and class_counts(held.val, 2) == [1, 1]
    assert load_dataset("pneu", tmp_path).test.images.shape == (6, 1, 224, 224)  # default size


def test_knee_folder_layout_uses_the_published_val_split(tmp_path):
    classes = ("0", "1", "2", "3", "4")
    written = _write_folder(tmp_path, {"train": 3, "val": 2, "test": 2}, classes)
    (tmp_path / "auto_test").mkdir()  # other top-level folders of the published archive are not read
    ds = load_dataset("knee", tmp_path, image_size=20, val_fraction=0.5)
    _check_images_match(ds.train, written["train"], tol=4)
    _check_images_match(ds.val, written["val"], tol=4)
    _check_images_match(ds.test, written["test"], tol=4)
    assert class_counts(ds.train, 5) == [3] * 5 and class_counts(ds.val, 5) == [2] * 5
    assert (ds.num_classes, ds.metric, ds.mean, ds.std) == (5, "mae", 0.5549, 0.2232)
    assert ds.class_names == classes and "per class [3, 3, 3, 3, 3]" in ds.summary()


def test_folder_images_are_centre_cropped_and_resized_like_an_antialiased_bilinear(tmp_path):
    """A lossless non-square gradient image against torch's antialiased bilinear resize of its centre."""
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (tmp_path / split / cls).mkdir(parents=True)
    yy, xx = np.mgrid[0:60, 0:90]
    arr = ((xx * 2 + yy * 1.5) % 256).astype(np.uint8)
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            Image.fromarray(arr).save(tmp_path / split / cls / "a.png")
    ds = load_dataset("pneu", tmp_path, image_size=25, val_fraction=0)
    centre = torch.from_numpy(arr[:, 15:75].astype(np.float32))[None, None]
    ref = F.interpolate(centre, size=(25, 25), mode="bilinear", antialias=True, align_corners=False)
    diff = (ds.test.images[0].float() - ref[0]).abs()
    assert diff.max() <= 2, float(diff.max())


def test_corrupt_image_raises_naming_the_file(tmp_path):
    _write_folder(tmp_path, {"train": 2, "test": 1}, ("NORMAL", "PNEUMONIA"))
    bad = tmp_path / "test" / "PNEUMONIA" / "broken.jpeg"
    bad.write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="broken.jpeg"):
        load_dataset("pneu", tmp_path, image_size=16)
    good = next(tmp_path.glob("*/*/*.png"))
    bad.write_bytes(good.read_bytes()[:60])  # a truncated PNG
    with pytest.raises(ValueError, match="broken.jpeg"):
        load_dataset("pneu", tmp_path, image_size=16)


def test_wrong_layouts_are_reported(tmp_path):
    classes = ("NORMAL", "PNEUMONIA")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset("pneu", tmp_path / "nowhere")
    flat = tmp_path / "flat"
    flat.mkdir()
    _image(50, 30, 30, False).save(flat / "a.png")
    with pytest.raises(FileNotFoundError, match=r"lacks the split folders \['train', 'test'\].*found \['a.png'\]"):
        load_dataset("pneu", flat)
    # the knee layout given as pneu: class folders 0..4 instead of NORMAL/PNEUMONIA
    knee = tmp_path / "knee"
    _write_folder(knee, {"train": 1, "val": 1, "test": 1}, ("0", "1", "2", "3", "4"))
    with pytest.raises(FileNotFoundError, match=r"exactly the class folders \['NORMAL', 'PNEUMONIA'\]"):
        load_dataset("pneu", knee)
    with pytest.raises(FileNotFoundError, match="layout .*train,val,test"):
        load_dataset("knee", tmp_path / "flat")
    root = tmp_path / "pneu"
    _write_folder(root, {"train": 1, "test": 1}, classes)
    (root / "test" / "OTHER").mkdir()
    with pytest.raises(ValueError, match="found \\['NORMAL', 'OTHER', 'PNEUMONIA'\\]"):
        load_dataset("pneu", root)
    (root / "test" / "OTHER").rmdir()
    (root / "train" / "NORMAL" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        load_dataset("pneu", root)
    (root / "train" / "NORMAL" / "notes.txt").unlink()
    for f in (root / "test" / "NORMAL").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="holds no images"):
        load_dataset("pneu", root)


def test_folder_cache_is_used_and_keyed_by_the_file_listing(tmp_path, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache"
    _write_folder(root, {"train": 2, "test": 1}, ("NORMAL", "PNEUMONIA"))
    first = load_dataset("pneu", root, image_size=16, val_fraction=0, cache_dir=cache)
    assert len(list(cache.glob("pneu-16px-*.pt"))) == 1

    def no_decoding(path, size, channels=1):
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(datasets, "read_image", no_decoding)
    again = load_dataset("pneu", root, image_size=16, val_fraction=0, cache_dir=cache)
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.labels,
                                                                              first.test.labels)
    _image(90, 20, 20, False).save(root / "test" / "NORMAL" / "new.png")
    with pytest.raises(AssertionError, match="decoded"):
        load_dataset("pneu", root, image_size=16, val_fraction=0, cache_dir=cache)


# --- arguments and splits -------------------------------------------------------------------------------

def test_load_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="name must be one of") as err:
        load_dataset("cifar10")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(ValueError, match="data_dir is required"):
        load_dataset("mnist")
    for kwargs, match in [({"val_fraction": 1.0}, "val_fraction"), ({"image_size": 0}, "image_size"),
                          ({"limit_train": 0}, "limit_train"), ({"image_size": 2.5}, "image_size")]:
        with pytest.raises(ValueError, match=match):
            load_dataset("digits", **kwargs)


def _indexed_split(labels):
    """A split whose image i holds i in its first two pixels, so subsets can be traced back."""
    n = len(labels)
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 0, 0, 1] = torch.arange(n) // 256
    return Split(images, torch.as_tensor(labels, dtype=torch.int64))


def _ids(split):
    return (split.images[:, 0, 0, 0].long() + 256 * split.images[:, 0, 0, 1].long()).tolist()


@pytest.mark.parametrize("fraction, n_held", [(0.1, 100), (0.01, 10)])
def test_clean_split_is_a_seeded_stratified_partition(fraction, n_held):
    labels = torch.cat([torch.zeros(700), torch.ones(200), torch.full((100,), 2)]).long()
    labels = labels[torch.randperm(1000)]
    split = _indexed_split(labels)
    held, rest = clean_split(split, fraction, seed=0)
    assert len(held) == n_held and len(rest) == 1000 - n_held
    assert sorted(_ids(held) + _ids(rest)) == list(range(1000))
    assert all(int(labels[i]) == int(y) for i, y in zip(_ids(held), held.labels))
    assert class_counts(held, 3) == [round(0.7 * n_held), round(0.2 * n_held), round(0.1 * n_held)]
    assert _ids(clean_split(split, fraction, seed=0)[0]) == _ids(held)
    assert _ids(clean_split(split, fraction, seed=1)[0]) != _ids(held)
    with pytest.raises(ValueError, match="fraction"):
        clean_split(split, 1.5)
    with pytest.raises(ValueError, match="empty"):
        clean_split(_indexed_split([0, 1, 0]), 0.01)


def test_stratified_take_allocates_by_largest_remainder():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    for n in range(11):
        taken, rest = datasets.stratified_take(labels, n, torch.Generator().manual_seed(n))
        assert len(taken) == n and sorted(taken.tolist() + rest.tolist()) == list(range(10))
        counts = torch.bincount(labels[taken], minlength=3)
        assert (counts.double() - torch.tensor([5, 3, 2]) * n / 10).abs().max() < 1


def test_split_validates_its_tensors():
    with pytest.raises(ValueError, match="images must be a uint8"):
        Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be an int64 tensor of shape \\(2,\\)"):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
