"""Teacher annotations (section 4.2, eq. 13-14), the random-annotation baseline and their quality (Figure 8)."""
from __future__ import annotations

import torch
import torch.nn as nn

from tap_fast.choices import TAU_RULES
from tap_fast.feeds import normalise
from tap_fast.input_gradients import input_gradient
from tap_fast.masks import as_mask_batch


def saliency_maps(model: nn.Module, images: torch.Tensor, *, mean: float, std: float,
                  batch_size: int = 256) -> torch.Tensor:
    """E of eq. 13: |input gradient| summed over channels and divided by its per-image maximum.

    Args:
        model: the teacher, evaluated in eval mode (its mode is restored afterwards).
        images: (N, C, H, W) uint8 images on the model's device, normalised as in training.
    Returns:
        (N, 1, H, W) float32 in [0, 1]; each image with a non-zero gradient has maximum 1, an image with an
        all-zero gradient maps to zeros (nothing salient).
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = normalise(images[i:i + batch_size], mean, std).requires_grad_(True)
            with torch.enable_grad():
                e = input_gradient(model(x), x).abs().sum(1, keepdim=True)
            peak = e.amax((2, 3), keepdim=True)
            out.append(torch.where(peak > 0, e / peak.clamp_min(torch.finfo(e.dtype).tiny), 0.0))
    finally:
        model.train(was_training)
    return torch.cat(out)


def threshold_saliency(saliency: torch.Tensor, tau: float, rule: str = "quantile") -> torch.Tensor:
    """Eq. 14's annotation of low-saliency pixels as spurious: uint8 masks (N, 1, H, W) of saliency (N, 1, H, W).

    rule "quantile" (the released code, behind Tables 12-17): exactly k = round(tau * H * W) pixels per image
    (Python's round: halves to even), its k lowest-saliency ones; ties are broken by a stable sort on the
    row-major pixel index, so among equal values the first pixels (top rows, then left columns) are masked.
    rule "threshold" (eq. 14 as printed): M = 1 where E < tau.
    """
    if not 0.0 < float(tau) <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {tau!r}")
    if rule not in TAU_RULES:
        raise ValueError(f"rule must be one of {TAU_RULES}, got {rule!r}")
    if rule == "threshold":
        return (saliency < tau).to(torch.uint8)
    flat = saliency.flatten(1)
    lowest = flat.argsort(dim=1, stable=True)[:, :round(float(tau) * flat.shape[1])]
    return torch.zeros_like(flat, dtype=torch.uint8).scatter_(1, lowest, 1).view_as(saliency)


def random_masks(reference: torch.Tensor, *, generator: torch.Generator | None = None,
                 batch_size: int = 1024) -> torch.Tensor:
    """Random-annotation baseline: each image gets as many ones as in ``reference`` (e.g. its teacher mask),
    at uniformly random pixels. Returns uint8 (N, 1, H, W) on the reference's device; the positions are drawn on
    the CPU from ``generator`` (a CPU generator, or None for the global RNG)."""
    reference = as_mask_batch(reference, "reference")
    n, _, h, w = reference.shape
    counts = reference.reshape(n, -1).ne(0).sum(1).cpu()
    out = []
    for i in range(0, n, batch_size):
        scores = torch.rand(min(batch_size, n - i), h * w, generator=generator)
        ranks = scores.argsort(1).argsort(1)
        out.append((ranks < counts[i:i + batch_size, None]).to(torch.uint8))
    return torch.cat(out).reshape(n, 1, h, w).to(reference.device)


def annotation_quality(masks: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Precision |M ∩ G| / |M| and recall |M ∩ G| / |G| of annotation masks M against ground-truth masks G,
    pooled over all pixels of all images (Figure 8), plus the fraction of pixels annotated. A ratio with an
    empty denominator is reported as 0.0."""
    masks, truth = as_mask_batch(masks, "masks"), as_mask_batch(truth, "truth")
    if masks.shape != truth.shape:
        raise ValueError(f"masks and truth must have the same shape, got {tuple(masks.shape)} and "
                         f"{tuple(truth.shape)}")
    m, g = masks.ne(0), truth.ne(0)
    hit, marked, spurious = (m & g).sum().item(), m.sum().item(), g.sum().item()
    return {"precision": hit / marked if marked else 0.0, "recall": hit / spurious if spurious else 0.0,
            "fraction": marked / m.numel()}
