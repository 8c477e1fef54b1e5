"""Users' own folders (tap_fast.folder_dataset): layout, mask folders, box CSVs, and one clear error per bad input."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tap_fast.folder_dataset import attach_boxes, attach_masks, decode_pair, decode_split, list_user_folder


def write_folder(root: Path, *, splits=("train", "test"), classes=("cat", "dog"), per_class=3, size=(37, 29),
                 seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                p = root / split / cls / f"im{i}.png"
                Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(p)
                paths.append(p)
    return paths


def test_listing_sorted_classes_and_optional_val(tmp_path):
    write_folder(tmp_path, classes=("zebra", "ant"))
    listing = list_user_folder(tmp_path)
    assert listing.class_names == ("ant", "zebra")
    assert set(listing.splits) == {"train", "test"}
    assert [y for _, y in listing.splits["train"]] == [0, 0, 0, 1, 1, 1]
    assert listing.unmasked("train") == 6


@pytest.mark.parametrize("make, message", [
    (lambda r: (r / "train").mkdir(parents=True), "lacks the split folders ['test']"),
    (lambda r: [(r / s).mkdir(parents=True) for s in ("train", "test")], "holds no class folders"),
    (lambda r: (write_folder(r), (r / "train" / "cow").mkdir()), "holds no images"),
    (lambda r: (write_folder(r), (r / "test" / "cow").mkdir(), (r / "test" / "cow" / "x.png").write_bytes(b"")),
     "that train/ lacks"),
    (lambda r: (write_folder(r), (r / "train" / "cat" / "notes.txt").write_text("x")), "notes.txt"),
])
def test_bad_layouts(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        list_user_folder(tmp_path)


def test_mask_folder_same_crop_and_resize(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    paths = write_folder(data, size=(40, 20))
    target = paths[0]
    m = np.zeros((20, 40), dtype=np.uint8)
    m[2:6, 12:16] = 255  # inside the centre square (x 10..30)
    (masks / "train" / "cat").mkdir(parents=True)
    Image.fromarray(m).save(masks / "train" / "cat" / "im0.png")
    listing = list_user_folder(data)
    attach_masks(listing, masks)
    assert listing.masks == {target: masks / "train" / "cat" / "im0.png"}
    assert listing.unmasked("train") == 5
    images, labels, out = decode_split(listing, "train", 10, 1)
    assert images.shape == (6, 1, 10, 10) and out.shape == (6, 1, 10, 10) and labels.tolist() == [0] * 3 + [1] * 3
    ys, xs = np.nonzero(out[0, 0])
    # source rows 2..5 and columns 12..15 of the 20x20 centre square, halved: rows 1..2, columns 1..2 (+ the
    # bilinear support's reach), and nothing far from it
    assert set(out[0].ravel().tolist()) == {0, 1}
    assert ys.min() >= 0 and ys.max() <= 3 and xs.min() >= 0 and xs.max() <= 3 and (1, 1) in set(zip(ys, xs))
    assert not out[1:].any()


def test_mask_errors(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    write_folder(data, size=(16, 16))
    (masks / "train" / "cat").mkdir(parents=True)
    grey = np.zeros((16, 16), dtype=np.uint8)
    grey[0, 0], grey[1, 1] = 100, 200
    Image.fromarray(grey).save(masks / "train" / "cat" / "im0.png")
    listing = list_user_folder(data)
    attach_masks(listing, masks)
    with pytest.raises(ValueError, match="im0.png is not binary.*--soft-masks"):
        decode_split(listing, "train", 8, 1)
    _, _, soft = decode_split(listing, "train", 16, 1, soft=True)
    assert soft.dtype == np.float32 and soft[0, 0, 0, 0] == pytest.approx(100 / 255)
    Image.fromarray(np.zeros((15, 16), dtype=np.uint8)).save(masks / "train" / "cat" / "im1.png")
    attach_masks(listing, masks)
    with pytest.raises(ValueError, match="im1.png: its size 16x15 differs from its image's 16x16"):
        image = data / "train" / "cat" / "im1.png"
        decode_pair(image, 8, 1, mask_file=listing.masks[image])
    Image.fromarray(grey).save(masks / "train" / "cat" / "stray.png")
    with pytest.raises(ValueError, match="name no image.*stray.png"):
        attach_masks(listing, masks)


def test_boxes(tmp_path):
    write_folder(tmp_path, size=(24, 24), classes=("a", "b"))
    csv = tmp_path / "boxes.csv"
    csv.write_text("path,x0,y0,x1,y1\ntrain/a/im0.png,0,0,12,12\ntrain/a/im0.png,20,20,24,24\n")
    listing = list_user_folder(tmp_path)
    attach_boxes(listing, csv)
    assert listing.boxes[tmp_path / "train" / "a" / "im0.png"] == [(0, 0, 12, 12), (20, 20, 24, 24)]
    image, mask = decode_pair(tmp_path / "train" / "a" / "im0.png", 24, 3,
                              boxes=listing.boxes[tmp_path / "train" / "a" / "im0.png"])
    assert image.shape == (3, 24, 24) and mask.dtype == np.uint8
    expected = np.zeros((24, 24), dtype=np.uint8)
    expected[:12, :12] = 1
    expected[20:, 20:] = 1
    np.testing.assert_array_equal(mask[0], expected)  # same size: the box exactly


@pytest.mark.parametrize("text, message", [
    ("path,x,y\n", "header path,x0,y0,x1,y1"),
    ("path,x0,y0,x1,y1\ntrain/a/nope.png,0,0,1,1\n", "line 2: 'train/a/nope.png' names no image"),
    ("path,x0,y0,x1,y1\ntrain/a/im0.png,0,0,25,3\n", r"line 2: box \(0,0\)-\(25,3\) is not inside"),
    ("path,x0,y0,x1,y1\ntrain/a/im0.png,5,5,5,9\n", "is not inside"),
    ("path,x0,y0,x1,y1\ntrain/a/im0.png,a,0,1,1\n", "must be integers"),
])
def test_bad_boxes(tmp_path, text, message):
    write_folder(tmp_path, size=(24, 24), classes=("a", "b"))
    (tmp_path / "boxes.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        attach_boxes(list_user_folder(tmp_path), tmp_path / "boxes.csv")


def test_soft_mask_with_boxes(tmp_path):
    """A soft mask file and boxes on one image: the boxes are drawn over the mask's grey levels."""
    write_folder(tmp_path / "data", size=(16, 16))
    grey = np.zeros((16, 16), dtype=np.uint8)
    grey[0, :3] = 50, 100, 150
    (tmp_path / "masks").mkdir()
    Image.fromarray(grey).save(tmp_path / "masks" / "im0.png")
    _, mask = decode_pair(tmp_path / "data" / "train" / "cat" / "im0.png", 16, 1,
                          mask_file=tmp_path / "masks" / "im0.png", boxes=[(8, 8, 16, 16)], soft=True)
    expected = grey.astype(np.float32) / 255
    expected[8:, 8:] = 1
    np.testing.assert_array_equal(mask[0], expected)  # same size: no resampling
