"""Markdown tables: the fused Triton TAP vs the eager PyTorch reference vs torch.compile of the reference.

For the tap shapes of each model (batch, dtype, layout) it first checks the fused op against the reference
at those shapes (value and gradients, the tolerances of tests/test_kernels.py), then times forward,
backward and forward+backward of the penalty (CUDA events through triton.testing.do_bench, median, L2
flushed between runs), forward+backward replayed from a CUDA graph and the backward alone replayed from a
CUDA graph (captured after a forward on the capture stream). Each implementation's row is written as soon
as it is measured (eager first, so that every row has its speedup). Bandwidths are against the byte floor
(forward: Z and the mask read once; backward: Z read and grad_Z written once) and against the card's
measured copy bandwidth (a 1 GiB device-to-device copy, bytes read plus written). A second table gives the
peak memory of a ResNet-18 training step without the penalty, with the fused op, with its identity form
and with the eager reference.

    python benchmarks/kernel_table.py --out $OUT/kernel_table.md        # everything (needs CUDA)
    python benchmarks/kernel_table.py --models resnet18 --batches 128   # a subset
    python benchmarks/kernel_table.py --smoke [--channels-last]         # tiny CPU run of every code path
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
IMPLS = ("eager", "fused", "compiled")  # the order rows are measured and written in
SMOKE_MODELS = {"smoke": (20, [(6, 10, 10), (5, 3, 3)])}
SMOKE_MEMORY = (2, 32)  # --smoke memory table: batch, image size
# Fused against the reference, as tests/test_kernels.py: |fused - ref| <= atol + rtol |ref| (value; gradients
# elementwise). bf16 gradients: the same fp32 value rounded once on each side, up to two ulps.
VALUE_TOL = {"fp32": (1e-5, 1e-6), "bf16": (1e-4, 1e-6)}
GRAD_TOL = {"fp32": (1e-5, 1e-6), "bf16": (1.6e-2, 1e-5)}


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
    """Median milliseconds of fn(): do_bench (or do_bench_cudagraph) on CUDA; elsewhere (--smoke: the code
    paths, not a measurement) the wall-clock time of one run after a warm-up run."""
    if device.type == "cuda":
        import triton.testing

        if cuda_graph:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def copy_bandwidth_gbs(device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB fp32 tensor."""
    import torch

    n = (256 if device.type == "cuda" else 1) * 2**20
    x = torch.empty(n, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / bench_ms(lambda: y.copy_(x), device) / 1e6


def check_fused(penalty, zs, mask, norm, dtype_name) -> dict:
    """The fused op against the eager reference at these shapes: the worst |fused - ref| / (atol + rtol |ref|)
    of the value and of the gradients (elementwise; at most 1 passes)."""
    import torch

    from tap_fast.tap import tap_penalty_reference

    ref = tap_penalty_reference(zs, mask, norm=norm)
    ref_grads = torch.autograd.grad(ref, zs)
    out = penalty(zs, mask)
    grads = torch.autograd.grad(out, zs)
    (v_rtol, v_atol), (g_rtol, g_atol) = VALUE_TOL[dtype_name], GRAD_TOL[dtype_name]
    value_err = (abs(out.item() - ref.item()) / (v_atol + v_rtol * abs(ref.item())))
    grad_err = max(((gf.float() - gr.float()).abs() / (g_atol + g_rtol * gr.float().abs())).max().item()
                   for gf, gr in zip(grads, ref_grads))
    return {"matches_reference": value_err <= 1 and grad_err <= 1, "value_err_vs_tol": value_err,
            "grad_err_vs_tol": grad_err, "tolerance": f"value rtol {v_rtol:g} atol {v_atol:g}, "
                                                      f"gradients rtol {g_rtol:g} atol {g_atol:g}"}


def backward_replay(penalty, zs, mask, device):
    """fn() running the backward alone: on CUDA the replay of a CUDA graph of it, captured on the stream the
    forward ran on (autograd runs each backward op on its forward op's stream); elsewhere the backward."""
    import torch

    if device.type != "cuda":
        p = penalty(zs, mask)
        return lambda: torch.autograd.grad(p, zs, retain_graph=True)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        p = penalty(zs, mask)
        for _ in range(3):  # warm-up: caches, autotuning, lazy allocations
            torch.autograd.grad(p, zs, retain_graph=True)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        torch.autograd.grad(p, zs, retain_graph=True)
    return graph.replay


def time_impl(penalty, zs, mask, device) -> dict:
    """Milliseconds of one implementation: fwd, bwd, fwd+bwd, fwd+bwd in a CUDA graph, bwd in a CUDA graph
    (NaN, with the error on stderr, where capturing fails: the other columns stay valid)."""
    import torch

    torch.autograd.grad(penalty(zs, mask), zs)  # compile / warm up
    fwd = bench_ms(lambda: penalty(zs, mask), device)
    p = penalty(zs, mask)
    bwd = bench_ms(lambda: torch.autograd.grad(p, zs, retain_graph=True), device)
    del p
    both = bench_ms(lambda: torch.autograd.grad(penalty(zs, mask), zs), device)
    out = {"fwd_ms": fwd, "bwd_ms": bwd, "fwd_bwd_ms": both}
    for key, build in (("fwd_bwd_graph_ms", lambda: bench_ms(lambda: torch.autograd.grad(penalty(zs, mask), zs),
                                                             device, cuda_graph=True)),
                       ("bwd_graph_ms", lambda: bench_ms(backward_replay(penalty, zs, mask, device), device))):
        try:
            out[key] = build()
        except RuntimeError as e:
            print(f"CUDA graph ({key}) failed: {e}", file=sys.stderr)
            out[key] = float("nan")
    return out


def print_row(line, record=None):
    """The default ``emit``: print the markdown line (the record is for --json)."""
    print(line, flush=True)


KERNEL_HEADER = ("| model | batch | dtype | layout | Z MiB | impl | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd ms, graph | "
                 "bwd ms, graph | fwd GB/s | bwd GB/s, graph | fwd+bwd GB/s, graph | % of copy, graph | "
                 "vs eager | vs eager, graph | fused = reference (worst error / tolerance) |")


def kernel_table(models, batches, dtypes, norm, device, impls, copy_gbs, channels_last=False, skip=(),
                 emit=print_row):
    """Markdown rows (header first) for every (model, batch, dtype) not in ``skip`` ("model:batch");
    ``emit(row, record)`` is called on each implementation's row as soon as it is measured, with its numbers
    as a dict."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = [KERNEL_HEADER, "|" + "---|" * KERNEL_HEADER.count(" | ") + "---|"]
    for row in rows:
        emit(row)
    layout = "channels_last" if channels_last else "NCHW"
    for model in models:
        for batch in ((CNN2_BATCH,) if model == "cnn2" else batches):
            if f"{model}:{batch}" in skip:
                continue
            for dtype in dtypes:
                zs, mask = make_inputs(model, batch, dt[dtype], device, channels_last)
                z_bytes = sum(z.numel() * z.element_size() for z in zs)
                mask_bytes = mask.numel() * mask.element_size()
                floors = {"fwd_ms": z_bytes + mask_bytes, "bwd_graph_ms": 2 * z_bytes,
                          "fwd_bwd_graph_ms": 3 * z_bytes + mask_bytes}
                eager = {}
                for name in [n for n in IMPLS if n in impls]:
                    penalty = make_impl(name, norm)
                    check = check_fused(penalty, zs, mask, norm, dtype) if name == "fused" else {}
                    t = time_impl(penalty, zs, mask, device)
                    eager = t if name == "eager" else eager
                    gbs = {k: f / t[k] / 1e6 for k, f in floors.items()}
                    speedup = eager.get("fwd_bwd_ms", float("nan")) / t["fwd_bwd_ms"]
                    graph_speedup = eager.get("fwd_bwd_graph_ms", float("nan")) / t["fwd_bwd_graph_ms"]
                    verdict = "-" if not check else (f"{'yes' if check['matches_reference'] else 'NO'} (value "
                                                     f"{check['value_err_vs_tol']:.2g}, gradients "
                                                     f"{check['grad_err_vs_tol']:.2g})")
                    rows.append(f"| {model} | {batch} | {dtype} | {layout} | {z_bytes / 2**20:.0f} | {name} | "
                                f"{t['fwd_ms']:.3f} | {t['bwd_ms']:.3f} | {t['fwd_bwd_ms']:.3f} | "
                                f"{t['fwd_bwd_graph_ms']:.3f} | {t['bwd_graph_ms']:.3f} | {gbs['fwd_ms']:.0f} | "
                                f"{gbs['bwd_graph_ms']:.0f} | {gbs['fwd_bwd_graph_ms']:.0f} | "
                                f"{100 * gbs['fwd_bwd_graph_ms'] / copy_gbs:.0f}% | {speedup:.2f}x | "
                                f"{graph_speedup:.2f}x | {verdict} |")
                    emit(rows[-1], {"table": "kernels", "model": model, "batch": batch, "dtype": dtype, "norm": norm,
                                    "channels_last": channels_last, "impl": name, **t, "z_bytes": z_bytes,
                                    "mask_bytes": mask_bytes, "floor_bytes": floors["fwd_bwd_graph_ms"],
                                    "fwd_bwd_graph_gbs": gbs["fwd_bwd_graph_ms"], "copy_gbs": copy_gbs, **check})
                    del penalty
                del zs, mask
    return rows


def peak_mib(step, device) -> float:
    """Peak MiB allocated while ``step()`` runs (CUDA); NaN elsewhere (no allocator statistics)."""
    import torch

    if device.type != "cuda":
        step()
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def memory_table(batch, device, dtype_name="fp32", steps=2, emit=print_row, channels_last=False, size=224):
    """Peak memory of one ResNet-18 training step (SGD, ``size`` x ``size``, 10 classes): no penalty vs TAP:
    fused after the forward in one node ("triton", all dZ at once), fused inside the forward per layer in
    the separate and identity forms (what training runs), eager reference."""
    import torch
    import torch.nn.functional as F

    from tap_fast.models import build_model, tap_points
    from tap_fast.tap import tap_penalty
    from tap_fast.tapped_model import TappedModel

    layout = "channels_last" if channels_last else "NCHW"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rows = [f"| step (ResNet-18, batch {batch}, {size} px, {dtype_name}, {layout}) | peak MiB | vs no penalty |",
            "|---|---|---|"]
    for row in rows:
        emit(row)
    base = None
    for backend in (None, "triton", "separate", "identity", "torch"):
        torch.manual_seed(0)
        net = build_model("resnet18", 10, in_channels=3, input_size=size).to(device, memory_format=fmt)
        model = TappedModel(net, tap_points("resnet18"))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,), device=device)
        mask = (torch.rand(batch, 1, size, size, device=device) < 0.3).float()

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype_name == "bf16"):
                if backend in ("separate", "identity"):
                    logits, penalty = model.forward_tap(x, mask, identity=backend == "identity")
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
        peak = peak_mib(step, device)
        base = peak if base is None else base
        name = {None: "no penalty", "triton": "TAP, fused, one node after the forward",
                "separate": "TAP, fused per layer, separate form", "identity": "TAP, fused per layer, identity form",
                "torch": "TAP, eager reference"}[backend]
        rows.append(f"| {name} | not measured (CPU) | - |" if math.isnan(peak) else
                    f"| {name} | {peak:.0f} | {peak - base:+.0f} ({100 * (peak - base) / base:+.2f}%) |")
        emit(rows[-1], {"table": "memory", "model": "resnet18", "batch": batch, "size": size, "dtype": dtype_name,
                        "channels_last": channels_last, "step": backend or "none", "peak_mib": peak,
                        "no_penalty_peak_mib": base})
        del net, model, opt, x, y, mask
        if device.type == "cuda":
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
    parser.add_argument("--channels-last", action="store_true",
                        help="activations (and the memory table's model and inputs) in channels_last format")
    parser.add_argument("--memory-batch", type=int, default=64, help="ResNet-18 batch of the memory table; 0 skips")
    parser.add_argument("--memory-dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="bf16 = autocast")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU through Triton's interpreter (the memory table at batch "
                             f"{SMOKE_MEMORY[0]}, {SMOKE_MEMORY[1]} px, fp32, peaks not measured)")
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
        memory = [(SMOKE_MEMORY[0], "fp32", SMOKE_MEMORY[1])] if args.memory_batch > 0 else []
    elif not torch.cuda.is_available():
        raise SystemExit("kernel_table.py needs a CUDA device (or --smoke for a tiny CPU run)")
    else:
        device, models, batches, dtypes = torch.device("cuda"), args.models, args.batches, args.dtypes
        memory = [(args.memory_batch, dtype, 224) for dtype in args.memory_dtypes if args.memory_batch > 0]
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
                 "(read + write). Byte floors: fwd = Z + mask, bwd = 2 x Z (read Z, write grad_Z), fwd+bwd = "
                 "3 x Z + mask. graph = replayed from a CUDA graph; bwd, graph = the backward alone. fused = "
                 "reference: the worst |fused - ref| / (atol + rtol |ref|) at these shapes (value, gradients "
                 f"elementwise; at most 1 passes): fp32 rtol {VALUE_TOL['fp32'][0]:g} (both), bf16 value rtol "
                 f"{VALUE_TOL['bf16'][0]:g}, gradients rtol {GRAD_TOL['bf16'][0]:g} atol {GRAD_TOL['bf16'][1]:g}.",
                 ""]:
        emit(line)
    kernel_table(models, batches, dtypes, args.norm, device, args.impls, copy_gbs, args.channels_last,
                 skip=set(args.skip), emit=emit)
    for batch, dtype, size in memory:
        emit("")
        memory_table(batch, device, dtype, emit=emit, channels_last=args.channels_last, size=size)
    emit("")


if __name__ == "__main__":
    main()
