"""The tap-fast command line: train / sweep / annotate / demo, JSON records, and argument errors."""
import json
import os
import subprocess
import sys

import pytest

from tap_fast.cli import main

TINY = ["--dataset", "digits", "--epochs", "1", "--limit-train", "64", "--limit-test", "30", "--batch-size", "32",
        "--lr", "0.05", "--quiet", "--device", "cpu"]


def test_train_writes_json_with_documented_keys(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["train", *TINY, "--method", "tap", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    for variant in ("contaminated", "permuted", "clean"):
        assert 0.0 <= record["metrics"][variant]["accuracy"] <= 1.0
    assert record["config"]["method"] == "tap" and record["config"]["lam"] == 0.01  # L1 default on digits
    assert record["config"]["norm"] == "l1" and record["config"]["arch"] == "cnn2"
    assert len(record["loss_per_epoch"]) == 1 and record["timing"]["total_s"] > 0
    assert "contaminated" in capsys.readouterr().out


def test_base_run_trains_on_clean_data(tmp_path):
    out = tmp_path / "base.json"
    assert main(["train", *TINY, "--method", "none", "--clean-train", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["config"]["clean_train"] is True and record["config"]["lam"] == 0.0


@pytest.mark.parametrize("args,flag", [
    (["--arch", "resnet50"], "--arch"), (["--dataset", "cifar10"], "--dataset"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "--data-dir"), (["--dataset", "mnist"], "--data-dir"),
    (["--lam", "-1"], "--lam"), (["--epochs", "0"], "--epochs"), (["--method", "tap", "--norm", "l3"], "--norm"),
    (["--tau", "2"], "--tau"), (["--resume"], "--resume"), (["--method", "tap", "--clean-train"], "--clean-train"),
    (["--method", "tap", "--arch", "resnet18", "--weights", "none"], "--lam"), (["--amp", "fp16"], "--amp"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs"), (["--permute", "swap"], "--permute"),
    (["--tag-mask", "outline"], "--tag-mask"), (["--tau-rule", "top"], "--tau-rule"),
    (["--teacher-lr", "0"], "--teacher-lr"), (["--teacher-weight-decay", "-1"], "--teacher-weight-decay")])
def test_bad_arguments_exit_non_zero_naming_the_argument(args, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        if main(["train", "--quiet", *args]) != 0:
            raise SystemExit(2)
    assert exc.value.code != 0
    assert flag in capsys.readouterr().err


def test_semantics_flags_reach_the_config_with_its_defaults():
    """--permute, --tag-mask, --tag-style, --tau-rule, --teacher-lr and --teacher-weight-decay fill the TrainConfig fields
    of their names; without them the CLI's defaults are TrainConfig's (the released code's semantics)."""
    from tap_fast.cli import _config, build_parser
    from tap_fast.config import TrainConfig
    fields = ("permute", "tag_mask", "tag_style", "tau_rule", "teacher_lr", "teacher_weight_decay")
    parser = build_parser()
    for command in ("train", "sweep", "annotate"):
        config = _config(parser.parse_args([command]))
        assert [getattr(config, f) for f in fields] == [getattr(TrainConfig(), f) for f in fields] == [
            "random", "box", "font", "quantile", 1e-4, 1e-4]
    args = parser.parse_args(["train", "--permute", "derangement", "--tag-mask", "ink", "--tag-style", "shrunk",
                              "--tau-rule", "threshold", "--teacher-lr", "0.01", "--teacher-weight-decay", "0"])
    assert [getattr(_config(args), f) for f in fields] == ["derangement", "ink", "shrunk", "threshold", 0.01, 0.0]
    assert parser.parse_args(["annotate", "--lr", "0.05"]).teacher_lr == 0.05  # annotate's --lr is the teacher's
    assert parser.parse_args(["annotate", "--teacher-lr", "0.02"]).teacher_lr == 0.02


def test_tau_takes_eq14s_range_like_the_library():
    """--tau accepts (0, 1], as check_config and annotations.threshold_saliency do (tau = 1 is allowed)."""
    from tap_fast.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["train", "--tau", "1"]).tau == 1.0
    assert parser.parse_args(["annotate", "--tau", "0.01", "1"]).tau == [0.01, 1.0]
    for bad in ("0", "1.01", "nan"):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "--tau", bad])


def test_triton_backend_on_the_cpu_is_refused_up_front(monkeypatch, capsys):
    """Without Triton's interpreter, --tap-backend triton / identity on the CPU is an argument error before
    any data is loaded, naming the flag and what it needs."""
    monkeypatch.delenv("TRITON_INTERPRET")
    for backend in ("triton", "identity"):
        assert main(["train", *TINY, "--method", "tap", "--tap-backend", backend]) == 2
        err = capsys.readouterr().err
        assert f"argument --tap-backend: tap_backend '{backend}' runs Triton kernels" in err
        assert "TRITON_INTERPRET=1" in err and "epoch" not in err
    assert main(["train", *TINY, "--method", "none", "--tap-backend", "torch"]) == 2
    assert "argument --tap-backend: tap_backend 'torch'" in capsys.readouterr().err


def test_empty_mnist_folder_is_an_error_naming_the_data(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mnist.npz" in err and "never downloads" in err


def test_sweep_and_annotate_commands(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert main(["sweep", *TINY, "--method", "tap", "--lambdas", "1e-3,1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["lam"] for r in record["runs"]] == [1e-3, 1.0] and record["best_lam"] in (1e-3, 1.0)
    out = tmp_path / "annotate.json"
    assert main(["annotate", *TINY, "--tau", "0.01", "0.1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["taus"]) == {"0.01", "0.1"}
    assert "precision" in capsys.readouterr().out


def test_demo_quick_prints_the_contrast(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--seeds", "0", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "No XS" in text and "TAP" in text and "Base" in text and "drop" in text
    record = json.loads(out.read_text())
    assert set(record["runs"]) == {"Base", "No XS", "TAP"}
    assert record["runs"]["Base"][0]["config"]["clean_train"] is True and record["seeds"] == [0]
    assert set(record["mean"]["TAP"]["metrics"]) == {"contaminated", "permuted", "clean"}


@pytest.mark.parametrize("args,code,expected", [
    (["--help"], 0, ["{train,sweep,annotate,explain,demo}"]),
    (["train", "--help"], 0, ["--teacher-fraction", "--resume", "--no-overlap"]),
    (["explain", "--help"], 0, ["--checkpoint", "--images"]),
    (["explain", "--out", "x"], 2, ["one of the arguments --run-dir --checkpoint is required"]),
    (["train", "--epochs", "0"], 2, ["argument --epochs: must be a positive integer, got '0'"]),
    (["train", "--dataset", "mnist"], 2, ["argument --data-dir: required for --dataset mnist"]),
    (["bench"], 2, ["invalid choice: 'bench'"])])  # the step benchmark is benchmarks/step_table.py
def test_help_and_argument_errors_answer_without_importing_torch(args, code, expected):
    """``python -m tap_fast`` (as the tap-fast script, through the package and tap_fast.cli) parses its
    arguments before it imports the engine: -X importtime lists every module the process imported."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tap_fast", *args], capture_output=True,
                          text=True, env=env, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert proc.returncode == code, proc.stderr
    assert all(text in proc.stdout + proc.stderr for text in expected)
    assert "tap_fast.cli" in imported and "torch" not in imported


def test_compile_flag_trains_like_eager(tmp_path):
    """--compile reaches make_step (dynamo compiles graphs) and, with inductor reordering fp32 sums, gives
    the eager losses within rtol 1e-4 after 2 steps."""
    import torch._dynamo
    tiny = [*TINY, "--method", "tap", "--limit-val", "20"]
    assert main(["train", *tiny, "--out", str(tmp_path / "eager.json")]) == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert main(["train", *tiny, "--compile", "--out", str(tmp_path / "compiled.json")]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch._dynamo.reset()
    eager, compiled = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("eager", "compiled"))
    assert compiled["config"]["compile"] is True and eager["config"]["compile"] is False
    for key in ("loss_per_epoch", "penalty_per_epoch"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4)
    for variant, m in eager["metrics"].items():
        assert compiled["metrics"][variant]["loss"] == pytest.approx(m["loss"], rel=1e-4)


def test_tap_backends_train_alike(tmp_path):
    """--tap-backend reaches the step: the PyTorch reference, the fused kernels and their identity form
    (Triton's interpreter here) give the same losses (fp32, rtol 1e-5)."""
    records = {}
    for backend in ("torch", "triton", "identity"):
        out = tmp_path / f"{backend}.json"
        assert main(["train", *TINY, "--method", "tap", "--limit-val", "20", "--tap-backend", backend,
                     "--out", str(out)]) == 0
        records[backend] = json.loads(out.read_text())
        assert records[backend]["config"]["tap_backend"] == backend
    for backend in ("triton", "identity"):
        for key in ("loss_per_epoch", "penalty_per_epoch"):
            assert records[backend][key] == pytest.approx(records["torch"][key], rel=1e-5)
    assert records["torch"]["penalty_per_epoch"][0] > 0
    with pytest.raises(SystemExit):
        main(["train", *TINY, "--tap-backend", "cuda"])
