"""Pure Triton kernels of the Targeted Activation Penalty (eq. 6-8). Launch wrappers: ``tap_launch``.

Activations Z (B, C, H, W) are addressed as (sample b, channel c, pixel p = h * W + w) with three strides,
which covers both contiguous (stride_p = 1) and channels_last (stride_c = 1) tensors; Triton specialises
a stride equal to 1, so either layout gets contiguous, vectorised loads. Per-pixel maps (D, the backward
weights) are contiguous (B, H, W). All arithmetic is in fp32 whatever the storage dtype.
"""
import triton
import triton.language as tl


@triton.jit
def bin_mean(src, i, j, valid, H, W, HO, WO, max_bin_h, mean_factor,
             K: tl.constexpr, BIN_W: tl.constexpr, MEAN_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """fp32 D(M, l) of eq. 7 at outputs (i, j) of BLOCK lanes: the mean over the adaptive-average-pool bin
    (rows floor(i H / HO) .. ceil((i+1) H / HO), likewise for columns) of the K x K, stride-1, 'same'
    max-pool of the (H, W) map at ``src`` (a pointer, or one per lane).

    Bins are summed row by row in fp32 and divided by their height, then their width, with IEEE division,
    exactly as torch's adaptive_avg_pool2d does (MEAN_MODE 0), so D is bit-identical to
    ``tap_fast.masks.downscale_mask``. For a 1 x 1 output torch takes mean() instead, which divides the sum
    by the count on the CPU (MEAN_MODE 1) and multiplies it by mean_factor = fp32(B) / fp32(B H W) on CUDA
    (MEAN_MODE 2): so do we, bit-identical whenever the sum is exact (binary masks), within fp32 rounding
    otherwise. K = 1 is a plain adaptive average pool (and HO, WO = H, W then returns src itself).
    max_bin_h and BIN_W bound the bin height and width; a bin row is unrolled (BIN_W is constexpr) so its
    loads are all in flight at once, while the sum itself stays sequential, as the bit-identical order
    requires.
    """
    h0 = (i * H) // HO
    h1 = ((i + 1) * H + HO - 1) // HO
    w0 = (j * W) // WO
    w1 = ((j + 1) * W + WO - 1) // WO
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for dh in range(0, max_bin_h):
        r = h0 + dh
        row_in = valid & (r < h1)
        for dw in tl.static_range(BIN_W):
            c = w0 + dw
            inside = row_in & (c < w1)
            if K == 1:
                pooled = tl.load(src + r * W + c, mask=inside, other=0.0).to(tl.float32)
            else:
                pooled = tl.full([BLOCK], float("-inf"), tl.float32)
                for kh in tl.static_range(K):
                    rr = r + (kh - K // 2)
                    row_ok = inside & (rr >= 0) & (rr < H)
                    for kw in tl.static_range(K):
                        cc = c + (kw - K // 2)
                        v = tl.load(src + rr * W + cc, mask=row_ok & (cc >= 0) & (cc < W), other=float("-inf"))
                        pooled = tl.maximum(pooled, v.to(tl.float32))
                pooled = tl.where(inside, pooled, 0.0)
            total += pooled
    # `/` would compile to the approximate div.full.f32 on NVIDIA GPUs; div_rn is IEEE round-to-nearest.
    if MEAN_MODE == 0:
        mean = tl.math.div_rn(tl.math.div_rn(total, (h1 - h0).to(tl.float32)), (w1 - w0).to(tl.float32))
    elif MEAN_MODE == 1:
        mean = tl.math.div_rn(total, ((h1 - h0) * (w1 - w0)).to(tl.float32))
    else:
        mean = total * mean_factor
    return mean


@triton.jit(do_not_specialize=["N", "H", "W", "HO", "WO", "max_bin_h"])  # gathers: divisibility is moot
def downscale_kernel(src_ptr, out_ptr, N, H, W, HO, WO, max_bin_h, mean_factor,
                     K: tl.constexpr, BIN_W: tl.constexpr, MEAN_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """D(M, l) of eq. 7 (``bin_mean``) for BLOCK of the N = B HO WO outputs: src (B, H, W) -> out (B, HO, WO).
    HO, WO = H, W is a plain K x K max-pool."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    b = offs // (HO * WO)
    mean = bin_mean(src_ptr + b * H * W, (offs // WO) % HO, offs % WO, valid, H, W, HO, WO, max_bin_h,
                    mean_factor, K, BIN_W, MEAN_MODE, BLOCK)
    tl.store(out_ptr + offs, mean.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["H", "W", "SH", "SW", "max_bin_h"])
def tap_forward_kernel(z_ptr, src_ptr, partial_ptr, w_ptr, C, HW, H, W, SH, SW, max_bin_h, mean_factor,
                       stride_zb, stride_zc, stride_zp, L2SQ: tl.constexpr, MEAN_MODE: tl.constexpr,
                       BIN_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Partial TAP sums of one layer for BLOCK_P pixels of sample ``program_id(1)``, all C channels.

    A = sum_c relu(Z_c) (eq. 6); D (eq. 7) is computed on the fly, as the adaptive average pool
    (``bin_mean``) of the (SH, SW) source map to this layer's (H, W): the max-pooled input-resolution mask,
    or the layer's own D map (1 x 1 bins: D itself). The program writes one fp32 partial, sum_p D * A
    ("l1", eq. 8) or sum_p (D * A)^2 ("l2sq"), to partial_ptr[b * num_programs(0) + program_id(0)], and the
    backward's per-pixel weight to w_ptr (B, H, W): D itself ("l1", rounded to the source's dtype as the
    reference stores D) or d/dA (D A)^2 = 2 D^2 A ("l2sq"), so the backward needs neither the mask nor A.
    Deterministic: a fixed loop order and tree sums, no atomics.
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
    d = bin_mean(src_ptr + b * SH * SW, offs_p // W, offs_p % W, p_ok, SH, SW, H, W, max_bin_h, mean_factor,
                 1, BIN_W, MEAN_MODE, BLOCK_P)
    d = d.to(src_ptr.dtype.element_ty).to(tl.float32)
    x = d * a
    pix = b * HW + offs_p
    if L2SQ:
        tl.store(w_ptr + pix, 2.0 * d * x, mask=p_ok)
        x = x * x
    else:
        tl.store(w_ptr + pix, d.to(w_ptr.dtype.element_ty), mask=p_ok)
    tl.store(partial_ptr + b * tl.num_programs(0) + pid_p, tl.sum(x, axis=0))


@triton.jit
def scaled_sum_kernel(x_ptr, out_ptr, N, scale, BLOCK: tl.constexpr):
    """out[0] = scale * sum(x[:N]) in one program: the second, deterministic stage of the reduction."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


@triton.jit
def tap_backward_kernel(z_ptr, w_ptr, g_ptr, gout_ptr, gin_ptr, scale, C, HW,
                        stride_zb, stride_zc, stride_zp, stride_ob, stride_oc, stride_op,
                        stride_ib, stride_ic, stride_ip,
                        HAS_GRAD_OUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """grad_Z = g * scale * W * 1[Z > 0] (+ grad_out) on a BLOCK_C x BLOCK_P tile, one pass over Z.

    W is D for "l1" and 2 D^2 A for "l2sq" (B, H, W); g is the incoming gradient of the penalty, read from
    device memory (no host sync). With HAS_GRAD_OUT the tile of grad_out (the gradient reaching Z from the
    rest of the network) is added, so the identity form writes the summed gradient once.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < HW
    ok = (offs_c[:, None] < C) & p_ok[None, :]
    w = tl.load(w_ptr + b * HW + offs_p, mask=p_ok, other=0.0).to(tl.float32)
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
