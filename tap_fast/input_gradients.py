"""Input-gradient explanations and the RRR / RBR baselines (eq. 4), which need double backward."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from tap_fast.masks import as_mask_batch, check_mask_values

REDUCTIONS = ("mean", "sum")
CHANNEL_REDUCTIONS = ("sum", "none")  # RRR: sum the input gradient over channels before squaring, or not


def input_gradient(logits: torch.Tensor, inputs: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
    """d/dX of sum_k log_softmax(f(X))_k, the explanation RRR penalises (eq. 4, Ross et al. 2017)."""
    _check_explained(logits, inputs)
    return _input_gradient(logits, inputs, create_graph)


def _check_explained(logits: torch.Tensor, inputs: torch.Tensor) -> None:
    """Raise, naming the argument, unless ``inputs`` is a tensor that requires grad and ``logits`` is (B, K)."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if not inputs.requires_grad:
        raise ValueError("inputs must require grad and be part of logits' graph: call "
                         "inputs.requires_grad_(True) before the forward pass")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
        raise ValueError(f"logits must be (B, K) with B = inputs batch size {inputs.shape[0]}, "
                         f"got {getattr(logits, 'shape', type(logits).__name__)}")


def _input_gradient(logits: torch.Tensor, inputs: torch.Tensor, create_graph: bool) -> torch.Tensor:
    (grad,) = torch.autograd.grad(F.log_softmax(logits, dim=1).sum(), inputs, create_graph=create_graph)
    return grad


def _check_penalty_inputs(logits: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor, reduction: str,
                          soft: bool, validate: bool) -> torch.Tensor:
    """Check the arguments of :func:`rrr_penalty` / :func:`rbr_penalty` (the mask's values if ``validate``);
    return the mask as (B, 1, H, W) in the inputs' dtype."""
    _check_explained(logits, inputs)
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be a (B, C, H, W) image batch, got shape {tuple(inputs.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    mask = as_mask_batch(mask, batch=inputs.shape[0], size=inputs.shape[-2:])
    if validate:
        check_mask_values(mask, soft=soft)
    return mask.to(inputs.dtype)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def rrr_penalty(logits: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor, *, normalize_mask: bool = False,
                reduction: str = "mean", channel_reduction: str = "sum", soft: bool = False,
                validate: bool = True) -> torch.Tensor:
    """RRR, eq. 4: sum_ij [M * sum_k d log p_k / dX]_ij^2 per sample, built with create_graph so it trains.

    Args:
        logits: (B, K) model outputs computed from ``inputs`` (which must require grad).
        inputs: (B, C, H, W); the mask is broadcast over C.
        mask: (B, 1, H, W) or (B, H, W), 1 = spurious pixel.
        normalize_mask: rescale each sample's mask by H*W / sum(M) as the released TAP code does;
            False gives Ross et al.'s plain mask.
        reduction: "mean" over the batch (released TAP code) or "sum" (Ross et al.).
        channel_reduction: "sum": sum_hw (M * sum_c grad_c)^2, the channels summed before squaring (the
            released code on RGB inputs); "none": sum_chw (M * grad_c)^2 (Ross et al.). Equal for C = 1.
    Returns a scalar in the inputs' dtype.
    """
    m = _check_penalty_inputs(logits, inputs, mask, reduction, soft, validate)
    if channel_reduction not in CHANNEL_REDUCTIONS:
        raise ValueError(f"channel_reduction must be one of {CHANNEL_REDUCTIONS}, got {channel_reduction!r}")
    if normalize_mask:
        area = m.shape[-2] * m.shape[-1]
        m = m * (area / m.sum((1, 2, 3), keepdim=True).clamp_min(1e-12))
    grad = _input_gradient(logits, inputs, True)
    if channel_reduction == "sum":
        grad = grad.sum(1, keepdim=True)
    return _reduce((m * grad).square().sum((1, 2, 3)), reduction)


def rbr_penalty(logits: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                parameters: Iterable[torch.Tensor], *, reduction: str = "sum", soft: bool = False,
                validate: bool = True, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """RBR (Shao et al. 2021) with an identity Hessian, as in the paper's baselines.

    influence = d/dX sum_theta dL_task/dtheta (L_task = batch-mean cross-entropy of ``targets``), and the
    penalty is sum_ij [M * influence * input_gradient]_ij^2 per sample, reduced over the batch by "sum"
    (released code; its lambdas are 1 to 1e9) or "mean". Training through it needs third-order
    derivatives: run BatchNorm models in eval mode for this term. ``class_weights`` weight L_task's
    cross-entropy (the weighted mean), as the released code does for PNEU. Returns a scalar in the inputs'
    dtype.
    """
    m = _check_penalty_inputs(logits, inputs, mask, reduction, soft, validate)
    if targets.dim() != 1 or targets.shape[0] != inputs.shape[0] or targets.dtype != torch.long:
        raise ValueError(f"targets must be (B,) int64 class indices with B = {inputs.shape[0]}, got shape "
                         f"{tuple(targets.shape)} and dtype {targets.dtype}")
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("parameters must contain at least one tensor that requires grad")
    task_loss = F.cross_entropy(logits, targets, weight=class_weights)
    param_grads = [g for g in torch.autograd.grad(task_loss, params, create_graph=True, allow_unused=True)
                   if g is not None]
    if not param_grads:
        raise ValueError("parameters must include parameters of the model that produced logits")
    summed = sum(g.sum() for g in param_grads)
    (influence,) = torch.autograd.grad(summed, inputs, create_graph=True)
    grad = _input_gradient(logits, inputs, True)
    return _reduce((m * influence * grad).square().sum((1, 2, 3)), reduction)
