"""The state of the machine a GPU check runs on, appended as markdown to --out and as records to --json:
``environment`` (Python, torch, triton, CUDA and cuDNN versions, the device's properties), ``nvidia-smi``
(a read-only query of clocks, power, temperature, memory and modes, and the performance report with the
throttle reasons; it sets nothing) and ``bandwidth`` (the measured device-to-device copy bandwidth, as
benchmarks/kernel_table.py measures it).

    python benchmarks/card_state.py environment nvidia-smi bandwidth --out card.md --json card.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from kernel_table import copy_bandwidth_gbs  # noqa: E402
from step_table import machine  # noqa: E402

PARTS = ("environment", "nvidia-smi", "bandwidth")
QUERY = ("name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,"
         "memory.used,memory.total,persistence_mode,compute_mode,mig.mode.current")


def environment() -> tuple[str, dict]:
    import torch
    import triton

    cuda = torch.cuda.is_available()
    record = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
              "properties": str(torch.cuda.get_device_properties(0)) if cuda else machine(torch.device("cpu"))}
    return "\n".join(f"- {k}: {v}" for k, v in record.items()), record


def nvidia_smi() -> tuple[str, dict]:
    """The query as CSV and ``nvidia-smi -q -d PERFORMANCE``; only reads (no -pm, -lgc, -pl, ...)."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi: not found", {"query": None}
    query = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv"], capture_output=True,
                           text=True, timeout=20)
    perf = subprocess.run(["nvidia-smi", "-q", "-d", "PERFORMANCE"], capture_output=True, text=True, timeout=20)
    text = query.stdout.strip() + query.stderr.strip()
    if query.returncode != 0:
        raise SystemExit(f"nvidia-smi --query-gpu failed (exit {query.returncode}): {text}")
    return f"```\n{text}\n\n{perf.stdout.strip()}\n```", {"query": text, "performance": perf.stdout}


def bandwidth() -> tuple[str, dict]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gbs = copy_bandwidth_gbs(device)
    return f"- device-to-device copy bandwidth (read + write): {gbs:.0f} GB/s", {"copy_gbs": gbs}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", choices=PARTS)
    parser.add_argument("--out", type=Path, help="append the markdown here")
    parser.add_argument("--json", type=Path, help="append the records to this JSON list")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    device = machine(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    for part in args.parts:
        text, record = {"environment": environment, "nvidia-smi": nvidia_smi, "bandwidth": bandwidth}[part]()
        stamp = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
        section = f"### {part} ({stamp})\n\n{text}\n"
        print(section, flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(section + "\n")
        if args.json is not None:
            records = json.loads(args.json.read_text()) if args.json.is_file() else []
            records.append({"table": part, "time": stamp, **record, "device": device})
            args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
