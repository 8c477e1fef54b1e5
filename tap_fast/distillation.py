"""The knowledge-distillation baselines of Appendix M (Tables 18-21): the student matches a frozen teacher.

- :func:`at_penalty`: attention transfer (Zagoruyko and Komodakis 2017) on the tapped layers.
- :func:`jt_penalty`: Jacobian transfer (Srinivas and Fleuret 2018), matching input gradients.
- :func:`kd_penalty`: vanilla knowledge distillation (Hinton, Vinyals and Dean 2015).

Each is a batch mean, computed in the student's dtype promoted to at least float32 and returned in it; the
teacher's side is detached (no gradient reaches the teacher).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def attention_map(z: torch.Tensor) -> torch.Tensor:
    """Zagoruyko and Komodakis' Q = vec(sum_c |Z_c|^2) of a (B, C, H, W) activation: (B, 1, H, W)."""
    return z.to(_dtype(z)).square().sum(1, keepdim=True)


def resize_attention(q: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A (B, 1, h, w) attention map at ``size`` (H, W): the mean over each output position's bin (adaptive
    average pooling, as D(M, l) of eq. 7 shrinks masks) where it shrinks in both dimensions, else bilinear
    interpolation (align_corners=False)."""
    size = tuple(size)
    if tuple(q.shape[-2:]) == size:
        return q
    if q.shape[-2] >= size[0] and q.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(q, size)
    return F.interpolate(q, size=size, mode="bilinear", align_corners=False)


def at_penalty(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention transfer (Zagoruyko and Komodakis' loss term, p = 2, its beta / 2 left to lambda): mean over
    the batch of sum_l || Q_s^l / ||Q_s^l||_2 - Q_t^l / ||Q_t^l||_2 ||_2, Q = vec(sum_c |A_c|^2)
    (:func:`attention_map`).

    Layers pair from the deepest: the last min(L_s, L_t) activations of each list, in order (VGG-16's five
    taps against ResNet-18's four pair at 56, 28, 14 and 7 pixels). A teacher map of another size is resized
    to the student's by :func:`resize_attention` before it is normalised. A zero map stays zero (F.normalize's
    eps).
    """
    if not student or not teacher:
        raise ValueError(f"student and teacher must each hold at least one (B, C, H, W) activation, got "
                         f"{len(student)} and {len(teacher)}")
    n = min(len(student), len(teacher))
    total = None
    for i, (zs, zt) in enumerate(zip(student[-n:], teacher[-n:])):
        if zs.dim() != 4 or zt.dim() != 4 or zs.shape[0] != zt.shape[0]:
            raise ValueError(f"student and teacher activations paired at depth {i} must be (B, C, H, W) with one "
                             f"B, got {tuple(zs.shape)} and {tuple(zt.shape)}")
        qs = attention_map(zs).flatten(1)
        qt = resize_attention(attention_map(zt.detach()), zs.shape[-2:]).flatten(1).to(qs.dtype)
        term = torch.linalg.vector_norm(F.normalize(qs, dim=1) - F.normalize(qt, dim=1), dim=1).mean()
        total = term if total is None else total + term
    return total


def class_input_gradient(logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, *,
                         create_graph: bool) -> torch.Tensor:
    """d f_y(X) / dX: the input gradient of each sample's true-class logit (``inputs`` must require grad)."""
    (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), inputs, create_graph=create_graph)
    return grad


def jt_penalty(student_grad: torch.Tensor, teacher_grad: torch.Tensor) -> torch.Tensor:
    """Jacobian transfer (Srinivas and Fleuret 2018, their matching loss of L2-normalised Jacobians): mean over
    the batch of || J_s / ||J_s||_2 - J_t / ||J_t||_2 ||_2^2, J the input gradient of the true-class logit
    (:func:`class_input_gradient`: one row of the Jacobian; all K would take K backward passes) flattened per
    sample. The student's J must carry its graph (create_graph=True) for the penalty to train: a double
    backward."""
    if student_grad.shape != teacher_grad.shape or student_grad.dim() < 2:
        raise ValueError(f"student_grad and teacher_grad must be input gradients of one (B, ...) shape, got "
                         f"{tuple(student_grad.shape)} and {tuple(teacher_grad.shape)}")
    js = student_grad.flatten(1).to(_dtype(student_grad))
    jt = teacher_grad.detach().flatten(1).to(js.dtype)
    return (F.normalize(js, dim=1) - F.normalize(jt, dim=1)).square().sum(1).mean()


def check_temperature(temperature: float) -> None:
    """Raise ValueError naming ``temperature`` unless it is a positive finite number."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def kd_penalty(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Vanilla knowledge distillation (Hinton et al. 2015): T^2 KL(softmax(t / T) || softmax(s / T)), batch mean
    (the T^2 keeps its gradient's scale independent of T)."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must be (B, K) of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    check_temperature(temperature)
    dtype = _dtype(student_logits)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
