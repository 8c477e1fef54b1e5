"""The fused TAP as autograd Functions over the launch wrappers, and as ``torch.library`` custom ops.

Eager calls go from an autograd Function straight to ``tap_launch`` (no custom-op dispatch on the host).
Under ``torch.compile`` the same Functions call the custom ops (namespace ``tap_fast``), whose fake (meta)
implementations let dynamo trace them without graph breaks; none of them syncs with the host, so CUDA
graphs capture them:
- ``downscale_masks(mask, sizes, kernel_size, compound) -> Tensor[]``: D(M, l) of eq. 7;
- ``tap_forward(zs, mask, norm, kernel_size, compound) -> (penalty, Tensor[])``: eq. 8 over L layers;
- ``tap_layer_forward(z, src, div_h, div_w, kernel_size, norm, d_dtype) -> (penalty, w, sums)``: one layer;
- ``tap_grad(grad_penalty, z, w, n_layers, grad_out?, w_off) -> Tensor``: one layer's gradient, one pass.

Eager, the launch wrappers pack maps (``tap_launch``'s ``packed``): the list form's node saves all layers'
backward weights as one buffer and their offsets, and a per-layer node hands its bin sums on in its
workspace; the custom ops return maps of their own (outputs may not alias).

Two forms:
- ``fused_tap_penalty(activations, mask)``: all layers in one autograd node, after the forward (what
  ``tap_penalty(backend="triton")`` runs). Its backward runs before the network's and so holds every dZ
  at once, at the memory peak;
- per layer, inside the forward (``MaskSource.penalty``, used by ``TappedModel.forward_tap`` in training):
  each layer's node is created as its Z is, so autograd (which runs ready nodes latest-created first)
  computes a layer's dZ only when the network's backward reaches that layer. The identity variant also
  returns Z through the node and adds the penalty's gradient into the gradient arriving at Z in the same
  pass (3 Z-sized transfers instead of 5).

Memory: autograd saves each Z by reference plus one B x H_l x W_l map per layer (D for "l1", 2 D^2 A for
"l2sq"), never a copy of Z; the next layer of the network saves the same tensor for its own backward
anyway. If Z is later modified in place, autograd raises (``TappedModel.forward_tap`` turns that into a
ValueError naming the tap). The mask gets no gradient. Inputs are validated at the entry points of this module and of
``tap_fast`` (``tap_penalty``, ``TappedModel.forward_tap``), never in the launch wrappers.
"""
# No `from __future__ import annotations`: torch.library infers the op schemas from real annotations.
from collections.abc import Sequence
from typing import List, Optional, Tuple

import torch

from kernels import NORMS, check_kernel_size, tap_launch


def _pairs(flat: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


@torch.library.custom_op("tap_fast::downscale_masks", mutates_args=())
def _downscale_masks_op(mask: torch.Tensor, sizes: List[int], kernel_size: int, compound: bool
                        ) -> List[torch.Tensor]:
    return tap_launch.downscale_masks(mask, _pairs(sizes), kernel_size, compound)


@_downscale_masks_op.register_fake
def _(mask, sizes, kernel_size, compound):
    dtype = tap_launch.mask_map_dtype(mask.dtype)
    return [mask.new_empty((mask.shape[0], h, w), dtype=dtype) for h, w in _pairs(sizes)]


@torch.library.custom_op("tap_fast::tap_forward", mutates_args=())
def _tap_forward_op(zs: List[torch.Tensor], mask: torch.Tensor, norm: str, kernel_size: int, compound: bool
                    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    penalty, weights, _ = tap_launch.tap_forward(zs, mask, norm, kernel_size, compound)
    return penalty, weights


@_tap_forward_op.register_fake
def _(zs, mask, norm, kernel_size, compound):
    dtype = torch.float32 if norm == "l2sq" else tap_launch.mask_map_dtype(mask.dtype)
    weights = [z.new_empty((z.shape[0], z.shape[2], z.shape[3]), dtype=dtype) for z in zs]
    return zs[0].new_empty((), dtype=torch.float32), weights


@torch.library.custom_op("tap_fast::tap_layer_forward", mutates_args=())
def _tap_layer_op(z: torch.Tensor, src: torch.Tensor, div_h: int, div_w: int, kernel_size: int, norm: str,
                  d_dtype: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tap_launch.tap_layer_forward(z, src, tuple(src.shape[-2:]), (div_h, div_w), kernel_size, norm, d_dtype)


@_tap_layer_op.register_fake
def _(z, src, div_h, div_w, kernel_size, norm, d_dtype):
    b, _, h, w = z.shape
    dtype = torch.float32 if norm == "l2sq" else tap_launch.D_TORCH[d_dtype]
    return (z.new_empty((), dtype=torch.float32), z.new_empty((b, h, w), dtype=dtype),
            z.new_empty((b, h, w), dtype=torch.float32))


@torch.library.custom_op("tap_fast::tap_grad", mutates_args=())
def _tap_grad_op(grad_penalty: torch.Tensor, z: torch.Tensor, w: torch.Tensor, n_layers: int,
                 grad_out: Optional[torch.Tensor], w_off: int = 0) -> torch.Tensor:
    return tap_launch.tap_grad(grad_penalty, z, w, n_layers, grad_out, w_off)


@_tap_grad_op.register_fake
def _(grad_penalty, z, w, n_layers, grad_out, w_off=0):
    return torch.empty_like(z)


# True while dynamo traces (it folds this very function to a constant), False in eager: bound directly, not
# wrapped, as every eager forward and backward asks it (one Python call less each time)
_tracing = torch.compiler.is_compiling


class _TapPenalty(torch.autograd.Function):
    """penalty = eq. 8 over all layers (one node); backward: one ``tap_grad`` per layer. The options come as
    one tuple (norm, kernel_size, compound): each argument of ``apply`` costs the autograd node some host
    time, forward and backward."""

    @staticmethod
    def forward(ctx, mask, options, *zs):
        norm, kernel_size, compound = options
        if _tracing():
            penalty, weights = _tap_forward_op(list(zs), mask, norm, kernel_size, compound)
            ctx.grads = ((0, None),) * len(zs)
        else:  # one buffer holds every layer's weights; per layer its offset and gradient's launch plan
            penalty, weights, ctx.grads = tap_launch.tap_forward(zs, mask, norm, kernel_size, compound, packed=True)
        ctx.save_for_backward(*zs, *weights)
        return penalty

    @staticmethod
    def backward(ctx, grad_penalty):
        plans = ctx.grads
        saved = ctx.saved_tensors  # the L activations, then the weights (eager: one packed buffer)
        if _tracing():  # the custom op (also where only the backward is traced)
            n_layers = len(plans)
            weights = saved[n_layers:]
            if len(weights) < n_layers:  # packed
                weights *= n_layers
            return None, None, *[_tap_grad_op(grad_penalty, z, w, n_layers, None, off) if need else None
                                 for z, w, (off, _), need in zip(saved, weights, plans, ctx.needs_input_grad[2:])]
        w, planned_grad = saved[-1], tap_launch.planned_grad
        return None, None, *[planned_grad(plan, grad_penalty, z, w) if need else None
                             for z, (_, plan), need in zip(saved, plans, ctx.needs_input_grad[2:])]


class _TapLayer(torch.autograd.Function):
    """One layer: (Z, penalty, sums) in the identity form, (penalty, sums) in the separate one; backward
    g W 1[Z > 0] / B, plus the gradient arriving at the returned Z in the identity form."""

    @staticmethod
    def forward(ctx, z, src, options):
        src_hw, div_hw, kernel_size, norm, d_dtype, identity = options  # one argument: see _TapPenalty
        if _tracing():
            penalty, weight, sums = _tap_layer_op(z, src, div_hw[0], div_hw[1], kernel_size, norm, d_dtype)
        else:
            penalty, weight, sums = tap_launch.tap_layer_forward(z, src, src_hw, div_hw, kernel_size, norm, d_dtype,
                                                                 packed=True)
        ctx.identity = identity
        ctx.save_for_backward(z, weight)
        ctx.mark_non_differentiable(sums)
        # eager autograd then passes None for unused outputs (the sums, always) instead of zero-filled tensors;
        # dynamo ignores this and traces materialised gradients, which the backward handles alike
        ctx.set_materialize_grads(False)
        return (z.view_as(z), penalty, sums) if identity else (penalty, sums)

    @staticmethod
    def backward(ctx, *grads):
        z, w = ctx.saved_tensors
        grad_z, grad_penalty = grads[:2] if ctx.identity else (None, grads[0])
        if grad_penalty is not None:
            grad_z = (_tap_grad_op if _tracing() else tap_launch.tap_grad)(grad_penalty, z, w, 1, grad_z)
        return grad_z, None, None


class MaskSource:
    """One batch's mask as the per-layer fused TAP reads it, in the order the layers run (eq. 7).

    ``penalty(z)`` of each targeted layer builds D(M, l) on the fly (``tap_launch.source_kind``): from the
    bin sums the previous layer wrote when its bins nest, else from the mask (max-pooled on the fly for
    small bins, or once at input resolution for large ones), so the mask is read once for a ResNet at
    224 x 224. With ``compound`` (released code) each layer's D is the max-pool and average pool of the
    previous layer's D, in the order the layers run: ``tap_names``' order for the presets (a tap that runs
    twice, or out of that order, chains differently from the reference).
    Does not check the mask's values (a host sync): check them once per data set.
    """

    def __init__(self, mask: torch.Tensor, kernel_size: int = 3, compound: bool = False):
        self.map = tap_launch.mask_map(mask)
        self.hw = tuple(self.map.shape[-2:])
        self.kernel_size, self.compound = kernel_size, compound
        self.d_dtype = tap_launch.MASK_DTYPES[self.map.dtype]
        self._prev: tuple[torch.Tensor, tuple[int, int]] | None = None  # last layer's sums (or D), its (H, W)
        self._pooled: torch.Tensor | None = None  # the max-pooled mask, made when a layer first needs it

    def _downscale(self, src: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if _tracing():
            return _downscale_masks_op(src, list(hw), self.kernel_size, True)[0]
        return tap_launch.downscale(src, hw, self.kernel_size)

    def penalty(self, z: torch.Tensor, norm: str = "l1", identity: bool = True):
        """This layer's TAP, mean_b sum_hw f(D * A) (eq. 8 before the 1/L): ``(Z, penalty)`` in the identity
        form (use the returned Z downstream), ``penalty`` in the separate one. Z (B, C, H_l, W_l), H_l and
        W_l at most the mask's; any float dtype, contiguous or channels_last."""
        hw = tuple(z.shape[-2:])
        prev = self._prev
        if self.compound:
            src = self._downscale(self.map if prev is None else prev[0], hw)
            src_hw, div, k = hw, hw, 1
        else:
            kind = tap_launch.source_kind(None if prev is None else prev[1], hw, self.hw, self.kernel_size)
            div, k = self.hw, self.kernel_size if kind == "mask" else 1
            if kind == "sums":
                src, src_hw = prev
            elif kind == "mask":
                src, src_hw = self.map, self.hw
            else:
                if self._pooled is None:
                    self._pooled = self._downscale(self.map, self.hw)
                src, src_hw = self._pooled, self.hw
        out = _TapLayer.apply(z, src, (src_hw, div, k, norm, self.d_dtype, identity))
        self._prev = (src if self.compound else out[-1], hw)
        return (out[0], out[1]) if identity else out[0]


def fused_downscale_masks(mask: torch.Tensor, sizes: Sequence[Sequence[int]], kernel_size: int = 3,
                          compound: bool = False) -> List[torch.Tensor]:
    """Triton twin of ``tap_fast.masks.downscale_masks`` (eq. 7), bit-identical for fp32 masks.

    mask: (B, 1, H, W) or (B, H, W); returns one (B, H_l, W_l) map per size, in the mask's dtype for
    fp32/fp16/bf16 masks and fp32 otherwise. One max-pool launch at input resolution, then one per size.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (3, 4) or (mask.dim() == 4 and mask.shape[1] != 1):
        raise ValueError(f"mask must have shape (B, 1, H, W) or (B, H, W), got {getattr(mask, 'shape', mask)}")
    check_kernel_size(kernel_size)
    h, w = mask.shape[-2:]
    pairs = [(int(a), int(b)) for a, b in sizes]
    bad = [p for p in pairs if not (0 < p[0] <= h and 0 < p[1] <= w)]
    if bad:
        raise ValueError(f"sizes must lie in [1, mask size]: got {bad} for mask size {(h, w)}")
    tap_launch.check_launchable(mask, "mask")
    flat = [v for p in pairs for v in p]
    if _tracing():
        return _downscale_masks_op(mask.detach(), flat, kernel_size, compound)
    return tap_launch.downscale_masks(mask, pairs, kernel_size, compound)


def fused_tap_penalty(activations: Sequence[torch.Tensor], mask: torch.Tensor, *, kernel_size: int = 3,
                      norm: str = "l1", compound: bool = False) -> torch.Tensor:
    """TAP, eq. 8 (batch mean, averaged over layers), with fused Triton kernels in one autograd node; equals
    ``tap_fast.tap.tap_penalty_reference``. Trusts its inputs: ``tap_penalty(..., backend="triton")``
    validates them (shapes always, mask values unless validate=False) and calls this.

    Launches: one kernel per layer (channel sum, D on the fly, masked reduction) and one sum; compound
    downscaling chains the D maps first (one launch per layer). Returns an fp32 scalar.
    """
    return _TapPenalty.apply(mask.detach() if mask.requires_grad else mask, (norm, kernel_size, compound), *activations)


def tap_identity(z: torch.Tensor, mask: torch.Tensor, *, kernel_size: int = 3, norm: str = "l1"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity form of one layer's TAP: returns (Z unchanged, fp32 penalty mean_b sum_hw f(D * A)).

    Use the returned Z downstream (e.g. from a forward hook) and add penalty / L to the loss. In backward,
    grad_Z = grad(Z out) + g * W * 1[Z > 0] / B is written in one pass that reads grad(Z out) and Z, into
    a new buffer, not into grad(Z out) in place: autograd may hand the same gradient tensor to other nodes
    (both inputs of an add, as in a ResNet's residual connections) or an expanded (stride-0) one. For
    several layers of one batch, use one :class:`MaskSource` (it reads the mask once).

    Args:
        z: (B, C, H_l, W_l) activation, any float dtype, on CUDA (or CPU with TRITON_INTERPRET=1).
        mask: (B, 1, H, W) or (B, H, W) at input resolution (H >= H_l, W >= W_l), 1 = spurious pixel.
        kernel_size: the max-pool window of eq. 7 (positive, odd).
        norm: "l1" (eq. 8) or "l2sq".
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or not z.is_floating_point():
        raise ValueError(f"z must be a floating-point (B, C, H_l, W_l) tensor, got {getattr(z, 'shape', z)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    check_kernel_size(kernel_size)
    b, _, h, w = z.shape
    shape = tuple(getattr(mask, "shape", ()))
    if not isinstance(mask, torch.Tensor) or len(shape) not in (3, 4) or shape[0] != b or shape[-2] < h \
            or shape[-1] < w or (len(shape) == 4 and shape[1] != 1):
        raise ValueError(f"mask must be a (B, 1, H, W) or (B, H, W) tensor with B = {b}, H >= {h}, W >= {w}, "
                         f"got {shape or type(mask).__name__}")
    if mask.device != z.device:
        raise ValueError(f"mask is on {mask.device} but z is on {z.device}")
    tap_launch.check_launchable(z, "z")
    return MaskSource(mask, kernel_size).penalty(z, norm, identity=True)
