"""Tap points: collect the outputs Z^l of named modules with forward hooks, for any CNN; or compute TAP
(eq. 8) inside those hooks with the fused kernels, one autograd node per layer (``kernels.tap_op.MaskSource``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from tap_fast.masks import check_kernel_size, as_mask_batch
from tap_fast.tap import NORMS, triton_available


class TappedModel(nn.Module):
    """Wraps ``model`` so that ``forward(x)`` returns ``(logits, [Z^l for each tap name])``.

    The activations are the named modules' outputs, in the order of ``tap_names``; they stay in the
    autograd graph, so a penalty on them trains the model. Works for any nn.Module.
    ``forward(x, masks, ...)`` is :meth:`forward_tap` (TAP computed in the hooks); call it that way through
    a DDP wrapper, whose forward must run for gradients to be synchronised.
    """

    def __init__(self, model: nn.Module, tap_names: Sequence[str]):
        super().__init__()
        if isinstance(tap_names, str) or len(tap_names) == 0:
            raise ValueError(f"tap_names must be a non-empty list of module names, got {tap_names!r}")
        modules = dict(model.named_modules())
        missing = [n for n in tap_names if n not in modules or n == ""]
        if missing:
            known = [n for n in modules if n][:12]
            raise ValueError(f"tap_names {missing} are not modules of {type(model).__name__}; "
                             f"known names include {known}")
        self.model = model
        self.tap_names = tuple(tap_names)
        self._taps = _TapState()
        for name in self.tap_names:
            modules[name].register_forward_hook(_TapHook(name, self._taps))

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None, *, kernel_size: int = 3,
                norm: str = "l1", compound: bool = False, identity: bool = True):
        """``(logits, [Z^l ...])``; given ``masks``, :meth:`forward_tap`'s ``(logits, penalty)``."""
        if masks is not None:
            return self.forward_tap(x, masks, kernel_size=kernel_size, norm=norm, compound=compound,
                                    identity=identity)
        state = self._taps
        state.outputs.clear()
        logits = self.model(x)
        acts = [state.outputs[n] for n in self.tap_names]
        state.outputs.clear()
        return logits, acts

    def forward_tap(self, x: torch.Tensor, masks: torch.Tensor, *, kernel_size: int = 3, norm: str = "l1",
                    compound: bool = False, identity: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward with TAP computed inside the tap hooks by the fused kernels: ``(logits, penalty)``.

        penalty = (1/L) sum_l mean_b sum_hw f(D(M, l) * A^l) (eq. 8, fp32), as
        ``tap_penalty_reference(forward(x)[1], masks, ...)`` computes it. Each hook computes its layer's
        term from one :class:`kernels.tap_op.MaskSource` of the batch (the mask is read once), so each
        layer's gradient is computed when the backward reaches that layer and no two layers' dZ are held
        at once. ``identity=True`` (the default) passes Z^l through the penalty's node, whose backward adds
        the penalty's gradient into the gradient arriving at Z^l in the same pass (3 Z-sized memory
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
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        check_kernel_size(kernel_size)
        masks = as_mask_batch(masks, "masks")
        if masks.shape[0] != x.shape[0] or masks.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"masks must be (B, 1, H, W) = {(x.shape[0], 1, *x.shape[-2:])} like the input, got "
                             f"{tuple(masks.shape)}")
        if masks.device != x.device:
            raise ValueError(f"masks is on {masks.device} but the input is on {x.device}")
        tap_op = fused_tap_ops(masks, "masks")
        state = self._taps
        state.source = tap_op.MaskSource(masks, kernel_size, compound)
        state.norm, state.identity = norm, identity
        state.penalties.clear()
        try:
            try:
                logits = self.model(x)
            except RuntimeError as e:  # the identity form's output (a view of Z) modified in place
                if "modified inplace" not in str(e):
                    raise
                last = repr(list(state.versions)[-1]) if state.versions else "(unknown)"
                raise ValueError(_INPLACE.format(last)) from e
            for name, (z, version) in state.versions.items():  # the separate form's saved Z
                if z._version != version:
                    raise ValueError(_INPLACE.format(repr(name)))
            penalty = sum(state.penalties[n] for n in self.tap_names) / len(self.tap_names)
        finally:
            state.source = None
            state.penalties.clear()
            state.versions.clear()
        return logits, penalty


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
    """What a TappedModel shares with its hooks: the outputs a plain forward collects, or, during
    forward_tap, the batch's MaskSource, the norm, the form and each tap's penalty (all cleared when
    forward returns)."""

    def __init__(self):
        self.outputs: dict[str, torch.Tensor] = {}
        self.source = None  # kernels.tap_op.MaskSource during forward_tap
        self.norm = "l1"
        self.identity = True
        self.penalties: dict[str, torch.Tensor] = {}
        self.versions: dict[str, tuple[torch.Tensor, int]] = {}  # each tap's Z and its version when tapped


class _TapHook:
    """Forward hook storing a module's output in ``state.outputs[name]``, or, during forward_tap, storing its
    penalty (and returning the output through the identity form's node). An object, not a closure, so that copy.deepcopy of
    a TappedModel gives hooks that use the copy's state, not the original's."""

    def __init__(self, name: str, state: _TapState):
        self.name, self.state = name, state

    def __call__(self, module: nn.Module, args, output) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ValueError(f"tap {self.name!r} must output a (B, C, H, W) tensor, got "
                             f"{getattr(output, 'shape', type(output).__name__)}")
        state = self.state
        source = state.source
        if source is None:
            state.outputs[self.name] = output
            return None
        if output.shape[0] != source.map.shape[0] or output.shape[-2] > source.hw[0] or output.shape[-1] > source.hw[1]:
            raise ValueError(f"tap {self.name!r} outputs {tuple(output.shape)}: TAP needs the batch of the masks "
                             f"and a spatial size at most theirs, {source.hw}")
        if not torch.compiler.is_compiling():  # tracing functionalises in-place ops (and has no versions)
            state.versions[self.name] = (output, output._version)
        if not state.identity:
            state.penalties[self.name] = source.penalty(output, state.norm, identity=False)
            return None
        output, state.penalties[self.name] = source.penalty(output, state.norm, identity=True)
        return output
