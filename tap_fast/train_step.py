"""One optimisation step of CE + lambda * XS penalty (eq. 3 with TAP of eq. 8, or RRR / RBR of eq. 4), or of
CE + lambda * a distillation term (Appendix M: AT, JT, KD)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tap_fast.choices import DISTILLATION_METHODS, METHODS
from tap_fast.distillation import at_penalty, class_input_gradient, jt_penalty, kd_penalty
from tap_fast.feeds import normalise
from tap_fast.input_gradients import rbr_penalty, rrr_penalty
from tap_fast.tap import tap_penalty, triton_available


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               masks: torch.Tensor | None, *, method: str, lam: float, mean: float, std: float,
               norm: str = "l1", kernel_size: int = 3, compound: bool = False, explain_in_eval: bool = False,
               backend: str = "auto", class_weights: torch.Tensor | None = None, teacher: nn.Module | None = None,
               temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take one step on a batch and return detached (loss, task_loss, penalty) device scalars.

    Args:
        model: a :class:`~tap_fast.tapped_model.TappedModel` (forward returns ``(logits, activations)``), in train mode.
        images: (B, C, H, W) uint8 batch on the model's device; normalised here by :func:`~tap_fast.feeds.normalise`.
        labels: (B,) int64 class indices.
        masks: (B, 1, H, W) binary annotation masks (1 = spurious) at the images' H, W (checked here; their
            values are validated once per data set beforehand); unused (may be None) for method "none".
        method: "none" (cross-entropy only), "tap" (eq. 8), "rrr" (eq. 4, released code's per-sample mask
            rescaling and batch mean), "rbr" (identity-Hessian RBR, summed over the batch), or the distillation
            baselines "at", "jt", "kd" (``teacher``).
        lam: lambda of eq. 3.
        norm, kernel_size, compound: passed to :func:`~tap_fast.tap.tap_penalty`.
        backend: TAP's implementation. "torch": the reference (:func:`~tap_fast.tap.tap_penalty`) after the
            forward; "triton" / "identity": the fused kernels inside the forward, one node per layer, in the
            separate / identity form (:meth:`~tap_fast.tapped_model.TappedModel.forward_tap`; Triton on CUDA, or
            TRITON_INTERPRET=1 on the CPU), so the backward holds one layer's dZ at a time; "auto": "identity"
            on CUDA with Triton installed (the fewest memory transfers), "torch" elsewhere.
        explain_in_eval: compute the RRR / RBR term from a second forward pass in eval mode, as the released
            code does; needed for BatchNorm models, whose training-mode backward lacks 3rd-order derivatives.
        class_weights: (num_classes,) weights of the cross-entropy (``F.cross_entropy(weight=...)``: the
            weighted mean), also inside RBR's task loss, as the released code weights PNEU; None: unweighted.
        teacher: methods "at", "jt", "kd" (Appendix M, :mod:`tap_fast.distillation`): the frozen teacher, a
            TappedModel in eval mode on the same normalised batch; no gradient reaches it. "at" matches the
            tapped layers' attention maps, "jt" the true-class input gradients (a double backward; the student's
            from this training-mode forward, as Srinivas and Fleuret: ``explain_in_eval`` is RRR / RBR's), "kd"
            the logits at ``temperature``.
    """
    if method in DISTILLATION_METHODS and teacher is None:
        raise ValueError(f"teacher must be the frozen teacher model (a TappedModel) for method {method!r}, got None")
    x = normalise(images, mean, std)
    input_grad = (method in ("rrr", "rbr") and not explain_in_eval) or method == "jt"
    if input_grad:
        x.requires_grad_(True)
    if method == "tap" and backend == "auto":
        backend = "identity" if x.is_cuda and triton_available() else "torch"
    tap_in_forward = method == "tap" and backend in ("identity", "triton")
    if tap_in_forward:
        if masks is None:
            raise ValueError("masks must be a (B, 1, H, W) tensor for method 'tap', got None")
        # model(x, masks) is TappedModel.forward_tap; called through __call__ so that a DDP wrapper's forward runs
        logits, penalty = model(x, masks, kernel_size=kernel_size, norm=norm, compound=compound,
                                identity=backend == "identity")
    else:
        logits, activations = model(x)
    task_loss = F.cross_entropy(logits, labels, weight=class_weights)

    if method == "none":
        penalty = torch.zeros((), device=task_loss.device)
    elif tap_in_forward:
        pass  # the penalty came with the logits
    elif method == "tap":
        penalty = tap_penalty(activations, masks, kernel_size=kernel_size, norm=norm, compound=compound,
                              validate=False, backend=backend, input_size=tuple(x.shape[-2:]))
    elif method in ("rrr", "rbr"):
        x_explained, logits_explained = x, logits
        if explain_in_eval:
            model.eval()
            x_explained = x.detach().requires_grad_(True)
            logits_explained, _ = model(x_explained)
            model.train()
        if method == "rrr":
            penalty = rrr_penalty(logits_explained, x_explained, masks, normalize_mask=True, reduction="mean",
                                  validate=False)
        else:
            penalty = rbr_penalty(logits_explained, x_explained, masks, labels, model.parameters(),
                                  reduction="sum", validate=False, class_weights=class_weights)
    elif method in ("at", "kd"):
        with torch.no_grad():
            teacher_logits, teacher_activations = teacher(x)
        penalty = (at_penalty(activations, teacher_activations) if method == "at"
                   else kd_penalty(logits, teacher_logits, temperature=temperature))
    elif method == "jt":
        x_teacher = x.detach().requires_grad_(True)
        teacher_grad = class_input_gradient(teacher(x_teacher)[0], x_teacher, labels, create_graph=False)
        penalty = jt_penalty(class_input_gradient(logits, x, labels, create_graph=True), teacher_grad)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    loss = task_loss + lam * penalty
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), task_loss.detach(), penalty.detach()
