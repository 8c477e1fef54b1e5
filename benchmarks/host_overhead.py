"""Host time per call of the fused TAP (Python, dispatch, allocation, autograd; no kernel work), against
the eager reference, at the ResNet-18 batch-128 tap shapes (64x56x56, 128x28x28, 256x14x14, 512x7x7,
mask 1x224x224), bf16 activations by default.

    python benchmarks/host_overhead.py --json h.json                  # CPU (any machine)
    python benchmarks/host_overhead.py --device cuda --json h.json    # on a GPU machine
    python benchmarks/host_overhead.py --profile fused_fwd_bwd        # cProfile of one case, then exit

Cases (each a forward, and a forward plus the backward to the activations):
- ``fused``: the public API, ``tap_fast.tap.tap_penalty(zs, mask, backend="triton", validate=False)``
  (one autograd node over the L layers; L + 1 launches forward, L backward);
- ``identity`` / ``separate``: the per-layer form training uses (``TappedModel.forward_tap``):
  ``kernels.tap_op.MaskSource(mask)``, then ``.penalty(z, "l1", identity=True / False)`` per layer and
  ``sum(penalties) / L`` as forward_tap combines them. The identity backward gets a gradient at every
  returned Z (preallocated) and the penalty's;
- ``eager``: the reference through the same entry, ``tap_penalty(..., backend="torch", validate=False)``
  (``tap_penalty_reference``);
- ``floor``: one ``torch.autograd.Function`` over the L activations that allocates a scalar forward and
  returns preallocated gradients backward: what any single-node implementation costs at least here. Most
  of it is the fixed cost of a backward call (graph task, engine), which a training step pays once for
  the whole network, so ``fused - floor`` is closer to what TAP adds to a step's host time.
Backward is ``torch.autograd.grad(outputs, zs, grads)``: the activations of a network are not leaves,
so nothing accumulates into ``.grad`` (``.backward()`` on leaf tensors would add an accumulation per step).

How the kernels are taken out: the launch wrappers call ``kernel[grid](*args, **constexprs)`` on the
module globals ``tap_forward_kernel``, ``tap_backward_kernel``, ``scaled_sum_kernel`` and
``downscale_kernel`` of ``kernels.tap_launch``; :func:`stub_kernels` replaces those four names by
:class:`NoOpKernel` objects whose ``__getitem__(grid)`` returns a callable that only counts the call, and
restores them on exit. Everything else (plans, allocation of outputs, autograd nodes, the custom-op layer's
dispatch) runs as in a real call. Triton's own launcher is therefore not counted: binding the arguments
and computing the specialisation key alone (``JITFunction.run`` before the driver call) took 5-6 us per
launch on the 2-core CPU this was written on, measured offline with the kernels' own binder, and the
driver launch adds a few us more: about 9 x 10 us per forward+backward of the fused form (9 launches), on
top of what this reports; ``--device cuda`` does not count them either.

Devices:
- ``cuda`` (real shapes): the fused forms allocate their outputs from the CUDA caching allocator; the
  eager reference runs its real CUDA kernels asynchronously, and the timer stops before the device is
  synchronised, so its time is its host cost as long as the launch queue does not fill (a round is about
  ``--round-us`` long). The CUDA backward also pays the autograd engine's hand-off to its device thread.
- ``cpu`` (the default; shapes scaled down): at the real shapes the eager reference would do its work on
  the CPU (seconds), so every case runs at tiny shapes with the same op sequence and launch structure
  (``SCALED``: batch 2, mask 16 x 16, layers 8, 4, 2, 2 pixels; each layer's bins nest in the previous
  one's, as at 224 x 224, so layers 2-4 build D from the previous sums; no 1 x 1 layer, for which torch's
  adaptive pool switches to mean()). There the reference's compute is about a microsecond per op (the
  3 x 3 max-pool, the largest, about 5 us; at 64 x 64 it took 200 us, hence shapes this small). The fused
  forms do the same host work at any shape (their plans are per shape). A real CUDA launch costs some us
  of driver time per op that the CPU has not: the eager reference (37 aten calls forward, about 30 of them
  kernels, and 46 backward) is under-estimated more than the fused forms (whose kernels are no-ops either
  way), so the fused/eager ratio here is conservative. TRITON_INTERPRET=1 is set in the process before
  ``kernels`` is imported, so that ``check_launchable`` accepts CPU tensors; no kernel runs (all stubbed).
- ``meta`` (real shapes): dispatch, allocation and autograd without compute. Not the default, because
  many of torch's meta kernels are Python (``torch._refs``, ``torch._meta_registrations``): measured on a
  2-core CPU, the eager reference costs about 3-4.5 ms forward there against about 0.2 ms on the CPU, and
  ``empty_like`` (the fused backward's grad buffers) adds about 30 us per backward: it inflates the
  reference far more than the fused forms.

Timing: every case is warmed up (plans cached), then ``--rounds`` interleaved rounds (the case order
rotates each round, so the load of a shared machine hits all cases alike); a round of a case times, with
``time.perf_counter_ns`` and garbage collection off, as many calls back to back as take about
``--round-us`` (300 us: one eager call, a few fused ones; ``--inner`` fixes the count), so that every
case's rounds are short and equally long and a preemption spoils only a minority of them. Reported: the
median over rounds of the per-call time, in us. Goal (issue 10): fused forward+backward at most 100 us
and at most half the eager reference's, in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH, MASK_SIZE = 128, 224
LAYERS = [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]  # ResNet-18 taps at 224 x 224
# The same op sequence and launch structure, tiny: the CPU's default (module docstring).
SCALED_BATCH, SCALED_MASK_SIZE = 2, 16
SCALED = [(2, 8, 8), (4, 4, 4), (8, 2, 2), (16, 2, 2)]
KERNEL_NAMES = ("tap_forward_kernel", "tap_backward_kernel", "scaled_sum_kernel", "downscale_kernel")
FORMS = ("fused", "identity", "separate", "eager", "floor")
CASES = tuple(f"{form}_{phase}" for form in FORMS for phase in ("fwd", "fwd_bwd"))
GOAL_US = 100.0
DTYPES = ("bf16", "fp16", "fp32")


class NoOpKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **constexprs)`` counts the launch
    and returns at once."""

    def __init__(self, name: str):
        self.name = name
        self.calls = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.calls += 1


@contextlib.contextmanager
def stub_kernels():
    """Replace the kernels that ``kernels.tap_launch`` launches by :class:`NoOpKernel` objects; yields
    {name: stub}. The real kernels are put back on exit."""
    from kernels import tap_launch

    saved = {name: getattr(tap_launch, name) for name in KERNEL_NAMES}
    stubs = {name: NoOpKernel(name) for name in KERNEL_NAMES}
    for name, stub in stubs.items():
        setattr(tap_launch, name, stub)
    try:
        yield stubs
    finally:
        for name, kernel in saved.items():
            setattr(tap_launch, name, kernel)


def make_inputs(device, dtype, shapes: str, channels_last: bool):
    """The L activations (requiring grad; differentiated with autograd.grad, module docstring), a binary
    fp32 mask, and the preallocated gradients of the identity form's outputs and of its penalty."""
    import torch

    if shapes == "real":
        batch, size, layers = BATCH, MASK_SIZE, LAYERS
    else:
        batch, size, layers = SCALED_BATCH, SCALED_MASK_SIZE, SCALED
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    real = device.type != "meta"
    zs = []
    for c, h, w in layers:
        z = (torch.randn(batch, c, h, w, device=device, dtype=dtype) if real else
             torch.empty(batch, c, h, w, device=device, dtype=dtype))
        zs.append(z.contiguous(memory_format=fmt).requires_grad_())
    mask = ((torch.rand(batch, 1, size, size, device=device) < 0.3).float() if real else
            torch.empty(batch, 1, size, size, device=device))
    grads = [torch.zeros_like(z) for z in zs]
    one = torch.ones((), device=device, dtype=torch.float32)
    return zs, mask, grads, one


def make_cases(zs, mask, grads, one) -> dict:
    """{case: callable} for ``CASES``."""
    import torch

    from kernels.tap_op import MaskSource
    from tap_fast.tap import tap_penalty

    n_layers = len(zs)

    def fused():
        return tap_penalty(zs, mask, backend="triton", validate=False)

    def per_layer(identity):
        source = MaskSource(mask)
        outs, penalties = [], []
        for z in zs:
            if identity:
                out, p = source.penalty(z, "l1", identity=True)
                outs.append(out)
            else:
                p = source.penalty(z, "l1", identity=False)
            penalties.append(p)
        return outs, sum(penalties) / n_layers  # as TappedModel.forward_tap combines them

    def identity_fwd_bwd():
        outs, penalty = per_layer(True)
        torch.autograd.grad([*outs, penalty], zs, [*grads, one])

    def eager():
        return tap_penalty(zs, mask, backend="torch", validate=False)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            return inputs[0].new_empty(())

        @staticmethod
        def backward(ctx, grad):
            return tuple(grads)

    return {
        "fused_fwd": fused,
        "fused_fwd_bwd": lambda: torch.autograd.grad(fused(), zs),
        "identity_fwd": lambda: per_layer(True),
        "identity_fwd_bwd": identity_fwd_bwd,
        "separate_fwd": lambda: per_layer(False),
        "separate_fwd_bwd": lambda: torch.autograd.grad(per_layer(False)[1], zs),
        "eager_fwd": eager,
        "eager_fwd_bwd": lambda: torch.autograd.grad(eager(), zs),
        "floor_fwd": lambda: Floor.apply(*zs),
        "floor_fwd_bwd": lambda: torch.autograd.grad(Floor.apply(*zs), zs),
    }


def count_launches(cases: dict, zs, grads, one, stubs: dict) -> dict:
    """Launches per kernel of one forward, and of the backward alone, of each fused form:
    {"fused_fwd": {kernel: n}, "fused_bwd": {...}, "identity_fwd": ..., ...}."""
    import torch

    def snapshot():
        return {name: stub.calls for name, stub in stubs.items()}

    def since(before):
        now = snapshot()
        return {name: now[name] - before[name] for name in now if now[name] != before[name]}

    out = {}
    for form in ("fused", "identity", "separate"):
        before = snapshot()
        result = cases[f"{form}_fwd"]()
        out[f"{form}_fwd"] = since(before)
        if form == "fused":
            outputs, grad_outputs = [result], None
        elif form == "identity":
            outputs, grad_outputs = [*result[0], result[1]], [*grads, one]
        else:
            outputs, grad_outputs = [result[1]], None
        before = snapshot()
        torch.autograd.grad(outputs, zs, grad_outputs)
        out[f"{form}_bwd"] = since(before)
    return out


def time_cases(cases: dict, names, rounds: int, inner: int | None, warmup: int, sync,
               round_us: float = 300.0) -> tuple[dict, dict, dict]:
    """({case: [us per call of each round]}, {case: calls per round}, {case: calls made in all, warm-up
    included}): interleaved rounds, the order rotating
    by one each round. A round times ``inner`` calls back to back, or (None) as many as take about
    ``round_us`` (from the warm-up's speed): short rounds of equal length for every case, so that the
    preemptions of a loaded machine hit a minority of every case's rounds alike, and the median skips them."""
    per_round, calls = {}, {}
    probe = max(3, warmup // 4)
    for name in names:
        fn = cases[name]
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter_ns()
        for _ in range(probe):
            fn()
        sync()
        us = (time.perf_counter_ns() - t0) / 1e3 / probe
        per_round[name] = inner if inner is not None else max(1, round(round_us / max(us, 1e-3)))
        calls[name] = warmup + probe + rounds * per_round[name]
    samples = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                fn, n = cases[name], per_round[name]
                sync()
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    fn()
                dt = time.perf_counter_ns() - t0
                sync()
                samples[name].append(dt / n / 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, per_round, calls


def machine_info(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    info["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(result: dict) -> str:
    us = result
    rows = [f"Host time per call, us (median of {result['rounds']} interleaved rounds of about "
            f"{result['round_us']:.0f} us; "
            f"{result['device']}, {result['shapes']} shapes, {result['dtype']}, "
            f"{'channels_last' if result['channels_last'] else 'NCHW'}; Triton launches stubbed; "
            f"{result['machine']['cpu']}, load average {result['machine'].get('load_average', '?')})", "",
            "| form | forward | forward+backward | fwd+bwd vs eager | launches fwd / bwd |",
            "|---|---|---|---|---|"]
    for form, label in (("fused", "fused, tap_penalty(backend='triton')"),
                        ("identity", "per layer, identity form (MaskSource)"),
                        ("separate", "per layer, separate form (MaskSource)"),
                        ("eager", "eager reference (backend='torch')"),
                        ("floor", "floor: one no-op autograd node")):
        launches = result["launches"]
        n = (f"{sum(launches[form + '_fwd'].values())} / {sum(launches[form + '_bwd'].values())}"
             if form + "_fwd" in launches else "-")
        ratio = us[f"{form}_fwd_bwd_us"] / us["eager_fwd_bwd_us"]
        rows.append(f"| {label} | {us[f'{form}_fwd_us']:.1f} | {us[f'{form}_fwd_bwd_us']:.1f} | "
                    f"{ratio:.2f}x | {n} |")
    rows += ["", f"Goal: fused forward+backward <= {GOAL_US:.0f} us and <= 0.5x eager: "
             f"{us['fused_fwd_bwd_us']:.1f} us, {us['fused_vs_eager_fwd_bwd']:.2f}x -> "
             f"{'met' if result['goal_met'] else 'missed'} (fused minus the one-node floor: "
             f"{us['fused_minus_floor_fwd_bwd_us']:.1f} us)"]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "meta"))
    parser.add_argument("--shapes", choices=("real", "scaled"), default=None,
                        help="real: the ResNet-18 batch-128 shapes; scaled: SCALED (default: scaled on the CPU, "
                             "real on cuda and meta)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="activations' dtype")
    parser.add_argument("--channels-last", action="store_true", help="activations in channels_last")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--inner", type=int, default=None,
                        help="calls per case per round (default: as many as take about --round-us)")
    parser.add_argument("--round-us", type=float, default=300.0, help="length of a round of one case, us")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no intra-op pool wake-ups)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--profile", choices=CASES, default=None,
                        help="print a cProfile of this case (tottime) instead of timing")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.device != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels is imported: check_launchable accepts CPU/meta
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, torch)
    finally:
        torch.set_num_threads(threads)


def _run(args, torch) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    shapes = args.shapes or ("scaled" if device.type == "cpu" else "real")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    zs, mask, grads, one = make_inputs(device, dtype, shapes, args.channels_last)
    with stub_kernels() as stubs:
        cases = make_cases(zs, mask, grads, one)
        launches = count_launches(cases, zs, grads, one, stubs)
        if args.profile:
            return _profile(cases[args.profile], args)
        samples, per_round, calls = time_cases(cases, CASES, args.rounds, args.inner, args.warmup, sync, args.round_us)
        stub_calls = {name: stub.calls for name, stub in stubs.items()}

    result = {f"{name}_us": statistics.median(v) for name, v in samples.items()}
    for form in ("fused", "identity", "separate", "floor"):
        for phase in ("fwd", "fwd_bwd"):
            result[f"{form}_vs_eager_{phase}"] = result[f"{form}_{phase}_us"] / result[f"eager_{phase}_us"]
    result["goal_us"] = GOAL_US
    result["goal_met"] = bool(result["fused_fwd_bwd_us"] <= GOAL_US and result["fused_vs_eager_fwd_bwd"] <= 0.5)
    result.update(device=str(device), shapes=shapes, dtype=args.dtype, channels_last=args.channels_last,
                  rounds=args.rounds, inner=per_round, calls=calls, round_us=args.round_us,
                  layers=[list(z.shape) for z in zs], mask=list(mask.shape),
                  quartiles_us={name: [round(q, 2) for q in statistics.quantiles(v, n=4)] if len(v) > 1 else v
                                for name, v in samples.items()},
                  launches=launches, stub_calls=stub_calls, machine=machine_info(device))
    result["fused_minus_floor_fwd_bwd_us"] = result["fused_fwd_bwd_us"] - result["floor_fwd_bwd_us"]
    table = markdown(result)
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "table": table}, indent=1) + "\n")
    assert all(math.isfinite(result[f"{c}_us"]) for c in CASES)
    return result


def _profile(fn, args) -> dict:
    import cProfile
    import pstats

    for _ in range(args.warmup):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.rounds * (args.inner or 10)):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return {}


if __name__ == "__main__":
    main()
