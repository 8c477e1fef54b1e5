"""Registers per thread, spills and shared memory of every TAP kernel configuration the launch wrappers use
at the ResNet-18 batch-128 tap shapes (bf16 activations, fp32 mask, 224 x 224) on an H200, from the offline
sm_90a compile: no GPU needed.

    python benchmarks/kernel_registers.py                    # markdown table
    python benchmarks/kernel_registers.py --json regs.json   # and the rows as JSON

How the configurations are found: the four kernels that ``kernels.tap_launch`` launches are replaced by
recorders, and the training and API paths run on CPU tensors of the real shapes (``torch.empty``: nothing
is touched or computed): the list form (``fused_tap_penalty`` forward and backward), the per-layer form
(``MaskSource.penalty``, identity and separate), both with and without ``compound``, and
``fused_downscale_masks``, in NCHW and channels_last, for "l1" and "l2sq". The wrappers derive every
block size and grid from their plan functions (``_forward_plan``, ``_backward_plan``, ``_downscale_plan``),
here with the plans' program target at 2 x 132 (``_target_programs`` on an H200) and torch's CUDA
semantics for 1 x 1 means (``_mean_mode(..., cuda=True)``). Each recorded launch is bound by the kernel's
own JIT binder, so it gets the specialisation a real launch gets (ints equal to 1 become constexprs,
16-divisible ints and pointers get divisibility hints, ``do_not_specialize`` honoured), compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (sm_90a) and its PTX put through Triton's ptxas
(``triton/backends/nvidia/bin``) with Triton's own flags plus ``-v``, whose report gives the registers per
thread, spill stores / loads and the stack frame; shared memory (dynamic, Triton's scratch) and num_warps
come from the compiled kernel's metadata. Launches that compile to the same binary are one row.

``tests/test_kernels_compile.py`` imports :func:`record_launches` and :func:`compile_launch` from here.
Needs TRITON_INTERPRET unset or 0 (set so here before ``kernels`` is imported).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["TRITON_INTERPRET"] = "0"  # the kernels must be JITFunctions, not interpreted ones

H200_PROGRAMS = 2 * 132  # _target_programs on an H200: two programs per SM
CAPABILITY = 90  # sm_90a
BATCH, MASK_SIZE = 128, 224
LAYERS = [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]  # ResNet-18 taps at 224 x 224
KERNEL_NAMES = ("tap_forward_kernel", "tap_backward_kernel", "scaled_sum_kernel", "downscale_kernel")
FORMS = ("list", "identity", "separate", "list-compound", "separate-compound", "masks", "masks-compound")


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)`` and what issued it."""
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict
    where: dict  # form, layout, norm, dtype, layer (1-based), phase


@dataclass
class Config:
    """One compiled configuration (a distinct binary) and the launches that use it."""
    kernel: str
    signature: dict
    constexprs: dict
    num_warps: int
    shared: int
    ptx: str
    cubin: bytes
    launches: list = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    compile_s: float = 0.0


@contextlib.contextmanager
def _recording(target: int):
    """Kernels of ``kernels.tap_launch`` replaced by recorders (yields the list they append to and the dict
    of labels each launch copies), the plans' program target fixed at ``target``, CUDA mean semantics and
    CPU tensors accepted; all restored on exit. The plan caches are cleared on entry and exit, so no plan
    computed here outlives it."""
    from kernels import tap_launch

    launches: list[Launch] = []
    where: dict = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.name, tuple(grid), args, kwargs, dict(where)))

    names = (*KERNEL_NAMES, "_target_programs", "_mean_mode", "check_launchable")
    saved = {name: getattr(tap_launch, name) for name in names}
    mean_mode = saved["_mean_mode"]
    caches = (tap_launch._forward_plan, tap_launch._backward_plan, tap_launch._downscale_plan,
              tap_launch._call_plan, tap_launch._layer_plan)
    for name in KERNEL_NAMES:
        setattr(tap_launch, name, Recorder(name))
    tap_launch._target_programs = lambda device: target
    tap_launch._mean_mode = lambda ho, wo, cuda: mean_mode(ho, wo, True)
    tap_launch.check_launchable = lambda t, name: None  # the recording runs on CPU tensors
    for cache in caches:
        cache.cache_clear()
    try:
        yield launches, where
    finally:
        for name, value in saved.items():
            setattr(tap_launch, name, value)
        for cache in caches:
            cache.cache_clear()


def record_launches(layers=LAYERS, batch: int = BATCH, mask_size: int = MASK_SIZE, dtypes=("bf16",),
                    layouts=("NCHW", "channels_last"), norms=("l1", "l2sq"), forms=FORMS,
                    mask_dtype: str = "fp32", target: int = H200_PROGRAMS) -> list[Launch]:
    """Every launch the fused TAP paths issue at these shapes (module docstring), recorded, not run."""
    import torch

    from kernels import tap_op

    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    n_layers = len(layers)
    with _recording(target) as (launches, where):
        mask = torch.empty(batch, 1, mask_size, mask_size, dtype=torch_dtypes[mask_dtype])
        for dtype in dtypes:
            for layout in layouts:
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                zs = [torch.empty(batch, c, h, w, dtype=torch_dtypes[dtype], memory_format=fmt).requires_grad_()
                      for c, h, w in layers]
                for norm in norms:
                    for form in forms:
                        where.clear()
                        where.update(form=form, layout=layout, norm=norm, dtype=dtype, phase="fwd")
                        compound = form.endswith("compound")
                        if form.startswith("masks"):
                            if norm == norms[0]:  # no norm in the masks' path
                                where["norm"] = "-"
                                tap_op.fused_downscale_masks(mask, [z.shape[-2:] for z in zs], compound=compound)
                            continue
                        if form.startswith("list"):
                            penalty = tap_op.fused_tap_penalty(zs, mask, norm=norm, compound=compound)
                            outputs, grads = [penalty], None
                        else:
                            source = tap_op.MaskSource(mask, compound=compound)
                            identity = form == "identity"
                            outs, penalties = [], []
                            for i, z in enumerate(zs):
                                where["layer"] = i + 1
                                out = source.penalty(z, norm, identity=identity)
                                if identity:
                                    outs.append(out[0])
                                penalties.append(out[1] if identity else out)
                            penalty = sum(penalties) / n_layers
                            outputs = [*outs, penalty]
                            grads = [torch.empty_like(o) for o in outs] + [torch.ones(())]
                        where.pop("layer", None)
                        where["phase"] = "bwd"
                        torch.autograd.grad(outputs, zs, grads)
    return _number_layers(launches, layers)


def _number_layers(launches: list[Launch], layers) -> list[Launch]:
    """Fill ``where["layer"]`` (1-based) from the launch's spatial size where the path did not say."""
    sizes = {(h, w): i + 1 for i, (_, h, w) in enumerate(layers)}
    for launch in launches:
        if "layer" in launch.where:
            continue
        if launch.kernel == "tap_forward_kernel":
            hw = (launch.args[7], launch.args[8])  # H, W
        elif launch.kernel == "tap_backward_kernel":
            hw = None
            for i, (c, h, w) in enumerate(layers):
                if launch.args[6] == c and launch.args[7] == h * w:
                    hw = (h, w)
        elif launch.kernel == "downscale_kernel":
            hw = (launch.args[4], launch.args[5])  # HO, WO
        else:
            hw = None
        launch.where["layer"] = sizes.get(hw, "-")
    return launches


def _jit(name: str):
    from kernels import tap_kernels

    fn = getattr(tap_kernels, name)
    if not hasattr(fn, "_pack_args"):
        raise RuntimeError(f"kernels.tap_kernels.{name} is {type(fn).__name__}, not a JITFunction: run with "
                           "TRITON_INTERPRET=0 (kernels must not have been imported in interpreter mode)")
    return fn


def specialise(launch: Launch, capability: int = CAPABILITY):
    """(signature, constexprs, attrs, options) of ``launch`` as Triton's launch-time binder computes them for
    the target (the same calls ``JITFunction.run`` makes before it compiles)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit(launch.kernel)
    backend = make_backend(GPUTarget("cuda", capability, 32))
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def compile_launch(launch: Launch, capability: int = CAPABILITY) -> Config:
    """Compile ``launch``'s specialisation offline for sm_``capability``a (cubin, through ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options, signature, constexprs, attrs = specialise(launch, capability)
    fn = _jit(launch.kernel)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                            options=options.__dict__)
    names = list(signature)
    return Config(kernel=launch.kernel, signature=signature,
                  constexprs={names[path[0]]: value for path, value in constexprs.items()},
                  num_warps=kernel.metadata.num_warps, shared=kernel.metadata.shared, ptx=kernel.asm["ptx"],
                  cubin=kernel.asm["cubin"], compile_s=time.perf_counter() - start)


def config_key(launch: Launch, capability: int = CAPABILITY):
    """What makes a distinct binary: the kernel, its specialised signature, constexprs, hints and options."""
    options, signature, constexprs, attrs = specialise(launch, capability)
    return (launch.kernel, tuple(signature.items()), tuple(sorted(constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())), options.num_warps, options.num_stages)


def ptxas_usage(ptx: str, capability: int = CAPABILITY) -> dict:
    """Registers per thread, spill stores / loads and stack frame (bytes) from ``ptxas -v`` with Triton's
    flags (``make_cubin``: -lineinfo --regAllocOptLevel=2), on Triton's ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(tmp) / "kernel.o")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return {"registers": int(regs.group(1)), "stack_bytes": int(spills.group(1)),
            "spill_store_bytes": int(spills.group(2)), "spill_load_bytes": int(spills.group(3))}


def configurations(launches: list[Launch], capability: int = CAPABILITY, usage: bool = True) -> list[Config]:
    """The distinct binaries of ``launches``, compiled (and with ptxas usage), each with its launches."""
    configs: dict = {}
    for launch in launches:
        key = config_key(launch, capability)
        if key not in configs:
            configs[key] = compile_launch(launch, capability)
            if usage:
                configs[key].usage = ptxas_usage(configs[key].ptx, capability)
        configs[key].launches.append(launch)
    return list(configs.values())


SHOWN = {"tap_forward_kernel": ("K", "BIN_W", "L2SQ", "D_DTYPE", "WRITE_SUM", "BLOCK_C", "BLOCK_P"),
         "tap_backward_kernel": ("HAS_GRAD_OUT", "BLOCK_C", "BLOCK_P"),
         "downscale_kernel": ("K", "BIN_W", "MEAN_MODE", "BLOCK"),
         "scaled_sum_kernel": ("BLOCK",)}
USAGE = ("registers", "spill_store_bytes", "spill_load_bytes", "stack_bytes")


def _join(values) -> str:
    return "/".join(str(v) for v in sorted(set(values), key=str))


def describe(config: Config) -> dict:
    """A row of ``config``: kernel, layer(s), layout, constexprs, usage, and the forms and norms using it."""
    c = config.constexprs
    unit = [name for name in ("stride_zp", "stride_zc") if c.get(name) == 1]
    layout = {"stride_zp": "NCHW", "stride_zc": "channels_last"}[unit[0]] if unit else "-"
    ws = [launch.where for launch in config.launches]
    return {"kernel": config.kernel.replace("_kernel", ""), "layer": _join(w.get("layer", "-") for w in ws),
            "layout": layout if config.kernel in ("tap_forward_kernel", "tap_backward_kernel") else "-",
            "constexprs": {k: c[k] for k in SHOWN[config.kernel] if k in c},
            "grid": _join(launch.grid for launch in config.launches),
            "forms": sorted({w["form"] for w in ws}), "norms": sorted({w["norm"] for w in ws}),
            "num_warps": config.num_warps, "shared_bytes": config.shared, **config.usage,
            "launches": len(config.launches), "signature": config.signature}


def markdown(rows: list[dict]) -> str:
    """One line per distinct binary, except that binaries differing only in L2SQ (the norms column says which)
    with the same usage share a line."""
    merged: dict = {}
    for r in rows:
        shown = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k != "L2SQ")
        key = (r["kernel"], r["layer"], r["layout"], shown, r["grid"], r["num_warps"], r["shared_bytes"],
               *(r.get(k, "?") for k in USAGE))
        line = merged.setdefault(key, {"forms": set(), "norms": set()})
        line["forms"].update(r["forms"])
        line["norms"].update(r["norms"])
    lines = ["| kernel | layer | layout | constexprs | grid | regs/thread | spill st / ld (B) | stack (B) | "
             "smem (B) | warps | used by (forms; norms) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, line in merged.items():
        kernel, layer, layout, shown, grid, warps, smem, regs, stores, loads, stack = key
        lines.append(f"| {kernel} | {layer} | {layout} | {shown} | {grid} | {regs} | {stores} / {loads} | {stack} | "
                     f"{smem} | {warps} | {_join(line['forms'])}; {_join(line['norms'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16", help="comma-separated activation dtypes (fp32, fp16, bf16)")
    parser.add_argument("--layouts", default="NCHW,channels_last")
    parser.add_argument("--norms", default="l1,l2sq")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {FORMS}")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    split = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731

    import triton
    import torch

    start = time.perf_counter()
    launches = record_launches(batch=args.batch, dtypes=split(args.dtypes), layouts=split(args.layouts),
                               norms=split(args.norms), forms=split(args.forms))
    configs = configurations(launches)
    order = {name: i for i, name in enumerate(KERNEL_NAMES[:1] + ("downscale_kernel", "scaled_sum_kernel",
                                                                    "tap_backward_kernel"))}
    rows = sorted((describe(c) for c in configs),
                  key=lambda r: (order[r["kernel"] + "_kernel"], r["layout"], r["layer"], str(r["constexprs"])))
    title = (f"TAP kernels at ResNet-18 batch {args.batch} ({args.dtypes} activations, fp32 mask, 224 x 224), "
             f"offline sm_90a compile (Triton {triton.__version__}, torch {torch.__version__}): {len(launches)} "
             f"launches, {len(configs)} binaries, {time.perf_counter() - start:.0f} s")
    table = markdown(rows)
    print(title + "\n\n" + table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"title": title, "target_programs": H200_PROGRAMS, "capability": CAPABILITY,
                                         "triton": triton.__version__, "torch": torch.__version__, "rows": rows},
                                        indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
