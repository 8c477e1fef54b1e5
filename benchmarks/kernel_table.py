"""Markdown tables: the fused Triton TAP vs the eager PyTorch reference vs torch.compile of the reference.

For the tap shapes of each model (batch, dtype) it times forward, backward and forward+backward of the
penalty (CUDA events through triton.testing.do_bench, median, L2 flushed between runs) and reports the
achieved bandwidth against the bandwidth floor (forward: Z read once; backward: Z read once and grad_Z
written once) and against the card's measured copy bandwidth (a 1 GiB device-to-device copy, bytes read
plus written). A second table gives the peak memory of a ResNet-18 TAP training step vs a step without
the penalty.

    python benchmarks/kernel_table.py --out $OUT/kernel_table.md        # everything (needs CUDA)
    python benchmarks/kernel_table.py --models resnet18 --batches 128   # a subset
    python benchmarks/kernel_table.py --smoke                           # tiny CPU run of every code path
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Tap shapes (C, H, W) at the models' input resolution: cnn2 at 28 x 28, the others at 224 x 224.
MODELS = {
    "cnn2": (28, [(100, 14, 14), (100, 6, 6)]),
    "resnet18": (224, [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]),
    "vgg16": (224, [(64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7)]),
    "densenet121": (224, [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (1024, 7, 7)]),
}
CNN2_BATCH = 256
IMPLS = ("fused", "eager", "compiled")
SMOKE_MODELS = {"smoke": (20, [(6, 10, 10), (5, 3, 3)])}


def make_inputs(model, batch, dtype, device, channels_last=False):
    """Random activations (requiring grad) at ``model``'s tap shapes and a binary mask at input size."""
    import torch

    size, layers = (SMOKE_MODELS | MODELS)[model]
    zs = []
    for c, h, w in layers:
        z = torch.randn(batch, c, h, w, device=device, dtype=dtype)
        zs.append((z.to(memory_format=torch.channels_last) if channels_last else z).requires_grad_())
    mask = (torch.rand(batch, 1, size, size, device=device) < 0.3).float()
    return zs, mask


def make_impl(name, norm):
    """penalty(zs, mask) for one implementation; "compiled" is a fresh torch.compile of the reference."""
    import torch

    from tap_fast.tap import tap_penalty_reference

    if name == "fused":
        from kernels.tap_op import fused_tap_penalty

        return lambda zs, mask: fused_tap_penalty(zs, mask, norm=norm)

    def reference(zs, mask):
        return tap_penalty_reference(zs, mask, norm=norm)

    if name == "eager":
        return reference
    if name == "compiled":
        torch._dynamo.reset()
        # Donated buffers forbid the retain_graph=True that timing the backward alone needs.
        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        return torch.compile(reference, fullgraph=True, dynamic=False)
    raise ValueError(f"impl must be one of {IMPLS}, got {name!r}")


def bench_ms(fn, device, cuda_graph=False) -> float:
    """Median milliseconds of fn(): do_bench (or do_bench_cudagraph) on CUDA; a few wall-clock runs
    elsewhere (--smoke only)."""
    if device.type == "cuda":
        import triton.testing

        if cuda_graph:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB fp32 tensor."""
    import torch

    n = (256 if device.type == "cuda" else 1) * 2**20
    x = torch.empty(n, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / bench_ms(lambda: y.copy_(x), device) / 1e6


def time_config(model, batch, dtype, norm, device, impls, channels_last=False):
    """{impl: (fwd, bwd, fwd+bwd, fwd+bwd in a CUDA graph) in ms}, the time of the fused op's mask max-pool
    (its one launch outside the per-layer kernels, which build D on the fly) and the bytes of Z, for one
    (model, batch, dtype)."""
    import torch

    zs, mask = make_inputs(model, batch, dtype, device, channels_last)
    z_bytes = sum(z.numel() * z.element_size() for z in zs)
    out = {}
    for name in impls:
        penalty = make_impl(name, norm)
        torch.autograd.grad(penalty(zs, mask), zs)  # compile / warm up
        fwd = bench_ms(lambda: penalty(zs, mask), device)
        p = penalty(zs, mask)
        bwd = bench_ms(lambda: torch.autograd.grad(p, zs, retain_graph=True), device)
        del p
        both = bench_ms(lambda: torch.autograd.grad(penalty(zs, mask), zs), device)
        try:
            graph = bench_ms(lambda: torch.autograd.grad(penalty(zs, mask), zs), device, cuda_graph=True)
        except RuntimeError as e:  # report, keep going: the other columns are still valid
            print(f"CUDA graph capture of {name} failed: {e}", file=sys.stderr)
            graph = float("nan")
        out[name] = (fwd, bwd, both, graph)
    pool_ms = float("nan")
    if "fused" in impls:
        from kernels.tap_op import fused_pooled_mask

        pool_ms = bench_ms(lambda: fused_pooled_mask(mask), device)
    return out, pool_ms, z_bytes


def print_row(line, record=None):
    """The default ``emit``: print the markdown line (the record is for --json)."""
    print(line, flush=True)


def kernel_table(models, batches, dtypes, norm, device, impls, copy_gbs, channels_last=False, skip=(),
                 emit=print_row):
    """Markdown rows (header first) for every (model, batch, dtype) not in ``skip`` ("model:batch");
    ``emit(row, record)`` is called on each row as soon as it is measured, with its numbers as a dict."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = ["| model | batch | dtype | Z MiB | impl | fwd ms | bwd ms | fwd+bwd ms | fwd GB/s | bwd GB/s | "
            "fwd+bwd GB/s | fwd+bwd % of copy | speedup vs eager | fwd+bwd ms, CUDA graph | "
            "speedup vs eager, CUDA graph | mask max-pool ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        emit(row)
    for model in models:
        for batch in ((CNN2_BATCH,) if model == "cnn2" else batches):
            if f"{model}:{batch}" in skip:
                continue
            for dtype in dtypes:
                times, pool_ms, z_bytes = time_config(model, batch, dt[dtype], norm, device, impls, channels_last)
                floors = (z_bytes, 2 * z_bytes, 3 * z_bytes)
                eager = times.get("eager", (float("nan"),) * 4)
                for name, (fwd, bwd, both, graph) in times.items():
                    gbs = [f / ms / 1e6 for f, ms in zip(floors, (fwd, bwd, both))]
                    pool_col = f"{pool_ms:.3f}" if name == "fused" else "-"
                    rows.append(f"| {model} | {batch} | {dtype} | {z_bytes / 2**20:.0f} | {name} | {fwd:.3f} | "
                                f"{bwd:.3f} | {both:.3f} | {gbs[0]:.0f} | {gbs[1]:.0f} | {gbs[2]:.0f} | "
                                f"{100 * gbs[2] / copy_gbs:.0f}% | {eager[2] / both:.2f}x | {graph:.3f} | "
                                f"{eager[3] / graph:.2f}x | {pool_col} |")
                    emit(rows[-1], {"table": "kernels", "model": model, "batch": batch, "dtype": dtype, "norm": norm,
                                    "channels_last": channels_last, "impl": name, "fwd_ms": fwd, "bwd_ms": bwd,
                                    "fwd_bwd_ms": both, "fwd_bwd_graph_ms": graph, "z_bytes": z_bytes,
                                    "bwd_gbs": gbs[1], "copy_gbs": copy_gbs})
    return rows


def memory_table(batch, device, dtype_name="fp32", steps=2, emit=print_row):
    """Peak memory of one ResNet-18 training step (SGD, 224 x 224, 10 classes): no penalty vs TAP (fused,
    its identity form inside the forward, eager reference)."""
    import torch
    import torch.nn.functional as F

    from tap_fast.models import build_model, tap_points
    from tap_fast.tap import tap_penalty
    from tap_fast.taps import TappedModel

    rows = ["| step (ResNet-18, batch %d, %s) | peak MiB | vs no penalty |" % (batch, dtype_name), "|---|---|---|"]
    for row in rows:
        emit(row)
    base = None
    for backend in (None, "triton", "identity", "torch"):
        torch.manual_seed(0)
        model = TappedModel(build_model("resnet18", 10, in_channels=3).to(device), tap_points("resnet18"))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(batch, 3, 224, 224, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        mask = (torch.rand(batch, 1, 224, 224, device=device) < 0.3).float()

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype_name == "bf16"):
                if backend == "identity":
                    logits, penalty = model.forward_tap(x, mask)
                    loss = F.cross_entropy(logits, y) + 0.1 * penalty
                else:
                    logits, acts = model(x)
                    loss = F.cross_entropy(logits, y)
                    if backend is not None:
                        loss = loss + 0.1 * tap_penalty(acts, mask, validate=False, backend=backend)
            loss.backward()
            opt.step()

        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        base = peak if base is None else base
        name = {None: "no penalty", "triton": "TAP, fused Triton", "identity": "TAP, fused identity form",
                "torch": "TAP, eager reference"}[backend]
        rows.append(f"| {name} | {peak:.0f} | {peak - base:+.0f} ({100 * (peak - base) / base:+.2f}%) |")
        emit(rows[-1], {"table": "memory", "model": "resnet18", "batch": batch, "dtype": dtype_name,
                        "step": backend or "none", "peak_mib": peak, "no_penalty_peak_mib": base})
        del model, opt, x, y, mask
        torch.cuda.empty_cache()
    return rows


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown to this file (rewritten after each row)")
    parser.add_argument("--json", type=Path, help="also write the rows' numbers as JSON records (rewritten after "
                                                  "each row; benchmarks/check_targets.py reads them)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 128], help="batches of the 224 x 224 models")
    parser.add_argument("--skip", nargs="+", default=[], metavar="MODEL:BATCH",
                        help="(model, batch) pairs to leave out")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--norm", default="l1", choices=["l1", "l2sq"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--channels-last", action="store_true", help="activations in channels_last format")
    parser.add_argument("--memory-batch", type=int, default=64, help="ResNet-18 batch of the memory table; 0 skips")
    parser.add_argument("--memory-dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="bf16 = autocast")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    return parser


def parse_args(argv=None):
    """Parse and check the command line; exits with a message naming the bad argument."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for pair in args.skip:
        model, _, batch = pair.partition(":")
        if model not in MODELS or not batch.isdigit():
            parser.error(f"--skip: expected MODEL:BATCH with MODEL in {list(MODELS)}, got {pair!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    import triton

    if args.smoke:
        device, models, batches, dtypes = torch.device("cpu"), ["smoke"], [2], ["fp32"]
    elif not torch.cuda.is_available():
        raise SystemExit("kernel_table.py needs a CUDA device (or --smoke for a tiny CPU run)")
    else:
        device, models, batches, dtypes = torch.device("cuda"), args.models, args.batches, args.dtypes
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    copy_gbs = copy_bandwidth_gbs(device)
    lines, records = [], []

    def emit(line, record=None):  # print and keep the files current, so that a run cut short leaves its rows
        lines.append(line)
        print(line, flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n")
        if record is not None:
            records.append({**record, "device": name, "torch": torch.__version__})
            if args.json is not None:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(records, indent=1) + "\n")

    for line in [f"# TAP kernels: {name}, torch {torch.__version__}, triton {triton.__version__}", "",
                 f"norm={args.norm}, channels_last={args.channels_last}; measured copy bandwidth {copy_gbs:.0f} GB/s "
                 "(read + write). Floors: fwd = bytes of Z, bwd = 2 x bytes of Z (read Z, write grad_Z), "
                 "fwd+bwd = 3 x bytes of Z. Every forward includes building the D maps from the mask (fused: "
                 "the mask's max-pool, timed alone in the last column, then D on the fly in each layer's kernel).",
                 ""]:
        emit(line)
    kernel_table(models, batches, dtypes, args.norm, device, args.impls, copy_gbs, args.channels_last,
                 skip=set(args.skip), emit=emit)
    if device.type == "cuda" and args.memory_batch > 0:
        for dtype in args.memory_dtypes:
            emit("")
            memory_table(args.memory_batch, device, dtype, emit=emit)
    emit("")


if __name__ == "__main__":
    main()
