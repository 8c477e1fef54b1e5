"""Tap points: collect the outputs Z^l of named modules with forward hooks, for any CNN; or compute TAP
(eq. 8) inside those hooks with the fused kernels, one autograd node per layer (``kernels.tap_op.MaskSource``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from tap_fast.masks import check_kernel_size, as_mask_batch
from tap_fast.tap import NORMS, triton_available


REPEATED_CALLS = ("error", "all")


class TappedModel(nn.Module):
    """Wraps ``model`` so that ``forward(x)`` returns ``(logits, [Z^l for each tap name])``.

    The activations are the named modules' outputs, in the order of ``tap_names``; they stay in the
    autograd graph, so a penalty on them trains the model. Works for any nn.Module.
    ``forward(x, masks, ...)`` is :meth:`forward_tap` (TAP computed in the hooks); call it that way through
    a DDP wrapper, whose forward must run for gradients to be synchronised.

    Every tap must run in every forward (ValueError naming those that did not). A tap whose module runs
    more than once per forward (a shared or reused module) is refused, ValueError naming it, unless
    ``repeated_calls="all"``: then each call is an activation of its own, a layer l of eq. 8 (each tap's
    calls in call order, the taps in ``tap_names`` order).

    The hooks record only while this wrapper's forward runs (calling ``model`` itself records nothing).
    :meth:`close`, or leaving ``with TappedModel(model, taps) as tapped:``, removes them and leaves ``model``
    as it was; calling a closed TappedModel is a RuntimeError.
    """

    def __init__(self, model: nn.Module, tap_names: Sequence[str], *, repeated_calls: str = "error"):
        super().__init__()
        if isinstance(tap_names, str) or len(tap_names) == 0:
            raise ValueError(f"tap_names must be a non-empty list of module names, got {tap_names!r}")
        if len(set(tap_names)) != len(tap_names):
            raise ValueError(f"tap_names must not repeat a name, got {list(tap_names)}")
        if repeated_calls not in REPEATED_CALLS:
            raise ValueError(f"repeated_calls must be one of {REPEATED_CALLS}, got {repeated_calls!r}")
        modules = dict(model.named_modules())
        missing = [n for n in tap_names if n not in modules or n == ""]
        if missing:
            known = [n for n in modules if n][:12]
            raise ValueError(f"tap_names {missing} are not modules of {type(model).__name__}; "
                             f"known names include {known}")
        self.model = model
        self.tap_names = tuple(tap_names)
        self.repeated_calls = repeated_calls
        self._taps = _TapState(repeated_calls == "all")
        self._hooks = [modules[name].register_forward_hook(_TapHook(name, self._taps)) for name in self.tap_names]
        self._closed = False

    def close(self) -> None:
        """Remove the hooks from the wrapped model (again: nothing to do); calling this wrapper then raises."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._closed = True

    def __enter__(self) -> TappedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None, *, kernel_size: int = 3,
                norm: str = "l1", compound: bool = False, identity: bool = True):
        """``(logits, [Z^l ...])``; given ``masks``, :meth:`forward_tap`'s ``(logits, penalty)``."""
        if masks is not None:
            return self.forward_tap(x, masks, kernel_size=kernel_size, norm=norm, compound=compound,
                                    identity=identity)
        self._check_open()
        return self._run(x)

    def forward_tap(self, x: torch.Tensor, masks: torch.Tensor, *, kernel_size: int = 3, norm: str = "l1",
                    compound: bool = False, identity: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward with TAP computed inside the tap hooks by the fused kernels: ``(logits, penalty)``.

        penalty = (1/L) sum_l mean_b sum_hw f(D(M, l) * A^l) (eq. 8, fp32), as
        ``tap_penalty(forward(x)[1], masks, input_size=x.shape[-2:], ...)`` computes it. Each hook computes
        its layer's term from one :class:`kernels.tap_op.MaskSource` of the batch (the mask is read once),
        so each layer's gradient is computed when the backward reaches that layer and no two layers' dZ are
        held at once. ``identity=True`` (the default) passes Z^l through the penalty's node, whose backward
        adds the penalty's gradient into the gradient arriving at Z^l in the same pass (3 Z-sized memory
        transfers per layer instead of 5); ``identity=False`` leaves Z^l alone and lets autograd add it.
        With ``compound`` the layers chain their masks in the order they run.

        Needs Triton and CUDA tensors, or the CPU with TRITON_INTERPRET=1. Does not check the masks'
        values (a host sync): check them once per data set (``tap_fast.masks.check_mask_values``).

        Args:
            x: the model's input batch (B, C, H, W).
            masks: (B, 1, H, W) or (B, H, W) at the input's resolution, 1 = spurious pixel.
            kernel_size, norm, compound: as :func:`~tap_fast.tap.tap_penalty`.
            identity: the identity form (True) or the separate one (False).
        """
        self._check_open()
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        check_kernel_size(kernel_size)
        masks = as_mask_batch(masks, "masks", batch=x.shape[0], size=x.shape[-2:])
        if masks.device != x.device:
            raise ValueError(f"masks is on {masks.device} but the input is on {x.device}")
        tap_op = fused_tap_ops(masks, "masks")
        state = self._taps
        state.source = tap_op.MaskSource(masks, kernel_size, compound)
        state.norm, state.identity = norm, identity
        try:
            try:
                logits, penalties = self._run(x)
            except RuntimeError as e:  # the identity form's output (a view of Z) modified in place
                if "modified inplace" not in str(e):
                    raise
                last = repr(state.versions[-1][0]) if state.versions else "(unknown)"
                raise ValueError(_INPLACE.format(last)) from e
            for name, z, version in state.versions:  # the separate form's saved Z
                if z._version != version:
                    raise ValueError(_INPLACE.format(repr(name)))
        finally:
            state.source = None
            state.versions.clear()
        return logits, sum(penalties) / len(penalties)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this TappedModel is closed (close() removed its hooks from the model): call the "
                               "model itself, or wrap it in a new TappedModel")

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``self.model(x)`` with the hooks recording: (logits, what they recorded: each tap's Z^l, or its
        penalty during forward_tap, in tap_names order and each tap's calls in call order)."""
        state = self._taps
        calls = state.outputs if state.source is None else state.penalties
        state.active = True
        try:
            logits = self.model(x)
            missing = [n for n in self.tap_names if n not in calls]
            if missing:
                ran = [n for n in self.tap_names if n in calls]
                raise ValueError(f"tap_names {missing} did not run in the forward of {type(self.model).__name__} "
                                 f"(the taps that ran: {ran}): tap modules that its forward calls for this input")
            return logits, [r for n in self.tap_names for r in calls[n]]
        finally:
            state.active = False
            calls.clear()


_INPLACE = ("the output of tap {} is modified in place later in the forward (e.g. by ReLU(inplace=True)), so TAP "
            "cannot be computed inside the forward (backend 'triton' / 'identity', or 'auto' on CUDA); tap the "
            "module that does the in-place operation instead, or use backend='torch'")


def fused_tap_ops(t: torch.Tensor, name: str):
    """``kernels.tap_op``, imported on first use (tap_fast imports without Triton), after checking that the
    fused kernels can run on ``t``'s device; ValueError naming ``name`` otherwise."""
    if not triton_available():
        raise ValueError("TAP inside the forward (forward_tap, backend='identity' or 'triton') needs the triton "
                         "package, which is not installed; use backend='torch'")
    from kernels import tap_launch, tap_op

    tap_launch.check_launchable(t, name)
    return tap_op


class _TapState:
    """What a TappedModel shares with its hooks: whether its forward runs and a tap may run more than once;
    the outputs each tap's calls give in a plain forward, or during forward_tap the batch's MaskSource, the
    norm, the form, each call's penalty and its Z with Z's version when tapped (all emptied when forward
    returns)."""

    def __init__(self, repeated: bool):
        self.active = False
        self.repeated = repeated
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.source = None  # kernels.tap_op.MaskSource during forward_tap
        self.norm = "l1"
        self.identity = True
        self.penalties: dict[str, list[torch.Tensor]] = {}
        self.versions: list[tuple[str, torch.Tensor, int]] = []


class _TapHook:
    """Forward hook appending a module's output to ``state.outputs[name]``, or, during forward_tap, its penalty
    to ``state.penalties[name]`` (and returning the output through the identity form's node). An object, not
    a closure, so that copy.deepcopy of a TappedModel gives hooks that use the copy's state, not the
    original's."""

    def __init__(self, name: str, state: _TapState):
        self.name, self.state = name, state

    def __call__(self, module: nn.Module, args, output) -> torch.Tensor | None:
        state = self.state
        if not state.active:  # the model called outside this TappedModel's forward
            return None
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ValueError(f"tap {self.name!r} must output a (B, C, H, W) tensor, got "
                             f"{getattr(output, 'shape', type(output).__name__)}")
        source = state.source
        calls = (state.outputs if source is None else state.penalties).setdefault(self.name, [])
        if calls and not state.repeated:
            raise ValueError(f"tap {self.name!r} runs more than once in one forward (a shared or reused module): "
                             "tap a module that runs once, or pass repeated_calls='all' to TappedModel to tap "
                             "every call")
        if source is None:
            calls.append(output)
            return None
        if output.shape[0] != source.map.shape[0] or output.shape[-2] > source.hw[0] or output.shape[-1] > source.hw[1]:
            raise ValueError(f"tap {self.name!r} outputs {tuple(output.shape)}: TAP needs the batch of the masks "
                             f"and a spatial size at most theirs, {source.hw}")
        if not torch.compiler.is_compiling():  # tracing functionalises in-place ops (and has no versions)
            state.versions.append((self.name, output, output._version))
        if not state.identity:
            calls.append(source.penalty(output, state.norm, identity=False))
            return None
        output, penalty = source.penalty(output, state.norm, identity=True)
        calls.append(penalty)
        return output
