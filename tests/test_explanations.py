"""Appendix D: the top-quartile overlap of input gradients and activations with the spurious masks (eq. 17),
maps.png (Figure 1), `tap-fast explain` and train's "overlap" record."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from tap_fast.cli import main
from tap_fast.experiments import explain
from tap_fast.explanations import (GRADIENT, HEADER, PAD, maps_figure, overlap, overlap_counts, recall_precision,
                                   tile_side, top_quartile, write_maps)
from tap_fast.tapped_model import TappedModel

TINY = ["--dataset", "digits", "--epochs", "1", "--limit-train", "64", "--limit-test", "32", "--batch-size", "32",
        "--lr", "0.05", "--quiet", "--device", "cpu"]


def _brute_top(values: list[float]) -> set[int]:
    """Indices of the top quartile of one image's pixel values: >= the k-th largest (k = ceil(n / 4)) and > 0."""
    kth = sorted(values, reverse=True)[math.ceil(len(values) / 4) - 1]
    return {i for i, v in enumerate(values) if v >= kth and v > 0}


def test_top_quartile_matches_a_brute_force_count():
    maps = torch.randint(0, 6, (4, 1, 5, 6)).float()  # many ties and zeros
    maps[3] = 0  # nothing salient: an empty top quartile
    top = top_quartile(maps)
    for b in range(4):
        expected = _brute_top(maps[b].flatten().tolist())
        assert set(top[b].flatten().nonzero().flatten().tolist()) == expected
    assert not top[3].any() and top[:3].flatten(1).sum(1).ge(8).all()  # k = ceil(30 / 4) = 8, ties included


def test_overlap_of_hand_set_maps_is_pooled_over_the_set():
    """Image 0: top quartile {9, 8, 7, 1, 1, 1} (k = 4, the three 1s tie), mask the 2x2 corner holding 9, 8, 7
    and a 1: 4 hits of 4. Image 1: top {5} only (zeros are never top), mask 2 pixels, 1 hit. Pooled: recall
    5 / 6 and precision 5 / 7 (the per-image mean recall would be 0.75)."""
    maps = torch.zeros(2, 1, 4, 4)
    maps[0, 0, :2] = torch.tensor([[9.0, 8, 0, 0], [7, 1, 1, 1]])
    maps[1, 0, 0, 3] = 5.0
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    masks[0, 0, :2, :2] = 1
    masks[1, 0, 0, 3] = masks[1, 0, 3, 3] = 1
    counts = overlap_counts({"act": maps}, masks)["act"]
    assert counts.tolist() == [5, 6, 7]
    assert recall_precision(counts) == {"recall": 5 / 6, "precision": 5 / 7}
    assert recall_precision(torch.tensor([0, 0, 0])) == {"recall": 0.0, "precision": 0.0}


def test_overlap_matches_brute_force_on_a_hand_built_model():
    """A two-conv net on 10x10 images, tapped after its max-pool (5x5) and at its last conv (3x3, pre-ReLU):
    the maps from plain autograd and explicit loops (nearest upsampling by floor(i * h / H)), the top
    quartiles and eq. 17's pooled counts by hand, against overlap() in batches of 3 (4 images)."""
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3), nn.Flatten(),
                        nn.Linear(18, 4))
    images = torch.randint(0, 256, (4, 1, 10, 10), dtype=torch.uint8)
    masks = torch.zeros(4, 1, 10, 10, dtype=torch.uint8)
    masks[0, 0, :3, :3] = 1
    masks[1, 0, 8:, 2:7] = 1
    masks[3, 0, 5, 5] = 1  # image 2 has no spurious pixel
    mean, std = 0.3, 0.2
    result = overlap(TappedModel(net, ["2", "3"]), images, masks, mean=mean, std=std, batch_size=3)

    x = ((images.float() / 255 - mean) / std).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.log_softmax(net(x), 1).sum(), x)
    with torch.no_grad():
        small = {"2": net[:3](x).clamp(min=0).sum(1), "3": net[:4](x).clamp(min=0).sum(1)}
    grids = {GRADIENT: grad.abs().sum(1).tolist(),
             **{name: [[[a[b, i * a.shape[1] // 10][j * a.shape[2] // 10].item() for j in range(10)]
                        for i in range(10)] for b in range(4)] for name, a in small.items()}}
    per_image_recall = {}
    for name, grid in grids.items():
        hit = spurious = top_size = 0
        recalls = []
        for b in range(4):
            values = [grid[b][i][j] for i in range(10) for j in range(10)]
            spur = {i * 10 + j for i in range(10) for j in range(10) if masks[b, 0, i, j]}
            top = _brute_top(values)
            hit, spurious, top_size = hit + len(top & spur), spurious + len(spur), top_size + len(top)
            if spur:
                recalls.append(len(top & spur) / len(spur))
        assert result[name] == {"recall": hit / spurious, "precision": hit / top_size}, name
        per_image_recall[name] = sum(recalls) / len(recalls)
    assert list(result) == [GRADIENT, "2", "3"]
    assert any(per_image_recall[n] != result[n]["recall"] for n in result)  # pooling is what is checked


def test_maps_png_has_one_row_per_image_and_one_column_per_map(tmp_path):
    n, side = 3, 10
    images = torch.randint(0, 256, (n, 1, side, side), dtype=torch.uint8)
    masks = torch.zeros(n, 1, side, side, dtype=torch.uint8)
    masks[:, :, :4, :3] = 1
    maps = {GRADIENT: torch.rand(n, 1, side, side), "layer1": torch.rand(n, 1, side, side),
            "layer2": torch.rand(n, 1, side, side)}
    path = tmp_path / "maps.png"
    write_maps(path, images, masks, maps)
    figure = np.asarray(Image.open(path).convert("RGB"))
    tile, cols = tile_side(side), 3 + 2
    assert tile == 120 and tile_side(28) == 112 and tile_side(224) == 224
    assert figure.shape == (HEADER + n * (tile + PAD), cols * (tile + PAD) + PAD, 3)
    scale = tile // side
    for i in range(n):
        y0 = HEADER + i * (tile + PAD)
        cells = [figure[y0:y0 + tile, PAD + j * (tile + PAD):PAD + j * (tile + PAD) + tile] for j in range(cols)]
        assert (cells[0][::scale, ::scale, 0] == images[i, 0].numpy()).all()  # the image, in grey
        assert (cells[1][::scale, ::scale, 1] == masks[i, 0].numpy() * 255).all()  # the mask, white = spurious
        for cell, m in zip(cells[2:], maps.values()):  # each map scaled to its own range: max white, min black
            hi, lo = divmod(int(m[i, 0].argmax()), side), divmod(int(m[i, 0].argmin()), side)
            assert (cell[hi[0] * scale, hi[1] * scale] == 255).all() and (cell[lo[0] * scale, lo[1] * scale] == 0).all()
    for j in range(cols):  # every column has its label in the header
        assert figure[:HEADER, PAD + j * (tile + PAD):PAD + j * (tile + PAD) + tile].min() < 100
    with pytest.raises(ValueError, match="layer1"):
        maps_figure(images, masks, {**maps, "layer1": torch.rand(n, 1, side, side + 1)})


def test_explain_end_to_end_matches_trains_overlap_record(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "explained"
    assert main(["train", *TINY, "--method", "tap", "--run-dir", str(run), "--out", str(tmp_path / "r.json")]) == 0
    trained = json.loads((tmp_path / "r.json").read_text())["overlap"]
    assert trained["images"] == 32 and list(trained["maps"]) == [GRADIENT, "pool1", "pool2"]
    assert main(["explain", "--run-dir", str(run), "--out", str(out), "--images", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "recall" in printed and "pool2" in printed
    record = json.loads((out / "overlap.json").read_text())
    assert record["overlap"] == trained  # the same model on the same contaminated test set
    assert all(0.0 <= v <= 1.0 for row in record["overlap"]["maps"].values() for v in row.values())
    assert record["maps_png"]["columns"] == ["image", "mask", GRADIENT, "pool1", "pool2"]
    assert len(set(record["maps_png"]["test_indices"])) == 3
    width, height = Image.open(out / "maps.png").size
    assert (width, height) == (5 * (112 + PAD) + PAD, HEADER + 3 * (112 + PAD))

    assert main(["explain", "--run-dir", str(run), "--out", str(out), "--device", "cpu"]) == 2
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert main(["explain", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out), "--overwrite",
                 "--images", "2", "--device", "cpu"]) == 0
    assert Image.open(out / "maps.png").size[1] == HEADER + 2 * (112 + PAD)
    capsys.readouterr()
    assert main(["explain", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no checkpoint at {tmp_path / 'checkpoint.pt'}" in err[0]


def _folder_without_masks(root):
    """A tiny two-class user folder (28x28 PNGs) with no masks and no contamination."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 4)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / split / label / f"{i}.png")


def test_overlap_is_skipped_without_spurious_masks_and_explain_refuses(tmp_path, capsys):
    _folder_without_masks(tmp_path / "data")
    args = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--arch", "cnn2", "--image-size",
            "28", "--epochs", "1", "--batch-size", "8", "--quiet", "--device", "cpu", "--run-dir", str(tmp_path / "run")]
    assert main([*args, "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["overlap"] is None
    capsys.readouterr()
    assert main(["explain", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no spurious masks" in err[0] and not (tmp_path / "x").exists()


@pytest.mark.parametrize("images", [0, -1, 2.0, True])
def test_explain_refuses_a_bad_image_count_before_reading(images, tmp_path):
    with pytest.raises(ValueError, match=r"images \(--images\) must be a positive int"):
        explain(tmp_path / "missing.pt", tmp_path / "x", images=images)
    assert not (tmp_path / "x").exists()


def test_no_overlap_flag_leaves_the_record_out(tmp_path):
    assert main(["train", *TINY, "--no-overlap", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["overlap"] is None
