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
bin bounds, workspace offsets, the kernels' arguments other than pointers) is computed once per signature
and cached (``functools.lru_cache``), with plain integer maths; per call only the buffers are allocated
and the kernels launched. Buffers come from ``new_empty`` of a tensor already on the device, the size an
int or a ``size=`` tuple (torch's argument parser takes a positional tuple on a slower path: about a
microsecond per allocation), and a plan without copies is one tuple test in :func:`planned_grad`. The
partial sums and bin sums of a call share one fp32 workspace that the
kernels address by offsets (sections start at multiples of ALIGN elements, so they are aligned as
separate buffers are); with ``packed`` (the eager autograd Functions of ``tap_op``) the backward weights
of all layers share one buffer too, and a layer's bin sums are handed on in its workspace; without it
(the custom ops, whose outputs may not alias) every returned map is a tensor of its own. Inputs are not
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
ALIGN = 128  # workspace sections start at multiples of this many elements: 512 bytes in fp32, like CUDA blocks
MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's limits on a launch grid's axes 0, 1, 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _aligned(n: int) -> int:
    return _cdiv(n, ALIGN) * ALIGN


def _pow2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def check_launchable(t: torch.Tensor, name: str) -> None:
    """Raise ValueError unless Triton can run on ``t``'s device (CUDA, or any device in the interpreter)."""
    if not t.is_cuda and not interpreter_enabled():
        raise ValueError(f"{name} is on {t.device}: the Triton TAP kernels need CUDA tensors, or "
                         "TRITON_INTERPRET=1 to run them on the CPU (use backend='torch' otherwise)")


def mask_map_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the D maps for a mask of ``dtype``: fp32/fp16/bf16 are kept (as the reference does), others
    (bool, integers, fp64) become fp32."""
    return dtype if dtype in MASK_DTYPES else torch.float32


def mask_map(mask: torch.Tensor) -> torch.Tensor:
    """The (B, 1, H, W) or (B, H, W) mask as the kernels read it, contiguous in ``mask_map_dtype``: the mask
    itself when it is so (a contiguous (B, 1, H, W) tensor is laid out as (B, H, W)) and needs no grad,
    else a (B, H, W) copy."""
    if mask.dtype in MASK_DTYPES and mask.is_contiguous() and not mask.requires_grad:
        return mask
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
def _downscale_plan(b: int, h: int, w: int, ho: int, wo: int, kernel_size: int, device: torch.device):
    n = ho * wo  # outputs of a sample, one per lane; halve the block (down to a warp) until the grid fills
    block = max(32, min(256, _pow2(n)))  # 256 lanes of 8 warps: no spills at K = 3 with 32-wide bins
    target = _target_programs(device)
    while block > 32 and b * _cdiv(n, block) < target:
        block //= 2
    grid = checked_grid((_cdiv(n, block), b), "mask")
    consts = dict(K=kernel_size, BLOCK=block, num_warps=block // 32, BIN_W=_max_bin(w, wo),
                  MEAN_MODE=_mean_mode(ho, wo, device.type == "cuda"))
    return grid, (h, w, ho, wo, _max_bin(h, ho), _mean_factor(b, h, w)), consts


def downscale(src: torch.Tensor, size: Sequence[int], kernel_size: int) -> torch.Tensor:
    """One launch of ``downscale_kernel``: src (B, [1,] H, W) contiguous float -> (B, H_l, W_l) in src's
    dtype."""
    b, (h, w), (ho, wo) = src.shape[0], src.shape[-2:], size
    grid, ints, consts = _downscale_plan(b, h, w, ho, wo, kernel_size, src.device)
    out = src.new_empty(size=(b, ho, wo))
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
        src = downscale(src, src.shape[-2:], kernel_size)
    return [downscale(src, tuple(size), 1) for size in sizes]


def _weight_dtype(norm: str, d_dtype: str) -> torch.dtype:
    return torch.float32 if norm == "l2sq" else D_TORCH[d_dtype]


@functools.lru_cache(maxsize=4096)
def _forward_plan(z_shape, z_strides, src_hw, div_hw, kernel_size, norm, d_dtype, write_sum, device):
    """(grid, ints up to the strides, constexprs in the kernel's order, z needs .contiguous()) of one layer's
    ``tap_forward_kernel`` launch; the offsets go between the two."""
    b, c, h, w = z_shape
    strides = _pixel_strides(z_shape, z_strides)
    copy = strides is None
    if copy:  # the launch makes z contiguous
        strides = (c * h * w, h * w, 1)
    _check_in_sample(c, h * w, strides, "activations")
    block_c, block_p = _tile(c, h * w, b, _target_programs(device), split_channels=False)
    grid = checked_grid((_cdiv(h * w, block_p), b), "activations")
    sh, sw = src_hw
    mh, mw = div_hw
    ints = (c, h * w, h, w, sh, sw, mh, mw, _max_bin(sh, h), _mean_factor(b, mh, mw), *strides)
    # K, L2SQ, MEAN_MODE, BIN_W, D_DTYPE, WRITE_SUM, BLOCK_C, BLOCK_P
    consts = (kernel_size, norm == "l2sq", _mean_mode(h, w, device.type == "cuda"), _max_bin(sw, w), d_dtype,
              write_sum, block_c, block_p)
    return grid, ints, consts, copy


def _scaled_sum(x: torch.Tensor, n: int, x_off: int, scale: float) -> torch.Tensor:
    out = x.new_empty(size=())  # fp32, as x
    scaled_sum_kernel[(1,)](x, out, n, scale, x_off, BLOCK=SUM_BLOCK, num_warps=8)
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
def _call_plan(z_sigs, mask_shape, mask_dtype, norm, kernel_size, compound, packed, device):
    """The launches of one ``tap_forward`` call, per (shape, stride) signature of its layers: (per layer
    (grid, the arguments after the pointers, copy z, source kind, shape of its own weight map), whether the
    pooled mask is needed, the partial count, the workspace's size, the weight buffer's size, the weights'
    dtype, per layer (weight offset, ``_backward_plan``), the scale 1/(L B)). Workspace (fp32): the partials
    of all layers from 0, then the bin sums each layer writes for the next. Packed, the weights of all
    layers fill one buffer."""
    mask_hw, d_dtype = mask_shape[-2:], MASK_DTYPES[mask_dtype]
    wdtype = _weight_dtype(norm, d_dtype)
    prev_hws = [None] + [shape[-2:] for shape, _ in z_sigs[:-1]]
    kinds = ["compound" if compound else source_kind(prev, shape[-2:], mask_hw, kernel_size)
             for prev, (shape, _) in zip(prev_hws, z_sigs)]
    write_sums = [kind == "sums" for kind in kinds[1:]] + [False]
    plans = []
    for i, ((shape, stride), kind) in enumerate(zip(z_sigs, kinds)):
        hw = shape[-2:]
        src_hw = hw if compound else prev_hws[i] if kind == "sums" else mask_hw
        plans.append(_forward_plan(shape, stride, src_hw, hw if compound else mask_hw,
                                   kernel_size if kind == "mask" else 1, norm, d_dtype, write_sums[i], device))
    n_partials = sum(grid[0] * grid[1] for grid, *_ in plans)
    ws_size, w_size, part_off, sum_off = _aligned(n_partials), 0, 0, 0
    layers, grads = [], []
    for (grid, ints, consts, copy), kind, write_sum, (shape, stride) in zip(plans, kinds, write_sums, z_sigs):
        b, _, h, w = shape
        n = _aligned(b * h * w)
        src_off = sum_off if kind == "sums" else 0
        sum_off = ws_size if write_sum else 0
        ws_size += n if write_sum else 0
        w_off = w_size if packed else 0
        w_size += n if packed else 0
        layers.append((grid, (*ints, src_off, part_off, w_off, sum_off, *consts), copy, kind, (b, h, w)))
        grads.append((w_off, _backward_plan(shape, stride, None, len(z_sigs), w_off, device)))
        part_off += grid[0] * grid[1]
    return (tuple(layers), "pooled" in kinds, n_partials, ws_size, w_size, wdtype, tuple(grads),
            1.0 / (len(z_sigs) * z_sigs[0][0][0]))


def tap_forward(zs: Sequence[torch.Tensor], mask: torch.Tensor, norm: str, kernel_size: int, compound: bool,
                packed: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], tuple]:
    """TAP of eq. 8, batch mean: (1/(L B)) sum_l sum_b sum_hw f(D_l * A_l), f = |.| or (.)^2.

    zs: L activations (B, C_l, H_l, W_l), any float dtype, contiguous or channels_last (others are made
    contiguous); mask (B, 1, H, W) or (B, H, W) at input resolution. Returns (the fp32 scalar, the
    backward weights, per layer (the offset of its weights into their buffer, the launch plan of its
    gradient for :func:`planned_grad`)). The weights, D ("l1", in ``mask_map_dtype``) or 2 D^2 A ("l2sq",
    fp32), are one (B, H_l, W_l) map per layer, or with ``packed`` a list of one flat buffer holding every
    layer's. L + 1 launches (one more where a layer reads the pooled mask; 2L + 1 with compound).
    """
    m = mask_map(mask)
    device = m.device
    layers, needs_pooled, n_partials, ws_size, w_size, wdtype, grads, scale = _call_plan(
        tuple([(z.shape, z.stride()) for z in zs]), m.shape, m.dtype, norm, kernel_size, compound, packed, device)
    ws = m.new_empty(ws_size, dtype=torch.float32)
    w = m.new_empty(w_size, dtype=wdtype) if packed else None
    pooled = downscale(m, m.shape[-2:], kernel_size) if needs_pooled else None
    weights, d = [w] if packed else [], m
    for z, (grid, args, copy, kind, w_shape) in zip(zs, layers):
        if kind == "compound":  # this layer's D, pooled from the previous layer's
            src = d = downscale(d, z.shape[-2:], kernel_size)
        else:  # a "sums" layer reads the bin sums the previous layer wrote into the workspace
            src = ws if kind == "sums" else pooled if kind == "pooled" else m
        if not packed:
            w = m.new_empty(size=w_shape, dtype=wdtype)
            weights.append(w)
        tap_forward_kernel[grid](z.contiguous() if copy else z, src, ws, w, ws, *args)
    out = ws.new_empty(size=())  # _scaled_sum, inlined: one Python call less
    scaled_sum_kernel[(1,)](ws, out, n_partials, scale, 0, BLOCK=SUM_BLOCK, num_warps=8)
    return out, weights, grads


@functools.lru_cache(maxsize=4096)
def _layer_plan(z_shape, z_stride, src_hw, div_hw, kernel_size, norm, d_dtype, packed, device):
    """``tap_layer_forward``'s launch: (grid, the arguments after the pointers, copy z, map shape (packed:
    flat), weights' dtype, workspace size, the partials' offset and count, the scale 1/B). Workspace (fp32):
    packed, the bin sums from 0, then the partials; else the partials alone."""
    grid, ints, consts, copy = _forward_plan(z_shape, z_stride, src_hw, div_hw, kernel_size, norm, d_dtype,
                                             True, device)
    b, _, h, w = z_shape
    part_off = _aligned(b * h * w) if packed else 0
    n_partials = grid[0] * grid[1]
    return (grid, (*ints, 0, part_off, 0, 0, *consts), copy, b * h * w if packed else (b, h, w),
            _weight_dtype(norm, d_dtype), part_off + n_partials, part_off, n_partials, 1.0 / b)


def tap_layer_forward(z: torch.Tensor, src: torch.Tensor, src_hw: tuple[int, int], div_hw: tuple[int, int],
                      kernel_size: int, norm: str, d_dtype: str, packed: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's TAP, mean_b sum_hw f(D * A), with D = binsum(maxpool_k(src)) / bins of ``div_hw``
    (``tap_kernels``' module docstring); src: the (SH, SW) = ``src_hw`` map from its first element. Returns
    (fp32 penalty, backward weight map, fp32 bin sums S, for a coarser layer to build its D from): (B, H, W)
    maps of their own, or with ``packed`` a flat weight map and S the first B H W elements of a flat
    workspace. Two launches."""
    device = z.device
    grid, args, copy, shape, wdtype, ws_size, part_off, n_partials, scale = _layer_plan(
        z.shape, z.stride(), src_hw, div_hw, kernel_size, norm, d_dtype, packed, device)
    ws = z.new_empty(ws_size, dtype=torch.float32)
    w = z.new_empty(shape, dtype=wdtype) if packed else z.new_empty(size=shape, dtype=wdtype)
    sums = ws if packed else z.new_empty(size=shape, dtype=torch.float32)
    tap_forward_kernel[grid](z.contiguous() if copy else z, src, ws, w, sums, *args)
    return _scaled_sum(ws, n_partials, part_off, scale), w, sums


@functools.lru_cache(maxsize=4096)
def _backward_plan(z_shape, z_stride, grad_out_stride, n_layers, w_off, device):
    """(grid, the arguments after the pointers, copies) of one layer's ``tap_backward_kernel`` launch; copies
    is None, or where pixels are not evenly strided (copy z, copy grad_out, write through a contiguous
    buffer)."""
    b, c, h, w = z_shape
    block_c, block_p = _tile(c, h * w, b, _target_programs(device), split_channels=True)
    grid = checked_grid((_cdiv(h * w, block_p), _cdiv(c, block_c), b), "z")
    z_strides = _pixel_strides(z_shape, z_stride)
    _check_in_sample(c, h * w, z_strides or (0, h * w, 1), "z")
    # grad_in = empty_like(z), the layout the fake kernel promises: its strides follow from z's
    in_strides = _pixel_strides(z_shape, torch.empty_like(torch.empty_strided(z_shape, z_stride, device="meta"))
                                .stride())
    has_grad_out = grad_out_stride is not None
    o_strides = _pixel_strides(z_shape, grad_out_stride) if has_grad_out else (0, 0, 0)  # (0, 0, 0): never read
    contiguous = (c * h * w, h * w, 1)
    args = (1.0 / (n_layers * b), c, h * w, *(z_strides or contiguous), *(o_strides or contiguous),
            *(in_strides or contiguous), w_off, has_grad_out, block_c, block_p)
    copies = (z_strides is None, o_strides is None, in_strides is None)
    return grid, args, copies if any(copies) else None


def tap_grad(grad_penalty: torch.Tensor, z: torch.Tensor, w: torch.Tensor, n_layers: int,
             grad_out: torch.Tensor | None = None, w_off: int = 0) -> torch.Tensor:
    """Gradient of the TAP of ``tap_forward`` with respect to one layer's Z, in one pass over Z:
    g / (n_layers B) * W * 1[Z > 0] (+ grad_out), in Z's dtype and memory format (``empty_like(z)``).

    grad_penalty: the incoming gradient g (one value, read on the device); w: the layer's backward weight
    map (D for "l1", 2 D^2 A for "l2sq"), from ``w_off`` elements into w; grad_out: optional gradient of z's
    shape to add.
    """
    plan = _backward_plan(z.shape, z.stride(), None if grad_out is None else grad_out.stride(), n_layers, w_off,
                          z.device)
    return planned_grad(plan, grad_penalty, z, w, grad_out)


def planned_grad(plan, grad_penalty: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
                 grad_out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`tap_grad` given its launch plan (``_backward_plan``, as ``tap_forward`` returns them)."""
    grid, args, copies = plan
    grad_in = torch.empty_like(z)
    if copies is None:  # evenly strided pixels (contiguous, channels_last): no copies
        tap_backward_kernel[grid](z, w, grad_penalty, z if grad_out is None else grad_out, grad_in, *args)
        return grad_in
    copy_z, copy_grad_out, via_copy = copies
    out = z.new_empty(size=z.shape) if via_copy else grad_in
    if copy_z:
        z = z.contiguous()
    if grad_out is None:
        grad_out = z  # placeholder pointer, never read
    elif copy_grad_out:
        grad_out = grad_out.contiguous()
    tap_backward_kernel[grid](z, w, grad_penalty, grad_out, out, *args)
    if via_copy:
        grad_in.copy_(out)
    return grad_in
