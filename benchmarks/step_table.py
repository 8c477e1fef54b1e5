"""Step benchmarks in the setting of the paper's Table 1, and the MNIST protocol's wall time.

Each row times full training steps of :func:`tap_fast.compiled_step.make_step` (forward, CE + lambda *
penalty, backward, SGD with momentum) on uint8 images with contamination masks (MNIST decoys at 28x28,
PNEU-style text tags at 224x224); the pixels are random, which changes nothing in a step's cost. Step
times are medians: CUDA events on a GPU, where rows run one after another so that each row's peak memory
(``torch.cuda.max_memory_allocated`` above what was allocated before its model was built) is its own;
on the CPU rows are interleaved step by step, so that the load of a shared machine hits them alike, and
only ratios between rows mean anything.

    python benchmarks/step_table.py --help
    python benchmarks/step_table.py --device cpu --configs cnn2@28:64 cnn2@28:256 resnet18@64:16
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tap_fast.choices import ARCH_NAMES, DISTILLATION_METHODS, METHODS  # noqa: E402
from tap_fast.cli import non_negative_int, positive_float, positive_int  # noqa: E402
from tap_fast.compiled_step import make_step  # noqa: E402
from tap_fast.config import KD_TEMPERATURE, default_lambda, resolve_device  # noqa: E402
from tap_fast.contamination import contaminate  # noqa: E402
from tap_fast.feeds import DeviceFeed  # noqa: E402
from tap_fast.loop import fit  # noqa: E402
from tap_fast.models import build_model, tap_points  # noqa: E402
from tap_fast.tapped_model import TappedModel  # noqa: E402

# row -> (label, method, TAP backend). "tap" is what training runs (backend "auto": the fused kernels'
# identity form inside the forward on CUDA, the reference elsewhere and under torch.compile); "tap-id" and
# "tap-sep" (the identity and separate per-layer forms, Triton only) run only when asked for with --rows.
ROWS = {"none": ("No XS", "none", "auto"), "tap": ("TAP (training default)", "tap", "auto"),
        "tap-ref": ("TAP (reference)", "tap", "torch"), "rrr": ("RRR", "rrr", "torch"), "rbr": ("RBR", "rbr", "torch"),
        "tap-id": ("TAP (fused, identity form)", "tap", "identity"),
        "tap-sep": ("TAP (fused, separate form)", "tap", "triton"),
        "at": ("AT (Appendix M)", "at", "torch"), "jt": ("JT (Appendix M)", "jt", "torch"),
        "kd": ("KD (Appendix M)", "kd", "torch")}
# lambda only scales a gradient term, so its value does not change a step's cost.
TIMING_LAMBDA = {"none": 0.0, "tap": 1e-3, "rrr": 1e-3, "rbr": 1.0, "at": 1.0, "jt": 1e-3, "kd": 1.0}
# Table 1 of the paper (RTX 3080 10 GB, PyTorch 1.13, batch 16, 224x224): (it/s, GB); None = OOM.
PAPER_TABLE1 = {
    "vgg16": {"none": (12.1, 4.4), "rrr": (2.6, 9.7), "rbr": (1.7, 8.6), "tap": (11.8, 4.4)},
    "resnet18": {"none": (38.5, 2.5), "rrr": (12.5, 3.2), "rbr": (7.3, 4.0), "tap": (36.7, 2.5)},
    "densenet121": {"none": (11.6, 4.4), "rrr": (3.0, 9.2), "rbr": None, "tap": (12.0, 4.5)},
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
GPU_CONFIGS = ("cnn2@28:256", "vgg16@224:16", "resnet18@224:16", "densenet121@224:16", "vgg16@224:max",
               "resnet18@224:max", "densenet121@224:max")
CPU_CONFIGS = ("cnn2@28:64", "cnn2@28:256", "resnet18@64:16")
MNIST_MEAN_STD = (0.1307, 0.3081)  # section 5 / released code
MNIST_BATCH = 256  # section 5.3
DATA_SETS = 4  # distinct batches the timed steps rotate over
MAX_BATCH_START = 16  # the first batch largest_batch tries ('max' configs)
OWN_LARGEST_BATCH = ("rrr", "rbr", "jt")  # rows that run at their own largest batch (double backward), not TAP's


@dataclass(frozen=True)
class Config:
    """A model and input shape: ``arch`` at ``size`` x ``size`` with ``batch`` images (0 = largest that fits)."""
    arch: str
    size: int
    batch: int

    @property
    def num_classes(self) -> int:
        return 10 if self.arch == "cnn2" else 2  # MNIST digits; PNEU's two classes at 224x224

    @property
    def name(self) -> str:
        return f"{self.arch}@{self.size}:{self.batch or 'max'}"


def parse_config(text: str) -> Config:
    """``"arch@size:batch"``, batch an int or "max" (e.g. "resnet18@224:16")."""
    try:
        arch, rest = text.split("@")
        size, batch = rest.split(":")
        config = Config(arch, int(size), 0 if batch == "max" else int(batch))
    except ValueError as e:
        raise ValueError(f"config must look like 'arch@size:batch' (batch an int or 'max'), got {text!r}") from e
    if arch not in ARCH_NAMES:
        raise ValueError(f"config {text!r}: unknown architecture {arch!r}; choose from {list(ARCH_NAMES)}")
    return config


def row_label(row: str, device: torch.device) -> str:
    """The row's label; "tap" runs the reference off CUDA and is labelled so."""
    if row == "tap" and device.type != "cuda":
        return "TAP (reference)"
    return ROWS[row][0]


def make_data(config: Config, batch: int, device: torch.device, *, sets: int = DATA_SETS, seed: int = 0
              ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``sets`` batches (uint8 images, labels, uint8 masks) on ``device``: random pixels contaminated with
    decoys (cnn2) or text tags (224-pixel models), with their ground-truth masks."""
    g = torch.Generator().manual_seed(seed)
    n = sets * batch
    images = torch.randint(0, 256, (n, 1, config.size, config.size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, config.num_classes, (n,), generator=g)
    kind = "decoy" if config.arch == "cnn2" else "tag"
    images, masks = contaminate(images.to(device), labels.to(device), kind, config.num_classes, seed=seed)
    labels = labels.to(device)
    return [(images[i:i + batch], labels[i:i + batch], masks[i:i + batch]) for i in range(0, n, batch)]


def build_step(config: Config, row: str, device: torch.device, *, amp_dtype: torch.dtype | None = None,
               compile: bool = False, cuda_graphs: bool = False, channels_last: bool = False):
    """A fresh seeded model, SGD (momentum 0.9) and the training step of ``row`` for ``config``. The distillation
    rows (AT, JT, KD) distil from an untrained, frozen teacher of the same arch: a step costs the same whatever
    the teacher's weights (training uses the data set's default arch, ``config.DEFAULT_ARCH``)."""
    _, method, backend = ROWS[row]
    torch.manual_seed(0)
    with torch.device(device):
        net = build_model(config.arch, config.num_classes, 1, input_size=config.size)
        teacher = None
        if method in DISTILLATION_METHODS:
            frozen = build_model(config.arch, config.num_classes, 1, input_size=config.size).requires_grad_(False)
            teacher = TappedModel(frozen, tap_points(config.arch))
    model = TappedModel(net, tap_points(config.arch)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    return make_step(model, optimizer, method=method, lam=TIMING_LAMBDA[method], mean=0.5, std=0.25,
                     backend=backend, compile=compile, cuda_graphs=cuda_graphs, amp_dtype=amp_dtype,
                     channels_last=channels_last, teacher=teacher,
                     temperature=KD_TEMPERATURE if method == "kd" else None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, data, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` consecutive steps (CUDA events on a GPU, else the host clock)."""
    if device.type != "cuda":
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step(*data[i % len(data)])
            times.append(time.perf_counter() - t0)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for i, (start, end) in enumerate(events):
        start.record()
        step(*data[i % len(data)])
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def _result(config: Config, batch: int, row: str, dtype: str, device: torch.device, times: list[float] | None,
            peak_gb: float | None = None, status: str = "ok") -> dict:
    out = {"config": config.name, "arch": config.arch, "size": config.size, "batch": batch, "row": row,
           "label": row_label(row, device), "dtype": dtype, "status": status, "peak_gb": peak_gb,
           "device": machine(device)}
    if times:
        med = statistics.median(times)
        out.update(step_ms=med * 1e3, min_ms=min(times) * 1e3, steps=len(times), it_s=1 / med,
                   images_s=batch / med)
    return out


def _status(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "OOM"
    traceback.print_exc(file=sys.stderr)
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_gpu(config: Config, batch: int, rows: list[str], dtype: str, device: torch.device, *, steps: int,
                warmup: int, compile: bool, cuda_graphs: bool, channels_last: bool) -> Iterator[dict]:
    """Rows one after another on a GPU, each with its own model and peak-memory count, yielded as each is
    measured (so that the caller writes it at once)."""
    data = make_data(config, batch, device)
    for row in rows:
        if compile:
            torch._dynamo.reset()
        _free(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            step = build_step(config, row, device, amp_dtype=DTYPES[dtype], compile=compile,
                              cuda_graphs=cuda_graphs, channels_last=channels_last)
            time_steps(step, data, warmup, device)
            times = time_steps(step, data, steps, device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            result = _result(config, batch, row, dtype, device, times, peak)
        except Exception as e:  # one failing row (OOM, a broken backend) must not end the table
            result = _result(config, batch, row, dtype, device, None, status=_status(e))
        step = None
        yield result


def measure_interleaved(config: Config, batch: int, rows: list[str], dtype: str, device: torch.device, *,
                        rounds: int, warmup: int, compile: bool, channels_last: bool) -> list[dict]:
    """All rows built first, then one step of each per round, in alternating order (for a shared, noisy
    CPU). "time vs No XS" is the median over rounds of each round's ratio, so drifts in load cancel."""
    data = make_data(config, batch, device)
    if compile:
        torch._dynamo.reset()  # each compiled step adds a recompile of the same code; start each config afresh
    steps, times, failed = {}, {row: [] for row in rows}, {}
    for row in rows:
        try:
            steps[row] = build_step(config, row, device, amp_dtype=DTYPES[dtype], compile=compile,
                                    channels_last=channels_last)
            time_steps(steps[row], data, warmup, device)
        except Exception as e:
            failed[row] = _status(e)
            steps.pop(row, None)
    for r in range(rounds):
        for row in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            times[row] += time_steps(steps[row], [data[r % len(data)]], 1, device)
    results = [_result(config, batch, row, dtype, device, times[row] or None, status=failed.get(row, "ok"))
               for row in rows]
    if "none" in steps:
        for res in results:
            if res["status"] == "ok":
                res["time_vs_none"] = statistics.median(t / b for t, b in zip(times[res["row"]], times["none"]))
    return results


def largest_batch(config: Config, device: torch.device, *, dtype: str, channels_last: bool,
                  start: int = MAX_BATCH_START, limit: int = 1024, row: str = "tap") -> int:
    """Largest power-of-two batch (from ``start`` up to ``limit``) at which one step of ``row`` fits in
    memory (0 if none does)."""
    best, batch = 0, start
    while batch <= limit:
        try:
            step = build_step(config, row, device, amp_dtype=DTYPES[dtype], channels_last=channels_last)
            step(*make_data(config, batch, device, sets=1)[0])
            _sync(device)
            best = batch
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            step = None
            _free(device)
        batch *= 2
    return best


def row_groups(config: Config, rows: list[str], max_rows: list[str]) -> list[tuple[str | None, list[str]]]:
    """(row whose largest batch to search for, or None for the config's own batch; rows to run at it).

    A fixed batch runs ``rows`` together. At the largest batch ('max' configs), the rows of ``max_rows``
    other than RRR, RBR and JT run together at TAP's largest batch, so that their time and memory compare;
    RRR, RBR and JT, whose double backward needs more memory, each run at their own largest batch.
    """
    if config.batch != 0:
        return [(None, rows)]
    shared = [r for r in max_rows if r not in OWN_LARGEST_BATCH]
    return [("tap", shared)] * bool(shared) + [(r, [r]) for r in max_rows if r in OWN_LARGEST_BATCH]


def add_ratios(results: list[dict]) -> list[dict]:
    """Add time and memory ratios to the No XS row of the same config, batch and dtype, and Table 1's values."""
    base = {(r["config"], r["batch"], r["dtype"]): r for r in results if r["row"] == "none" and r["status"] == "ok"}
    for r in results:
        b = base.get((r["config"], r["batch"], r["dtype"]))
        if b is not None and r["status"] == "ok":
            r.setdefault("time_vs_none", r["step_ms"] / b["step_ms"])
            if r["peak_gb"] is not None and b["peak_gb"]:
                r["mem_vs_none"] = r["peak_gb"] / b["peak_gb"]
        paper = PAPER_TABLE1.get(r["arch"], {}).get(r["row"].split("-")[0], "n/a")
        if r["size"] == 224 and r["batch"] == 16 and paper != "n/a":
            r["paper"] = "OOM" if paper is None else f"{paper[0]} it/s, {paper[1]} GB"
    return results


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def steps_table(results: list[dict]) -> str:
    """Markdown table of step results (one line per row)."""
    lines = ["| config | batch | dtype | method | ms/step | images/s | it/s | peak GB | time vs No XS | "
             "mem vs No XS | paper Table 1 (RTX 3080) |", "|" + " --- |" * 11]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | {r['batch']} | {r['dtype']} | {r['label']} | {r['status']} "
                         f"|  |  |  |  |  | {r.get('paper', '')} |")
            continue
        lines.append(f"| {r['config']} | {r['batch']} | {r['dtype']} | {r['label']} | {r['step_ms']:.2f} | "
                     f"{r['images_s']:.0f} | {r['it_s']:.1f} | {_fmt(r['peak_gb'], '.3f')} | "
                     f"{_fmt(r.get('time_vs_none'), '.3f')} | {_fmt(r.get('mem_vs_none'), '.3f')} | "
                     f"{r.get('paper', '')} |")
    return "\n".join(lines)


def mnist_protocol(device: torch.device, *, epochs: int = 50, n_train: int = 54_000, batch: int = MNIST_BATCH,
                   method: str = "tap", lam: float | None = None, compile: bool = False, cuda_graphs: bool = True,
                   amp_dtype: torch.dtype | None = None, data_dir: str | None = None, seed: int = 0) -> dict:
    """Section 5's MNIST run end to end: ``n_train`` 28x28 uint8 images held on ``device`` in a
    :class:`~tap_fast.feeds.DeviceFeed` that contaminates each shuffled static batch with decoys there (the
    last partial batch dropped), the two-layer CNN and its step, ``epochs`` epochs with losses summed on the
    device and read once per epoch.

    Uses MNIST's training split from ``data_dir`` (``tap_fast.datasets``) when given, else random pixels
    (the same cost). ``lam``: default this package's lambda for TAP (L1) on MNIST with ground-truth masks.
    Returns wall times (total; set-up: the data to the device; training, whose first epoch holds compilation
    and graph capture) and the losses.
    """
    t0 = time.perf_counter()
    if lam is None:
        lam = default_lambda(method, "l1", "mnist", "cnn2", "ground-truth")
    if data_dir is not None:
        from tap_fast.datasets import load_dataset
        train = load_dataset("mnist", data_dir).train
        images, labels = train.images[:n_train], train.labels[:n_train]
    else:
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (n_train, 1, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n_train,), generator=g)
    n_train = images.shape[0]
    if n_train < batch:
        raise ValueError(f"n_train ({n_train} images) must be at least batch ({batch}): an epoch is whole batches")
    # uint8 batches (mean, std None): the step normalises them
    feed = DeviceFeed(images, labels, kind="decoy", num_classes=10, batch_size=batch, mean=None, std=None,
                      seed=seed, device=device)
    torch.manual_seed(seed)
    _sync(device)
    t_setup = time.perf_counter()
    with TappedModel(build_model("cnn2", 10).to(device), tap_points("cnn2")) as model:
        # the training loop of every run (tap_fast.loop.fit); set-up (compilation, graph capture) is in epoch 1
        history = fit(model, feed, method=method, lam=lam, epochs=epochs, lr=1e-3, momentum=0.9,
                      mean=MNIST_MEAN_STD[0], std=MNIST_MEAN_STD[1], quiet=True, desc="mnist", compile=compile,
                      cuda_graphs=cuda_graphs, amp_dtype=amp_dtype, channels_last=False)
    t_end = time.perf_counter()
    epoch_s = history["epoch_s"]
    return {"method": method, "epochs": epochs, "n_train": n_train, "batch": batch, "steps": epochs * len(feed),
            "compile": compile, "cuda_graphs": cuda_graphs, "dtype": "bf16" if amp_dtype else "fp32",
            "data": "MNIST" if data_dir else "random pixels", "total_s": t_end - t0, "setup_s": t_setup - t0,
            "train_s": t_end - t_setup, "first_epoch_s": epoch_s[0],
            "later_epoch_s": statistics.median(epoch_s[1:]) if epochs > 1 else None,
            "final_loss": history["loss"][-1], "final_task_loss": history["task_loss"][-1],
            "final_penalty": history["penalty"][-1]}


def mnist_table(results: list[dict]) -> str:
    lines = ["| method | data | dtype | compile | CUDA graphs | epochs x images | total s | set-up s | train s | "
             "first epoch s | later epoch s | final loss (task, penalty) |", "|" + " --- |" * 12]
    for r in results:
        if "status" in r:
            lines.append(f"| {r['method']} | | | | | | {r['status']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['data']} | {r['dtype']} | {r['compile']} | {r['cuda_graphs']} | "
                     f"{r['epochs']} x {r['n_train']} | {r['total_s']:.1f} | {r['setup_s']:.1f} | "
                     f"{r['train_s']:.1f} | {r['first_epoch_s']:.2f} | {_fmt(r['later_epoch_s'], '.3f')} | "
                     f"{r['final_loss']:.4f} ({r['final_task_loss']:.4f}, {r['final_penalty']:.4g}) |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    """The card's name, or "CPU, N cores" (with torch's thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU, {os.cpu_count()} cores ({name or 'unknown'}; {torch.get_num_threads()} torch threads)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="step_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--configs", nargs="*", default=None,
                   help="arch@size:batch (batch an int or 'max'); default: the paper's set on a GPU "
                        f"{' '.join(GPU_CONFIGS)}, on the CPU {' '.join(CPU_CONFIGS)}")
    p.add_argument("--rows", default=None, help=f"comma-separated of {','.join(ROWS)}; default "
                                                "none,tap,tap-ref,rrr,rbr,at,jt,kd on a GPU, none,tap,rrr,rbr,at,jt,kd "
                                                "on the CPU")
    p.add_argument("--max-rows", default="none,tap,tap-ref",
                   help="rows at the largest batch ('max' configs): rrr, rbr and jt each at their own largest "
                        "batch, the others together at TAP's")
    p.add_argument("--max-limit", type=positive_int, default=1024,
                   help=f"largest batch tried for 'max' configs (at least {MAX_BATCH_START})")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated of fp32,bf16 (bf16 = autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the No XS / TAP steps (and the MNIST "
                                                          "protocol's; its compile time counts in its first epoch)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="do not capture steps in CUDA graphs")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps per row (GPU)")
    p.add_argument("--max-steps", type=positive_int, default=8, help="timed steps per row at the largest batch (GPU)")
    p.add_argument("--warmup", type=non_negative_int, default=5, help="untimed steps first (graph capture needs 4)")
    p.add_argument("--rounds", type=positive_int, default=10, help="interleaved rounds per row (CPU)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--mnist", action="store_true", help="also run the MNIST protocol (TAP and No XS)")
    p.add_argument("--mnist-epochs", type=positive_int, default=50)
    p.add_argument("--mnist-n", type=positive_int, default=54_000,
                   help=f"training images (54,000 in the paper; at least the batch of {MNIST_BATCH})")
    p.add_argument("--mnist-data", default=None, help="folder with mnist.npz; default random pixels")
    p.add_argument("--mnist-methods", default="tap,none")
    p.add_argument("--time-budget", type=positive_float, default=None, help="seconds; skip what would start later")
    p.add_argument("--out", default=None, help="folder for steps.md, steps.json, mnist.md, mnist.json")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (``device`` becomes a torch.device); exits through argparse (code 2)
    with a message naming the bad argument."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        parser.error(f"--device: {e}")
    if args.max_limit < MAX_BATCH_START:
        parser.error(f"--max-limit: must be at least {MAX_BATCH_START} (the first batch tried), got {args.max_limit}")
    if args.mnist_n < MNIST_BATCH:
        parser.error(f"--mnist-n: must be at least the MNIST protocol's batch of {MNIST_BATCH}, got {args.mnist_n}")
    if args.mnist_data is not None and not Path(args.mnist_data).exists():
        parser.error(f"--mnist-data: {args.mnist_data} does not exist")
    for flag, text, allowed in (("--rows", args.rows or "none", ROWS), ("--max-rows", args.max_rows, ROWS),
                                ("--dtypes", args.dtypes, DTYPES), ("--mnist-methods", args.mnist_methods, METHODS)):
        unknown = [name for name in text.split(",") if name not in allowed]
        if unknown:
            parser.error(f"{flag}: unknown {unknown[0]!r}; choose from {list(allowed)}")
    try:
        args.configs = None if args.configs is None else [parse_config(c) for c in args.configs]
    except ValueError as e:
        parser.error(f"--configs: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device = args.device
    gpu = device.type == "cuda"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
    configs = args.configs if args.configs is not None else [parse_config(c) for c in (GPU_CONFIGS if gpu else
                                                                                        CPU_CONFIGS)]
    rows = (args.rows or ("none,tap,tap-ref,rrr,rbr,at,jt,kd" if gpu else "none,tap,rrr,rbr,at,jt,kd")).split(",")
    dtypes = args.dtypes.split(",")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    graphs = gpu and not args.no_cuda_graphs
    header = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(device)}, torch {torch.__version__}, "
              f"compile={args.compile}, cuda_graphs={graphs}, channels_last={args.channels_last}\n"
              f"command: python benchmarks/step_table.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    over_budget = lambda: args.time_budget is not None and time.perf_counter() - start > args.time_budget  # noqa: E731

    results: list[dict] = []
    settings = {"compile": args.compile, "cuda_graphs": graphs, "channels_last": args.channels_last}

    def flush():
        for r in results:
            r.update(settings)
        add_ratios(results)
        if out:
            (out / "steps.md").write_text(header + "\n" + steps_table(results) + "\n")
            (out / "steps.json").write_text(json.dumps(results, indent=1) + "\n")

    for config in configs:
        for dtype in dtypes:
            if over_budget():
                print(f"skipped {config.name} {dtype}: time budget", file=sys.stderr)
                continue
            for search, cfg_rows in row_groups(config, rows, args.max_rows.split(",")):
                batch = config.batch
                if search is not None:
                    try:
                        batch = largest_batch(config, device, dtype=dtype, channels_last=args.channels_last,
                                              limit=args.max_limit, row=search)
                        status = f"OOM at {MAX_BATCH_START}"
                    except Exception as e:  # a CUDA / cuDNN error at a large batch ends this group, not the table
                        batch, status = 0, f"largest batch: {_status(e)}"
                    if batch == 0:
                        results += [_result(config, 0, r, dtype, device, None, status=status) for r in cfg_rows]
                        flush()
                        continue
                if gpu:
                    for result in measure_gpu(config, batch, cfg_rows, dtype, device,
                                              steps=args.max_steps if config.batch == 0 else args.steps,
                                              warmup=args.warmup, compile=args.compile, cuda_graphs=graphs,
                                              channels_last=args.channels_last):
                        results.append(result)
                        flush()
                else:
                    results += measure_interleaved(config, batch, cfg_rows, dtype, device, rounds=args.rounds,
                                                   warmup=args.warmup, compile=args.compile,
                                                   channels_last=args.channels_last)
                    flush()
            print(f"[{time.perf_counter() - start:.0f}s] {config.name} {dtype} done", file=sys.stderr)
    print(header)
    if configs:
        flush()
        print(steps_table(results))

    if args.mnist:
        mnist = []
        for method in args.mnist_methods.split(","):
            if over_budget():
                mnist.append({"method": method, "status": "skipped: time budget"})
                continue
            try:
                mnist.append(mnist_protocol(device, epochs=args.mnist_epochs, n_train=args.mnist_n, method=method,
                                            compile=args.compile, cuda_graphs=graphs,
                                            data_dir=args.mnist_data))
            except Exception as e:
                mnist.append({"method": method, "status": _status(e)})
            if out:
                (out / "mnist.md").write_text(header + "\n" + mnist_table(mnist) + "\n")
                (out / "mnist.json").write_text(json.dumps(mnist, indent=1) + "\n")
        print()
        print(mnist_table(mnist))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
