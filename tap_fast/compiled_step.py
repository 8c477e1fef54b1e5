"""The hot-loop training step: :func:`tap_fast.train_step.train_step` made fast.

:func:`make_step` wraps the eager step (forward, CE + lambda * penalty, backward, optimizer step) with,
as options: ``torch.compile`` (forward, TAP, backward and the optimizer step all compiled; RRR, RBR and JT,
whose double backward does not compile, stay eager), a CUDA graph holding the whole step (captured once
on static input buffers, then replayed: one launch per step), bf16 autocast, and channels_last. The step
returns device tensors and never syncs with the host, so metrics can be summed on the device and read
once per epoch.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from kernels import NORMS
from tap_fast.choices import DISTILLATION_METHODS, METHODS, STEP_BACKENDS
from tap_fast.distillation import check_temperature
from tap_fast.distributed import unwrap
from tap_fast.tapped_model import TappedModel, fused_tap_ops
from tap_fast.train_step import train_step

# RRR / RBR / JT need double backward, which torch.compile cannot trace; AT and KD compile
COMPILED_METHODS = ("none", "tap", "at", "kd")
AMP_DTYPES = (None, torch.bfloat16)
GRAPH_WARMUP_STEPS = 3  # lazy optimizer state, recompiles and cuDNN autotuning happen before capture
DDP_GRAPH_WARMUP_STEPS = 11  # DDP's reducer needs 11 eager iterations before capture (torch.cuda.graphs docs)
COMPILED_AUTO_BACKEND = "torch"  # what TAP's backend "auto" means under torch.compile: see make_step


def rbr_scale(world_size: int) -> float:
    """Factor on the RBR term of each DDP rank so that averaged gradients equal one process's.

    RBR's influence differentiates the batch-mean task loss, so on a rank's share of b = B / W samples it
    is W times that of the global batch, and its squared terms W^2 times; DDP averages over W ranks, so the
    summed penalty would weigh W times too much. Batch-mean penalties (TAP, RRR) need no factor.
    """
    return 1.0 / world_size


class TrainStep:
    """``step(images_uint8, labels, masks) -> (loss, task_loss, penalty)``, fp32 device scalars.

    Built by :func:`make_step`. With CUDA graphs the first ``warmup_steps`` calls run uncaptured on a side
    stream, the next captures the step on static copies of its inputs and replays it, and later calls copy
    their batch into those buffers and replay. A batch of another shape (a partial last batch) runs
    uncaptured, which is correct but slow: drop or pad it for speed.
    """

    def __init__(self, body, *, cuda_graphs: bool, warmup_steps: int, channels_last: bool):
        self._body = body
        self.cuda_graphs, self.warmup_steps, self.channels_last = cuda_graphs, warmup_steps, channels_last
        self._calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: tuple | None = None
        self._static_out: torch.Tensor | None = None

    @property
    def captured(self) -> bool:
        """True once the step has been captured in a CUDA graph."""
        return self._graph is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if not self.cuda_graphs:
            return self._body(images, labels, masks)
        inputs = (images, labels, masks)
        if self._graph is None:
            if self._calls < self.warmup_steps:
                self._calls += 1
                return self._on_side_stream(inputs)
            self._capture(inputs)
        elif not all(_same_layout(s, x) for s, x in zip(self._static_in, inputs)):
            return self._body(images, labels, masks)
        for static, x in zip(self._static_in, inputs):
            if static is not None:
                static.copy_(x)
        self._graph.replay()
        return self._static_out.clone().unbind()

    def _on_side_stream(self, inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = torch.stack(self._body(*inputs))
        torch.cuda.current_stream().wait_stream(side)
        return out.clone().unbind()

    def _capture(self, inputs):
        torch.cuda.synchronize()
        self._static_in = tuple(None if x is None else x.clone(memory_format=torch.preserve_format)
                                for x in inputs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = torch.stack(self._body(*self._static_in))
        self._graph = graph


def _same_layout(static: torch.Tensor | None, x: torch.Tensor | None) -> bool:
    if static is None or x is None:
        return static is None and x is None
    return static.shape == x.shape and static.dtype == x.dtype and static.device == x.device


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, method: str, lam: float, mean: float,
              std: float, norm: str = "l1", kernel_size: int = 3, compound: bool = False,
              explain_in_eval: bool | None = None, backend: str = "auto", compile: bool = False,
              compile_backend: str = "inductor", cuda_graphs: bool = False, amp_dtype: torch.dtype | None = None,
              channels_last: bool = False, warmup_steps: int | None = None,
              class_weights: torch.Tensor | None = None, teacher: nn.Module | None = None,
              temperature: float | None = None) -> TrainStep:
    """Build the training step for ``model`` (a :class:`~tap_fast.tapped_model.TappedModel`, optionally in DDP).

    Args:
        method, lam, norm, kernel_size, compound, backend: as :func:`~tap_fast.train_step.train_step`
            (``backend`` is TAP's), except that with ``compile`` "auto" is "torch" (below).
        mean, std: normalisation of the uint8 images, as (x / 255 - mean) / std.
        explain_in_eval: RRR / RBR explanations from an eval-mode pass; None (the default): for every model, as
            the released code (BatchNorm models need it: their training-mode backward lacks 3rd-order
            derivatives; VGG-16 is explained without dropout).
        compile: ``torch.compile`` the step (methods ``COMPILED_METHODS``; RRR / RBR / JT run eager). Static
            shapes (``dynamic=False``); the optimizer step is compiled too.
        compile_backend: the torch.compile backend ("inductor"; "aot_eager" traces without code generation).
        cuda_graphs: capture the whole step in one CUDA graph (CUDA models only). The graph holds the
            parameters, gradients and optimizer state it was captured with: load checkpoints before building
            the step; the learning rate is fixed at capture; Adam-style optimizers need capturable=True.
        amp_dtype: None (fp32) or torch.bfloat16 (autocast of the step; master weights stay fp32).
        channels_last: convert the model and each batch to channels_last memory format.
        warmup_steps: uncaptured steps before the graph is captured (default 3; 11 under DDP).
        class_weights: (num_classes,) cross-entropy weights on the model's device, as ``train_step``'s.
        teacher: methods "at", "jt", "kd" only (required there): the frozen teacher, a TappedModel on the
            model's device, put in eval mode (and channels_last with ``channels_last``) here.
        temperature: method "kd" only (required there): T of :func:`~tap_fast.distillation.kd_penalty`.

    Under DDP the RBR term is scaled by :func:`rbr_scale` so that training equals one process's at the
    same global batch; the returned penalty is scaled alike (its mean over ranks is the global value).

    Compiled, the step is three graphs: forward + CE + penalty (one graph, no break inside), its
    AOTAutograd backward, and the optimizer step; dynamo breaks only where PyTorch makes it (the skipped
    Optimizer.zero_grad, Tensor.backward, torch.optim's own graph_break calls). Every compiled step adds
    cache entries to the same code: a process that builds more than 8 (a lambda sweep) should call
    ``torch._dynamo.reset()`` between runs, or dynamo's recompile limit makes later steps run eagerly.

    Compiled, TAP's backend "auto" is "torch", the plain-torch eq. 6-8, on every device: Inductor fuses it
    into the network's own kernels, the channel sum (eq. 6) into the loop that writes Z^l and, where Z^l is
    a ReLU's output, the relu mask and TAP's gradient into that ReLU's backward. The fused Triton op
    (backends "triton" and "identity", still honoured) is opaque to Inductor: its launches read every Z^l
    again, Inductor copies Z^l into the op's layout where they differ, and the gradient takes passes of
    its own.
    Measured from Inductor's generated code by ``benchmarks/inductor_fusion.py`` (``benchmarks/RESULTS.md``;
    ResNet-18, CPU): the compiled TAP step adds to the compiled No XS step 5 forward kernels (mask path and
    masked reductions) and no backward kernel, none of them touching a tapped activation; the fused op, in
    either form, adds 10 forward and 8 backward kernels, 16 or 17 of them over a tapped activation, and
    about 3 forward and 7 backward Z^l-sized transfers per layer.
    """
    _check_step_args(model, optimizer, method, lam, norm, backend, amp_dtype, cuda_graphs, compile)
    _check_teacher(method, teacher, temperature)
    if teacher is not None:
        teacher.eval()
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
    if compile and method in COMPILED_METHODS and backend == "auto":
        backend = COMPILED_AUTO_BACKEND
    tapped = unwrap(model)
    if explain_in_eval is None:
        explain_in_eval = True
    if channels_last:
        tapped.to(memory_format=torch.channels_last)
    ddp = isinstance(model, DistributedDataParallel)
    scale = rbr_scale(torch.distributed.get_world_size(model.process_group)) if ddp and method == "rbr" else 1.0
    device_type = next(tapped.parameters()).device.type

    def body(images, labels, masks):
        # Autocast's weight-cast cache must stay off under capture: its casts would be skipped on replay.
        with (torch.autocast(device_type, dtype=amp_dtype, cache_enabled=not cuda_graphs) if amp_dtype
              else contextlib.nullcontext()):
            loss, task_loss, penalty = train_step(
                model, optimizer, images, labels, masks, method=method, lam=lam * scale, mean=mean, std=std,
                norm=norm, kernel_size=kernel_size, compound=compound, explain_in_eval=explain_in_eval,
                backend=backend, class_weights=class_weights, teacher=teacher, temperature=temperature)
        return loss, task_loss, penalty * scale

    if compile and method in COMPILED_METHODS:
        body = torch.compile(body, backend=compile_backend, dynamic=False)
    if warmup_steps is None:
        warmup_steps = DDP_GRAPH_WARMUP_STEPS if ddp else GRAPH_WARMUP_STEPS
    if not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"warmup_steps must be a positive int, got {warmup_steps!r}")
    return TrainStep(body, cuda_graphs=cuda_graphs, warmup_steps=warmup_steps, channels_last=channels_last)


def _check_teacher(method: str, teacher: nn.Module | None, temperature: float | None) -> None:
    """A TappedModel teacher exactly for the distillation methods; a positive temperature exactly for "kd"."""
    if method in DISTILLATION_METHODS and not isinstance(teacher, TappedModel):
        raise TypeError(f"teacher must be a TappedModel (the frozen teacher) for method {method!r}, got "
                        f"{type(teacher).__name__}")
    if method not in DISTILLATION_METHODS and teacher is not None:
        raise ValueError(f"teacher applies to methods {DISTILLATION_METHODS} only, got method {method!r}")
    if method == "kd":
        check_temperature(temperature)
    elif temperature is not None:
        raise ValueError(f"temperature applies to method 'kd' only, got method {method!r}")


def _check_step_args(model, optimizer, method, lam, norm, backend, amp_dtype, cuda_graphs, compile) -> None:
    if not isinstance(unwrap(model), TappedModel):
        raise TypeError(f"model must be a TappedModel (optionally wrapped in DDP), got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if backend not in STEP_BACKENDS:
        raise ValueError(f"backend must be one of {STEP_BACKENDS}, got {backend!r}")
    if method == "tap" and backend in ("identity", "triton"):
        fused_tap_ops(next(unwrap(model).parameters()), "model")
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be None or torch.bfloat16, got {amp_dtype!r} (float16 would need "
                         "loss scaling)")
    if not isinstance(compile, bool) or not isinstance(cuda_graphs, bool):
        raise TypeError(f"compile and cuda_graphs must be bools, got {compile!r} and {cuda_graphs!r}")
    if cuda_graphs:
        if next(unwrap(model).parameters()).device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device; use cuda_graphs=False on the CPU")
        not_capturable = [i for i, g in enumerate(optimizer.param_groups) if g.get("capturable") is False]
        if not_capturable:
            raise ValueError(f"cuda_graphs=True needs a capturable optimizer: construct "
                             f"{type(optimizer).__name__} with capturable=True (param groups {not_capturable})")
