"""benchmarks/check_targets.py judges the issues' GPU targets from benchmark records: verdicts on synthetic
records just inside and just outside each target, "not measured" for what is missing, and the real
records of kernel_table.py (--smoke, Triton's interpreter) and step_table.py (CPU) read end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench_scripts import load_script
from tap_fast import bench

ROOT = Path(__file__).resolve().parents[1]
check_targets = load_script("check_targets")


def _kernel(impl, both_ms, bwd_gbs=1000.0):
    return {"table": "kernels", "model": "resnet18", "batch": 128, "dtype": "bf16", "norm": "l1",
            "channels_last": False, "impl": impl, "fwd_bwd_ms": both_ms, "bwd_gbs": bwd_gbs, "copy_gbs": 3000.0,
            "device": "NVIDIA H100"}


def _memory(peak, base=1000.0):
    return {"table": "memory", "model": "resnet18", "batch": 64, "dtype": "bf16", "step": "triton",
            "peak_mib": peak, "no_penalty_peak_mib": base}


def _step(row, ms, gb, config="resnet18@224:16", dtype="fp32", images_s=100.0):
    arch, rest = config.split("@")
    size, batch = rest.split(":")
    return {"config": config, "arch": arch, "size": int(size), "batch": int(batch), "row": row, "dtype": dtype,
            "status": "ok", "step_ms": ms, "peak_gb": gb, "images_s": images_s}


def _mnist(total_s):
    return {"method": "tap", "epochs": 50, "n_train": 54_000, "total_s": total_s, "train_s": total_s - 2,
            "compile": False, "cuda_graphs": True}


def _verdicts(rows):
    return {r["target"]: r["verdict"] for r in rows}


@pytest.mark.parametrize("good", [True, False])
def test_verdicts_on_either_side_of_each_target(good):
    k = 1.0 if good else 1.3  # fused fwd+bwd ms against eager 5.1 and compiled 1.2
    kernels = [_kernel("fused", k, bwd_gbs=2110.0 if good else 2090.0), _kernel("eager", 5.1),
               _kernel("compiled", 1.2), _memory(1009.0 if good else 1011.0)]
    tap_ms, tap_gb = (10.29, 2.019) if good else (10.31, 2.021)
    steps = [_step("none", 10.0, 2.0), _step("tap", tap_ms, tap_gb),
             _step("rrr", 51.6 if good else 51.4, 4.05 if good else 4.0),
             _step("rbr", 82.5 if good else 82.4, 4.05 if good else 4.0),
             _step("tap", 5.0, 1.0, config="resnet18@224:256", dtype="bf16", images_s=3001 if good else 2999)]
    rows = check_targets.kernel_targets(kernels) + check_targets.step_targets(steps, [_mnist(14.9 if good else 15.1)])
    verdicts = _verdicts(rows)
    assert len(verdicts) == 12, verdicts
    assert set(verdicts.values()) == {"PASS" if good else "FAIL"}, verdicts


def test_missing_records_are_not_measured_and_failed_rows_are_skipped():
    steps = [_step("none", 10.0, 2.0), {**_step("tap", 10.1, 2.0), "status": "OOM"}]
    rows = check_targets.kernel_targets([]) + check_targets.step_targets(steps, [])
    assert {r["verdict"] for r in rows} == {"not measured"} and len(rows) == 7
    mnist_elsewhere = {**_mnist(3.0), "epochs": 2}  # a scaled-down run is not the protocol
    (row,) = [r for r in check_targets.step_targets([], [mnist_elsewhere]) if "MNIST" in r["target"]]
    assert row["verdict"] == "not measured"


def test_rows_of_different_runs_are_not_compared(tmp_path):
    """An eager run that misses the targets and a compiled run of the same config that meets them: each is
    judged on its own rows (a compiled TAP must not be set against the eager run's RRR)."""
    eager = [{**_step("none", 10.0, 2.0), "compile": False}, {**_step("tap", 11.0, 2.0), "compile": False},
             {**_step("rrr", 44.0, 4.0), "compile": False}]
    compiled = [{**_step("none", 5.0, 2.0), "compile": True}, {**_step("tap", 5.1, 2.0), "compile": True}]
    merged = tmp_path / "results.json"
    merged.write_text(json.dumps({"steps_1/steps.json": eager, "steps_4/steps.json": compiled}))
    _, steps, _ = check_targets.load_records([merged])
    verdicts = _verdicts(check_targets.step_targets(steps, []))
    assert verdicts["TAP step time <= 1.03x No XS (resnet18@224:16, b16, fp32, eager; steps_1/steps.json)"] == "FAIL"
    assert verdicts["TAP >= 5x faster than RRR (resnet18@224:16, b16, fp32, eager; steps_1/steps.json)"] == "FAIL"
    assert verdicts["TAP step time <= 1.03x No XS (resnet18@224:16, b16, fp32, compiled; steps_4/steps.json)"] \
        == "PASS"
    assert not [t for t in verdicts if "RRR" in t and "steps_4" in t]


@pytest.mark.slow
def test_real_records_end_to_end(tmp_path):
    """kernel_table.py's --json (relabelled to the target shape: the interpreter runs tiny shapes only) and
    step_table.py's steps.json, merged as gpu_check.sh merges them, give measured verdicts."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    md, records = tmp_path / "kernel.md", tmp_path / "kernel_1.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_table.py"), "--smoke", "--out", str(md),
                    "--json", str(records)], cwd=ROOT, check=True, timeout=300, env=env, capture_output=True)
    rows = [ln.split("|")[1:-1] for ln in md.read_text().splitlines() if ln.startswith("| smoke")]
    assert [r[4].strip() for r in rows] == ["fused", "eager", "compiled"]
    kernels = json.loads(records.read_text())
    assert [r["impl"] for r in kernels] == ["fused", "eager", "compiled"]
    for row, rec in zip(rows, kernels):  # the JSON holds the markdown's numbers
        assert float(row[7]) == pytest.approx(rec["fwd_bwd_ms"], abs=1e-3) and rec["fwd_bwd_ms"] > 0
    for rec in kernels:
        rec.update(model="resnet18", batch=128, dtype="bf16")
    bench.main(["--device", "cpu", "--configs", "cnn2@28:4", "--rows", "none,tap", "--rounds", "2", "--warmup", "1",
                "--dtypes", "fp32", "--out", str(tmp_path / "steps_1")])
    merged = tmp_path / "results.json"
    merged.write_text(json.dumps({"kernel_1.json": kernels,
                                  "steps_1/steps.json": json.loads((tmp_path / "steps_1" / "steps.json").read_text())}))
    out = tmp_path / "targets.md"
    assert check_targets.main([str(merged), "--out", str(out)]) == 0
    table = out.read_text()
    assert "cpu (Triton interpreter)" in table
    for target in ("fused fwd+bwd >= 5x eager", "faster than torch.compile", "70% of the copy bandwidth",
                   "TAP step time <= 1.03x No XS (cnn2@28:4, b4, fp32, eager; steps_1/steps.json)"):
        (line,) = [ln for ln in table.splitlines() if target in ln]
        assert line.endswith("| PASS |") or line.endswith("| FAIL |"), line
    with pytest.raises(SystemExit):
        check_targets.main([str(tmp_path / "nope.json")])
