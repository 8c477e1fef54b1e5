"""Annotation masks: validation and the layer-wise downscaling D(M, l) of eq. 7."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels import check_kernel_size  # one definition, shared with kernels/


def as_mask_batch(mask: torch.Tensor, name: str = "mask", *, batch: int | None = None,
                  size: Sequence[int] | None = None) -> torch.Tensor:
    """Return ``mask`` as a (B, 1, H, W) tensor; accepts (B, H, W) or (B, 1, H, W). Given the input's
    ``batch`` size and spatial ``size`` (H, W), refuses masks of another B or (H, W)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    if mask.shape[0] == 0 or mask.shape[-1] == 0 or mask.shape[-2] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(mask.shape)}")
    if batch is not None and mask.shape[0] != batch:
        raise ValueError(f"{name} must have the input's batch size {batch}, got shape {tuple(mask.shape)}")
    if size is not None and tuple(mask.shape[-2:]) != tuple(size):
        raise ValueError(f"{name} must be at the input's resolution (H, W) = {tuple(size)}, got shape "
                         f"{tuple(mask.shape)}")
    return mask


def check_mask_values(mask: torch.Tensor, *, soft: bool = False, name: str = "mask") -> None:
    """Raise ValueError for NaN/inf masks, and for non-binary ones unless ``soft`` (then [0, 1]).

    This reads the mask on the host: call it once per dataset or batch outside compiled regions.
    """
    m = mask.detach()
    if not torch.isfinite(m).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if soft:
        if bool((m < 0).any()) or bool((m > 1).any()):
            raise ValueError(f"{name} must lie in [0, 1] (soft=True), got range "
                             f"[{m.min().item():g}, {m.max().item():g}]")
    elif not bool(((m == 0) | (m == 1)).all()):
        bad = m[(m != 0) & (m != 1)].flatten()[:3].tolist()
        raise ValueError(f"{name} must be binary (0 or 1, 1 = spurious), found values such as {bad}; "
                         "pass soft=True to allow soft masks in [0, 1]")


def downscale_mask(mask: torch.Tensor, size: Sequence[int], kernel_size: int = 3) -> torch.Tensor:
    """D(M, l) of eq. 7: AvgPool(MaxPool_k(M), H_l, W_l).

    The max-pool has stride 1 and 'same' padding (k // 2), so the penalty region grows by k // 2 pixels;
    the average pool is adaptive, so H need not be a multiple of H_l (MNIST 28 -> 6). When it is, the
    adaptive pool equals a plain AvgPool with kernel and stride H / H_l.

    Args:
        mask: (B, 1, H, W) or (B, H, W), 1 = spurious pixel.
        size: (H_l, W_l), each at most the mask's H, W.
        kernel_size: odd max-pool window kappa (paper: 3); 1 skips the max-pool.
    Returns:
        (B, H_l, W_l) float tensor in [0, 1].
    """
    mask = as_mask_batch(mask)
    check_kernel_size(kernel_size)
    (size,) = _check_sizes(mask, [size], "size")
    return downscale_trusted(mask, [size], kernel_size, compound=False)[0]


def downscale_masks(mask: torch.Tensor, sizes: Sequence[Sequence[int]], kernel_size: int = 3,
                    compound: bool = False) -> list[torch.Tensor]:
    """D(M, l) (eq. 7) for each layer size, as :func:`downscale_mask` gives it. ``compound=True`` follows the
    released code: layer l's mask is downscaled from layer l-1's, so the max-pool is applied again at every
    layer; otherwise the max-pool, the same for every layer, is computed once."""
    mask = as_mask_batch(mask)
    check_kernel_size(kernel_size)
    return downscale_trusted(mask, _check_sizes(mask, sizes, "sizes", compound), kernel_size, compound)


def _check_sizes(mask: torch.Tensor, sizes: Sequence[Sequence[int]], name: str,
                 compound: bool = False) -> list[tuple[int, int]]:
    """``sizes`` as int pairs, each in [1, the mask's (H, W)] (with ``compound``, the previous size's)."""
    pairs, bound = [(int(h), int(w)) for h, w in sizes], tuple(mask.shape[-2:])
    for i, p in enumerate(pairs):
        if not (0 < p[0] <= bound[0] and 0 < p[1] <= bound[1]):
            what = f"the previous size {bound} (compound=True)" if compound and i else f"the mask size {bound}"
            raise ValueError(f"{name} must lie in [1, {what}]: got {p}")
        if compound:
            bound = p
    return pairs


def _max_pool(mask: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """MaxPool_k of eq. 7 (stride 1, 'same' padding) of a checked (B, 1, H, W) mask, as floats."""
    m = mask if mask.is_floating_point() else mask.float()
    return F.max_pool2d(m, kernel_size, stride=1, padding=kernel_size // 2) if kernel_size > 1 else m


def downscale_trusted(mask: torch.Tensor, sizes: Sequence[Sequence[int]], kernel_size: int,
                      compound: bool) -> list[torch.Tensor]:
    """:func:`downscale_masks` of a checked (B, 1, H, W) mask and sizes within it (``tap_penalty`` checks
    them once)."""
    if not compound:
        pooled = _max_pool(mask, kernel_size)
        return [F.adaptive_avg_pool2d(pooled, size)[:, 0] for size in sizes]
    out, prev = [], mask
    for size in sizes:
        prev = F.adaptive_avg_pool2d(_max_pool(prev, kernel_size), size)
        out.append(prev[:, 0])
    return out
