"""Pure Triton kernels of the Targeted Activation Penalty (eq. 6-8). Launch wrappers: ``tap_launch``.

Activations Z (B, C, H, W) are addressed as (sample b, channel c, pixel p = h * W + w) with three strides,
which covers both contiguous (stride_p = 1) and channels_last (stride_c = 1) tensors; Triton specialises
a stride equal to 1, so either layout gets contiguous, vectorised loads. Per-pixel maps (masks, D, bin
sums, the backward weights) are contiguous (B, H, W). All arithmetic is in fp32 whatever the storage dtype.
Index maths is 32-bit inside a sample (a sample holds fewer than 2^31 elements); only the sample's base
offset, program_id(1 or 2) times the batch stride, is 64-bit.

D(M, l) of eq. 7 is one formula for every source: D = S / (bin height) / (bin width), where S is the sum,
over the adaptive-average-pool bin of each output pixel, of the K x K stride-1 'same' max-pool of a source
map, and the bin dimensions are those of the (MH, MW) input-resolution mask pooled to the layer's (H, W).
The source is the mask itself (K = kappa), or the bin sums S of an earlier, finer layer whose bins nest in
this layer's (K = 1: a sum of sums, exact for binary masks), or the layer's own D map (K = 1 and
MH, MW = H, W: compound downscaling, bins and divisors of 1).
"""
import triton
import triton.language as tl


@triton.jit
def bin_sum(src, i, j, valid, SH, SW, HO, WO, max_bin_h,
            K: tl.constexpr, BIN_W: tl.constexpr, BLOCK: tl.constexpr):
    """fp32 sum over the adaptive bin of outputs (i, j) (rows floor(i SH / HO) .. ceil((i+1) SH / HO),
    likewise for columns) of the K x K, stride-1, 'same' max-pool of the (SH, SW) map at ``src``.

    Summed row by row, left to right, in fp32, as torch's adaptive_avg_pool2d does, so binary masks and
    any mask with K = 1 give torch's sums bit for bit. max_bin_h and BIN_W bound the bin height and width;
    a bin row is unrolled (BIN_W is constexpr) so its loads are all in flight at once.
    """
    h0 = (i * SH) // HO
    h1 = ((i + 1) * SH + HO - 1) // HO
    w0 = (j * SW) // WO
    w1 = ((j + 1) * SW + WO - 1) // WO
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for dh in range(0, max_bin_h):
        r = h0 + dh
        row_in = valid & (r < h1)
        for dw in tl.static_range(BIN_W):
            c = w0 + dw
            inside = row_in & (c < w1)
            if K == 1:
                pooled = tl.load(src + r * SW + c, mask=inside, other=0.0).to(tl.float32)
            else:
                pooled = tl.full([BLOCK], float("-inf"), tl.float32)
                for kh in tl.static_range(K):
                    rr = r + (kh - K // 2)
                    row_ok = inside & (rr >= 0) & (rr < SH)
                    for kw in tl.static_range(K):
                        cc = c + (kw - K // 2)
                        v = tl.load(src + rr * SW + cc, mask=row_ok & (cc >= 0) & (cc < SW), other=float("-inf"))
                        pooled = tl.maximum(pooled, v.to(tl.float32))
                pooled = tl.where(inside, pooled, 0.0)
            total += pooled
    return total


@triton.jit
def bin_divide(total, i, j, MH, MW, HO, WO, mean_factor, MEAN_MODE: tl.constexpr):
    """D = total / h / w for the bin (h x w) of output (i, j) when an (MH, MW) map is pooled to (HO, WO),
    with IEEE division (``/`` would compile to the approximate div.full.f32 on NVIDIA GPUs), exactly as
    torch's adaptive_avg_pool2d (MEAN_MODE 0). For a 1 x 1 output torch takes mean() instead, which divides
    by the count on the CPU (MEAN_MODE 1) and multiplies by mean_factor = fp32(B) / fp32(B MH MW) on CUDA
    (MEAN_MODE 2): so do we."""
    h = ((i + 1) * MH + HO - 1) // HO - (i * MH) // HO
    w = ((j + 1) * MW + WO - 1) // WO - (j * MW) // WO
    if MEAN_MODE == 0:
        mean = tl.math.div_rn(tl.math.div_rn(total, h.to(tl.float32)), w.to(tl.float32))
    elif MEAN_MODE == 1:
        mean = tl.math.div_rn(total, (h * w).to(tl.float32))
    else:
        mean = total * mean_factor
    return mean


@triton.jit(do_not_specialize=["H", "W", "HO", "WO", "max_bin_h"])  # gathers: divisibility is moot
def downscale_kernel(src_ptr, out_ptr, H, W, HO, WO, max_bin_h, mean_factor,
                     K: tl.constexpr, BIN_W: tl.constexpr, MEAN_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """D(M, l) of eq. 7 for BLOCK of the HO WO outputs of sample ``program_id(1)``: src (B, H, W) ->
    out (B, HO, WO). HO, WO = H, W is a plain K x K max-pool."""
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < HO * WO
    i, j = offs // WO, offs % WO
    total = bin_sum(src_ptr + b * H * W, i, j, valid, H, W, HO, WO, max_bin_h, K, BIN_W, BLOCK)
    mean = bin_divide(total, i, j, H, W, HO, WO, mean_factor, MEAN_MODE)
    tl.store(out_ptr + b * HO * WO + offs, mean.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["H", "W", "SH", "SW", "MH", "MW", "max_bin_h", "partial_off"])
def tap_forward_kernel(z_ptr, src_ptr, partial_ptr, w_ptr, sum_ptr, C, HW, H, W, SH, SW, MH, MW, max_bin_h,
                       mean_factor, stride_zb, stride_zc, stride_zp, src_off, partial_off, w_off, sum_off,
                       K: tl.constexpr, L2SQ: tl.constexpr, MEAN_MODE: tl.constexpr, BIN_W: tl.constexpr,
                       D_DTYPE: tl.constexpr, WRITE_SUM: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """Partial TAP sums of one layer for BLOCK_P pixels of sample ``program_id(1)``, all C channels.

    A = sum_c relu(Z_c) (eq. 6) and D (eq. 7) from the (SH, SW) source map (module docstring: the mask,
    with the K x K max-pool done here, or a finer layer's bin sums, or the layer's D map). The program
    writes one fp32 partial, sum_p D * A ("l1", eq. 8) or sum_p (D * A)^2 ("l2sq"), to
    partial_ptr[b * num_programs(0) + program_id(0)]; the backward's per-pixel weight to w_ptr (B, H, W):
    D itself ("l1", in w's dtype) or d/dA (D A)^2 = 2 D^2 A ("l2sq", fp32), so the backward needs neither
    the mask nor A; and with WRITE_SUM the fp32 bin sums S to sum_ptr (B, H, W), from which a coarser
    layer builds its D without reading the mask again. D is rounded to D_DTYPE ("fp32", "fp16" or "bf16":
    the mask's) as the reference stores it. Deterministic: a fixed loop order and tree sums, no atomics.
    Each map (src, partials, w, sums) starts ``*_off`` elements into its buffer, so that the launch
    wrappers can pack several into one.
    """
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HW
    z_pix = z_ptr + b * stride_zb + offs_p[None, :] * stride_zp
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ok = (offs_c[:, None] < C) & p_ok[None, :]
        z = tl.load(z_pix + offs_c[:, None] * stride_zc, mask=ok, other=0.0)
        acc += tl.maximum(z.to(tl.float32), 0.0)
    a = tl.sum(acc, axis=0)
    i, j = offs_p // W, offs_p % W
    s = bin_sum(src_ptr + src_off + b * SH * SW, i, j, p_ok, SH, SW, H, W, max_bin_h, K, BIN_W, BLOCK_P)
    pix = b * HW + offs_p
    if WRITE_SUM:
        tl.store(sum_ptr + sum_off + pix, s, mask=p_ok)
    d = bin_divide(s, i, j, MH, MW, H, W, mean_factor, MEAN_MODE)
    if D_DTYPE == "bf16":
        d = d.to(tl.bfloat16).to(tl.float32)
    elif D_DTYPE == "fp16":
        d = d.to(tl.float16).to(tl.float32)
    x = d * a
    if L2SQ:
        tl.store(w_ptr + w_off + pix, 2.0 * d * x, mask=p_ok)
        x = x * x
    else:
        tl.store(w_ptr + w_off + pix, d.to(w_ptr.dtype.element_ty), mask=p_ok)
    tl.store(partial_ptr + partial_off + b * tl.num_programs(0) + pid_p, tl.sum(x, axis=0))


@triton.jit
def scaled_sum_kernel(x_ptr, out_ptr, N, scale, x_off, BLOCK: tl.constexpr):
    """out[0] = scale * sum(x[x_off:x_off + N]) in one program: the second, deterministic stage of the
    reduction."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + x_off + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


@triton.jit
def tap_backward_kernel(z_ptr, w_ptr, g_ptr, gout_ptr, gin_ptr, scale, C, HW,
                        stride_zb, stride_zc, stride_zp, stride_ob, stride_oc, stride_op,
                        stride_ib, stride_ic, stride_ip, w_off,
                        HAS_GRAD_OUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """grad_Z = g * scale * W * 1[Z > 0] (+ grad_out) on a BLOCK_C x BLOCK_P tile, one pass over Z.

    W is D for "l1" and 2 D^2 A for "l2sq" (B, H, W), ``w_off`` elements into its buffer; g is the incoming
    gradient of the penalty, read from device memory (no host sync). With HAS_GRAD_OUT the tile of grad_out
    (the gradient reaching Z from the rest of the network) is added, so the identity form writes the summed
    gradient once.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < HW
    ok = (offs_c[:, None] < C) & p_ok[None, :]
    w = tl.load(w_ptr + w_off + b * HW + offs_p, mask=p_ok, other=0.0).to(tl.float32)
    w = w * (tl.load(g_ptr).to(tl.float32) * scale)
    z = tl.load(z_ptr + b * stride_zb + offs_c[:, None] * stride_zc + offs_p[None, :] * stride_zp,
                mask=ok, other=0.0)
    grad = tl.where(z > 0, w[None, :], 0.0)
    if HAS_GRAD_OUT:
        go = tl.load(gout_ptr + b * stride_ob + offs_c[:, None] * stride_oc + offs_p[None, :] * stride_op,
                     mask=ok, other=0.0)
        grad += go.to(tl.float32)
    tl.store(gin_ptr + b * stride_ib + offs_c[:, None] * stride_ic + offs_p[None, :] * stride_ip,
             grad.to(gin_ptr.dtype.element_ty), mask=ok)
