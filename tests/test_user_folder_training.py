"""Training on the user's own folder (``--dataset folder``) with its masks, from the CLI: a generated data set
whose artefact reveals the class. No XS leans on the artefact (its accuracy collapses on a test split whose
artefacts are swapped between the classes); TAP with the masks (or the same as boxes) relies on it clearly
less. Two CPU trainings of a few seconds each."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tap_fast.cli import main

SIZE = 28
COMMON = ["--dataset", "folder", "--arch", "cnn2", "--image-size", str(SIZE), "--epochs", "6", "--lr", "0.05",
          "--batch-size", "32", "--device", "cpu", "--quiet", "--no-channels-last"]


def artefact_folder(root: Path, n_per_class: int = 150, seed: int = 0) -> None:
    """Classes "horizontal" / "vertical": faint noisy stripes (the real signal) below a bright 5x5 artefact at the
    top left (class 0) or top right (class 1). val/ keeps that pairing, test/ swaps it. masks/ and boxes.csv
    mark a generous box around each artefact, as an annotator would draw it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    rows = ["path,x0,y0,x1,y1"]
    for split, n, swap in (("train", n_per_class, False), ("val", n_per_class // 3, False),
                           ("test", n_per_class // 2, True)):
        for label, cls in enumerate(("horizontal", "vertical")):
            for sub in ("data", "masks"):
                (root / sub / split / cls).mkdir(parents=True)
            for i in range(n):
                img = rng.normal(110, 50, (SIZE, SIZE))
                wave = ((yy if label == 0 else xx) + rng.integers(0, 4)) % 4 < 2
                img[8:] += 40 * np.where(wave[8:], 1, -1)
                x0 = 1 if (label == 1) == swap else SIZE - 6
                img[1:6, x0:x0 + 5] = 255
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "data" / split / cls / f"{i}.png")
                box = (max(0, x0 - 3), 0, min(SIZE, x0 + 8), 9)
                mask = np.zeros((SIZE, SIZE), np.uint8)
                mask[box[1]:box[3], box[0]:box[2]] = 255
                Image.fromarray(mask).save(root / "masks" / split / cls / f"{i}.png")
                rows.append(f"{split}/{cls}/{i}.png,{','.join(map(str, box))}")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")


def _train(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["train", *COMMON, "--data-dir", str(tmp_path / "data"), "--out", str(out), *args]) == 0
    return json.loads(out.read_text())


def _reliance(record: dict) -> float:
    """Accuracy on the artefact-aligned val split minus on the swapped test split."""
    return record["validation"]["test"]["accuracy"] - record["metrics"]["test"]["accuracy"]


def test_tap_on_users_masks_removes_the_artefact_shortcut(tmp_path):
    artefact_folder(tmp_path)
    no_xs = _train(tmp_path, "none", "--method", "none")
    tap = _train(tmp_path, "tap", "--method", "tap", "--lam", "0.03", "--masks-dir", str(tmp_path / "masks"))
    assert set(no_xs["metrics"]) == {"test"} and no_xs["shortcut_drop"] is None  # nothing contaminated
    assert no_xs["validation"]["test"]["accuracy"] > 0.9 and _reliance(no_xs) > 0.6
    assert tap["metrics"]["test"]["accuracy"] > 0.8 and _reliance(tap) < _reliance(no_xs) - 0.5
    assert tap["annotations"]["images_without_mask"] == {"train": 0, "val": 0, "test": 0}
    boxed = _train(tmp_path, "boxes", "--method", "tap", "--lam", "0.03", "--boxes", str(tmp_path / "boxes.csv"),
                   "--epochs", "1")
    masked = _train(tmp_path, "masks1", "--method", "tap", "--lam", "0.03", "--masks-dir",
                    str(tmp_path / "masks"), "--epochs", "1")
    # the boxes are the mask files' rectangles: the same masks, so the same training
    assert boxed["loss_per_epoch"] == masked["loss_per_epoch"]


def test_images_without_a_mask_are_counted_and_printed(tmp_path, capsys):
    artefact_folder(tmp_path, n_per_class=6)
    for name in ("0.png", "1.png"):
        (tmp_path / "masks" / "train" / "vertical" / name).unlink()
    out = tmp_path / "r.json"
    assert main(["train", *[a for a in COMMON if a != "--quiet"], "--data-dir", str(tmp_path / "data"), "--epochs",
                 "1", "--batch-size", "4", "--method", "tap", "--lam", "0.1", "--masks-dir", str(tmp_path / "masks"),
                 "--out", str(out)]) == 0
    counts = {"train": 2, "val": 0, "test": 0}
    assert json.loads(out.read_text())["annotations"]["images_without_mask"] == counts
    assert f"images without a mask (no spurious pixels) per split: {counts}" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--masks-dir", "nope"], "--masks-dir nope is not a directory"),
    (["--boxes", "missing.csv"], "--boxes missing.csv: cannot read it"),
    (["--soft-masks"], "soft_masks|--soft-masks"),
    (["--channels", "3", "--dataset", "digits"], "channels"),
])
def test_bad_folder_arguments_are_one_error_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    (tmp_path / "data" / "test" / "a").mkdir(parents=True)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "data" / split / cls / "x.png")
    argv = ["train", *COMMON, "--data-dir", "data", "--method", "tap", "--lam", "0.1", *args]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own checks
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and any(re.search(message, line) for line in err)


@pytest.mark.parametrize("feed", ["torchvision", "dali"])
def test_streamed_folder_trains_as_the_memory_feed(tmp_path, feed):
    """The training split streamed from disk (DALI's CPU pipeline or torchvision) gives the memory feed's
    batches in the same order, so the same losses and metrics for the same seed (PNG: bit-exact decoding)."""
    if feed == "dali":
        pytest.importorskip("nvidia.dali")
    artefact_folder(tmp_path, n_per_class=40)
    args = ["--method", "tap", "--lam", "0.03", "--masks-dir", str(tmp_path / "masks"), "--epochs", "2",
            "--batch-size", "16", "--contamination", "stripe"]
    memory = _train(tmp_path, "memory", *args, "--feed", "memory")
    streamed = _train(tmp_path, feed, *args, "--feed", feed)
    assert memory["loss_per_epoch"] == streamed["loss_per_epoch"] and memory["metrics"] == streamed["metrics"]
    assert set(memory["metrics"]) == {"test", "contaminated", "permuted", "clean"}


def test_auto_feed_streams_a_folder_beyond_the_memory_budget(tmp_path, monkeypatch):
    from tap_fast import preparation
    from tap_fast.config import TrainConfig

    artefact_folder(tmp_path, n_per_class=4)
    config = TrainConfig(dataset="folder", data_dir=str(tmp_path / "data"), image_size=SIZE, feed="auto")
    assert preparation.resolve_feed(config) == "memory"  # 8 images of 28 x 28 px and their masks
    monkeypatch.setattr(preparation, "MEMORY_FEED_BYTES", 8 * 2 * SIZE * SIZE - 1)
    assert preparation.resolve_feed(config) in ("dali", "torchvision")
    dataset = preparation.load(config)
    assert dataset.streamed_train is not None and len(dataset.streamed_train.files) == 8


def test_streamed_knee_layout_trains_as_the_memory_feed(tmp_path):
    """The paper's folder sets stream too: a KNEE layout ({train,val,test}/{0..4}/*.png, odd image sizes)
    trains identically from memory and streamed by torchvision, tags and all."""
    rng = np.random.default_rng(2)
    for split, n in (("train", 5), ("val", 1), ("test", 2)):
        for grade in range(5):
            (tmp_path / "knee" / split / str(grade)).mkdir(parents=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(30, 60, 2))
                Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(
                    tmp_path / "knee" / split / str(grade) / f"{i}.png")
    common = ["train", "--dataset", "knee", "--data-dir", str(tmp_path / "knee"), "--arch", "cnn2", "--image-size",
              "28", "--epochs", "2", "--lr", "0.05", "--batch-size", "10", "--device", "cpu", "--quiet",
              "--no-channels-last", "--method", "tap", "--lam", "0.01", "--weights", "none"]
    records = {}
    for feed in ("memory", "torchvision"):
        out = tmp_path / f"{feed}.json"
        assert main([*common, "--feed", feed, "--out", str(out)]) == 0
        records[feed] = json.loads(out.read_text())
    assert records["memory"]["loss_per_epoch"] == records["torchvision"]["loss_per_epoch"]
    assert records["memory"]["metrics"] == records["torchvision"]["metrics"]
    assert records["torchvision"]["sizes"]["train"] == 25


def test_base_model_streams_with_a_contamination_and_tiny_train_is_named(tmp_path, capsys):
    """The clean-trained Base model streamed with a contamination asked (its train split is clean: no
    placement), and a train/ too small to hold out a val split without val/ is one error line."""
    artefact_folder(tmp_path, n_per_class=12)
    out = tmp_path / "base.json"
    assert main(["train", *COMMON, "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "8",
                 "--method", "none", "--clean-train", "--contamination", "stripe", "--feed", "torchvision",
                 "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["metrics"]) == {"test", "contaminated", "permuted", "clean"}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "small" / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small" / split / cls / "x.png")
    assert main(["train", *COMMON, "--data-dir", str(tmp_path / "small"), "--method", "none"]) == 2
    assert "too few to hold out 10% for validation; add a val/ folder" in capsys.readouterr().err
