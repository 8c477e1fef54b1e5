"""benchmarks/gpu_check.sh is ready for a GPU session: every step's command line parses, every pytest selection
is non-empty, and the deadline cuts and skips steps (the kernel table's code paths run in
tests/test_check_targets.py).

The device time of a GPU session is short (one call of a few minutes), so a typo found there costs the run.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench_scripts import load_script
from tap_fast import bench

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
# The steps that measure the issues' targets; they must stay in the plan, in this order, ahead of the rest.
PRIORITY = ["environment", "tests_kernels", "kernels_resnet18", "steps_b16_fp32", "mnist_protocol",
            "steps_max_bf16", "steps_b16_bf16", "feeds", "tests_engine"]


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
def plan(tmp_path_factory):
    return _plan(tmp_path_factory.mktemp("plan"))


def test_plan_order_and_caps(plan):
    names = [name for name, _, _ in plan]
    assert len(set(names)) == len(names), f"duplicate step names: {names}"
    assert names[:len(PRIORITY)] == PRIORITY
    assert all(0 < cap <= 180 for _, cap, _ in plan)  # no single step may eat the call


def test_only_selects_steps(tmp_path):
    names = [name for name, _, _ in _plan(tmp_path, ONLY="kernels_.*")]
    assert names and all(name.startswith("kernels_") for name in names)


def test_benchmark_arguments_parse(plan):
    """Each benchmark command's arguments pass its script's own parser and checks."""
    parsers = {"kernel_table.py": load_script("kernel_table").parse_args,
               "step_table.py": bench.parse_args,
               "bench_feeds.py": lambda argv: load_script("bench_feeds").build_parser()
               .parse_args(argv)}
    seen = set()
    for name, _, cmd in plan:
        script = Path(cmd[1]).name
        if script in parsers:
            parsers[script](cmd[2:])  # SystemExit (argparse's error) fails the test
            seen.add(script)
    assert seen == set(parsers)


@pytest.mark.parametrize("parse,argv,named", [
    (bench.parse_args, ["--configs", "resnet99@224:16"], "--configs: config 'resnet99@224:16': unknown architecture"),
    (bench.parse_args, ["--rows", "none,tapp"], "--rows: unknown 'tapp'"),
    (bench.parse_args, ["--mnist-methods", "tap,xs"], "--mnist-methods: unknown 'xs'"),
    ("kernel_table", ["--skip", "resnet18"], "--skip: expected MODEL:BATCH"),
])
def test_bad_benchmark_arguments_are_named(parse, argv, named, capsys):
    if parse == "kernel_table":
        parse = load_script("kernel_table").parse_args
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2 and named in capsys.readouterr().err


def test_pytest_selections_are_not_empty(plan):
    """`-m gpu` (and the files named) select CUDA tests: collected here, skipped here, run on the device."""
    for name, _, cmd in plan:
        if cmd[1:3] != ["-m", "pytest"]:
            continue
        args = [a for a in cmd[3:] if a not in ("-q", "-rfEs")]
        res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        collected = [ln for ln in res.stdout.splitlines() if "::" in ln]
        files = {a for a in args if a.endswith(".py")}
        assert {c.split("::")[0] for c in collected} == files, f"{name}: a file selects no CUDA test"


@pytest.mark.slow
def test_deadline_cuts_then_skips(tmp_path):
    """With a fake python whose kernel-table run hangs, that step is cut at the deadline, the later ones are
    skipped and named, the earlier ones pass, and the script exits 1."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\nif [[ \"$*\" == *kernel_table* ]]; then sleep 300; fi\necho fake \"$@\"\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OUT": str(out), "PYTHON": str(fake), "DEADLINE_S": "30"})
    log = (out / "gpu_check.log").read_text()
    assert res.returncode == 1, log
    assert re.search(r"ok environment", log) and re.search(r"ok tests_kernels", log)
    assert re.search(r"CUT kernels_resnet18 at 2\d s", log), log
    assert "skipped steps_b16_fp32: deadline" in log
    assert re.search(r"skipped at the deadline: steps_b16_fp32 .*steps_max_rest", log)
