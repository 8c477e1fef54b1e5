"""Launch wrappers for ``tap_kernels``: shapes, strides, block sizes and grids on real tensors.

Launch plan of one TAP step with L targeted layers (all asynchronous, no host syncs):
  forward  - one K x K max-pool of the mask at input resolution (none for K = 1), shared by all layers;
             then one launch per layer that reads Z once, builds D(M, l) on the fly by average-pooling the
             max-pooled mask over each pixel's bin, and writes per-(sample, pixel block) partials into
             slices of a single buffer plus the layer's B x H_l x W_l backward map; then one single-program
             launch summing that buffer (two-stage reduction: deterministic, no float atomics). L + 2
             launches. Compound downscaling (released code) chains the D maps first, one launch per layer,
             and the layer launches then read their D map as is (1 x 1 bins);
  backward - one launch per layer, each reading Z once and writing grad_Z once.
The max-pool is a launch of its own because every layer reads it: fusing it too would load each mask
pixel K^2 times per layer instead of once. Layers have unrelated shapes, dtypes and strides, so one launch
per layer is the simplest correct plan; each moves megabytes, so launch latency only matters for tiny
problems, and under CUDA graphs (torch.compile mode="reduce-overhead") it vanishes.

Block sizes are fixed heuristics (no autotuning, so runs are reproducible and start without a tuning
pass): tiles of about 4096 elements, 128 pixels wide when the layer is large, narrowed for small layers
so that the grid still fills the GPU. Wrapping the kernels in ``triton.autotune`` over BLOCK_C/BLOCK_P and
num_warps is a drop-in option if benchmarks show a gain.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import triton

from kernels.tap_kernels import downscale_kernel, scaled_sum_kernel, tap_backward_kernel, tap_forward_kernel
from tap_fast.tap import NORMS, interpreter_enabled

MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE_ELEMENTS = 4096
SUM_BLOCK = 4096
MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's limits on a launch grid's axes 0, 1, 2


def check_launchable(t: torch.Tensor, name: str) -> None:
    """Raise ValueError unless Triton can run on ``t``'s device (CUDA, or any device in the interpreter)."""
    if t.device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"{name} is on {t.device}: the Triton TAP kernels need CUDA tensors, or "
                         "TRITON_INTERPRET=1 to run them on the CPU (use backend='torch' otherwise)")


def mask_map_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the D maps for a mask of ``dtype``: fp32/fp16/bf16 are kept (as the reference does), others
    (bool, integers, fp64) become fp32."""
    return dtype if dtype in MASK_DTYPES else torch.float32


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    # The interpreter runs programs one after another: few large ones are fastest there.
    if device.type != "cuda" or interpreter_enabled():
        return 4
    return 2 * _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _tile(c: int, hw: int, batch: int, target: int, split_channels: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) for a tile of about TILE_ELEMENTS: BLOCK_P from 128 pixels, halved (down to 16)
    while the grid would have fewer than ``target`` programs; BLOCK_C fills the tile, capped by C. The
    forward loops over channels inside a program; the backward (``split_channels``) also tiles them."""
    block_p = max(16, min(128, triton.next_power_of_2(hw)))
    while True:
        block_c = max(1, min(triton.next_power_of_2(c), TILE_ELEMENTS // block_p))
        programs = batch * triton.cdiv(hw, block_p) * (triton.cdiv(c, block_c) if split_channels else 1)
        if block_p == 16 or programs >= target:
            return block_c, block_p
        block_p //= 2


def checked_grid(grid: tuple[int, ...], what: str) -> tuple[int, ...]:
    """``grid``, or ValueError if an axis exceeds CUDA's limit (MAX_GRID): the forward and backward put the
    batch on axis 1 or 2, so batches above 65535 samples must be split. ``what`` names the launch's input."""
    for axis, (n, limit) in enumerate(zip(grid, MAX_GRID)):
        if n > limit:
            raise ValueError(f"{what}: its launch grid {grid} exceeds CUDA's limit of {limit} programs on axis "
                             f"{axis}; the fused TAP kernels take batches of at most 65535 samples (split the batch)")
    return grid


def _pixel_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_b, stride_c, stride_p) addressing (b, c, p = h * W + w) of a (B, C, H, W) tensor, or None
    if its pixels are not evenly strided (then the caller makes it contiguous)."""
    _, _, h, w = t.shape
    sb, sc, sh, sw = t.stride()
    if h == 1:
        return sb, sc, sw
    if w == 1:
        return sb, sc, sh
    return (sb, sc, sw) if sh == w * sw else None


def _strided(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    strides = _pixel_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _pixel_strides(t)
    return t, strides


def _check_activation(z: torch.Tensor, name: str) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or not z.is_floating_point():
        raise ValueError(f"{name} must be a floating-point (B, C, H, W) tensor, got "
                         f"{getattr(z, 'shape', type(z).__name__)} {getattr(z, 'dtype', '')}")
    check_launchable(z, name)


def _check_map(m: torch.Tensor, z: torch.Tensor, name: str, at_least: bool = False) -> torch.Tensor:
    """m as a contiguous float (B, H_l, W_l) map of z's batch and device, or ValueError naming ``name``;
    ``at_least``: any (B, H_s, W_s) with H_s >= H_l and W_s >= W_l (a map to average-pool into D)."""
    b, _, h, w = z.shape
    shape = tuple(getattr(m, "shape", ()))
    if at_least:
        fits = len(shape) == 3 and shape[0] == b and shape[1] >= h and shape[2] >= w
        expected = f"(B, H_s, W_s) with B = {b}, H_s >= {h}, W_s >= {w}"
    else:
        fits, expected = shape == (b, h, w), f"(B, H_l, W_l) = {(b, h, w)}"
    if not isinstance(m, torch.Tensor) or not fits or not m.is_floating_point():
        raise ValueError(f"{name} must be a floating-point {expected} tensor, got "
                         f"{getattr(m, 'shape', type(m).__name__)} {getattr(m, 'dtype', '')}")
    if m.device != z.device:
        raise ValueError(f"{name} is on {m.device} but its activation is on {z.device}")
    return m.contiguous()


@functools.lru_cache(maxsize=1024)
def _max_bin(n: int, n_out: int) -> int:
    """The largest adaptive-average-pool bin, n inputs into n_out outputs (bins floor(i n / n_out) ..
    ceil((i+1) n / n_out)); cached: every eager forward asks for every layer."""
    return max(-(-(i + 1) * n // n_out) - i * n // n_out for i in range(n_out))


def _bin_plan(src: torch.Tensor, ho: int, wo: int) -> dict:
    """``bin_mean``'s bin bounds and mean mode for average-pooling src (B, H, W) to (ho, wo)."""
    b, h, w = src.shape
    # torch's adaptive_avg_pool2d computes a 1 x 1 output with mean(): sum / count on the CPU, sum times
    # fp32(outputs) / fp32(inputs) on CUDA (see bin_mean)
    return dict(max_bin_h=_max_bin(h, ho), mean_factor=float(np.float32(b) / np.float32(b * h * w)),
                BIN_W=_max_bin(w, wo), MEAN_MODE=0 if (ho, wo) != (1, 1) else 2 if src.device.type == "cuda" else 1)


def downscale(src: torch.Tensor, size: Sequence[int], kernel_size: int) -> torch.Tensor:
    """One launch of ``downscale_kernel``: src (B, H, W) float -> (B, H_l, W_l) in src's dtype."""
    b, h, w = src.shape
    ho, wo = (int(s) for s in size)
    if not (0 < ho <= h and 0 < wo <= w):
        raise ValueError(f"size must lie in [1, mask size]: got {(ho, wo)} for mask size {(h, w)}")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    check_launchable(src, "mask")
    src = src.contiguous()
    out = torch.empty((b, ho, wo), device=src.device, dtype=src.dtype)
    n = b * ho * wo  # outputs, one per lane; halve the block (down to a warp) until the grid fills the GPU
    block = max(32, min(1024, triton.next_power_of_2(n)))
    while block > 32 and triton.cdiv(n, block) < _target_programs(src.device):
        block //= 2
    downscale_kernel[(triton.cdiv(n, block),)](src, out, n, h, w, ho, wo, K=kernel_size, BLOCK=block,
                                                num_warps=max(1, min(4, block // 32)), **_bin_plan(src, ho, wo))
    return out


def downscale_masks(mask: torch.Tensor, sizes: Sequence[Sequence[int]], kernel_size: int = 3,
                    compound: bool = False) -> list[torch.Tensor]:
    """D(M, l) (eq. 7) for each size, equal to ``tap_fast.masks.downscale_masks``; mask (B, 1, H, W).

    Not compound: the max-pool runs once at input resolution, then one average-pool launch per layer.
    Compound (released code): each layer max-pools and averages the previous layer's D in one launch.
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (B, 1, H, W), got {tuple(mask.shape)}")
    src = mask[:, 0].to(mask_map_dtype(mask.dtype))
    if compound:
        out = []
        for size in sizes:
            src = downscale(src, size, kernel_size)
            out.append(src)
        return out
    if kernel_size > 1:
        src = downscale(src, src.shape[-2:], kernel_size)
    return [downscale(src, size, 1) for size in sizes]


def tap_forward(zs: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], norm: str
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """TAP of eq. 8, batch mean: (1/(L B)) sum_l sum_b sum_hw f(D_l * A_l), f = |.| or (.)^2.

    zs: L activations (B, C_l, H_l, W_l), any float dtype, contiguous or channels_last (others are made
    contiguous); sources: for each, a float map (B, H_s, W_s), H_s >= H_l and W_s >= W_l, whose adaptive
    average pool to (H_l, W_l) is D_l: ``pooled_mask`` (the same tensor for every layer) or the layer's own
    D map. Returns the fp32 scalar and the per-layer backward weights (B x H_l x W_l each): D ("l1", in the
    source's dtype) or 2 D^2 A ("l2sq", fp32).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if len(zs) == 0 or len(zs) != len(sources):
        raise ValueError(f"need one source map per activation, got {len(zs)} activations and {len(sources)} maps")
    batch = zs[0].shape[0]
    device = zs[0].device
    target = _target_programs(device)
    plans = []
    for i, (z, src) in enumerate(zip(zs, sources)):
        _check_activation(z, f"activations[{i}]")
        if z.shape[0] != batch or z.device != device:
            raise ValueError(f"activations[{i}] has batch {z.shape[0]} on {z.device}, expected batch {batch} "
                             f"on {device} like activations[0]")
        src = _check_map(src, z, f"sources[{i}]", at_least=True)
        z, strides = _strided(z)
        block_c, block_p = _tile(z.shape[1], z.shape[2] * z.shape[3], batch, target, split_channels=False)
        n_pblocks, _ = checked_grid((triton.cdiv(z.shape[2] * z.shape[3], block_p), batch), f"activations[{i}]")
        plans.append((z, src, strides, block_c, block_p, n_pblocks))
    partials = torch.empty(sum(batch * p[-1] for p in plans), device=device, dtype=torch.float32)
    weights, start = [], 0
    for z, src, strides, block_c, block_p, n_pblocks in plans:
        _, c, h, w = z.shape
        wmap = torch.empty((batch, h, w), device=device, dtype=torch.float32 if norm == "l2sq" else src.dtype)
        sb, sc, sp = strides
        tap_forward_kernel[(n_pblocks, batch)](z, src, partials[start:], wmap, c, h * w, h, w, *src.shape[1:],
                                               stride_zb=sb, stride_zc=sc, stride_zp=sp, L2SQ=norm == "l2sq",
                                               BLOCK_C=block_c, BLOCK_P=block_p, **_bin_plan(src, h, w))
        start += batch * n_pblocks
        weights.append(wmap)
    penalty = torch.empty((), device=device, dtype=torch.float32)
    scaled_sum_kernel[(1,)](partials, penalty, partials.numel(), 1.0 / (len(zs) * batch), BLOCK=SUM_BLOCK,
                            num_warps=8)
    return penalty, weights


def tap_grad(grad_penalty: torch.Tensor, z: torch.Tensor, w: torch.Tensor, n_layers: int,
             grad_out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of the TAP of ``tap_forward`` with respect to one layer's Z, in one pass over Z:
    g / (n_layers B) * W * 1[Z > 0] (+ grad_out), in Z's dtype and memory format (``empty_like(z)``).

    grad_penalty: the incoming gradient g (scalar tensor, read on the device); w: the layer's backward
    weight map (D for "l1", 2 D^2 A for "l2sq"); grad_out: optional gradient of the same shape as z to add.
    """
    _check_activation(z, "z")
    w = _check_map(w, z, "w")
    if grad_penalty.numel() != 1:
        raise ValueError(f"grad_penalty must hold one value, got shape {tuple(grad_penalty.shape)}")
    b, c, h, wd = z.shape
    grad_in = torch.empty_like(z)  # the layout the fake (meta) kernel promises
    out = grad_in if _pixel_strides(grad_in) is not None else torch.empty(z.shape, device=z.device, dtype=z.dtype)
    z, z_strides = _strided(z)
    has_grad_out = grad_out is not None
    if has_grad_out:
        if grad_out.shape != grad_in.shape:
            raise ValueError(f"grad_out must have shape {tuple(grad_in.shape)}, got {tuple(grad_out.shape)}")
        grad_out, o_strides = _strided(grad_out)
    else:
        grad_out, o_strides = z, (0, 0, 0)  # placeholder pointer, never read
    block_c, block_p = _tile(c, h * wd, b, _target_programs(z.device), split_channels=True)
    grid = checked_grid((triton.cdiv(h * wd, block_p), triton.cdiv(c, block_c), b), "z")
    tap_backward_kernel[grid](z, w, grad_penalty.reshape(()), grad_out, out, 1.0 / (n_layers * b), c, h * wd,
                              *z_strides, *o_strides, *_pixel_strides(out),
                              HAS_GRAD_OUT=has_grad_out, BLOCK_C=block_c, BLOCK_P=block_p)
    if out is not grad_in:
        grad_in.copy_(out)
    return grad_in
