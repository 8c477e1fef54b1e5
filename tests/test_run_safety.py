"""Nothing a run is given is lost or half-checked (issue 11, point 4): output paths checked before any data is
loaded, run dirs never replaced unasked, corrupt files named (caches rebuilt), Ctrl-C says how to resume,
batch sizes checked against the training set, --weights named as the flag, a summary line at the start."""
import json
import os
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

import tap_fast.experiments as experiments
import tap_fast.preparation as preparation
from tap_fast.cli import main
from tap_fast.config import TrainConfig, resolve
from tap_fast.datasets import load_dataset
from tap_fast.loop import load_checkpoint
from tap_fast.models import build_model

TINY = ["--dataset", "digits", "--epochs", "1", "--limit-train", "64", "--limit-test", "32", "--batch-size", "16",
        "--lr", "0.05", "--device", "cpu", "--method", "tap"]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any data set fails the test: what it runs must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded")
    monkeypatch.setattr(preparation, "load_dataset", refuse)


def _error_line(capsys, untrained_teacher: bool = False) -> str:
    """The one line on stderr; with ``untrained_teacher``, beside the warning that a teacher trained on these tiny
    sets learned nothing (``preparation.evaluate_teacher``), which must be there."""
    lines = capsys.readouterr().err.strip().splitlines()
    if untrained_teacher:
        warnings = [line for line in lines if line.startswith("warning: the teacher (")]
        assert len(warnings) == 1, lines
        lines = [line for line in lines if line not in warnings]
    assert not any("Traceback" in line for line in lines) and len(lines) == 1, lines
    return lines[0]


def _usage_error(capsys) -> str:
    """argparse's answer to a bad argument: its usage line, then one error line (returned)."""
    usage, line = capsys.readouterr().err.strip().splitlines()
    assert usage.startswith("usage: tap-fast")
    return line


def _train(run_dir, *extra, quiet=True) -> int:
    return main(["train", *TINY, "--run-dir", str(run_dir), *(["--quiet"] if quiet else []), *extra])


# --- --out, --run-dir and --cache-dir before any data is loaded --------------------------------------------

@pytest.mark.parametrize("command,flag,place", [
    ("train", "--out", "folder"), ("train", "--out", "under-file"), ("train", "--run-dir", "file"),
    ("train", "--cache-dir", "file"), ("train", "--run-dir", "under-file"), ("sweep", "--run-dir", "file"),
    ("sweep", "--out", "folder"), ("annotate", "--cache-dir", "under-file"), ("annotate", "--run-dir", "file"),
    ("demo", "--out", "folder")])
def test_output_paths_are_checked_before_any_data_is_loaded(command, flag, place, tmp_path, no_loading, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    path = {"folder": tmp_path / "folder", "file": tmp_path / "file", "under-file": tmp_path / "file" / "a" / "b"}
    method = ["--method", "tap"] if command == "sweep" else []
    with pytest.raises(SystemExit) as exc:
        main([command, *method, "--quiet", flag, str(path[place])])
    assert exc.value.code == 2
    line = _usage_error(capsys)
    assert f"argument {flag}: " in line and str(path[place]) in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_is_refused(tmp_path, no_loading, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SystemExit):
        main(["train", "--quiet", "--out", str(locked / "r.json")])
    assert "argument --out: cannot write" in _usage_error(capsys)


def test_creatable_output_paths_pass(tmp_path):
    out, run_dir = tmp_path / "new" / "r.json", tmp_path / "new" / "deeper" / "run"
    assert _train(run_dir, "--out", str(out), "--cache-dir", str(tmp_path / "cache")) == 0
    assert json.loads(out.read_text())["config"]["run_dir"] == str(run_dir)


# --- run dirs: --resume or --overwrite -------------------------------------------------------------------

def test_a_run_dir_with_a_checkpoint_needs_resume_or_overwrite(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    assert _train(run_dir) == 0
    checkpoint = run_dir / "checkpoint.pt"
    written = checkpoint.read_bytes()
    monkeypatch.setattr(preparation, "load_dataset", lambda *a, **k: pytest.fail("data was loaded"))
    assert _train(run_dir) == 2  # the same configuration
    line = _error_line(capsys)
    assert "argument --run-dir: " in line and "this configuration" in line
    assert "--resume" in line and "--overwrite" in line
    assert _train(run_dir, "--lam", "0.5") == 2  # another one
    line = _error_line(capsys)
    assert "another configuration" in line and "'lam'" in line and "--overwrite" in line
    assert _train(run_dir, "--lam", "0.5", "--resume") == 2  # cannot be resumed either
    assert "different settings ['lam']" in _error_line(capsys)
    assert _train(run_dir, "--resume", "--overwrite") == 2
    assert "argument --overwrite: " in _error_line(capsys)
    assert checkpoint.read_bytes() == written
    monkeypatch.undo()
    assert _train(run_dir, "--lam", "0.5", "--overwrite") == 0
    assert load_checkpoint(checkpoint)["meta"]["lam"] == 0.5


def test_a_sweep_refuses_the_run_dirs_of_an_earlier_sweep(tmp_path, capsys):
    sweep = ["sweep", *TINY, "--quiet", "--lambdas", "1e-3", "--run-dir", str(tmp_path / "sweep")]
    assert main(sweep) == 0
    capsys.readouterr()
    assert main(sweep) == 2
    line = _error_line(capsys)
    assert str(tmp_path / "sweep" / "lam_0.001") in line and "--resume" in line
    assert main([*sweep, "--resume"]) == 0


# --- corrupt files ---------------------------------------------------------------------------------------

def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_a_corrupt_npz_is_one_error_line_naming_it(tmp_path, capsys):
    path = tmp_path / "mnist.npz"
    np.savez(path, **{k: np.zeros((4, 28, 28) if k[0] == "x" else 4, np.uint8)
                      for k in ("x_train", "y_train", "x_test", "y_test")})
    _truncated(path)
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--quiet"]) == 2
    line = _error_line(capsys)
    assert str(path) in line and "BadZipFile" in line and "complete copy" in line
    for content in (b"", b"not an npz at all" * 9):
        path.write_bytes(content)
        assert main(["train", "--dataset", "pneumoniamnist", "--data-dir", str(path), "--quiet"]) == 2
        assert f"cannot read {path} as an npz file" in _error_line(capsys)
    np.save(tmp_path / "x.npy", np.zeros(3))
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "x.npy"), "--quiet"]) == 2
    assert "not an npz archive" in _error_line(capsys)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "a list", "incomplete"])
def test_a_corrupt_checkpoint_is_named_and_overwrite_replaces_it(kind, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(run_dir) == 0
    checkpoint = run_dir / "checkpoint.pt"
    if kind == "truncated":
        _truncated(checkpoint)
    elif kind == "a list":
        torch.save([1, 2], checkpoint)
    elif kind == "incomplete":
        torch.save({"model": {}, "epoch": 1}, checkpoint)
    else:
        checkpoint.write_bytes(b"" if kind == "empty" else b"\x80garbage" * 40)
    for extra in ((), ("--resume", "--epochs", "2")):
        assert _train(run_dir, *extra) == 2
        line = _error_line(capsys)
        assert f"cannot read {checkpoint}" in line and "--overwrite" in line
    assert _train(run_dir, "--overwrite") == 0
    assert load_checkpoint(checkpoint)["epoch"] == 1


def test_load_checkpoint_names_a_missing_entry(tmp_path):
    torch.save({"model": {}, "epoch": 1}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"lacks the entries \['optimizer'"):
        load_checkpoint(tmp_path / "c.pt")


def _teacher_config(run_dir):
    return TrainConfig(dataset="digits", method="tap", annotations="teacher", lam=0.01, epochs=1, lr=0.05,
                       batch_size=32, limit_train=64, limit_test=32, quiet=True, device="cpu", run_dir=str(run_dir))


def test_an_annotation_cache_older_than_a_setting_is_reused_at_its_default(tmp_path, monkeypatch):
    """A cache whose key lacks a setting added since (here tag_style) is reused while the run holds it at its
    default (no teacher is trained again), and rebuilt for another value."""
    config = _teacher_config(tmp_path)
    ds = preparation.load(config)
    first = preparation.prepare(resolve(config, ds), ds)
    cache = tmp_path / "annotations.pt"
    saved = torch.load(cache, weights_only=True)
    del saved["key"]["tag_style"]
    torch.save(saved, cache)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was trained again")
    monkeypatch.setattr(preparation, "train_teacher", no_teacher)
    again = preparation.prepare(resolve(config, ds), ds)
    assert torch.equal(again.train.masks, first.train.masks)
    shrunk = TrainConfig(**{**config.__dict__, "tag_style": "shrunk"})
    with pytest.raises(AssertionError, match="trained again"):
        preparation.prepare(resolve(shrunk, ds), ds)


@pytest.mark.parametrize("content", [b"", b"garbage" * 30, "truncated"])
def test_a_corrupt_annotation_cache_is_rebuilt(content, tmp_path, capsys):
    config = _teacher_config(tmp_path)
    ds = preparation.load(config)
    first = preparation.prepare(resolve(config, ds), ds)
    cache = tmp_path / "annotations.pt"
    if content == "truncated":
        _truncated(cache)
    else:
        cache.write_bytes(content)
    capsys.readouterr()
    again = preparation.prepare(resolve(config, ds), ds)
    notice = _error_line(capsys, untrained_teacher=True)  # the rebuild trains the teacher again
    assert f"cannot read {cache}" in notice and "rebuild" in notice
    assert torch.equal(again.train.masks, first.train.masks)
    assert set(torch.load(cache, weights_only=True)) == {"key", "masks", "info"}


def test_a_corrupt_decoded_image_cache_is_rebuilt(tmp_path, capsys):
    root, cache_dir = tmp_path / "data", tmp_path / "cache"
    for split, cls, i in [(s, c, i) for s in ("train", "test") for c in ("NORMAL", "PNEUMONIA") for i in range(2)]:
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20), 40 * i + (cls == "NORMAL") * 100, np.uint8)).save(
            root / split / cls / f"{i}.png")
    first = load_dataset("pneu", root, image_size=16, val_fraction=0, cache_dir=cache_dir)
    (cache,) = cache_dir.glob("pneu-16px-*.pt")
    _truncated(cache)
    again = load_dataset("pneu", root, image_size=16, val_fraction=0, cache_dir=cache_dir)
    notice = _error_line(capsys)
    assert f"cannot read {cache}" in notice and "rebuild" in notice
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.labels,
                                                                              first.test.labels)
    assert set(torch.load(cache, weights_only=True)) == {"train", "test"}


@pytest.mark.parametrize("kind", ["garbage", "truncated", "other arch"])
def test_a_bad_weights_file_is_one_line_naming_the_flag(kind, tmp_path, capsys):
    path = tmp_path / "w.pth"
    torch.save(build_model("cnn2", 10).state_dict(), path)  # a state dict, but not of a ResNet-18
    if kind == "garbage":
        path.write_bytes(b"\x80garbage" * 40)
    elif kind == "truncated":
        _truncated(path)
    assert main(["train", *TINY, "--quiet", "--method", "none", "--arch", "resnet18", "--weights", str(path)]) == 2
    line = _error_line(capsys)
    assert line.startswith("tap-fast train: error: argument --weights: ") and str(path) in line
    assert "weights=" not in line and "--weights PATH" in line
    assert ("do not fit arch 'resnet18'" if kind == "other arch" else "unreadable") in line


def test_missing_imagenet_weights_name_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert main(["train", *TINY, "--quiet", "--method", "none", "--arch", "resnet18", "--weights", "imagenet"]) == 2
    line = _error_line(capsys)
    assert "not available offline" in line and "--weights PATH" in line and "weights=" not in line


# --- Ctrl-C -------------------------------------------------------------------------------------------------

def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    assert _train(run_dir) == 0
    monkeypatch.setattr(experiments, "fit", _interrupt)
    argv = ["train", *TINY, "--epochs", "2", "--quiet", "--run-dir", str(run_dir), "--resume"]
    assert main(argv) == 130
    line = _error_line(capsys)
    assert "interrupted" in line and f"--run-dir {run_dir}" in line and "--resume" in line
    command = shlex.split(line.split(": tap-fast ", 1)[1])
    assert command == argv  # the command that was interrupted, with --resume once
    monkeypatch.undo()
    assert main(command) == 0
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 2


def test_ctrl_c_without_a_run_dir_exits_130_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(experiments, "fit", _interrupt)
    assert main(["train", *TINY, "--quiet"]) == 130
    line = _error_line(capsys)
    assert line == "tap-fast train: interrupted"


# --- batch size, summary line -----------------------------------------------------------------------------

def test_a_batch_larger_than_the_training_set_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "fit", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(preparation, "fit", lambda *a, **k: pytest.fail("trained a teacher"))
    assert main(["train", *TINY, "--quiet", "--batch-size", "65"]) == 2
    assert "argument --batch-size: batch_size 65 exceeds the 64 training images" in _error_line(capsys)
    # a teacher holds out round(0.1 * 64) = 6 of them
    assert main(["train", *TINY, "--quiet", "--annotations", "teacher", "--batch-size", "60"]) == 2
    assert "batch_size 60 exceeds the 58 training images" in _error_line(capsys)


def test_a_default_batch_is_capped_and_recorded(tmp_path):
    out = tmp_path / "r.json"
    tiny = [a for a in TINY if a not in ("--batch-size", "16")]
    assert main(["train", *tiny, "--quiet", "--limit-train", "40", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["batch_size"] == 40  # digits' default 256 > 40 images


def test_a_run_prints_a_summary_line_and_where_it_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train(run_dir, quiet=False) == 0
    err = capsys.readouterr().err
    assert ("tap: digits train 64 / val 144 / test 32 images, device cpu, feed memory, arch cnn2, lr 0.05, "
            "lambda 0.01, batch 16") in err
    assert "resuming" not in err
    assert _train(run_dir, "--resume", "--epochs", "3", quiet=False) == 0
    err = capsys.readouterr().err
    assert f"{run_dir}: resuming from epoch 2" in err and "tap epoch 2/3" in err
    assert _train(run_dir, "--resume", "--epochs", "4") == 0  # --quiet: neither line
    assert capsys.readouterr().err == ""


def test_a_checkpoint_older_than_a_setting_resumes_at_its_default(tmp_path, capsys):
    """A checkpoint written before a setting existed (its meta lacks the key) resumes when the run holds that
    setting at its default, and is refused, naming it, when the run sets another value."""
    run_dir = tmp_path / "run"
    assert _train(run_dir) == 0
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    for key in ("tag_style", "tau_rule"):
        del state["meta"][key]
    torch.save(state, run_dir / "checkpoint.pt")
    assert _train(run_dir, "--tag-style", "shrunk", "--resume", "--epochs", "2") == 2
    assert "tag_style" in _error_line(capsys)
    assert _train(run_dir, "--resume", "--epochs", "2") == 0
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_extending_a_teacher_run_names_teacher_epochs(tmp_path, capsys):
    """teacher_epochs follows epochs: more epochs with --resume would change the teacher the checkpoint was
    trained with, so it is refused with the flag that keeps it; given, the run continues."""
    run_dir = tmp_path / "run"
    teacher = ["--annotations", "teacher", "--batch-size", "16"]
    assert _train(run_dir, *teacher) == 0
    capsys.readouterr()  # the first run's output
    assert _train(run_dir, *teacher, "--resume", "--epochs", "2") == 2
    line = _error_line(capsys)
    assert "teacher_epochs" in line and "--teacher-epochs) 1 " in line
    assert _train(run_dir, *teacher, "--resume", "--epochs", "2", "--teacher-epochs", "1") == 0


def test_resume_accepts_the_default_batch_capped_at_the_set(tmp_path):
    """A default batch larger than the training set is capped (and recorded) at load time; resuming with more
    epochs compares the capped value, not the uncapped default."""
    run_dir = tmp_path / "run"
    base = ["train", "--dataset", "digits", "--limit-train", "100", "--limit-test", "20", "--lr", "0.05",
            "--device", "cpu", "--quiet", "--run-dir", str(run_dir), "--out", str(tmp_path / "r.json")]
    assert main([*base, "--epochs", "1"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["config"]["batch_size"] == 100  # 256 capped
    assert main([*base, "--epochs", "2", "--resume"]) == 0
