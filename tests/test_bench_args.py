"""benchmarks/step_table.py checks its arguments up front: a bad one exits through argparse (code 2) naming the flag,
before any model is built or a device is touched."""
import pytest
import torch

from bench_scripts import load_script
from tap_fast.config import resolve_device

step_table = load_script("step_table")


@pytest.mark.parametrize("argv,named", [
    (["--device", "foo"], "--device: device must be 'auto'"),
    (["--device", "meta"], "--device: device must be 'auto'"),
    (["--device", "cuda"], "--device: device 'cuda' was requested but CUDA is not available"),
    (["--rounds", "0"], "argument --rounds: must be a positive integer, got '0'"),
    (["--steps", "0"], "argument --steps: must be a positive integer"),
    (["--steps", "2.5"], "argument --steps: must be a positive integer, got '2.5'"),
    (["--max-steps", "-3"], "argument --max-steps: must be a positive integer"),
    (["--warmup", "-1"], "argument --warmup: must be an integer >= 0, got '-1'"),
    (["--threads", "0"], "argument --threads: must be a positive integer"),
    (["--max-limit", "0"], "argument --max-limit: must be a positive integer"),
    (["--max-limit", "8"], "--max-limit: must be at least 16"),
    (["--mnist-epochs", "0"], "argument --mnist-epochs: must be a positive integer"),
    (["--mnist-n", "0"], "argument --mnist-n: must be a positive integer"),
    (["--mnist-n", "100"], "--mnist-n: must be at least the MNIST protocol's batch of 256"),
    (["--mnist-data", "/nonexistent/mnist"], "--mnist-data: /nonexistent/mnist does not exist"),
    (["--time-budget", "-5"], "argument --time-budget: must be a positive number"),
    (["--time-budget", "nan"], "argument --time-budget: must be a positive number"),
])
def test_bad_bench_arguments_exit_2_naming_the_flag(argv, named, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "--device cuda" on a GPU-less machine
    with pytest.raises(SystemExit) as exc:
        step_table.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and named in err, err
    assert "Traceback" not in err


def test_parse_args_resolves_the_device_and_keeps_valid_values(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = step_table.parse_args(["--warmup", "0", "--rounds", "3", "--mnist-n", "256", "--time-budget", "2.5"])
    assert args.device == torch.device("cpu")  # "auto" without CUDA
    assert (args.warmup, args.rounds, args.mnist_n, args.time_budget) == (0, 3, 256, 2.5)
    assert step_table.parse_args(["--device", "cpu"]).device == torch.device("cpu")


def test_resolve_device_rejects_a_missing_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"device 'cuda:3'.*1 CUDA device"):
        resolve_device("cuda:3")


def test_mnist_protocol_needs_a_full_batch():
    with pytest.raises(ValueError, match="n_train .*at least batch"):
        step_table.mnist_protocol(torch.device("cpu"), epochs=1, n_train=10, batch=16)
