"""Verdicts on the GPU targets of issues 4 and 5 from the benchmarks' JSON records (gpu_check.sh's
results.json, or the files of kernel_table.py --json and step_table.py --out): one markdown row per
target with what was measured, the target and PASS / FAIL / not measured. It reports; it decides nothing.

    python benchmarks/check_targets.py $OUT/results.json [--out targets.md]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

TABLE1 = {"size": 224, "batch": 16}  # the paper's Table 1 setting


def load_records(paths) -> tuple[list[dict], list[dict], list[dict]]:
    """(kernel records, step records, MNIST-protocol records) from JSON files holding lists of records or
    gpu_check's merged {file: list} mapping. Each record gets a "source": the run (file) it came from, so
    that rows of one run are only compared with rows of the same run."""
    kernels, steps, mnist = [], [], []

    def visit(value, source):
        if isinstance(value, dict) and not ({"table", "row", "method"} & set(value)):
            for key, v in value.items():
                visit(v, key)
        elif isinstance(value, list):
            for v in value:
                visit(v, source)
        elif isinstance(value, dict):
            record = {**value, "source": source}
            if "table" in value:
                kernels.append(record)
            elif "row" in value:
                steps.append(record)
            elif "total_s" in value:
                mnist.append(record)

    for path in paths:
        visit(json.loads(Path(path).read_text()), str(path))
    return kernels, steps, mnist


def _row(issue, target, measured, ok) -> dict:
    verdict = "not measured" if ok is None else "PASS" if ok else "FAIL"
    return {"issue": issue, "target": target, "measured": measured, "verdict": verdict}


def _target(issue, target, result) -> dict:
    """``result``: (measured, ok), or a falsy value when the records it needs are missing."""
    return _row(issue, target, *(result or ("", None)))


def _fmt(x, spec=".2f"):
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def kernel_targets(kernels: list[dict]) -> list[dict]:
    """Issue 4 at ResNet-18 shapes, batch 128, bf16 (l1, contiguous): fused fwd+bwd >= 5x eager and faster
    than torch.compile of the reference; backward >= 70% of the copy bandwidth; TAP step peak memory at
    most 1% above a step without penalty."""
    at = {r["impl"]: r for r in kernels if r["table"] == "kernels" and r["model"] == "resnet18"
          and r["batch"] == 128 and r["dtype"] == "bf16" and r["norm"] == "l1" and not r["channels_last"]}
    fused, eager, compiled = at.get("fused"), at.get("eager"), at.get("compiled")
    ms = lambda r: _fmt(r["fwd_bwd_ms"], ".3f")  # noqa: E731
    speedup = fused and eager and eager["fwd_bwd_ms"] / fused["fwd_bwd_ms"]
    share = fused and fused["bwd_gbs"] / fused["copy_gbs"]
    rows = [
        _target(4, "fused fwd+bwd >= 5x eager (ResNet-18, b128, bf16)",
                speedup and (f"{_fmt(speedup)}x ({ms(fused)} vs {ms(eager)} ms)", speedup >= 5)),
        _target(4, "fused fwd+bwd faster than torch.compile of the reference",
                fused and compiled and (f"{ms(fused)} vs {ms(compiled)} ms",
                                        fused["fwd_bwd_ms"] < compiled["fwd_bwd_ms"])),
        _target(4, "backward >= 70% of the copy bandwidth",
                share and (f"{100 * share:.0f}% ({_fmt(fused['bwd_gbs'], '.0f')} of "
                           f"{_fmt(fused['copy_gbs'], '.0f')} GB/s)", share >= 0.7)),
    ]
    memory = [r for r in kernels if r["table"] == "memory" and r["step"] == "triton"]
    for r in memory:
        ratio = r["peak_mib"] / r["no_penalty_peak_mib"]
        rows.append(_row(4, f"TAP step peak memory <= 1.01x no penalty (ResNet-18, b{r['batch']}, {r['dtype']})",
                         f"{ratio:.4f}x ({r['peak_mib']:.0f} vs {r['no_penalty_peak_mib']:.0f} MiB)",
                         ratio <= 1.01))
    if not memory:
        rows.append(_row(4, "TAP step peak memory <= 1.01x no penalty", "", None))
    return rows


def step_targets(steps: list[dict], mnist: list[dict]) -> list[dict]:
    """Issue 5: TAP (fused) within 3% of No XS in time and 1% in memory, >= 5x / 8x faster than RRR / RBR
    with at most half their memory (Table 1 setting), the MNIST protocol under 15 s, ResNet-18 bf16 TAP
    above 3,000 images/s."""
    ok_rows = [r for r in steps if r.get("status") == "ok"]
    by_key = {}
    for r in ok_rows:  # rows are compared only within one run (source) of one config, batch and dtype
        by_key.setdefault((r.get("source", ""), r["config"], r["batch"], r["dtype"]), {})[r["row"]] = r
    rows = []
    for (source, config, batch, dtype), group in sorted(by_key.items()):
        tap, none = group.get("tap"), group.get("none")
        if tap is None or none is None:
            continue
        step_kind = ("compiled" if tap.get("compile") else "eager") + (", CUDA graph" if tap.get("cuda_graphs")
                                                                      else "")
        where = f"{config}, b{batch}, {dtype}, {step_kind}; {source}"
        time_ratio = tap["step_ms"] / none["step_ms"]
        rows.append(_row(5, f"TAP step time <= 1.03x No XS ({where})", f"{time_ratio:.3f}x", time_ratio <= 1.03))
        if tap.get("peak_gb") and none.get("peak_gb"):
            mem_ratio = tap["peak_gb"] / none["peak_gb"]
            rows.append(_row(5, f"TAP peak memory <= 1.01x No XS ({where})", f"{mem_ratio:.4f}x", mem_ratio <= 1.01))
        if tap["size"] != TABLE1["size"] or batch != TABLE1["batch"]:
            continue
        for other, factor in (("rrr", 5), ("rbr", 8)):
            base = group.get(other)
            if base is None:
                continue
            speedup = base["step_ms"] / tap["step_ms"]
            rows.append(_row(5, f"TAP >= {factor}x faster than {other.upper()} ({where})", f"{speedup:.2f}x",
                             speedup >= factor))
            if tap.get("peak_gb") and base.get("peak_gb"):
                share = tap["peak_gb"] / base["peak_gb"]
                rows.append(_row(5, f"TAP memory <= 0.5x {other.upper()}'s ({where})", f"{share:.3f}x", share <= 0.5))
    if not rows:
        rows.append(_row(5, "TAP step time and memory vs No XS, RRR, RBR", "", None))
    protocol = [r for r in mnist if r.get("method") == "tap" and "total_s" in r and r.get("epochs") == 50
                and r.get("n_train") == 54_000]
    if protocol:
        best = min(protocol, key=lambda r: r["total_s"])
        rows.append(_row(5, "MNIST protocol (50 epochs x 54,000) with TAP under 15 s",
                         f"{best['total_s']:.1f} s in all, {best['train_s']:.1f} s training (compile="
                         f"{best['compile']}, CUDA graphs={best['cuda_graphs']})", best["total_s"] < 15))
    else:
        rows.append(_row(5, "MNIST protocol (50 epochs x 54,000) with TAP under 15 s", "", None))
    fast = [r for r in ok_rows if r["arch"] == "resnet18" and r["size"] == 224 and r["dtype"] == "bf16"
            and r["row"] in ("tap", "tap-id")]
    if fast:
        best = max(fast, key=lambda r: r["images_s"])
        rows.append(_row(5, "ResNet-18 224x224 TAP training > 3,000 images/s in bf16",
                         f"{best['images_s']:,.0f} images/s (batch {best['batch']}, {best['row']})",
                         best["images_s"] > 3000))
    else:
        rows.append(_row(5, "ResNet-18 224x224 TAP training > 3,000 images/s in bf16", "", None))
    return rows


def targets_table(rows: list[dict], devices: set[str]) -> str:
    lines = [f"### Targets ({', '.join(sorted(devices)) or 'device not recorded'})", "",
             "| issue | target | measured | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['issue']} | {r['target']} | {r['measured']} | {r['verdict']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files of benchmark records")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"results: no such file {missing}")
    kernels, steps, mnist = load_records(args.results)
    devices = {r["device"] for r in kernels + steps if "device" in r}
    table = targets_table(kernel_targets(kernels) + step_targets(steps, mnist), devices)
    if args.out is not None:
        args.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
