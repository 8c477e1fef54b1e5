"""The fused TAP as ``torch.library`` custom ops, and its public entry points.

Ops (namespace ``tap_fast``), each with a fake (meta) implementation so torch.compile(fullgraph=True)
traces them without graph breaks, and none of them syncs with the host, so CUDA graphs can capture them:
- ``downscale_masks(mask, sizes, kernel_size, compound) -> Tensor[]``: D(M, l) of eq. 7 (no gradient:
  the mask is data);
- ``tap_forward(zs, sources, norm) -> (penalty, Tensor[])``: eq. 8 with D(M, l) built on the fly from each
  layer's source map, with autograd registered; the second output holds the per-layer backward weights
  (D for "l1", 2 D^2 A for "l2sq");
- ``tap_grad(grad_penalty, z, w, n_layers, grad_out?) -> Tensor``: one layer's gradient, one pass.

Memory: the autograd context saves each Z by reference plus one B x H_l x W_l map per layer (D for "l1",
2 D^2 A for "l2sq"), never a copy of Z. Saving the reference costs nothing: the next layer of the
network saves the same tensor for its own backward, so autograd keeps it alive anyway. If Z is later
modified in place (an inplace ReLU on a tapped output), autograd's version check raises in backward,
exactly as for the reference. The mask gets no gradient.
"""
# No `from __future__ import annotations`: torch.library infers the op schemas from real annotations.
from collections.abc import Sequence
from typing import List, Optional, Tuple

import torch

from kernels import tap_launch
from tap_fast.masks import check_kernel_size, as_mask_batch
from tap_fast.tap import check_tap_inputs


def _pairs(flat: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


@torch.library.custom_op("tap_fast::downscale_masks", mutates_args=())
def _downscale_masks(mask: torch.Tensor, sizes: List[int], kernel_size: int, compound: bool
                     ) -> List[torch.Tensor]:
    return tap_launch.downscale_masks(mask, _pairs(sizes), kernel_size, compound)


@_downscale_masks.register_fake
def _(mask, sizes, kernel_size, compound):
    dtype = tap_launch.mask_map_dtype(mask.dtype)
    return [mask.new_empty((mask.shape[0], h, w), dtype=dtype) for h, w in _pairs(sizes)]


@torch.library.custom_op("tap_fast::tap_forward", mutates_args=())
def _tap_forward(zs: List[torch.Tensor], sources: List[torch.Tensor], norm: str
                 ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    return tap_launch.tap_forward(zs, sources, norm)


@_tap_forward.register_fake
def _(zs, sources, norm):
    weights = [z.new_empty((z.shape[0], z.shape[2], z.shape[3]), dtype=torch.float32 if norm == "l2sq" else s.dtype)
               for z, s in zip(zs, sources)]
    return zs[0].new_empty((), dtype=torch.float32), weights


@torch.library.custom_op("tap_fast::tap_grad", mutates_args=())
def _tap_grad(grad_penalty: torch.Tensor, z: torch.Tensor, w: torch.Tensor, n_layers: int,
              grad_out: Optional[torch.Tensor]) -> torch.Tensor:
    return tap_launch.tap_grad(grad_penalty, z, w, n_layers, grad_out)


@_tap_grad.register_fake
def _(grad_penalty, z, w, n_layers, grad_out):
    return torch.empty_like(z)


def _tap_forward_setup_context(ctx, inputs, output):
    zs, _, _ = inputs
    _, weights = output
    ctx.n_layers = len(zs)
    ctx.save_for_backward(*zs, *weights)


def _tap_forward_backward(ctx, grad_penalty, grad_weights):
    saved = ctx.saved_tensors
    zs, weights = saved[:ctx.n_layers], saved[ctx.n_layers:]
    needs = ctx.needs_input_grad[0]
    grads = [_tap_grad(grad_penalty, z, w, ctx.n_layers, None) if need else None
             for z, w, need in zip(zs, weights, needs)]
    return grads, [None] * len(weights), None


_tap_forward.register_autograd(_tap_forward_backward, setup_context=_tap_forward_setup_context)


def fused_downscale_masks(mask: torch.Tensor, sizes: Sequence[Sequence[int]], kernel_size: int = 3,
                          compound: bool = False) -> List[torch.Tensor]:
    """Triton twin of ``tap_fast.masks.downscale_masks`` (eq. 7), bit-identical for fp32 masks.

    mask: (B, 1, H, W) or (B, H, W); returns one (B, H_l, W_l) map per size, in the mask's dtype for
    fp32/fp16/bf16 masks and fp32 otherwise.
    """
    mask = as_mask_batch(mask)
    check_kernel_size(kernel_size)
    flat = [int(v) for size in sizes for v in size]
    return _downscale_masks(mask.detach(), flat, kernel_size, compound)


def fused_pooled_mask(mask: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """MaxPool_k_s1(M) of eq. 7 at input resolution, (B, H, W), in ``fused_downscale_masks``' dtype: the map
    that the forward kernels of ``fused_tap_penalty`` and ``tap_identity`` average-pool into each layer's
    D(M, l) on the fly. One launch, shared by all layers (a compound step to the mask's own size); for
    kernel_size 1, the mask itself in that dtype."""
    mask = as_mask_batch(mask)
    check_kernel_size(kernel_size)
    if kernel_size == 1:
        return mask[:, 0].detach().to(tap_launch.mask_map_dtype(mask.dtype))
    (pooled,) = fused_downscale_masks(mask, [mask.shape[-2:]], kernel_size, compound=True)
    return pooled


def fused_tap_penalty(activations: Sequence[torch.Tensor], mask: torch.Tensor, *, kernel_size: int = 3,
                      norm: str = "l1", compound: bool = False) -> torch.Tensor:
    """TAP, eq. 8 (batch mean, averaged over layers), with fused Triton kernels; equals
    ``tap_fast.tap.tap_penalty_reference``. Does not check the mask's values (that syncs with the host):
    ``tap_penalty(..., backend="triton")`` does, unless validate=False.

    Launches: the mask's max-pool, one kernel per layer (channel sum, D on the fly, masked reduction), one
    sum; compound downscaling chains the D maps first (one launch per layer) and the layers read them.

    Args: as ``tap_penalty``: activations (B, C_l, H_l, W_l) on CUDA (or the CPU with TRITON_INTERPRET=1),
    any float dtype; mask (B, 1, H, W) or (B, H, W) at input resolution. Returns an fp32 scalar.
    """
    mask = check_tap_inputs(activations, mask, norm)
    if compound:
        sources = fused_downscale_masks(mask, [a.shape[-2:] for a in activations], kernel_size, compound=True)
    else:
        sources = [fused_pooled_mask(mask, kernel_size)] * len(activations)
    penalty, _ = _tap_forward(list(activations), sources, norm)
    return penalty


class _TapIdentity(torch.autograd.Function):
    """(z, penalty) = (Z, mean_b sum_hw f(D * A)); backward adds the penalty's gradient into the gradient
    arriving at Z in the same pass that computes it (``tap_grad`` with grad_out)."""

    @staticmethod
    def forward(ctx, z, source, norm):
        penalty, (weight,) = _tap_forward([z], [source], norm)
        ctx.save_for_backward(z, weight)
        return z.view_as(z), penalty

    @staticmethod
    def backward(ctx, grad_z, grad_penalty):
        z, w = ctx.saved_tensors
        return _tap_grad(grad_penalty, z, w, 1, grad_z), None, None


def tap_identity(z: torch.Tensor, source: torch.Tensor, *, norm: str = "l1") -> tuple[torch.Tensor, torch.Tensor]:
    """Identity form of one layer's TAP: returns (Z unchanged, fp32 penalty mean_b sum_hw f(D * A)).

    Use the returned Z downstream (e.g. from a forward hook) and add penalty / L to the loss. In backward,
    grad_Z = grad(Z out) + g * W * 1[Z > 0] / B is written in one pass that reads grad(Z out) and Z
    (3 Z-sized transfers instead of 5 for a separate gradient that autograd then adds). It is written to a
    new buffer, not into grad(Z out) in place: autograd may hand the same gradient tensor to other nodes
    (both inputs of an add, as in a ResNet's residual connections) or an expanded (stride-0) one, and
    writing into it would corrupt their gradients.

    Args:
        z: (B, C, H_l, W_l) activation, any float dtype, on CUDA (or CPU with TRITON_INTERPRET=1).
        source: (B, H_s, W_s) map, H_s >= H_l and W_s >= W_l, whose adaptive average pool to (H_l, W_l) is
            this layer's D(M, l) (eq. 7): ``fused_pooled_mask`` of the input mask (D built on the fly), or
            the layer's D map itself, e.g. from ``fused_downscale_masks``.
        norm: "l1" (eq. 8) or "l2sq".
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        raise ValueError(f"z must be a (B, C, H_l, W_l) tensor, got {getattr(z, 'shape', type(z).__name__)}")
    if norm not in tap_launch.NORMS:
        raise ValueError(f"norm must be one of {tap_launch.NORMS}, got {norm!r}")
    b, _, h, w = z.shape
    if not isinstance(source, torch.Tensor) or source.dim() != 3 or source.shape[0] != b \
            or source.shape[1] < h or source.shape[2] < w:
        raise ValueError(f"source must be a (B, H_s, W_s) tensor with B = {b}, H_s >= {h}, W_s >= {w}, got "
                         f"{getattr(source, 'shape', type(source).__name__)}")
    return _TapIdentity.apply(z, source.detach(), norm)
