"""Launch wrappers for ``tap_kernels``: shapes, strides, block sizes and grids on real tensors.

Launch plan of one TAP forward with L targeted layers (all asynchronous, no host syncs): one launch per
layer that reads Z once and builds D(M, l) on the fly, then one single-program launch summing the partials
(two-stage reduction: deterministic, no float atomics): L + 1 launches. The input-resolution mask is read
by the first layer only, which max-pools it on the fly and writes the bin sums S of its D; each later
layer whose bins nest in the previous one's (H % H_prev == 0 and H_prev % H_l == 0, likewise W: every
ResNet, VGG, DenseNet, EfficientNet and MobileNet preset at 224 x 224) builds its D from those sums, a map
16 or more times smaller, and the rest read the mask again. Compound downscaling (released code) chains
its D maps first (one launch per layer) and the layers read them as is. The backward is one launch per
layer, each reading Z once and writing grad_Z once.

Host cost: everything that depends only on shapes, strides, dtypes and the device (block sizes, grids,
bin bounds, the constexprs) is computed once per signature and cached (``functools.lru_cache``), with plain
integer maths; per call only the output buffers are allocated and the kernels launched. Inputs are not
validated here: the public entry points (``tap_fast.tap.tap_penalty``, ``kernels.tap_op``'s functions,
``TappedModel.forward_tap``) validate them once.

Block sizes are fixed heuristics (no autotuning, so runs are reproducible and start without a tuning
pass): tiles of about 4096 elements, 128 pixels wide when the layer is large, narrowed for small layers
so that the grid still fills the GPU.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from kernels import interpreter_enabled
from kernels.tap_kernels import downscale_kernel, scaled_sum_kernel, tap_backward_kernel, tap_forward_kernel

MASK_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
D_TORCH = {name: dtype for dtype, name in MASK_DTYPES.items()}
TILE_ELEMENTS = 4096
RAW_BIN_PIXELS = 16  # see source_kind
SUM_BLOCK = 4096
MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's limits on a launch grid's axes 0, 1, 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def check_launchable(t: torch.Tensor, name: str) -> None:
    """Raise ValueError unless Triton can run on ``t``'s device (CUDA, or any device in the interpreter)."""
    if t.device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"{name} is on {t.device}: the Triton TAP kernels need CUDA tensors, or "
                         "TRITON_INTERPRET=1 to run them on the CPU (use backend='torch' otherwise)")


def mask_map_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the D maps for a mask of ``dtype``: fp32/fp16/bf16 are kept (as the reference does), others
    (bool, integers, fp64) become fp32."""
    return dtype if dtype in MASK_DTYPES else torch.float32


def mask_map(mask: torch.Tensor) -> torch.Tensor:
    """The (B, 1, H, W) or (B, H, W) mask as the contiguous (B, H, W) map the kernels read, in
    ``mask_map_dtype``; no copy for a contiguous fp32/fp16/bf16 mask."""
    m = mask[:, 0] if mask.dim() == 4 else mask
    return m.detach().to(mask_map_dtype(m.dtype)).contiguous()


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
    block_p = max(16, min(128, _pow2(hw)))
    while True:
        block_c = max(1, min(_pow2(c), TILE_ELEMENTS // block_p))
        programs = batch * _cdiv(hw, block_p) * (_cdiv(c, block_c) if split_channels else 1)
        if block_p == 16 or programs >= target:
            return block_c, block_p
        block_p //= 2


def checked_grid(grid: tuple[int, ...], what: str) -> tuple[int, ...]:
    """``grid``, or ValueError if an axis exceeds CUDA's limit (MAX_GRID): the kernels put the batch on
    axis 1 or 2, so batches above 65535 samples must be split. ``what`` names the launch's input."""
    for axis, (n, limit) in enumerate(zip(grid, MAX_GRID)):
        if n > limit:
            raise ValueError(f"{what}: its launch grid {grid} exceeds CUDA's limit of {limit} programs on axis "
                             f"{axis}; the fused TAP kernels take batches of at most 65535 samples (split the batch)")
    return grid


def _check_in_sample(c: int, hw: int, strides: tuple[int, int, int], what: str) -> None:
    """ValueError unless every element of a sample is addressed by a 32-bit offset (the kernels' in-sample
    index maths); ``what`` names the input."""
    _, sc, sp = strides
    if (c - 1) * abs(sc) + (hw - 1) * abs(sp) >= 2**31:
        raise ValueError(f"{what}: a sample of {c} channels x {hw} pixels spans 2^31 elements or more, beyond the "
                         "fused TAP kernels' 32-bit in-sample offsets; use backend='torch'")


def _pixel_strides(shape, stride) -> tuple[int, int, int] | None:
    """(stride_b, stride_c, stride_p) addressing (b, c, p = h * W + w) of a (B, C, H, W) tensor, or None
    if its pixels are not evenly strided (then the caller makes it contiguous)."""
    _, _, h, w = shape
    sb, sc, sh, sw = stride
    if h == 1:
        return sb, sc, sw
    if w == 1:
        return sb, sc, sh
    return (sb, sc, sw) if sh == w * sw else None


def _strided(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    strides = _pixel_strides(t.shape, t.stride())
    if strides is None:
        t = t.contiguous()
        strides = _pixel_strides(t.shape, t.stride())
    return t, strides


@functools.lru_cache(maxsize=1024)
def _max_bin(n: int, n_out: int) -> int:
    """The largest adaptive-average-pool bin, n inputs into n_out outputs (bins floor(i n / n_out) ..
    ceil((i+1) n / n_out))."""
    return max(-(-(i + 1) * n // n_out) - i * n // n_out for i in range(n_out))


def _mean_mode(ho: int, wo: int, cuda: bool) -> int:
    # torch's adaptive_avg_pool2d computes a 1 x 1 output with mean(): sum / count on the CPU, sum times
    # fp32(outputs) / fp32(inputs) on CUDA (see tap_kernels.bin_divide)
    return 0 if (ho, wo) != (1, 1) else 2 if cuda else 1


def _mean_factor(b: int, mh: int, mw: int) -> float:
    return float(np.float32(b) / np.float32(b * mh * mw))


def nests(fine: tuple[int, int], coarse: tuple[int, int], mask_hw: tuple[int, int]) -> bool:
    """Whether every bin of the ``coarse`` layer is a union of whole bins of the ``fine`` layer, all of one
    size (both poolings of the mask are uniform): then the coarse layer's bin sums are sums of the fine
    layer's, and D(M, l) can be built from them."""
    return all(m % f == 0 and f % c == 0 for m, f, c in zip(mask_hw, fine, coarse))


@functools.lru_cache(maxsize=4096)
def _downscale_plan(b: int, h: int, w: int, ho: int, wo: int, kernel_size: int, target: int, cuda: bool):
    n = ho * wo  # outputs of a sample, one per lane; halve the block (down to a warp) until the grid fills
    block = max(32, min(256, _pow2(n)))  # 256 lanes of 8 warps: no spills at K = 3 with 32-wide bins
    while block > 32 and b * _cdiv(n, block) < target:
        block //= 2
    grid = checked_grid((_cdiv(n, block), b), "mask")
    consts = dict(K=kernel_size, BLOCK=block, num_warps=block // 32, BIN_W=_max_bin(w, wo),
                  MEAN_MODE=_mean_mode(ho, wo, cuda))
    return grid, (h, w, ho, wo, _max_bin(h, ho), _mean_factor(b, h, w)), consts


def downscale(src: torch.Tensor, size: Sequence[int], kernel_size: int) -> torch.Tensor:
    """One launch of ``downscale_kernel``: src (B, H, W) contiguous float -> (B, H_l, W_l) in src's dtype."""
    b, h, w = src.shape
    ho, wo = size
    out = torch.empty((b, ho, wo), device=src.device, dtype=src.dtype)
    grid, ints, consts = _downscale_plan(b, h, w, ho, wo, kernel_size, _target_programs(src.device),
                                         src.device.type == "cuda")
    downscale_kernel[grid](src, out, *ints, **consts)
    return out


def downscale_masks(mask: torch.Tensor, sizes: Sequence[Sequence[int]], kernel_size: int = 3,
                    compound: bool = False) -> list[torch.Tensor]:
    """D(M, l) (eq. 7) for each size, equal to ``tap_fast.masks.downscale_masks``; mask (B, 1, H, W).

    Not compound: one max-pool launch at input resolution, then one average-pool launch per size.
    Compound (released code): each layer max-pools and averages the previous layer's D in one launch.
    """
    src = mask_map(mask)
    if compound:
        out = []
        for size in sizes:
            src = downscale(src, tuple(size), kernel_size)
            out.append(src)
        return out
    if kernel_size > 1:
        src = downscale(src, src.shape[1:], kernel_size)
    return [downscale(src, tuple(size), 1) for size in sizes]


@functools.lru_cache(maxsize=4096)
def _forward_plan(z_shape, z_strides, src_shape, div_hw, kernel_size, norm, d_dtype, write_sum, target, cuda):
    """(grid, ints, constexprs, z needs .contiguous()) of one layer's ``tap_forward_kernel`` launch."""
    b, c, h, w = z_shape
    strides = _pixel_strides(z_shape, z_strides)
    copy = strides is None
    if copy:  # the launch makes z contiguous
        strides = (c * h * w, h * w, 1)
    _check_in_sample(c, h * w, strides, "activations")
    block_c, block_p = _tile(c, h * w, b, target, split_channels=False)
    grid = checked_grid((_cdiv(h * w, block_p), b), "activations")
    _, sh, sw = src_shape
    mh, mw = div_hw
    ints = (c, h * w, h, w, sh, sw, mh, mw, _max_bin(sh, h), _mean_factor(b, mh, mw), *strides)
    consts = dict(K=kernel_size, L2SQ=norm == "l2sq", MEAN_MODE=_mean_mode(h, w, cuda), BIN_W=_max_bin(sw, w),
                  D_DTYPE=d_dtype, WRITE_SUM=write_sum, BLOCK_C=block_c, BLOCK_P=block_p)
    return grid, ints, consts, copy


def _scaled_sum(partials: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty((), device=partials.device, dtype=torch.float32)
    scaled_sum_kernel[(1,)](partials, out, partials.numel(), scale, BLOCK=SUM_BLOCK, num_warps=8)
    return out


def source_kind(prev_hw: tuple[int, int] | None, hw: tuple[int, int], mask_hw: tuple[int, int],
                kernel_size: int) -> str:
    """Where a layer (not compound) builds D from: "sums", the previous layer's bin sums, when its bins
    nest; else "mask", the mask max-pooled on the fly (K^2 loads per bin pixel), when its bins hold at
    most RAW_BIN_PIXELS pixels (or K = 1); else "pooled", the mask max-pooled once at input resolution."""
    if prev_hw is not None and nests(prev_hw, hw, mask_hw):
        return "sums"
    if kernel_size == 1 or _max_bin(mask_hw[0], hw[0]) * _max_bin(mask_hw[1], hw[1]) <= RAW_BIN_PIXELS:
        return "mask"
    return "pooled"


@functools.lru_cache(maxsize=1024)
def _call_plan(z_sigs, mask_hw, d_dtype, norm, kernel_size, target, cuda):
    """The launches of one non-compound ``tap_forward`` call, per (shape, stride) signature of its layers:
    per layer (grid, ints, constexprs, copy z, weight dtype, source kind, write sums, partials slice); whether
    the pooled mask is needed; the partial count; the scale 1/(L B)."""
    kinds = [source_kind(None if i == 0 else z_sigs[i - 1][0][-2:], shape[-2:], mask_hw, kernel_size)
             for i, (shape, _) in enumerate(z_sigs)]
    layers, start = [], 0
    for i, ((shape, stride), kind) in enumerate(zip(z_sigs, kinds)):
        src_hw = z_sigs[i - 1][0][-2:] if kind == "sums" else mask_hw
        write_sum = i + 1 < len(kinds) and kinds[i + 1] == "sums"
        grid, ints, consts, copy = _forward_plan(shape, stride, (shape[0], *src_hw), mask_hw,
                                                 kernel_size if kind == "mask" else 1, norm, d_dtype, write_sum,
                                                 target, cuda)
        n = grid[0] * grid[1]
        wdtype = torch.float32 if norm == "l2sq" else D_TORCH[d_dtype]
        layers.append((grid, ints, consts, copy, wdtype, kind, write_sum, start, start + n))
        start += n
    return tuple(layers), "pooled" in kinds, start, 1.0 / (len(z_sigs) * z_sigs[0][0][0])


def tap_forward(zs: Sequence[torch.Tensor], mask: torch.Tensor, norm: str, kernel_size: int, compound: bool
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """TAP of eq. 8, batch mean: (1/(L B)) sum_l sum_b sum_hw f(D_l * A_l), f = |.| or (.)^2.

    zs: L activations (B, C_l, H_l, W_l), any float dtype, contiguous or channels_last (others are made
    contiguous); mask (B, 1, H, W) or (B, H, W) at input resolution. Returns the fp32 scalar and the
    per-layer backward weights (B x H_l x W_l each): D ("l1", in ``mask_map_dtype``) or 2 D^2 A ("l2sq",
    fp32). L + 1 launches (one more where a layer reads the pooled mask; 2L + 1 with compound).
    """
    m = mask_map(mask)
    device = m.device
    if compound:
        return _compound_forward(zs, m, norm, kernel_size)
    plan, needs_pooled, total, scale = _call_plan(tuple((tuple(z.shape), z.stride()) for z in zs),
                                                  tuple(m.shape[1:]), MASK_DTYPES[m.dtype], norm, kernel_size,
                                                  _target_programs(device), device.type == "cuda")
    pooled = downscale(m, m.shape[1:], kernel_size) if needs_pooled else None
    partials = torch.empty(total, device=device, dtype=torch.float32)
    weights, sums = [], None
    for z, (grid, ints, consts, copy, wdtype, kind, write_sum, a, b) in zip(zs, plan):
        # a "sums" layer reads the bin sums the previous layer wrote (its write_sum is set for this)
        if copy:
            z = z.contiguous()
        wmap = torch.empty((z.shape[0], z.shape[2], z.shape[3]), device=device, dtype=wdtype)
        src = sums if kind == "sums" else pooled if kind == "pooled" else m
        sums = torch.empty(wmap.shape, device=device, dtype=torch.float32) if write_sum else wmap
        tap_forward_kernel[grid](z, src, partials[a:b], wmap, sums, *ints, **consts)
        weights.append(wmap)
    return _scaled_sum(partials, scale), weights


def _compound_forward(zs, m, norm, kernel_size):
    """tap_forward with compound downscaling: each layer's D map from the previous one's, then the layers."""
    device, mask_dtype = m.device, MASK_DTYPES[m.dtype]
    counts = []
    plans = []
    for z in zs:
        plan = _layer_plan(tuple(z.shape), z.stride(), tuple(z.shape[:1] + z.shape[2:]), tuple(z.shape[2:]), 1,
                           norm, mask_dtype, False, _target_programs(device), device.type == "cuda")
        plans.append(plan)
        counts.append(plan[0][0] * plan[0][1])
    partials = torch.empty(sum(counts), device=device, dtype=torch.float32)
    weights, d, start = [], m, 0
    for z, (grid, ints, consts, copy, wdtype), n in zip(zs, plans, counts):
        d = downscale(d, z.shape[2:], kernel_size)
        wmap = torch.empty(d.shape, device=device, dtype=wdtype)
        tap_forward_kernel[grid](z.contiguous() if copy else z, d, partials[start:start + n], wmap, wmap, *ints,
                                 **consts)
        weights.append(wmap)
        start += n
    return _scaled_sum(partials, 1.0 / (len(zs) * zs[0].shape[0])), weights


@functools.lru_cache(maxsize=4096)
def _layer_plan(z_shape, z_stride, src_shape, div_hw, kernel_size, norm, d_dtype, write_sum, target, cuda):
    grid, ints, consts, copy = _forward_plan(z_shape, z_stride, src_shape, div_hw, kernel_size, norm, d_dtype,
                                             write_sum, target, cuda)
    return grid, ints, consts, copy, torch.float32 if norm == "l2sq" else D_TORCH[d_dtype]


def tap_layer_forward(z: torch.Tensor, src: torch.Tensor, div_h: int, div_w: int, kernel_size: int, norm: str,
                      d_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's TAP, mean_b sum_hw f(D * A), with D = binsum(maxpool_k(src)) / bins of (div_h, div_w)
    (``tap_kernels``' module docstring). Returns (fp32 penalty, backward weight map, fp32 bin sums S, for
    a coarser layer to build its D from). Two launches."""
    device = z.device
    grid, ints, consts, copy, wdtype = _layer_plan(tuple(z.shape), z.stride(), tuple(src.shape), (div_h, div_w),
                                                   kernel_size, norm, d_dtype, True, _target_programs(device),
                                                   device.type == "cuda")
    partials = torch.empty(grid[0] * grid[1], device=device, dtype=torch.float32)
    b, _, h, w = z.shape
    wmap = torch.empty((b, h, w), device=device, dtype=wdtype)
    sums = torch.empty((b, h, w), device=device, dtype=torch.float32)
    tap_forward_kernel[grid](z.contiguous() if copy else z, src, partials, wmap, sums, *ints, **consts)
    return _scaled_sum(partials, 1.0 / b), wmap, sums


@functools.lru_cache(maxsize=4096)
def _backward_plan(z_shape, z_stride, target):
    """(grid, constexprs, Z's pixel strides or None) of one layer's ``tap_backward_kernel`` launch."""
    b, c, h, w = z_shape
    block_c, block_p = _tile(c, h * w, b, target, split_channels=True)
    grid = checked_grid((_cdiv(h * w, block_p), _cdiv(c, block_c), b), "z")
    strides = _pixel_strides(z_shape, z_stride)
    _check_in_sample(c, h * w, strides or (0, h * w, 1), "z")
    return grid, dict(BLOCK_C=block_c, BLOCK_P=block_p), strides


def tap_grad(grad_penalty: torch.Tensor, z: torch.Tensor, w: torch.Tensor, n_layers: int,
             grad_out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of the TAP of ``tap_forward`` with respect to one layer's Z, in one pass over Z:
    g / (n_layers B) * W * 1[Z > 0] (+ grad_out), in Z's dtype and memory format (``empty_like(z)``).

    grad_penalty: the incoming gradient g (one value, read on the device); w: the layer's backward weight
    map (D for "l1", 2 D^2 A for "l2sq"); grad_out: optional gradient of z's shape to add.
    """
    grid, consts, z_strides = _backward_plan(tuple(z.shape), z.stride(), _target_programs(z.device))
    grad_in = torch.empty_like(z)  # the layout the fake (meta) kernel promises
    if z_strides is None:  # not evenly strided pixels: a contiguous copy of z, and of the result
        z, z_strides = _strided(z)
    out_strides = _pixel_strides(grad_in.shape, grad_in.stride())
    out = grad_in if out_strides is not None else torch.empty(z.shape, device=z.device, dtype=z.dtype)
    has_grad_out = grad_out is not None
    if has_grad_out:
        grad_out, o_strides = _strided(grad_out)
    else:
        grad_out, o_strides = z, (0, 0, 0)  # placeholder pointer, never read
    b, c, h, wd = z.shape
    tap_backward_kernel[grid](z, w, grad_penalty, grad_out, out, 1.0 / (n_layers * b), c, h * wd,
                              *z_strides, *o_strides, *(out_strides or (c * h * wd, h * wd, 1)),
                              HAS_GRAD_OUT=has_grad_out, **consts)
    if out is not grad_in:
        grad_in.copy_(out)
    return grad_in
