"""benchmarks/gpu_check.sh is ready for a GPU session: each call's caps fit its deadline, call 1 holds the
targets' steps in order, call 2 repeats none of them and covers the rest of v1's plan (or says what it
drops), every step's command line parses, every pytest selection is non-empty, a CPU run through the step
server gathers its files, and the deadline cuts and skips steps (the kernel table's code paths run in
tests/test_check_targets.py, the step server's in tests/test_step_server.py).

The device time of a GPU session is short (two calls of a few minutes), so a typo found there costs the run.
"""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bench_scripts import load_script

step_table = load_script("step_table")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
DEADLINE_S = 450  # the script's default
# Call 1: the issues' targets, in this order.
CALL1 = ["environment", "nvidia_smi", "copy_bandwidth", "tests_cuda", "kernels_resnet18", "kernels_channels_last",
         "steps_max_bf16", "steps_b16_fp32", "mnist_protocol", "nvidia_smi_end"]
MACHINE_STATE = {"environment", "nvidia_smi", "nvidia_smi_end"}  # each call records its own machine
V1_PLAN = ["environment", "tests_kernels", "kernels_resnet18", "steps_b16_fp32", "mnist_protocol", "steps_max_bf16",
           "steps_b16_bf16", "feeds", "tests_engine", "steps_identity", "kernels_rest", "kernels_l2sq",
           "kernels_channels_last", "mnist_protocol_compiled", "steps_b16_compiled", "steps_max_rest",
           "steps_max_baselines", "bench_kernels", "tests_dali"]


def _reproduce_parser():
    """reproduce_mnist.py's parser, with --data-dir pointed at a tiny generated mnist.npz (the device's MNIST is
    carried in data/mnist; its parser checks the folder before anything trains)."""
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_mnist"))
    rng = np.random.default_rng(0)
    np.savez(folder / "mnist.npz", x_train=rng.integers(0, 256, (60, 28, 28), dtype=np.uint8),
             y_train=np.arange(60, dtype=np.uint8) % 10, x_test=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
             y_test=np.arange(20, dtype=np.uint8) % 10)
    parse = load_script("reproduce_mnist").parse_args

    def parse_with_tiny_mnist(argv):
        argv = list(argv)
        argv[argv.index("--data-dir") + 1] = str(folder)
        return parse(argv)
    return parse_with_tiny_mnist


PARSERS = {"kernel_table.py": lambda: load_script("kernel_table").parse_args,
           "reproduce_mnist.py": _reproduce_parser,
           "step_table.py": lambda: step_table.parse_args,
           "bench_feeds.py": lambda: load_script("bench_feeds").build_parser().parse_args,
           "card_state.py": lambda: load_script("card_state").build_parser().parse_args}


def _plan(tmp_path, **env):
    out = tmp_path / "plan_out"
    subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, check=True, timeout=60,
                   env={**os.environ, "OUT": str(out), "GPU_CHECK_PLAN": "1", **env})
    steps = []
    for record in (out / "plan.txt").read_text().split("\x1e")[:-1]:
        name, cap, *cmd = record.split("\x1f")[:-1]
        steps.append((name, int(cap), cmd))
    return steps


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    return {call: _plan(tmp_path_factory.mktemp(f"plan{call}"), CALL=call) for call in ("1", "2")}


def _args(cmd):
    """The parsed arguments of a benchmark command (its script's own parser)."""
    return PARSERS[Path(cmd[1]).name]()(cmd[2:])


def test_caps_fit_the_deadline(plans):
    for call, plan in plans.items():
        names = [name for name, _, _ in plan]
        assert len(set(names)) == len(names), f"call {call}: duplicate step names: {names}"
        assert all(cap > 0 for _, cap, _ in plan)
        assert sum(cap for _, cap, _ in plan) <= DEADLINE_S, f"call {call}: {[(n, c) for n, c, _ in plan]}"


def test_call1_holds_the_targets_steps_in_order(plans):
    plan = {name: cmd for name, _, cmd in plans["1"]}
    assert list(plan) == CALL1
    assert plan["environment"][-1] == "environment" and plan["nvidia_smi"][-1] == "nvidia-smi"
    assert plan["copy_bandwidth"][-1] == "bandwidth"
    assert "-rA" in plan["tests_cuda"] and "-m" in plan["tests_cuda"] and "-k" in plan["tests_cuda"]
    for name, channels_last in (("kernels_resnet18", False), ("kernels_channels_last", True)):
        args = _args(plan[name])
        assert (args.models, args.batches, args.dtypes, args.norm) == (["resnet18"], [128], ["bf16"], "l1")
        assert args.channels_last == channels_last and set(args.impls) == {"eager", "fused", "compiled"}
    memory = _args(plan["kernels_channels_last"])
    assert memory.memory_batch > 0 and memory.memory_dtypes == ["bf16"]  # the identity form is a row of it
    largest = _args(plan["steps_max_bf16"])
    assert [c.name for c in largest.configs] == ["resnet18@224:max"] and largest.max_limit == 512
    assert (largest.max_rows, largest.dtypes, largest.channels_last) == ("none,tap,tap-id", "bf16", True)
    table1 = _args(plan["steps_b16_fp32"])
    assert {(c.size, c.batch) for c in table1.configs} == {(224, 16)} and table1.rows == "none,tap,tap-id,rrr,rbr"
    mnist = _args(plan["mnist_protocol"])
    assert mnist.mnist and "tap" in mnist.mnist_methods.split(",") and mnist.configs == []


def test_call2_repeats_nothing_and_covers_v1(plans):
    """Call 2 runs no step of call 1 (but the machine's state); every step of v1's plan is in a call or is
    named in the script as dropped; some step measures the 8,000 images/s target's setting."""
    call1, call2 = ({name: cmd for name, _, cmd in plans[c]} for c in ("1", "2"))
    assert set(call1) & set(call2) == MACHINE_STATE
    assert not [n for n in call2 if n not in MACHINE_STATE and call2[n] in call1.values()]
    dropped = set(re.findall(r"^\s*#\s+dropped (\w+):", SCRIPT.read_text(), re.M))
    assert dropped and not dropped & (set(call1) | set(call2))
    assert [n for n in V1_PLAN if n not in set(call1) | set(call2) | dropped] == []
    fast = [n for n, cmd in {**call1, **call2}.items() if Path(cmd[1]).name == "step_table.py"
            and (a := _args(cmd)).compile and not a.no_cuda_graphs and a.channels_last
            and "bf16" in a.dtypes and "resnet18@224:max" in [c.name for c in a.configs] and "tap" in a.max_rows]
    assert fast == ["steps_max_compiled"]
    reproduce = _args(call2["reproduce_mnist"])  # the paper's full MNIST protocol, every row
    assert (reproduce.epochs, reproduce.seeds, reproduce.lr, reproduce.batch_size) == (50, [0, 1, 2, 3, 4], 1e-3, 256)
    assert set(reproduce.rows) == set(load_script("reproduce_mnist").ROW_KEYS) and reproduce.taus == [0.01, 0.05, 0.1]
    assert call2["reproduce_mnist"][call2["reproduce_mnist"].index("--data-dir") + 1] == "data/mnist"
    assert "reproduce_table.md" in SCRIPT.read_text() and "data/" in (ROOT / ".gitignore").read_text().split()


def test_only_selects_steps(tmp_path):
    names = [name for name, _, _ in _plan(tmp_path, ONLY="kernels_.*")]
    assert names == ["kernels_resnet18", "kernels_channels_last"]


def test_benchmark_arguments_parse(plans):
    """Each python step is a benchmark script whose arguments pass its own parser and checks, or pytest."""
    seen = set()
    for name, _, cmd in plans["1"] + plans["2"]:
        if cmd[1:3] == ["-m", "pytest"]:
            continue
        assert Path(cmd[1]).name in PARSERS, f"{name}: no parser check for {cmd[1]}"
        _args(cmd)  # SystemExit (argparse's error) fails the test
        seen.add(Path(cmd[1]).name)
    assert seen == set(PARSERS)


@pytest.mark.parametrize("parse,argv,named", [
    (step_table.parse_args, ["--configs", "resnet99@224:16"],
     "--configs: config 'resnet99@224:16': unknown architecture"),
    (step_table.parse_args, ["--rows", "none,tapp"], "--rows: unknown 'tapp'"),
    (step_table.parse_args, ["--mnist-methods", "tap,xs"], "--mnist-methods: unknown 'xs'"),
    ("kernel_table", ["--skip", "resnet18"], "--skip: expected MODEL:BATCH"),
])
def test_bad_benchmark_arguments_are_named(parse, argv, named, capsys):
    if parse == "kernel_table":
        parse = load_script("kernel_table").parse_args
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2 and named in capsys.readouterr().err


def _collect(cmd):
    args = [a for a in cmd[3:] if a not in ("-q", "-v", "-rfEs", "-rA")]
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return {ln for ln in res.stdout.splitlines() if "::" in ln}, {a for a in args if a.endswith(".py")}


def test_pytest_selections_are_not_empty(plans):
    """`-m gpu` (and the files named) select CUDA tests: collected here, skipped here, run on the device. Call 1's
    subset and call 2's rest of the same files do not overlap."""
    selected = {}
    for name, _, cmd in plans["1"] + plans["2"]:
        if cmd[1:3] == ["-m", "pytest"]:
            selected[name], files = _collect(cmd)
            assert {c.split("::")[0] for c in selected[name]} == files, f"{name}: a file selects no CUDA test"
    assert not selected["tests_cuda"] & selected["tests_kernels"]
    assert len(selected["tests_cuda"]) <= 30  # a small subset


def test_cpu_run_through_the_step_server(tmp_path):
    """The machine-state steps run on the CPU through the step server (which starts, serves and ends) and leave
    card.md, results.json, targets.md and the log, at most 8 files."""
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OUT": str(out), "PYTHON": sys.executable,
                              "ONLY": "environment|copy_bandwidth"})
    log = (out / "gpu_check.log").read_text()
    assert res.returncode == 0, log
    assert "step_server: ready" in log and "ok environment" in log and "ok copy_bandwidth" in log
    assert {p.name for p in out.iterdir()} == {"card.md", "results.json", "targets.md", "gpu_check.log"}
    assert "copy bandwidth" in (out / "card.md").read_text()
    assert "| not measured |" in (out / "targets.md").read_text()


FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == - || "$1" == *check_targets.py ]]; then exec {python} "$@"; fi  # gather results for real
if [[ "$*" == *kernel_table* ]]; then  # a row, then a hang
    json=$(sed 's/.*--json \\([^ ]*\\).*/\\1/' <<< "$*")
    echo '[{{"table": "kernels", "impl": "probe", "device": "fake"}}]' > "$json"
    for _ in $(seq 100); do
        if grep -q probe "$OUT/results.json" 2> /dev/null; then echo "row gathered while the step runs"; break; fi
        sleep 0.2
    done
    sleep 300
fi
echo fake "$@"
"""


@pytest.mark.slow
def test_deadline_cuts_then_skips(tmp_path):
    """With a fake python whose kernel-table run writes a row and hangs, the row reaches $OUT while the step
    runs, that step is cut at the deadline, the later ones are skipped and named, the earlier ones pass, and
    the script exits 1."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OUT": str(out), "PYTHON": str(fake), "DEADLINE_S": "30"})
    log = (out / "gpu_check.log").read_text()
    assert res.returncode == 1, log
    assert re.search(r"ok environment", log) and re.search(r"ok tests_cuda", log)
    assert "row gathered while the step runs" in log
    assert re.search(r"CUT kernels_resnet18 at 2\d s", log), log
    assert "skipped kernels_channels_last: deadline" in log
    assert re.search(r"skipped at the deadline: kernels_channels_last .*nvidia_smi_end", log)
