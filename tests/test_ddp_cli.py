"""``torchrun --nproc_per_node=2 -m tap_fast train`` (DDP, gloo on 2 CPU processes) equals one process.

Same global batch (64, so 32 per rank), same seed: the final checkpoint's parameters agree within atol 2e-6 /
rtol 1e-5 and the epoch losses within rtol 1e-5 (only the order of fp32 sums differs, as in test_ddp.py);
evaluation losses within rtol 1e-4. Only rank 0 prints the table and writes the JSON.
"""
import json

import pytest
import torch
from launch_ddp import torchrun

from tap_fast.cli import main

ARGS = ["train", "--dataset", "digits", "--method", "tap", "--epochs", "1", "--limit-train", "256", "--limit-test",
        "50", "--limit-val", "50", "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_cli")
    proc = torchrun(["-m", "tap_fast", *ARGS, "--run-dir", str(out / "two"), "--out", str(out / "two.json")])
    assert main([*ARGS, "--run-dir", str(out / "one"), "--out", str(out / "one.json")]) == 0
    return out, proc


def test_two_processes_train_like_one(runs):
    out, _ = runs
    two, one = (json.loads((out / f"{k}.json").read_text()) for k in ("two", "one"))
    assert two["environment"]["processes"] == 2 and one["environment"]["processes"] == 1
    assert two["config"]["batch_size"] == one["config"]["batch_size"] == 64
    for key in ("loss_per_epoch", "task_loss_per_epoch", "penalty_per_epoch"):
        torch.testing.assert_close(torch.tensor(two[key]), torch.tensor(one[key]), atol=0, rtol=1e-5)
    assert one["penalty_per_epoch"][0] > 0
    for variant, m in one["metrics"].items():
        assert two["metrics"][variant]["loss"] == pytest.approx(m["loss"], rel=1e-4)
        assert two["metrics"][variant]["accuracy"] == pytest.approx(m["accuracy"], abs=1 / 50)
    a, b = (torch.load(out / k / "checkpoint.pt", weights_only=True) for k in ("two", "one"))
    assert a["epoch"] == b["epoch"] == 1 and a["model"].keys() == b["model"].keys()
    for name, tensor in b["model"].items():
        torch.testing.assert_close(a["model"][name], tensor, atol=2e-6, rtol=1e-5, msg=name)


def test_only_rank_zero_prints_and_writes(runs):
    _, proc = runs
    assert proc.stderr.count("wrote ") == 1
    assert proc.stdout.count("model ") == 1  # the table header, once


def test_other_commands_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["sweep", *ARGS[1:], "--lambdas", "1e-3"]) == 2
    assert "only `train` runs under torchrun" in capsys.readouterr().err
