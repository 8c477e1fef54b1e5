"""FolderFeed (DALI CPU pipeline and torchvision fallback) against the in-memory references: load_dataset and
contaminate(...) of the whole set for the PNEU/KNEE layouts, and for users' folders (odd-sized PNGs, mask PNGs,
boxes, soft masks, greyscale and RGB) decode_pair read in epoch_order with the same placement, and DeviceFeed
itself; Pillow-exact crop-resize; DDP sharding; set_epoch; undecodable files named; the fallback notice.

PNG images must match the reference exactly. JPEG decoders may differ (nvJPEG on a GPU is not
libjpeg-turbo), so JPEG images are compared within JPEG_MAX_DIFF grey levels (on this CPU machine DALI's,
torchvision's and Pillow's libjpeg-turbo decodes agree exactly).
"""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tap_fast.contamination import contaminate, signal_placement
from tap_fast.dali_feed import FolderFeed, centre_square_resize, dali_available, pad_batch, pil_grey
from tap_fast.datasets import folder_split, load_dataset
from tap_fast.feeds import DeviceFeed, epoch_order
from tap_fast.folder_dataset import attach_boxes, attach_masks, decode_pair, list_user_folder

JPEG_MAX_DIFF = 8  # grey levels, max over pixels, between a feed's JPEG decode and Pillow's
MEAN, STD = 0.5549, 0.2232
BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI not installed")),
            "torchvision"]
# (h, w): portrait, landscape, square, exactly 224, smaller than 224 (upsampling), odd sizes
SIZES = [(300, 250), (240, 320), (231, 229), (224, 224), (100, 90), (57, 81), (401, 260), (260, 333)]


def picture(h, w, k, channels):
    """Smooth structure plus noise, uint8 (h, w) or (h, w, channels)."""
    rng = np.random.default_rng(k)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 90 * np.sin(xx / (5.0 + k) + k) * np.cos(yy / (7.0 + k))
    img = np.clip(base[..., None] + rng.normal(0, 25, (h, w, channels)), 0, 255).astype(np.uint8)
    return img[..., 0] if channels == 1 else img


def write_layout(root, splits, classes, suffix):
    k = 0
    for split, per_class in splits.items():
        for cls in classes:
            for _ in range(per_class):
                h, w = SIZES[k % len(SIZES)]
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(picture(h, w, k, 3 if k % 3 else 1)).save(folder / f"im{k:02d}{suffix}")
                k += 1
    return root


@pytest.fixture(scope="module")
def knee(tmp_path_factory):
    return write_layout(tmp_path_factory.mktemp("knee"), {"train": 2, "val": 1, "test": 1},
                        [str(c) for c in range(5)], ".png")


@pytest.fixture(scope="module")
def pneu(tmp_path_factory):
    return write_layout(tmp_path_factory.mktemp("pneu"), {"train": 5, "test": 1}, ["NORMAL", "PNEUMONIA"],
                        ".jpeg")


def make_feed(files, labels, backend, **kw):
    kw = {"kind": None, "num_classes": 5, "batch_size": 3, "seed": 3, "num_threads": 2, "mean": MEAN, "std": STD,
          **kw}
    return FolderFeed(files, labels, backend=backend, **kw)


def grey_levels(x):
    """Undo the normalisation: float grey levels 0..255."""
    return (x * STD + MEAN) * 255


@pytest.mark.parametrize("name,split", [("knee", "train"), ("knee", "val"), ("knee", "test"),
                                        ("pneu", "train"), ("pneu", "val"), ("pneu", "test")])
def test_folder_split_matches_reference(name, split, knee, pneu):
    root = {"knee": knee, "pneu": pneu}[name]
    files, labels = folder_split(name, root, split, seed=1)
    ref = getattr(load_dataset(name, root, seed=1), split)
    assert torch.equal(labels, ref.labels) and len(files) == len(ref.labels) > 0
    limited = folder_split(name, root, "train", limit_train=4, seed=1)[1]
    assert torch.equal(limited, load_dataset(name, root, limit_train=4, seed=1).train.labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["knee", "pneu"])
def test_images_equal_reference_loader(backend, name, knee, pneu):
    root = {"knee": knee, "pneu": pneu}[name]
    ref = load_dataset(name, root).train
    files, labels = folder_split(name, root, "train")
    feed = make_feed(files, labels, backend, num_classes=ref.labels.max().item() + 1, drop_last=False,
                     shuffle=False)
    seen = []
    for idx, x, y, m in feed.indexed():
        want = ref.images[idx].float()
        diff = (grey_levels(x) - want).abs().max().item()
        if name == "knee":  # PNG: exact (up to the float round trip of the normalisation)
            assert diff < 1e-3, diff
            assert torch.equal(x, want.div(255).sub(MEAN).div(STD))
        else:
            assert diff <= JPEG_MAX_DIFF, diff
        assert torch.equal(y, ref.labels[idx]) and not m.any()
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(files)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,variant,options", [("tag", "contaminated", {}), ("tag", "permuted", {}),
                                                  ("stripe", "permuted", {}),
                                                  ("tag", "permuted", {"permute": "derangement", "tag_mask": "ink"}),
                                                  ("tag", "contaminated", {"tag_style": "shrunk"})])
def test_contaminated_batches_equal_reference(backend, kind, variant, options, knee):
    size = 48 if options.get("tag_style") == "shrunk" else 224  # shrunk tags: images under 77 px
    ref = load_dataset("knee", knee, image_size=size).train
    ref_x, ref_m = contaminate(ref.images, ref.labels, kind, 5, variant=variant, seed=7, **options)
    assert ref_m.sum() > 0
    if size < 224:  # the grey tag, not the font's
        assert not torch.equal(ref_x, contaminate(ref.images, ref.labels, kind, 5, variant=variant, seed=7)[0])
    files, labels = folder_split("knee", knee, "train")
    feed = make_feed(files, labels, backend, kind=kind, variant=variant, seed=7, batch_size=4, image_size=size,
                     **options)
    for epoch in range(2):
        seen = []
        for idx, x, y, m in feed.indexed():
            assert x.shape == m.shape == (4, 1, size, size)
            assert torch.equal(x, ref_x[idx].float().div(255).sub(MEAN).div(STD))
            assert torch.equal(m, ref_m[idx].float()) and torch.equal(y, ref.labels[idx])
            seen += idx.tolist()
        assert len(seen) == len(set(seen)) == len(feed) * 4 == 8  # one epoch, no repeats, static shapes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shards_disjoint_and_equal(backend, world_size, knee):
    files, labels = folder_split("knee", knee, "train")  # 10 files
    n, b = len(files), 2
    feeds = [make_feed(files, labels, backend, batch_size=b, rank=r, world_size=world_size)
             for r in range(world_size)]
    epochs = []
    for epoch in range(3):
        shares = []
        for feed in feeds:
            feed.set_epoch(epoch)
            shares.append([i for idx, *_ in feed.indexed() for i in idx.tolist()])
            assert shares[-1] == epoch_order(n, epoch=epoch, seed=3, rank=feed.rank,
                                             world_size=world_size)[:len(feed) * b].tolist()
        assert all(len(s) == len(feeds[0]) * b == (n // world_size) // b * b for s in shares)
        flat = [i for s in shares for i in s]
        assert len(flat) == len(set(flat))  # disjoint within the epoch
        epochs.append(flat)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled


def test_fallback_to_torchvision_without_dali(monkeypatch, knee):
    files, labels = folder_split("knee", knee, "test")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now raises ImportError
    assert not dali_available()
    with pytest.warns(UserWarning, match="DALI is not installed: FolderFeed falls back to torchvision"):
        feed = make_feed(files, labels, "auto", batch_size=5)
    assert feed.backend == "torchvision"
    (x, y, m), = list(feed)
    assert x.shape == (5, 1, 224, 224)


def test_auto_uses_dali_when_installed(knee):
    if not dali_available():
        pytest.skip("DALI not installed")
    files, labels = folder_split("knee", knee, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert make_feed(files, labels, "auto", batch_size=5).backend == "dali"


def test_centre_square_resize_is_pillow_exact():
    """Awkward sizes in one padded batch: 1 px, thin strips, upsampling, non-divisible downscales."""
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (5, 3), (13, 17), (2, 40), (224, 224), (225, 224), (449, 300), (700, 451), (97, 1000)]
    for size in (28, 224, 37):
        arrays = [rng.integers(0, 256, s, dtype=np.uint8) for s in sizes]
        batch, hw = pad_batch([torch.from_numpy(a) for a in arrays])
        out = centre_square_resize(batch, hw, size)
        assert out.shape == (len(sizes), 1, size, size) and out.dtype == torch.uint8
        for a, o in zip(arrays, out):
            img = Image.fromarray(a)
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            want = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
            np.testing.assert_array_equal(o[0].numpy(), np.asarray(want))


def test_pil_grey_is_pillow_exact():
    rgb = np.random.default_rng(1).integers(0, 256, (31, 17, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(pil_grey(torch.from_numpy(rgb).permute(2, 0, 1)).numpy(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["knee", "pneu"])
def test_gpu_folder_feed_equals_reference(name, backend, knee, pneu):
    """DALI's GPU pipeline (mixed decode) and torchvision's nvJPEG path, on cuda:0."""
    root = {"knee": knee, "pneu": pneu}[name]
    ref = load_dataset(name, root).train
    num_classes = ref.labels.max().item() + 1
    kind = "stripe" if name == "pneu" else "tag"
    ref_x, ref_m = contaminate(ref.images, ref.labels, kind, num_classes, variant="permuted", seed=7)
    files, labels = folder_split(name, root, "train")
    feed = make_feed(files, labels, backend, kind=kind, num_classes=num_classes, variant="permuted", seed=7,
                     device_id=0, drop_last=False)
    for idx, x, y, m in feed.indexed():
        assert x.is_cuda and m.is_cuda and y.is_cuda
        idx = idx.cpu()
        diff = (grey_levels(x.cpu()) - ref_x[idx].float()).abs().max().item()
        assert diff < 1e-3 if name == "knee" else diff <= JPEG_MAX_DIFF, diff
        assert torch.equal(m.cpu(), ref_m[idx].float()) and torch.equal(y.cpu(), ref.labels[idx])


@pytest.mark.parametrize("kwargs,match", [
    ({"files": ["/nonexistent/a.png"]}, "files must name existing image files"),
    ({"labels": torch.zeros(3, dtype=torch.int64)}, r"labels must be a \(5,\) integer tensor"),
    ({"backend": "opencv"}, "backend must be one of"),
    ({"device_id": -1}, "device_id must be a CUDA device index"),
    ({"batch_size": 6}, "exceeds this rank's share of 5 files"),
    ({"image_size": 0}, "image_size must be a positive int"),
    ({"kind": "decoys"}, "kind must be one of"),
    ({"rank": 3, "world_size": 3}, "rank must be an int in"),
])
def test_bad_inputs(kwargs, match, knee):
    files, labels = folder_split("knee", knee, "test")
    args = {"files": files, "labels": labels, "backend": "torchvision", "batch_size": 5, **kwargs}
    files, labels, backend = args.pop("files"), args.pop("labels"), args.pop("backend")
    with pytest.raises(ValueError, match=match):
        make_feed(files, labels, backend, **args)


def test_folder_split_bad_inputs(knee):
    with pytest.raises(ValueError, match="name must be one of"):
        folder_split("mnist", knee, "train")
    with pytest.raises(ValueError, match="split must be"):
        folder_split("knee", knee, "holdout")


def corrupt_knee(root, how, which=2):
    """A KNEE layout whose training image ``which`` is truncated (PNG), garbage, or a GIF named .png (which
    torchvision and Pillow decode and DALI does not); returns that file."""
    write_layout(root, {"train": 2, "val": 1, "test": 1}, [str(c) for c in range(5)], ".png")
    bad = sorted((root / "train").rglob("*.png"))[which]
    if how == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    elif how == "garbage":
        bad = bad.rename(bad.with_suffix(".jpeg"))
        bad.write_bytes(b"not an image " * 50)
    else:
        Image.fromarray(picture(40, 30, 0, 3)).save(bad, format="GIF")
    return bad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_image_is_named(backend, how, tmp_path):
    bad = corrupt_knee(tmp_path, how)
    with pytest.raises(ValueError, match="cannot read image ") as reference:
        load_dataset("knee", tmp_path)
    files, labels = folder_split("knee", tmp_path, "train")
    feed = make_feed(files, labels, backend)
    with pytest.raises(ValueError) as error:
        list(feed)
    assert str(error.value).startswith(f"cannot read image {bad}: ")  # the reference loader's wording
    assert str(reference.value).startswith(f"cannot read image {bad}: ")


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
@pytest.mark.parametrize("rank", [0, 1])
def test_dali_corrupt_image_named_on_every_shard(rank, tmp_path):
    """The failed batch is the oldest one DALI holds: decoding its files one by one names the bad one, in
    whichever epoch puts it in this rank's share (batches are read a batch ahead)."""
    bad = corrupt_knee(tmp_path, "truncated", which=4)
    files, labels = folder_split("knee", tmp_path, "train")
    assert files[4] == bad
    feed = make_feed(files, labels, "dali", batch_size=4, rank=rank, world_size=2)
    with pytest.raises(ValueError, match=f"cannot read image {bad}: "):
        for _ in range(10):  # the file is in this shard's share of some epoch
            list(feed)


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_names_batch_when_cpu_decodes_it(tmp_path):
    bad = corrupt_knee(tmp_path, "gif")
    files, labels = folder_split("knee", tmp_path, "train")
    feed = make_feed(files, labels, "dali", batch_size=3, shuffle=False)
    seen = []
    with pytest.raises(ValueError, match="cannot read the images of the batch") as error:
        for idx, *_ in feed.indexed():
            seen += idx.tolist()
    named = [f for f in files if f"'{f}'" in str(error.value)]
    assert bad in named and len(named) == 3 and not {files.index(f) for f in named} & set(seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_corrupt_jpeg_is_named(backend, tmp_path):
    """A batch that fails in DALI's mixed decoder or nvJPEG: the CPU decodes name the file."""
    bad = corrupt_knee(tmp_path, "garbage")
    files, labels = folder_split("knee", tmp_path, "train")
    with pytest.raises(ValueError, match=f"cannot read image {bad}: "):
        list(make_feed(files, labels, backend, device_id=0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_batches_without_normalisation(backend, knee):
    """mean = std = None: the contaminated uint8 batches (what make_step takes), equal to the reference."""
    ref = load_dataset("knee", knee).train
    ref_x, ref_m = contaminate(ref.images, ref.labels, "tag", 5, seed=7)
    files, labels = folder_split("knee", knee, "train")
    feed = make_feed(files, labels, backend, kind="tag", seed=7, batch_size=4, mean=None, std=None)
    seen = 0
    for idx, x, y, m in feed.indexed():
        assert x.dtype == torch.uint8 and torch.equal(x, ref_x[idx]) and torch.equal(m, ref_m[idx].float())
        seen += len(idx)
    assert seen == 8 and ref_m.any()


# --- users' folders: the streaming feed against the in-memory path (decode_pair + epoch_order + placement) ----

USER_SIZE = 16  # output side: every image is resized (down from odd sizes)
USER_SIZES = [(29, 37), (37, 29), (31, 31), (23, 50), (45, 41)]  # (h, w)
USER_N = 11  # training images: batch sizes 2, 3, 4 do not divide it


def write_user_folder(root):
    """DIR/{train,test}/{a,b}/*.png, greyscale and RGB, with mask PNGs (binary at levels 255 or 9, and soft
    grey levels) for every third training image and boxes (one or two) for every fourth; returns
    (data dir, binary masks dir, soft masks dir, boxes CSV)."""
    data, binary, soft = root / "data", root / "masks", root / "soft"
    rows = ["path,x0,y0,x1,y1"]
    for split, n in (("train", USER_N), ("test", 2)):
        for k in range(n):
            h, w = USER_SIZES[k % len(USER_SIZES)]
            rel = Path(split) / "ab"[k % 2] / f"im{k:02d}.png"
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture(h, w, k, 3 if k % 2 else 1)).save(data / rel)
            if split == "train" and k % 3 == 0:
                level = np.zeros((h, w), dtype=np.uint8)
                level[h // 4: h // 2 + 3, w // 3: w // 3 + 7] = 1
                for folder, pixels in ((binary, level * (255 if k % 2 else 9)),
                                       (soft, level * np.arange(w, dtype=np.uint8)[None] * 5)):
                    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels).save(folder / rel)
            if split == "train" and k % 4 == 1:
                rows.append(f"{rel.as_posix()},1,2,{w // 2},{h // 3}")
                if k % 8 == 1:
                    rows.append(f"{rel.as_posix()},{w - 6},{h - 4},{w},{h}")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    return data, binary, soft, root / "boxes.csv"


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The training split's files and labels with the per-file annotations of each kind."""
    data, binary, soft, boxes_csv = write_user_folder(tmp_path_factory.mktemp("user"))
    listing = list_user_folder(data)
    files = [p for p, _ in listing.splits["train"]]
    annotations = {"none": {}}
    for name, folder in (("masks", binary), ("soft", soft)):
        attach_masks(listing, folder)
        annotations[name] = {"masks": [listing.masks.get(p) for p in files]}
    attach_boxes(listing, boxes_csv)
    annotations["boxes"] = {"boxes": [listing.boxes.get(p, []) for p in files]}
    annotations["soft+boxes"] = {**annotations["soft"], **annotations["boxes"], "soft_masks": True}
    labels = torch.tensor([y for _, y in listing.splits["train"]])
    return files, labels, annotations


def user_feed(user, backend, annotations="none", **kw):
    files, labels, annotations_of = user
    kw = {"kind": None, "num_classes": 2, "batch_size": 4, "seed": 3, "num_threads": 2, "mean": None, "std": None,
          "image_size": USER_SIZE, "drop_last": False, "backend": backend, **annotations_of[annotations], **kw}
    return FolderFeed(files, labels, **kw)


def memory_set(user, annotations="none", channels=1):
    """decode_pair of every file: images (N, C, S, S) uint8 and masks (N, 1, S, S) float32."""
    files, _, annotations_of = user
    kw = annotations_of[annotations]
    masks, boxes = kw.get("masks", [None] * len(files)), kw.get("boxes", [[]] * len(files))
    pairs = [decode_pair(f, USER_SIZE, channels, mask_file=m, boxes=b, soft=kw.get("soft_masks", False))
             for f, m, b in zip(files, masks, boxes)]
    return (torch.from_numpy(np.stack([im for im, _ in pairs])),
            torch.from_numpy(np.stack([m for _, m in pairs])).float())


def memory_batches(user, annotations="none", channels=1, *, kind=None, epoch=0, batch_size=4, drop_last=False,
                   rank=0, world_size=1, seed=3):
    """The in-memory path: decode_pair's images and masks read in epoch_order, contaminated by the same
    placement, the mask the union of the user's and the contamination's."""
    _, labels, _ = user
    images, masks = memory_set(user, annotations, channels)
    placement = None if kind is None else signal_placement(labels, kind, 2, height=USER_SIZE, width=USER_SIZE,
                                                           seed=seed)
    order = epoch_order(len(labels), epoch=epoch, seed=seed, rank=rank, world_size=world_size)
    if drop_last:
        order = order[:len(order) // batch_size * batch_size]
    for idx in order.split(batch_size):
        x, m = images[idx], masks[idx]
        if placement is not None:
            x, signal = placement.apply(x, idx)
            m = torch.maximum(m, signal.float())
        yield idx, x, labels[idx], m


def assert_same_batches(feed, reference, soft=False):
    got, want = list(feed.indexed()), list(reference)
    assert len(got) == len(want) == len(feed) > 0
    for (idx, x, y, m), (ref_idx, ref_x, ref_y, ref_m) in zip(got, want):
        assert torch.equal(idx, ref_idx) and torch.equal(y, ref_y)
        assert x.dtype == torch.uint8 and torch.equal(x, ref_x)
        assert m.dtype == torch.float32 and m.shape == (len(idx), 1, USER_SIZE, USER_SIZE)
        if soft:
            assert (m - ref_m).abs().max() <= 1e-6
        else:
            assert torch.equal(m, ref_m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("annotations,kind", [("none", None), ("masks", None), ("boxes", "stripe"),
                                              ("soft+boxes", "stripe")])
def test_user_folder_equals_memory_path(backend, channels, annotations, kind, user):
    """Two epochs of every batch (the last one partial): images, labels and masks equal decode_pair's in
    epoch_order, the masks united with the contamination's; the comparison is not vacuous."""
    images, masks = memory_set(user, annotations, channels)
    assert masks.any() == (annotations != "none") and (annotations != "soft+boxes" or (masks % 1).any())
    feed = user_feed(user, backend, annotations, channels=channels, kind=kind)
    for epoch in range(2):
        assert_same_batches(feed, memory_batches(user, annotations, channels, kind=kind, epoch=epoch),
                            soft=annotations.startswith("soft"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size,drop_last", [(1, True), (3, True), (USER_N, False)])
def test_user_folder_batch_sizes(backend, batch_size, drop_last, user):
    feed = user_feed(user, backend, "masks", channels=3, kind="stripe", batch_size=batch_size, drop_last=drop_last)
    assert len(feed) == (USER_N // batch_size if drop_last else 1)
    assert_same_batches(feed, memory_batches(user, "masks", 3, kind="stripe", batch_size=batch_size,
                                             drop_last=drop_last))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_user_folder_rank_shards(backend, world_size, user):
    """Each rank reads its epoch_order share, equal to the memory path's; the shares are disjoint and equal."""
    seen = []
    for rank in range(world_size):
        feed = user_feed(user, backend, "boxes", kind="stripe", batch_size=2, rank=rank, world_size=world_size)
        feed.set_epoch(1)
        assert_same_batches(feed, memory_batches(user, "boxes", kind="stripe", epoch=1, batch_size=2, rank=rank,
                                                 world_size=world_size))
        seen.append(feed.order().tolist())
    flat = [i for share in seen for i in share]
    assert len(flat) == len(set(flat)) == USER_N // world_size * world_size


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_epoch_jumps(backend, user):
    """Any epoch in any order, also after an epoch left part-read (DALI then discards what it read ahead)."""
    feed = user_feed(user, backend, "masks", batch_size=3)
    for epoch in (5, 2):
        feed.set_epoch(epoch)
        assert_same_batches(feed, memory_batches(user, "masks", epoch=epoch, batch_size=3))
        assert feed.epoch == epoch + 1
    batches = feed.indexed()
    next(batches)  # epoch 3, left part-read
    del batches
    feed.set_epoch(5)
    assert_same_batches(feed, memory_batches(user, "masks", epoch=5, batch_size=3))
    assert_same_batches(feed, memory_batches(user, "masks", epoch=6, batch_size=3))


def test_dali_reads_one_epoch_at_a_time(user):
    """An epoch still being read when a later one starts ends with an error, not with the later one's batches."""
    pytest.importorskip("nvidia.dali")
    feed = user_feed(user, "dali", batch_size=3)
    first = feed.indexed()
    next(first)
    assert_same_batches(feed, memory_batches(user, epoch=1, batch_size=3))
    with pytest.raises(RuntimeError, match="a later epoch was started"):
        next(first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_same_batches_as_device_feed(backend, channels, user):
    """The memory feed over decode_pair's set and the streaming feed over the files: identical normalised
    batches for the same seed, epoch after epoch."""
    _, labels, _ = user
    images, masks = memory_set(user, "masks", channels)
    kw = {"kind": "stripe", "num_classes": 2, "batch_size": 4, "mean": MEAN, "std": STD, "seed": 9,
          "contamination_seed": 4, "drop_last": True}
    memory = DeviceFeed(images, labels, device="cpu", masks=masks, **kw)
    streaming = user_feed(user, backend, "masks", channels=channels, **kw)
    for _ in range(2):
        got, want = list(streaming), list(memory)
        assert len(got) == len(want) == USER_N // 4
        for batch, ref in zip(got, want):
            assert all(torch.equal(a, b) for a, b in zip(batch, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_mask_errors_are_named(backend, user, tmp_path):
    files, labels, _ = user
    grey = np.zeros((USER_SIZES[0][0], USER_SIZES[0][1]), dtype=np.uint8)
    grey[0, :2] = 100, 200
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey[1:]).save(tmp_path / "short.png")  # files[0] is 37x29 (w x h)
    for mask, match in (("grey.png", "grey.png is not binary.*--soft-masks"),
                        ("short.png", "short.png: its size 37x28 differs from its image's 37x29")):
        masks = [tmp_path / mask] + [None] * (len(files) - 1)
        feed = FolderFeed(files, labels, kind=None, num_classes=2, batch_size=USER_N, mean=None, std=None,
                          image_size=USER_SIZE, masks=masks, backend=backend, num_threads=2)
        with pytest.raises(ValueError, match=match):
            list(feed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_user_image_is_named(backend, tmp_path):
    data, binary, _, _ = write_user_folder(tmp_path)
    listing = list_user_folder(data)
    attach_masks(listing, binary)
    files = [p for p, _ in listing.splits["train"]]
    bad = files[3]  # has a mask (its header still reads)
    bad.write_bytes(bad.read_bytes()[:200])
    feed = FolderFeed(files, torch.zeros(len(files), dtype=torch.int64), kind=None, num_classes=2, batch_size=3,
                      mean=None, std=None, image_size=USER_SIZE, channels=3, backend=backend, num_threads=2,
                      masks=[listing.masks.get(p) for p in files])
    with pytest.raises(ValueError, match=f"cannot read image {bad}: "):
        for _ in range(3):
            list(feed)


def test_torchvision_refuses_16_bit_png(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((9, 7), 40000, dtype=np.uint16)).save(path)
    feed = FolderFeed([path], torch.zeros(1, dtype=torch.int64), kind=None, num_classes=2, batch_size=1,
                      mean=None, std=None, image_size=4, backend="torchvision")
    with pytest.raises(ValueError, match=f"cannot read image {path}: .*16-bit"):
        list(feed)


@pytest.mark.parametrize("kwargs,match", [
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"masks": [None]}, r"masks must give one mask file \(or None\) per file, got 1 for 11"),
    ({"masks": ["/nonexistent/m.png"] + [None] * 10}, "missing"),
    ({"boxes": [[]] * 3}, "boxes must give one list of boxes per file, got 3 for 11"),
    ({"boxes": [[(3, 0, 3, 4)]] + [[]] * 10}, r"boxes of .*im00.png must be \(x0, y0, x1, y1\) integer pixels"),
    ({"boxes": [[(0, 0, 1.5, 4)]] + [[]] * 10}, "integer pixels"),
])
def test_bad_annotation_arguments(kwargs, match, user):
    with pytest.raises(ValueError, match=match):
        user_feed(user, "torchvision", **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_gpu_user_folder_equals_memory_path(backend, channels, user):
    """DALI's mixed decoder and torchvision on cuda:0, with masks, boxes and a contamination."""
    feed = user_feed(user, backend, "soft+boxes", channels=channels, kind="stripe", device_id=0)
    got = [tuple(t.cpu() for t in batch) for batch in feed.indexed()]
    want = list(memory_batches(user, "soft+boxes", channels, kind="stripe"))
    assert len(got) == len(want)
    for (idx, x, y, m), (ref_idx, ref_x, ref_y, ref_m) in zip(got, want):
        assert torch.equal(idx, ref_idx) and torch.equal(x, ref_x) and torch.equal(y, ref_y)
        assert (m - ref_m).abs().max() <= 1e-6
