"""What the compiled TAP step adds to the compiled No XS step, counted in Inductor's generated code.

For each model the training step of ``tap_fast.compiled_step.make_step(compile=True)`` (forward + CE +
lambda * TAP of eq. 8, its AOTAutograd backward, SGD with momentum) is built for method "none" and for
method "tap" with each TAP formulation, as ``train_step`` runs it: "torch" (``tap_penalty_reference``, plain
torch ops, what backend "auto" means under compile), "triton" and "identity" (the fused Triton kernels as
opaque ``torch.library`` custom ops inside the forward, separate and identity form; on the CPU through
Triton's interpreter, TRITON_INTERPRET=1, which Inductor compiles around like any extern op). One step
runs; the wrapper code of every graph Inductor compiles is kept (``GraphLowering.save_output_code``,
caches off) with its phase: forward, backward, and the optimizer step (the same in every row, not shown).

    python benchmarks/inductor_fusion.py --json fusion.json     # cnn2@28 and resnet18@72, batch 3, CPU
    python benchmarks/inductor_fusion.py --models cnn2 --backends torch

Counting, per graph, from the wrapper's ``call`` (parsed with ``ast``) and the kernels' sources:
- kernels: launches of generated kernels (``cpp_fused_*`` on the CPU, Triton kernels on CUDA) and extern
  calls (convolutions, matmuls, aten fallbacks, the ``tap_fast`` custom ops).
- passes: sweeps over memory. A generated CPU kernel runs its nodes as one or more loop nests, one after
  the other, each a pass (an outer-loop-fused nest, whose inner loops reuse a row while it is in cache,
  counts once); a Triton kernel is one pass, or one per top-level loop of its body; an extern call is one
  pass over each tensor argument and output.
- over Z^l: for each tap l, the kernels, and the (pass, buffer) pairs, that read or write a buffer with
  Z^l's number of elements (any dtype: Z^l itself, its relu mask, its gradient, a copy in another layout),
  and their traffic in units of Z^l's size (a bool mask of an fp32 Z^l is 0.25). In the No XS step this
  is the network's own traffic at that size; TAP minus No XS is what TAP adds: a channel sum (eq. 6) fused
  into the loop that writes Z^l adds nothing, one in a loop of its own adds a pass; the net can be
  negative where Inductor then saves a mask instead of recomputing it. A parameter, the input, the mask or
  a module output of another shape with a tap's number of elements would be counted too, so that raises
  (ResNet-18 runs at 72, not 64: at a multiple of 16 its layer3 output has as many elements as the mask).
Printed: the No XS count -> the TAP count, and TAP minus No XS over each Z^l. The goal (issue 10): no
kernel and no pass over Z^l beyond the fused channel sum and masked reduction; extra kernels only for the
mask path D(M, l) (eq. 7) and the masked reductions over the B x H_l x W_l maps.

Limits: on the CPU the counts are those of Inductor's C++ backend. What is fused is decided by the
scheduler both backends share, and the joint-graph CSE and the partitioner that decide what the backward
reads are device independent; kernel boundaries are not: the CPU backend puts fused nodes whose loops do
not match (a pointwise node and a reduction over its channels) into one kernel as separate loop nests,
where Triton needs one iteration space or separate kernels, so the CPU's passes are the closer analogue of
Triton launches. Layouts differ (the CPU picks channels_last for convolution outputs; on CUDA the model's
memory format decides, and with it whether a channel sum matches the producer's loop), and the CPU runs
the scatter of the max-pool backward (a scatter_add decomposition on every device) as an aten fallback
whose arguments need copies into its layout, where Triton generates it. Adaptive average pools of
non-divisible sizes with windows over 25 pixels (28 -> 6, 72 -> 5) fall back to aten on every device.
Counts are of launches and memory passes, not time. ``--device cuda`` (Triton kernels, graph partitions)
has not run yet: no GPU so far.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import sys
from unittest import mock

BACKENDS = ("torch", "triton", "identity")
# Input sizes, small enough for a CPU compile. ResNet-18 at 72, not 64: at any multiple of 16 its layer3 output
# (256 x H/16 x W/16) has the input's and the mask's number of elements.
MODELS = {"cnn2": 28, "resnet18": 72}
PHASES = ("forward", "backward")
DTYPE_BYTES = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "bfloat16": 2, "float16": 2, "int8": 1,
               "uint8": 1, "bool": 1}
# element types of kernel parameters (C++ on the CPU, Triton signatures on CUDA) as torch dtype names
PARAM_DTYPES = {"double": "float64", "int64_t": "int64", "float": "float32", "int32_t": "int32",
                "at::BFloat16": "bfloat16", "bfloat16": "bfloat16", "at::Half": "float16", "half": "float16",
                "int8_t": "int8", "uint8_t": "uint8", "bool": "bool", "fp64": "float64", "i64": "int64",
                "fp32": "float32", "i32": "int32", "bf16": "bfloat16", "fp16": "float16", "i8": "int8", "u8": "uint8",
                "i1": "bool"}


# ---- parsing Inductor's wrapper code ----------------------------------------------------------------------

def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _numel(shape) -> int | None:
    return math.prod(shape) if isinstance(shape, tuple) and all(isinstance(s, int) for s in shape) else None


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _kernel_sources(code: str) -> dict[str, tuple[str, str]]:
    """name -> (kind, source) of the kernels defined in a wrapper module ("cpp" or "triton")."""
    kernels = {}
    for stmt in ast.parse(code).body:
        if not (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.targets[0], ast.Name)):
            continue
        func = _dotted(stmt.value.func)
        sources = [a.value for a in stmt.value.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if func == "async_compile.cpp_pybinding" and sources:
            kernels[stmt.targets[0].id] = ("cpp", sources[-1])
        elif func == "async_compile.triton" and len(sources) >= 2:
            kernels[stmt.targets[0].id] = ("triton", sources[1])
    return kernels


def _cpp_params(source: str) -> dict[str, str | None]:
    """param -> element dtype, in order, from ``extern "C" void kernel(const float* in_ptr0, ...)``."""
    head = source[source.index("kernel(") + len("kernel("):source.index(")", source.index("kernel("))]
    params = {}
    for p in filter(str.strip, head.split(",")):
        ctype, name = p.replace("const ", "").replace("*", " ").split()
        params[name] = PARAM_DTYPES.get(ctype)
    return params


def _triton_params(source: str) -> dict[str, str | None]:
    """param -> element dtype, in order, from the kernel's signature and its ``triton_meta``."""
    fn = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef))
    types = dict(re.findall(r"'(\w+)': '\*(\w+)'", source))
    return {a.arg: PARAM_DTYPES.get(types.get(a.arg, "")) for a in fn.args.args}


def _cpp_passes(source: str, params: list[str]) -> list[dict[str, set[str]]]:
    """The top-level loop nests of a C++ kernel (plus its code outside loops), each as param -> {"r", "w"}."""
    body = source[source.index("{", source.index("kernel(")):]
    spans, depth, loop_depth, pending, i = [], 0, None, False, 0
    while i < len(body):
        if body.startswith("for(", i) and loop_depth is None:
            start, pending = i, True
        elif body[i] == "{":
            depth += 1
            if pending:
                loop_depth, pending = depth, False
        elif body[i] == "}":
            if depth == loop_depth:
                spans.append((start, i + 1))
                loop_depth = None
            depth -= 1
        i += 1
    rest, last = [], 0
    for a, b in spans:
        rest.append(body[last:a])
        last = b
    rest.append(body[last:])
    texts = [body[a:b] for a, b in spans] + ["".join(rest)]
    names = _pointer_names(source, params)
    return [p for p in (_accesses(t, names) for t in texts) if p]


def _triton_passes(source: str, params: list[str]) -> list[dict[str, set[str]]]:
    """A Triton kernel: one pass for its straight-line code and one per top-level loop of its body."""
    fn = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef))
    loops = [s for s in fn.body if isinstance(s, (ast.For, ast.While))]
    straight = [s for s in fn.body if s not in loops]
    texts = [ast.unparse(s) for s in loops] + ["\n".join(ast.unparse(s) for s in straight)]
    names = _pointer_names(source, params)
    return [p for p in (_accesses(t, names) for t in texts) if p]


def _pointer_names(source: str, params: list[str]) -> dict[str, str]:
    """Pointer name -> kernel param: the params, and C++ aliases such as ``auto out_ptr1 = in_out_ptr0;``."""
    names = {p: p for p in params if "ptr" in p}
    return names | {a: p for a, p in re.findall(r"auto (\w+) = (\w+);", source) if p in names}


def _accesses(text: str, names: dict[str, str]) -> dict[str, set[str]]:
    """param -> {"r", "w"}: the pointer params that ``text`` reads or writes."""
    out = {}
    for line in text.splitlines():
        if re.fullmatch(r"\s*auto \w+ = \w+;\s*", line):
            continue
        for name in names:
            for m in re.finditer(rf"(?<!\w){name}(?!\w)", line):
                out.setdefault(names[name], set()).add(_mode(line, name, m))
    return out


def _mode(line: str, name: str, m) -> str:
    """Write ("w") or read ("r"): a store is ``.store(p``, ``tl.store(p``, ``p[i] = v`` or the destination of a
    transpose; anything else reads."""
    if line[:m.start()].endswith(".store(") or re.match(r"\[[^\[\]]*\]\s*=(?!=)", line[m.end():]):
        return "w"
    if "transpose_mxn" in line and not re.search(rf">\(\s*{name}(?!\w)", line):
        return "w"
    return "r"


class _Buffers:
    """numel and dtype of the wrapper's tensors, from allocations, size asserts, views and get_args()."""

    def __init__(self):
        self.numel: dict[str, int] = {}
        self.dtype: dict[str, str] = {}

    def note(self, name, shape=None, dtype=None):
        n = _numel(shape) if shape is not None else None
        if n is not None:
            self.numel[name] = n
        if dtype:
            self.dtype[name] = dtype

    def copy(self, dst, src):
        if src in self.numel:
            self.numel[dst] = self.numel[src]
        if src in self.dtype:
            self.dtype[dst] = self.dtype[src]


def _torch_dtype(node) -> str | None:
    name = _dotted(node)
    return name.split(".", 1)[1] if name.startswith("torch.") else None


def parse_graph(code: str) -> dict:
    """Kernels and passes of one compiled graph's wrapper code.

    Returns {"kernels": [...], "passes": [...]}: each kernel {"name", "kind": cpp|triton|extern} in launch
    order, each pass {"launch": index into kernels, "buffers": [(name, numel, dtype, "r"|"w"|"rw"), ...]}.
    """
    tree = ast.parse(code)
    defs = _kernel_sources(code)
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    bufs = _Buffers()
    for stmt in funcs["get_args"].body if "get_args" in funcs else []:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call) and \
                _dotted(stmt.value.func) == "rand_strided":
            dtype = next((_torch_dtype(k.value) for k in stmt.value.keywords if k.arg == "dtype"), None)
            bufs.note(stmt.targets[0].id, _literal(stmt.value.args[0]), dtype)
    kernels, passes, items, extern_outputs = [], [], {}, []

    def arg_buffer(node):
        """(name, numel) of a tensor argument: a buffer name or a reinterpret_tensor view of one."""
        if isinstance(node, ast.Name) and (node.id in bufs.numel or node.id in items):
            return node.id, bufs.numel.get(node.id)
        if isinstance(node, ast.Call) and _dotted(node.func) == "reinterpret_tensor":
            return node.args[0].id, _numel(_literal(node.args[1]))
        return None

    def tensor_args(call):
        nodes = list(call.args) + [k.value for k in call.keywords if k.arg != "out"]
        flat = [e for n in nodes for e in (n.elts if isinstance(n, (ast.List, ast.Tuple)) else [n])]
        return [b for b in map(arg_buffer, flat) if b]

    def visit(stmts):
        for stmt in stmts:
            if isinstance(stmt, ast.With):
                visit(stmt.body)
                continue
            target = stmt.targets[0].id if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name) \
                else None
            value = stmt.value if isinstance(stmt, (ast.Assign, ast.Expr)) else None
            if target and isinstance(value, ast.Name):
                bufs.copy(target, value.id)
            elif target and isinstance(value, ast.Subscript):
                base = value
                while isinstance(base, ast.Subscript):
                    base = base.value
                items[target] = base.id
            if not isinstance(value, ast.Call):
                continue
            func = _dotted(value.func)
            if func.startswith("empty_strided"):
                bufs.note(target, _literal(value.args[0]), _torch_dtype(value.args[2]))
            elif func == "assert_size_stride":
                bufs.note(value.args[0].id, _literal(value.args[1]))
            elif func == "assert_size_stride_grouped":
                for name, shape in zip(value.args[0].elts, _literal(value.args[1]) or ()):
                    bufs.note(name.id, shape)
            elif func == "assert_tensor_metadata":
                bufs.note(value.args[0].id, _literal(value.args[1]), _torch_dtype(value.args[3]))
            elif func == "reinterpret_tensor":
                bufs.copy(target, value.args[0].id)
                bufs.note(target, _literal(value.args[1]))
            elif func in defs or (func.endswith(".run") and func[:-4] in defs):
                name = func if func in defs else func[:-4]
                kind, source = defs[name]
                params = _cpp_params(source) if kind == "cpp" else _triton_params(source)
                by_param = dict(zip(params, value.args))
                kernels.append({"name": name, "kind": kind})
                for access in (_cpp_passes if kind == "cpp" else _triton_passes)(source, list(params)):
                    entries = []
                    for param, modes in access.items():
                        buf = arg_buffer(by_param[param]) if param in by_param else None
                        if buf:
                            entries.append((*buf, params[param], "".join(sorted(modes, reverse=True))))
                    passes.append({"launch": len(kernels) - 1, "buffers": entries})
            elif func.split(".")[0] in ("extern_kernels", "aten") or func.startswith("torch.ops."):
                kernels.append({"name": func, "kind": "extern"})
                reads = tensor_args(value)
                outs = [k.value.id for k in value.keywords if k.arg == "out" and isinstance(k.value, ast.Name)]
                entry = {"launch": len(kernels) - 1, "buffers": [(n, k, None, "r") for n, k in reads]}
                if re.search(r"\.[a-z]\w*_\.", func):  # in-place (aten.scatter_reduce_.two): writes its 1st argument
                    outs.append(reads[0][0])
                passes.append(entry)
                extern_outputs.append((entry, [target] if target else [], outs))

    for name in ["call"] + sorted(n for n in funcs if re.fullmatch(r"partition_\d+", n)):  # graph partitions (CUDA)
        visit(funcs[name].body)
    for entry, targets, outs in extern_outputs:  # outputs: the target, or the items taken out of it
        written = outs + targets + [t for t, base in items.items() if base in targets]
        entry["buffers"] += [(n, bufs.numel[n], None, "w") for n in dict.fromkeys(written) if n in bufs.numel]
    for p in passes:
        p["buffers"] = [(n, k if k is not None else bufs.numel.get(n), bufs.dtype.get(n, dtype), m)
                        for n, k, dtype, m in p["buffers"]]
    return {"kernels": kernels, "passes": passes}


# ---- counting -----------------------------------------------------------------------------------------------

def count(graphs: list[dict], taps: list[tuple[int, int]]) -> dict:
    """Totals over the graphs of one phase: kernels (generated, extern), passes, and for each tap, given as
    (numel, bytes per element), the kernels and the passes that read or write a buffer of its size, and
    their traffic in units of the tap's own size (a read or write of a bool mask of fp32 Z^l is 0.25; an
    extern call's unknown output dtypes count 4 bytes)."""
    kernels = [k for g in graphs for k in g["kernels"]]
    n = len(taps)
    z_reads, z_writes, z_traffic, z_launches = [0] * n, [0] * n, [0.0] * n, [set() for _ in range(n)]
    for gi, g in enumerate(graphs):
        for p in g["passes"]:
            for _, numel, dtype, mode in p["buffers"]:
                for i, (tap_numel, itemsize) in enumerate(taps):
                    if numel == tap_numel:
                        z_reads[i] += "r" in mode
                        z_writes[i] += "w" in mode
                        z_traffic[i] += len(mode) * DTYPE_BYTES.get(dtype, 4) / itemsize
                        z_launches[i].add((gi, p["launch"]))
    return {"kernels": len(kernels), "generated": sum(k["kind"] != "extern" for k in kernels),
            "extern": sum(k["kind"] == "extern" for k in kernels), "passes": sum(len(g["passes"]) for g in graphs),
            "z_kernels": [len(s) for s in z_launches], "z_reads": z_reads, "z_writes": z_writes,
            "z_passes": [r + w for r, w in zip(z_reads, z_writes)], "z_traffic": z_traffic}


def difference(tap: dict, none: dict) -> dict:
    """TAP minus No XS, field by field (lists elementwise)."""
    return {k: [a - b for a, b in zip(v, none[k])] if isinstance(v, list) else v - none[k] for k, v in tap.items()}


# ---- capturing the compiled step ----------------------------------------------------------------------------

def capture_step(arch: str, method: str, backend: str, *, batch: int = 3, size: int | None = None,
                 norm: str = "l1", device: str = "cpu", seed: int = 0):
    """Build and run one compiled step; return (wrapper codes by phase, taps as (numel, bytes per element),
    step outputs, model).

    The model and batch are seeded, so two calls with the same arguments train the same model on the same
    data (for comparing with an eager step)."""
    import torch
    import torch._dynamo
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V

    from tap_fast.compiled_step import make_step

    model, batch_data = make_model_and_batch(arch, batch, size, device, seed)
    taps = _taps(model, batch_data[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = make_step(model, opt, method=method, lam=1e-2, mean=0.1307, std=0.3081, norm=norm, backend=backend,
                     compile=True)
    codes = {}

    def save(code):
        codes.setdefault(V.graph.get_training_phase(), []).append(code)

    torch._dynamo.reset()
    with mock.patch.object(GraphLowering, "save_output_code", save), inductor_config.patch(force_disable_caches=True):
        out = step(*batch_data)
    torch._dynamo.reset()
    return codes, taps, out, model


def _taps(model, images) -> list[tuple[int, int]]:
    """(elements, bytes per element) of each tapped activation; ValueError if a parameter, the input (and so
    the mask), or a module output of another shape has as many (its passes would count as passes over a tap)."""
    import torch

    shapes = {}

    def note(_, __, out):
        if isinstance(out, torch.Tensor):
            shapes[tuple(out.shape)] = out.numel()

    hooks = [m.register_forward_hook(note) for m in model.modules() if m is not model]
    with torch.no_grad():
        _, acts = model(images.float())
    for h in hooks:
        h.remove()
    taps = {tuple(a.shape): a.numel() for a in acts}
    others = [tuple(p.shape) for p in model.parameters()] + [tuple(images.shape)]
    others += [s for s in shapes if s not in taps]
    clash = [s for s in others if math.prod(s) in taps.values()]
    if clash:
        raise ValueError(f"tensors of shapes {clash} have as many elements as a tapped activation "
                         f"({list(taps)}): passes over the taps would count them; change the batch or input size")
    return [(a.numel(), a.element_size()) for a in acts]


def make_model_and_batch(arch: str, batch: int, size: int | None, device: str, seed: int):
    """A seeded TappedModel of ``arch`` (10 classes, 1 channel) and one uint8 batch with its binary mask."""
    import torch

    from tap_fast.models import build_model, tap_points
    from tap_fast.tapped_model import TappedModel

    size = size or MODELS[arch]
    torch.manual_seed(seed)
    model = TappedModel(build_model(arch, 10, input_size=size), tap_points(arch)).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, 256, (batch, 1, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (batch,), generator=g)
    m = (torch.rand(batch, 1, size, size, generator=g) > 0.7).to(torch.uint8)
    return model, tuple(t.to(device) for t in (x, y, m))


def measure(arch: str, backends=BACKENDS, **kw) -> dict:
    """Counts of the No XS step and of each TAP formulation, with TAP minus No XS, per phase."""
    codes, taps, _, _ = capture_step(arch, "none", "auto", **kw)
    none = {ph: count([parse_graph(c) for c in codes.get(ph, [])], taps) for ph in PHASES}
    record = {"arch": arch, "taps": taps, "none": none, "tap": {}}
    for backend in backends:
        codes, _, _, _ = capture_step(arch, "tap", backend, **kw)
        tap = {ph: count([parse_graph(c) for c in codes.get(ph, [])], taps) for ph in PHASES}
        record["tap"][backend] = {ph: {"counts": tap[ph], "extra": difference(tap[ph], none[ph])} for ph in PHASES}
    return record


def table(records: list[dict]) -> str:
    """Markdown: per model, formulation and graph, the No XS step's count -> the TAP step's (of the extra
    kernels, how many are extern), and per tap (l = 1 / 2 / ...) TAP minus No XS over Z^l."""
    lines = ["| model | TAP formulation | graph | kernels | passes | kernels over Z^l | passes over Z^l "
             "| traffic over Z^l (x its size) |", "| " + " | ".join(["---"] * 8) + " |"]
    for r in records:
        for backend, t in r["tap"].items():
            for ph in PHASES:
                n, c, e = r["none"][ph], t[ph]["counts"], t[ph]["extra"]
                per_tap = [" / ".join(f"{v:+d}" for v in e[k]) for k in ("z_kernels", "z_passes")]
                lines.append(f"| {r['arch']} | {backend} | {ph} | {n['kernels']} -> {c['kernels']} "
                             f"({e['extern']:+d} extern) "
                             f"| {n['passes']} -> {c['passes']} | {per_tap[0]} | {per_tap[1]} | "
                             + " / ".join(f"{v:+.2f}" for v in e["z_traffic"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="cnn2,resnet18", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"TAP formulations, of {BACKENDS}")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--norm", default="l1", choices=("l1", "l2sq"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    models, backends = args.models.split(","), args.backends.split(",")
    bad = [m for m in models if m not in MODELS] + [b for b in backends if b not in BACKENDS]
    if bad:
        parser.error(f"unknown models or backends: {bad}")
    if args.batch < 1:
        parser.error(f"--batch must be positive, got {args.batch}")
    if args.device == "cpu" and {"triton", "identity"} & set(backends):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined
    import torch

    records = [measure(m, backends, batch=args.batch, norm=args.norm, device=args.device) for m in models]
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "norm": args.norm, "device": args.device, "torch": torch.__version__,
                       "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
