"""benchmarks/check_targets.py judges the GPU targets from benchmark records: verdicts on synthetic records just
inside and just outside each target, "not measured" for what is missing or outside a target's setting, and
the real records of kernel_table.py (--smoke --channels-last, Triton's interpreter: every new code path) and
step_table.py (CPU) read end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
check_targets = load_script("check_targets")
step_table = load_script("step_table")
FLOOR, COPY = 3.2e8, 4000.0  # 80% of the copy bandwidth over this floor: 0.1 ms


def _kernel(impl, graph_ms, channels_last=False, **kw):
    return {"table": "kernels", "model": "resnet18", "batch": 128, "dtype": "bf16", "norm": "l1",
            "channels_last": channels_last, "impl": impl, "fwd_bwd_ms": 2 * graph_ms, "fwd_bwd_graph_ms": graph_ms,
            "floor_bytes": FLOOR, "copy_gbs": COPY, "device": "NVIDIA H200", **kw}


def _fused(graph_ms, ok=True, **kw):
    return _kernel("fused", graph_ms, matches_reference=ok, value_err_vs_tol=0.1 if ok else 1.5,
                   grad_err_vs_tol=0.5, **kw)


def _step(row, ms, gb, config="resnet18@224:max", dtype="bf16", batch=512, images_s=100.0, fast=True):
    arch, rest = config.split("@")
    return {"config": config, "arch": arch, "size": int(rest.split(":")[0]), "batch": batch, "row": row,
            "dtype": dtype, "status": "ok", "step_ms": ms, "peak_gb": gb, "images_s": images_s,
            "compile": fast, "cuda_graphs": fast, "channels_last": fast, "device": "NVIDIA H200"}


def _table1(row, ms, gb):
    return _step(row, ms, gb, config="resnet18@224:16", dtype="fp32", batch=16, fast=False)


def _mnist(total_s):
    return {"method": "tap", "epochs": 50, "n_train": 54_000, "total_s": total_s, "train_s": total_s - 2,
            "compile": False, "cuda_graphs": True, "source": "mnist_1/mnist.json"}


def _sourced(records):
    """The records, each from the same run unless it says otherwise (load_records adds "source")."""
    return [{"source": "run.json", **r} for r in records]


def _judge(kernels, steps, mnist):
    return check_targets.kernel_targets(_sourced(kernels)) + check_targets.step_targets(_sourced(steps), mnist)


def _verdicts(rows):
    return {r["target"]: r["verdict"] for r in rows}


@pytest.mark.parametrize("good", [True, False])
def test_verdicts_on_either_side_of_each_target(good):
    e = -1e-4 if good else 1e-4  # just inside / just outside every bound
    kernels = [_kernel("eager", 0.25), _fused(0.1 + e, ok=good), _kernel("compiled", 0.12)]
    tap_ms, tap_gb = 102 + 100 * e, 10.1 + 100 * e  # against No XS's 100 ms and 10 GB: 1.02x, 1.01x
    images_s = 8000 - 1e4 * e
    steps = [_step("none", 100.0, 10.0), _step("tap", tap_ms, tap_gb, images_s=images_s),
             _step("tap-id", tap_ms, tap_gb, images_s=images_s),
             _table1("none", 9.0, 0.9), _table1("tap", 10.0, 1.0), _table1("tap-id", 10.0, 1.0),
             _table1("rrr", 50 - 1e4 * e, 2 - 1e4 * e), _table1("rbr", 80 - 1e4 * e, 2 - 1e4 * e)]
    verdicts = _verdicts(_judge(kernels, steps, [_mnist(6 + 10 * e)]))
    assert len(verdicts) == 19, verdicts  # 4 kernel, 2 x 3 largest batch, 2 x 2 x 2 Table 1, 1 MNIST
    assert set(verdicts.values()) == {"PASS" if good else "FAIL"}, verdicts


def test_missing_records_are_not_measured_and_failed_rows_are_skipped():
    steps = [_step("none", 10.0, 2.0), {**_step("tap", 10.1, 2.0), "status": "OOM"}]
    rows = _judge([], steps, [])
    assert {r["verdict"] for r in rows} == {"not measured"} and len(rows) == 9
    mnist_elsewhere = {**_mnist(3.0), "epochs": 2}  # a scaled-down run is not the protocol
    assert _verdicts(check_targets.mnist_targets([mnist_elsewhere])) == {
        "MNIST protocol (50 epochs x 54,000, TAP) under 6 s": "not measured"}


def test_outside_a_targets_setting_is_not_measured():
    """8,000 images/s is for a compiled, graphed, channels_last step on an H200; a failed CUDA graph capture
    leaves the graphed kernel targets unmeasured."""
    eager = _step("tap", 10.0, 1.0, images_s=9000, fast=False)
    h100 = {**_step("tap", 10.0, 1.0, images_s=9000), "device": "NVIDIA H100"}
    for steps, note in (([eager], "not in this setting; best: 9,000 images/s (eager, b512)"), ([h100], "not an H200")):
        (row,) = [r for r in _judge([], steps, []) if "images/s" in r["target"]]
        assert row["verdict"] == "not measured" and note in row["measured"], row
    kernels = [_kernel("eager", 0.25), _fused(math.nan), _kernel("compiled", 0.12)]
    verdicts = [r["verdict"] for r in check_targets.kernel_targets(_sourced(kernels))]
    assert verdicts == ["PASS", "not measured", "not measured", "not measured"]


def test_rows_of_different_runs_and_layouts_are_not_compared(tmp_path):
    """An eager run that misses the targets and a compiled run that meets them are each judged on their own rows
    (a compiled TAP must not be set against the eager run's No XS); NCHW and channels_last kernel rows apart."""
    eager = [_step("none", 100.0, 10.0, fast=False), _step("tap", 110.0, 10.0, fast=False)]
    compiled = [_step("none", 50.0, 10.0), _step("tap", 50.5, 10.0)]
    kernels = [_kernel("eager", 0.25), _fused(0.2), _kernel("eager", 0.25, channels_last=True),
               _fused(0.05, channels_last=True)]
    merged = tmp_path / "results.json"
    merged.write_text(json.dumps({"steps_1/steps.json": eager, "steps_3/steps.json": compiled,
                                  "kernel_1.json": kernels}))
    kernels, steps, _ = check_targets.load_records([merged])
    verdicts = _verdicts(check_targets.kernel_targets(kernels) + check_targets.step_targets(steps, []))
    prefix = "TAP step time <= 1.02x No XS (tap; resnet18@224:max, b512, bf16, "
    assert verdicts[prefix + "eager; steps_1/steps.json)"] == "FAIL"
    assert verdicts[prefix + "compiled, CUDA graph, channels_last; steps_3/steps.json)"] == "PASS"
    prefix = "fused fwd+bwd in a CUDA graph >= 2.5x the eager reference (ResNet-18, b128, bf16, "
    assert verdicts[prefix + "NCHW; kernel_1.json)"] == "FAIL"
    assert verdicts[prefix + "channels_last; kernel_1.json)"] == "PASS"


@pytest.mark.slow
def test_real_records_end_to_end(tmp_path):
    """kernel_table.py --smoke --channels-last (eager, fused and compiled rows written one by one, each with its
    graphed columns; fused checked against the reference; the memory table with the identity form) and
    step_table.py's steps.json, relabelled to the targets' settings (the CPU runs tiny shapes only) and merged
    as gpu_check.sh merges them, give measured verdicts."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    md, records = tmp_path / "kernel.md", tmp_path / "kernel_1.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_table.py"), "--smoke", "--channels-last",
                    "--out", str(md), "--json", str(records)], cwd=ROOT, check=True, timeout=300, env=env,
                   capture_output=True)
    rows = [ln.split("|")[1:-1] for ln in md.read_text().splitlines() if ln.startswith("| smoke")]
    assert [(r[3].strip(), r[5].strip()) for r in rows] == [("channels_last", i) for i in ("eager", "fused",
                                                                                            "compiled")]
    assert rows[1][-1].strip().startswith("yes (value") and rows[0][-1].strip() == "-"
    kernels = json.loads(records.read_text())
    timed = [r for r in kernels if r["table"] == "kernels"]
    assert [r["impl"] for r in timed] == ["eager", "fused", "compiled"]
    for row, rec in zip(rows, timed):  # the JSON holds the markdown's numbers
        assert float(row[8]) == pytest.approx(rec["fwd_bwd_ms"], abs=1e-3) and rec["fwd_bwd_ms"] > 0
        assert rec["bwd_graph_ms"] > 0 and rec["fwd_bwd_graph_ms"] > 0 and rec["channels_last"]
    assert timed[1]["matches_reference"] and timed[1]["grad_err_vs_tol"] <= 1
    assert [r["step"] for r in kernels if r["table"] == "memory"] == ["none", "triton", "separate", "identity", "torch"]
    for rec in timed:
        rec.update(model="resnet18", batch=128, dtype="bf16")
    step_table.main(["--device", "cpu", "--configs", "cnn2@28:4", "--rows", "none,tap,rrr,rbr", "--rounds", "2",
                "--warmup", "1", "--dtypes", "fp32", "--out", str(tmp_path / "steps_1")])
    steps = json.loads((tmp_path / "steps_1" / "steps.json").read_text())
    largest = [{**r, "config": "resnet18@224:max", "arch": "resnet18", "size": 224, "dtype": "bf16"} for r in steps]
    table1 = [{**r, "config": "resnet18@224:16", "arch": "resnet18", "size": 224, "batch": 16} for r in steps]
    merged = tmp_path / "results.json"
    merged.write_text(json.dumps({"kernel_1.json": kernels, "steps_1/steps.json": largest,
                                  "steps_2/steps.json": table1}))
    out = tmp_path / "targets.md"
    assert check_targets.main([str(merged), "--out", str(out)]) == 0
    table = out.read_text()
    assert "cpu (Triton interpreter)" in table
    for target in ("fused = reference", "copy bandwidth over the byte floor (ResNet-18, b128, bf16, channels_last",
                   "the eager reference (ResNet-18", "torch.compile of the reference (ResNet-18",
                   "TAP step time <= 1.02x No XS (tap; resnet18@224:max, b4, bf16, eager; steps_1/steps.json)",
                   "TAP >= 5x faster than RRR per step (tap; resnet18@224:16, fp32, eager; steps_2/steps.json)",
                   "TAP >= 8x faster than RBR per step (tap; resnet18@224:16, fp32, eager; steps_2/steps.json)"):
        (line,) = [ln for ln in table.splitlines() if target in ln]
        assert line.endswith("| PASS |") or line.endswith("| FAIL |"), line
    with pytest.raises(SystemExit):
        check_targets.main([str(tmp_path / "nope.json")])
