"""Fused Triton TAP (kernels/) against the plain-PyTorch reference: D maps, values and gradients.

CPU runs use Triton's interpreter (TRITON_INTERPRET=1, set by conftest), mostly fp32, on tiny grids; the
same tests run on CUDA in fp32 and bf16 when a GPU is present and the interpreter is off
(TRITON_INTERPRET=0, as benchmarks/gpu_check.sh sets it).
Tolerances: D maps are bit-identical (same fp32 summation order and IEEE divisions as torch), except a
1 x 1 map of soft values, which torch computes with mean() (rtol 1e-5), and soft masks on layers that build
D from a finer layer's bin sums (a sum of sums: rtol 1e-6). Penalty values differ from the
reference only in fp32 summation order: rtol 1e-5 (1e-4 when some Z is half precision). Gradients: fp32
rtol 1e-5; half precision rounds the same fp32 value once, as the reference does, up to its own fp32
rounding: rtol 2e-3 (fp16), 1.6e-2 (bf16, two ulps). Re-running gives bit-identical results.
"""
import pytest
import torch

pytest.importorskip("triton")

from kernels import tap_launch  # noqa: E402
from kernels.tap_op import MaskSource, fused_downscale_masks, fused_tap_penalty, tap_identity  # noqa: E402
from tap_fast.masks import downscale_mask, downscale_masks  # noqa: E402
from tap_fast.tap import tap_penalty, tap_penalty_reference  # noqa: E402

INTERPRET = tap_launch.interpreter_enabled()
ON_CPU = pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs TRITON_INTERPRET=1")
ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                                               reason="needs a CUDA device with TRITON_INTERPRET=0")]
DEVICES = [pytest.param("cpu", marks=ON_CPU), pytest.param("cuda", marks=ON_CUDA)]
DEVICE_DTYPES = [pytest.param("cpu", torch.float32, marks=ON_CPU, id="cpu-fp32"),
                 pytest.param("cuda", torch.float32, marks=ON_CUDA, id="cuda-fp32"),
                 pytest.param("cuda", torch.bfloat16, marks=ON_CUDA, id="cuda-bf16")]

# (batch, mask H, mask W, [(C_l, H_l, W_l), ...]): non-divisible downscales, odd channel counts, batch 1.
CASES = {
    "cnn2": (3, 28, 28, [(5, 14, 14), (7, 6, 6)]),
    "odd": (2, 13, 17, [(6, 13, 17), (3, 5, 4), (33, 3, 3)]),
    "batch1": (1, 20, 20, [(4, 7, 9)]),
    # bins nest: D from the previous layer's bin sums, except 5 x 4 (6 % 5 != 0) and 1 x 1 (48 % 5 != 0)
    "nested": (2, 48, 40, [(3, 24, 20), (5, 12, 10), (4, 6, 5), (6, 5, 4), (3, 1, 1)]),
}


def _tol(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-6),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}[dtype]


def _mask(kind, b, h, w, device):
    if kind == "random":
        return (torch.rand(b, 1, h, w, device=device) < 0.3).float()
    if kind == "soft":
        return torch.rand(b, 1, h, w, device=device)
    return torch.full((b, 1, h, w), 1.0 if kind == "ones" else 0.0, device=device)


def _activations(b, layers, device, dtype, channels_last):
    zs = []
    for c, h, w in layers:
        z = torch.randn(b, c, h, w, device=device)
        z[z.abs() < 0.1] = 0.0  # exact zeros: relu'(0) must be 0 on both paths
        z = z.to(dtype)
        if channels_last:
            z = z.to(memory_format=torch.channels_last)
        zs.append(z.requires_grad_())
    return zs


def _check_against_reference(zs, mask, **kw):
    g = 0.7  # a non-unit incoming gradient checks that the backward reads it
    ref = tap_penalty_reference(zs, mask, **kw)
    ref_grads = torch.autograd.grad(ref * g, zs)
    out = fused_tap_penalty(zs, mask, **kw)
    grads = torch.autograd.grad(out * g, zs)
    assert out.dtype == torch.float32 and out.shape == ()
    all_fp32 = all(z.dtype == torch.float32 for z in zs)
    torch.testing.assert_close(out, ref, rtol=1e-5 if all_fp32 else 1e-4, atol=1e-6)
    for z, gr, gf in zip(zs, ref_grads, grads):
        assert gf.dtype == z.dtype and gf.stride() == torch.empty_like(z).stride()  # Z's memory format
        torch.testing.assert_close(gf, gr, **_tol(z.dtype))
    again = fused_tap_penalty(zs, mask, **kw)  # deterministic: no atomics, fixed reduction order
    assert torch.equal(again, out) and all(map(torch.equal, torch.autograd.grad(again * g, zs), grads))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("norm", ["l1", "l2sq"])
@pytest.mark.parametrize("compound", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_penalty_matches_reference(device, dtype, case, norm, compound, channels_last):
    b, h, w, layers = CASES[case]
    zs = _activations(b, layers, device, dtype, channels_last)
    mask = _mask("random", b, h, w, device)
    _check_against_reference(zs, mask, norm=norm, compound=compound)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("kind", ["zeros", "ones", "soft"])
@pytest.mark.parametrize("norm", ["l1", "l2sq"])
def test_penalty_mask_kinds(device, dtype, kind, norm):
    b, h, w, layers = CASES["cnn2"]
    zs = _activations(b, layers, device, dtype, channels_last=False)
    _check_against_reference(zs, _mask(kind, b, h, w, device), norm=norm, kernel_size=3)


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_strided_and_mixed_inputs(device):
    """Non-dense activations (a channel slice, a spatial transpose), an fp16 layer (and a bf16 one on CUDA:
    the interpreter truncates fp32 -> bf16 casts), a (B, H, W) mask."""
    base = torch.randn(2, 9, 11, 10, device=device)
    zs = [base[:, 2:7].requires_grad_(), torch.randn(2, 4, 6, 5, device=device).transpose(2, 3).requires_grad_(),
          torch.randn(2, 3, 5, 5, device=device, dtype=torch.float16).requires_grad_()]
    if device == "cuda":
        zs.append(torch.randn(2, 3, 4, 4, device=device, dtype=torch.bfloat16).requires_grad_())
    mask = (torch.rand(2, 11, 10, device=device) < 0.4).float()
    _check_against_reference(zs, mask, norm="l2sq")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["l1", "l2sq"])
def test_saves_no_activation_copy(device, norm):
    """Autograd keeps each Z by reference plus one B x H_l x W_l map per layer (all in one buffer, each
    from an ALIGN-aligned offset), nothing Z-sized."""
    b, h, w, layers = CASES["odd"]
    zs = _activations(b, layers, device, torch.float32, channels_last=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_tap_penalty(zs, _mask("random", b, h, w, device), norm=norm)
    z_ptrs = {z.data_ptr() for z in zs}
    maps = {t.data_ptr(): t for t in saved if t.data_ptr() not in z_ptrs}
    assert len(saved) == len(zs) + 1 and {t.data_ptr() for t in saved} >= z_ptrs
    (buffer,) = maps.values()
    align = tap_launch.ALIGN
    assert buffer.dim() == 1 and buffer.numel() == sum(-(-b * hl * wl // align) * align for _, hl, wl in layers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,kernel_size", [("random", 1), ("random", 3), ("random", 5), ("soft", 1),
                                              ("soft", 3), ("soft", 5), ("ones", 3)])
def test_downscale_bit_identical(device, kind, kernel_size):
    mask = _mask(kind, 2, 28, 23, device)
    sizes = [(28, 23), (14, 12), (6, 5), (5, 3), (1, 1)]
    for compound in (False, True):
        ours = fused_downscale_masks(mask, sizes, kernel_size, compound)
        ref = downscale_masks(mask, sizes, kernel_size, compound)
        for size, o, r in zip(sizes, ours, ref):
            assert o.dtype == torch.float32 and o.shape == r.shape
            if size == (1, 1) and (kind == "soft" or compound):
                # torch computes a 1 x 1 adaptive pool with mean(), in its own summation order
                torch.testing.assert_close(o, r, rtol=1e-5, atol=0)
            else:
                assert torch.equal(o, r), (compound, size)


@pytest.mark.parametrize("device", DEVICES)
def test_downscale_large_bins_and_dtypes(device):
    """224 -> 7 (32 x 32 bins) bit-identical from a bool mask (fp32 D); on CUDA, bf16 masks give bf16 D
    rounded like the reference (Triton's interpreter truncates fp32 -> bf16 casts, so not on the CPU)."""
    mask = torch.rand(1, 1, 224, 224, device=device) < 0.2
    (d,) = fused_downscale_masks(mask, [(7, 7)])
    assert d.dtype == torch.float32 and torch.equal(d, downscale_mask(mask, (7, 7)))
    if device == "cuda":
        soft = torch.rand(2, 13, 13, device=device).to(torch.bfloat16)
        (d,) = fused_downscale_masks(soft, [(5, 5)])
        assert d.dtype == torch.bfloat16 and torch.equal(d, downscale_mask(soft, (5, 5)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,kernel_size", [("random", 3), ("soft", 3), ("soft", 1), ("ones", 5)])
@pytest.mark.parametrize("nested", [False, True])
def test_forward_builds_d_bit_identical(device, kind, kernel_size, nested):
    """The forward kernels build each layer's D on the fly and hand it to the backward ("l1"): from the mask
    (max-pooled on the fly) at awkward sizes, or, when bins nest, from the previous layer's bin sums. Binary
    masks: bit-identical to the reference's D maps; soft masks: bit-identical from the mask (a 1 x 1 map:
    rtol 1e-5, torch uses mean() there), rtol 1e-6 from bin sums. "l2sq" hands over 2 D^2 A instead."""
    b, h, w = (2, 32, 24) if nested else (2, 29, 23)
    sizes = [(32, 24), (16, 12), (8, 6), (2, 3), (1, 1)] if nested else [(29, 23), (14, 12), (6, 5), (5, 3), (1, 1)]
    zs = [z.detach() for z in _activations(b, [(3, *s) for s in sizes], device, torch.float32, False)]
    mask = _mask(kind, b, h, w, device)
    kinds = [tap_launch.source_kind(None if i == 0 else sizes[i - 1], size, (h, w), kernel_size)
             for i, size in enumerate(sizes)]
    assert kinds[1:] == ["sums"] * 4 if nested else "sums" not in kinds
    _, d_maps, _ = tap_launch.tap_forward(zs, mask, "l1", kernel_size, False)
    _, l2sq_maps, _ = tap_launch.tap_forward(zs, mask, "l2sq", kernel_size, False)
    for i, (size, z, d, wmap, ref) in enumerate(zip(sizes, zs, d_maps, l2sq_maps,
                                                    downscale_masks(mask, sizes, kernel_size))):
        assert d.dtype == torch.float32 and d.shape == ref.shape
        if kind == "soft" and (nested and i > 0):
            torch.testing.assert_close(d, ref, rtol=1e-6, atol=0)
        elif size == (1, 1) and kind == "soft":
            torch.testing.assert_close(d, ref, rtol=1e-5, atol=0)
        else:
            assert torch.equal(d, ref), size
        torch.testing.assert_close(wmap, 2 * ref.square() * torch.relu(z).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("identity", [True, False])
def test_mask_source_reads_the_mask_once(device, identity, monkeypatch):
    """Per layer, in the order the layers run: the first layer reads the mask, each later layer whose bins
    nest reads the previous layer's bin sums, a layer whose bins do not (5 x 4 after 6 x 5) reads the mask
    max-pooled once at input resolution (made by the first layer that needs it); the layers' penalties sum to the reference's eq. 8 and their gradients match it."""
    b, h, w, layers = CASES["nested"]
    zs = _activations(b, layers, device, torch.float32, channels_last=False)
    mask = _mask("random", b, h, w, device)
    sources = []
    real = tap_launch.tap_layer_forward

    def recording(z, src, src_hw, *args, **kwargs):
        sources.append(tuple(src_hw))
        return real(z, src, src_hw, *args, **kwargs)

    monkeypatch.setattr(tap_launch, "tap_layer_forward", recording)
    source = MaskSource(mask)
    outs = [source.penalty(z, "l1", identity=identity) for z in zs]
    penalties = [o[1] for o in outs] if identity else outs
    assert sources == [(h, w), (24, 20), (12, 10), (h, w), (h, w)]
    assert source._pooled is not None and torch.equal(source._pooled, downscale_mask(mask, (h, w)))
    penalty = sum(penalties) / len(zs)
    ref = tap_penalty_reference(zs, mask)
    torch.testing.assert_close(penalty, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(penalty, zs), torch.autograd.grad(ref, zs)):
        torch.testing.assert_close(g, r, **_tol(torch.float32))


MASK_DTYPES = [pytest.param("cpu", torch.float16, marks=ON_CPU, id="cpu-fp16"),
               pytest.param("cpu", torch.bool, marks=ON_CPU, id="cpu-bool"),
               pytest.param("cuda", torch.float16, marks=ON_CUDA, id="cuda-fp16"),
               pytest.param("cuda", torch.bfloat16, marks=ON_CUDA, id="cuda-bf16"),
               pytest.param("cuda", torch.bool, marks=ON_CUDA, id="cuda-bool")]


@pytest.mark.parametrize("device,mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_mask_dtypes(device, mask_dtype, kernel_size):
    """Half-precision soft masks keep their dtype in D, rounded once as the reference stores D (bf16 on CUDA
    only: Triton's interpreter truncates fp32 -> bf16 casts); bool masks give fp32 D. The forward's D maps
    (the "l1" backward weights) are bit-identical to the reference's, the penalty and gradients match it
    (fp32 Z: rtol 1e-5), and the custom op's fake kernel promises these dtypes (opcheck)."""
    b, h, w = 2, 19, 15
    sizes = [(19, 15), (9, 7), (4, 3)]
    soft = torch.rand(b, 1, h, w, device=device)
    mask = (soft < 0.3) if mask_dtype == torch.bool else soft.to(mask_dtype)
    map_dtype = torch.float32 if mask_dtype == torch.bool else mask_dtype
    zs = _activations(b, [(3, *size) for size in sizes], device, torch.float32, channels_last=False)
    _, d_maps, _ = tap_launch.tap_forward([z.detach() for z in zs], mask, "l1", kernel_size, False)
    for d, ref in zip(d_maps, downscale_masks(mask, sizes, kernel_size)):
        assert d.dtype == ref.dtype == map_dtype and torch.equal(d, ref)
    for norm in ("l1", "l2sq"):  # "l2sq"'s gradient, 2 D^2 A per pixel, shows an unrounded D elementwise
        _check_against_reference(zs, mask, kernel_size=kernel_size, norm=norm)
        torch.library.opcheck(torch.ops.tap_fast.tap_forward.default,
                              ([z.detach() for z in zs], mask, norm, kernel_size, False))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("norm", ["l1", "l2sq"])
@pytest.mark.parametrize("mask_dims", [3, 4])
def test_identity_form(device, dtype, norm, mask_dims):
    """tap_identity returns Z itself (no copy) and adds the penalty gradient to the downstream one."""
    b, c, h, w = 2, 6, 9, 7
    (z,) = _activations(b, [(c, h, w)], device, dtype, channels_last=norm == "l2sq")
    mask = _mask("random", b, 19, 15, device)
    u = torch.randn(b, c, h, w, device=device)
    out, penalty = tap_identity(z, mask[:, 0] if mask_dims == 3 else mask, norm=norm)
    assert out.data_ptr() == z.data_ptr() and torch.equal(out, z)
    grad = torch.autograd.grad((out.float() * u).sum() + 0.3 * penalty, z)[0]
    ref_penalty = tap_penalty_reference([z], mask, norm=norm)
    ref_grad = torch.autograd.grad((z.float() * u).sum() + 0.3 * ref_penalty, z, retain_graph=True)[0]
    torch.testing.assert_close(penalty, ref_penalty, rtol=1e-5 if dtype == torch.float32 else 1e-4, atol=1e-6)
    # bf16: the reference rounds the penalty's gradient p to bf16 before adding it, we round the sum once;
    # where the summands cancel, the results differ by up to half a bf16 ulp of p (<= 2^-8 |p|), not of the
    # small result: atol 2^-8 max|p| (|p| <= 0.15 for "l1" here, ~2 for "l2sq", whose 2 D^2 A weights grow
    # with A; a fixed atol of 1e-3 fails "l2sq", measured by emulating both roundings on the CPU)
    tol = _tol(dtype)
    if dtype != torch.float32:
        p_max = float(torch.autograd.grad(0.3 * ref_penalty, z)[0].float().abs().max())
        tol = dict(rtol=1.6e-2, atol=max(1e-5, 2**-8 * p_max))
    torch.testing.assert_close(grad, ref_grad, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch(device, monkeypatch):
    """tap_penalty(backend="triton") runs the fused op; "auto" picks it on CUDA and the reference on the CPU."""
    import kernels.tap_op

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return fused_tap_penalty(*args, **kwargs)

    monkeypatch.setattr(kernels.tap_op, "fused_tap_penalty", counting)
    zs = _activations(2, [(3, 7, 7)], device, torch.float32, channels_last=False)
    mask = _mask("random", 2, 14, 14, device)
    ref = tap_penalty(zs, mask, backend="torch")
    assert not calls
    fused = tap_penalty(zs, mask, backend="triton")
    assert len(calls) == 1
    tap_penalty(zs, mask, backend="auto")
    assert len(calls) == (3 if device == "cuda" else 1)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of the custom ops agree."""
    zs = _activations(2, [(3, 5, 6), (4, 3, 3)], device, torch.float32, channels_last=False)
    mask = _mask("random", 2, 11, 12, device)
    ds = fused_downscale_masks(mask, [(5, 6), (3, 3)])
    for norm in ("l1", "l2sq"):
        for compound in (False, True):
            torch.library.opcheck(torch.ops.tap_fast.tap_forward.default, ([z.detach() for z in zs], mask, norm, 3,
                                                                          compound))
        torch.library.opcheck(torch.ops.tap_fast.tap_layer_forward.default,
                              (zs[1].detach(), mask[:, 0], 11, 12, 3, norm, "fp32"))
        torch.library.opcheck(torch.ops.tap_fast.tap_layer_forward.default,
                              (zs[1].detach(), ds[0], 11, 12, 1, norm, "fp32"))
    torch.library.opcheck(torch.ops.tap_fast.downscale_masks.default, (mask, [5, 6, 3, 3], 3, True))
    g = torch.tensor(0.5, device=device)
    grad_out = torch.randn(2, 3, 5, 6, device=device)
    torch.library.opcheck(torch.ops.tap_fast.tap_grad.default, (g, zs[0].detach(), ds[0], 2, grad_out))


@pytest.mark.parametrize("device", DEVICES)
def test_batch_beyond_cuda_grid_limit(device):
    """The forward's grid is (pixel blocks, B), the backward's (pixel blocks, channel blocks, B); CUDA allows
    65535 programs on axes 1 and 2, so B = 65536 raises ValueError before any launch (on the CPU too, for
    the same behaviour everywhere). The largest benchmark grids (batch 1024 at 224 x 224) are far inside."""
    b = 65536
    z = torch.rand(b, 1, 1, 1, device=device)
    with pytest.raises(ValueError, match=r"activations: .*65535 samples"):
        tap_launch.tap_forward([z], torch.rand(b, 1, 1, device=device), "l1", 1, False)
    with pytest.raises(ValueError, match="z: .*65535 samples"):
        tap_launch.tap_grad(torch.tensor(1.0, device=device), z, torch.rand(b, 1, 1, device=device), 1)
    assert tap_launch.checked_grid((98, 16, 65535), "z") == (98, 16, 65535)


def test_errors(monkeypatch):
    """Bad input raises ValueError naming the argument at the public entry points (the launch wrappers
    trust their inputs)."""
    z = torch.randn(2, 3, 5, 5, requires_grad=True)
    mask = _mask("random", 2, 10, 10, "cpu")
    with pytest.raises(ValueError, match="norm"):
        tap_penalty([z], mask, norm="l2", backend="triton")
    with pytest.raises(ValueError, match="kernel_size"):
        tap_penalty([z], mask, kernel_size=2, backend="triton")
    with pytest.raises(ValueError, match="exceeds the mask size"):
        tap_penalty([z], mask[..., :4, :4], backend="triton")
    with pytest.raises(ValueError, match="mask must be"):
        tap_identity(z, torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="kernel_size"):
        tap_identity(z, mask, kernel_size=0)
    with pytest.raises(ValueError, match="norm"):
        tap_identity(z, mask, norm="l3")
    with pytest.raises(ValueError, match="sizes must lie"):
        fused_downscale_masks(mask, [(11, 5)], 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for call in (lambda: tap_penalty([z], mask, backend="triton"), lambda: tap_identity(z, mask),
                 lambda: fused_downscale_masks(mask, [(5, 5)])):
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device with TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("norm", ["l1", "l2sq"])
def test_benchmark_shapes(dtype, channels_last, norm, exact_cuda):
    """The benchmark's shapes (ResNet-18's taps at batch 128, 224 x 224 mask): the list form and the
    per-layer forms against the reference, value and gradients (tolerances of the module docstring)."""
    layers = [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
    zs = _activations(128, layers, "cuda", dtype, channels_last)
    mask = _mask("random", 128, 224, 224, "cuda")
    _check_against_reference(zs, mask, norm=norm)
    ref = tap_penalty_reference(zs, mask, norm=norm)
    ref_grads = torch.autograd.grad(ref, zs)
    for identity in (True, False):
        source = MaskSource(mask)
        outs = [source.penalty(z, norm, identity=identity) for z in zs]
        penalty = sum(o[1] if identity else o for o in outs) / len(zs)
        torch.testing.assert_close(penalty, ref, rtol=1e-5 if dtype == torch.float32 else 1e-4, atol=1e-6)
        for g, r, z in zip(torch.autograd.grad(penalty, zs), ref_grads, zs):
            torch.testing.assert_close(g, r, **_tol(z.dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device with TRITON_INTERPRET=0")
def test_cuda_graph_capture():
    """Forward and backward of the fused op replay from a CUDA graph (no host syncs, static shapes)."""
    zs = _activations(4, [(64, 28, 28), (128, 14, 14)], "cuda", torch.float32, channels_last=False)
    mask = _mask("random", 4, 56, 56, "cuda")

    def step():
        penalty = fused_tap_penalty(zs, mask, norm="l2sq")
        return (penalty, *torch.autograd.grad(penalty, zs))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        expected = step()  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for z in zs:
            z.mul_(-1.5)  # new data in the same buffers
    graph.replay()
    expected = step()
    for c, e in zip(captured, expected):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
