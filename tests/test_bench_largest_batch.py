"""benchmarks/step_table.py at the largest batch ('max' configs): No XS and TAP share TAP's largest batch, RRR
and RBR each run at their own. Memory limits are emulated on the CPU by steps that raise CUDA's OOM error
above a per-row batch."""
import json

import torch

from bench_scripts import load_script

step_table = load_script("step_table")

CAPACITY = {"none": 64, "tap": 64, "tap-ref": 64, "rrr": 32, "rbr": 16}


def test_row_groups():
    fixed, largest = step_table.parse_config("cnn2@28:64"), step_table.parse_config("cnn2@28:max")
    assert step_table.row_groups(fixed, ["none", "tap", "rrr"], ["none"]) == [(None, ["none", "tap", "rrr"])]
    assert step_table.row_groups(largest, ["none"], ["none", "tap", "rrr", "rbr"]) == [
        ("tap", ["none", "tap"]), ("rrr", ["rrr"]), ("rbr", ["rbr"])]
    assert step_table.row_groups(largest, ["none"], ["rrr"]) == [("rrr", ["rrr"])]


def test_each_baseline_at_its_own_largest_batch(tmp_path, monkeypatch):
    real = step_table.build_step

    def limited(config, row, device, **kw):
        step = real(config, row, device, **kw)

        def run(images, labels, masks):
            if images.shape[0] > CAPACITY[row]:
                raise torch.cuda.OutOfMemoryError(f"emulated: {row} at batch {images.shape[0]}")
            return step(images, labels, masks)
        return run

    monkeypatch.setattr(step_table, "build_step", limited)
    assert step_table.largest_batch(step_table.parse_config("cnn2@28:max"), torch.device("cpu"), dtype="fp32",
                                    channels_last=False, limit=128, row="rrr") == 32
    assert step_table.main(["--device", "cpu", "--configs", "cnn2@28:max", "--dtypes", "fp32", "--max-rows",
                            "none,tap,rrr,rbr", "--rounds", "1", "--warmup", "0", "--max-limit", "128",
                            "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "steps.json").read_text())
    assert {r["row"]: r["batch"] for r in records} == {"none": 64, "tap": 64, "rrr": 32, "rbr": 16}
    assert all(r["status"] == "ok" for r in records)
    assert "time_vs_none" in next(r for r in records if r["row"] == "tap")  # same batch as No XS: compared
