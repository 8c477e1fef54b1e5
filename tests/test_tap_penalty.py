"""tap_penalty (eq. 6-8) and downscale_mask (eq. 7) against loop implementations; analytic gradients."""
import numpy as np
import pytest
import torch

from brute_force import downscale_loop, tap_loop
from tap_fast import downscale_mask, downscale_masks, tap_penalty

# (mask H, W, [(C_l, H_l, W_l), ...], batch): odd sizes, batch 1, 28->14->6, 224->56/28/14/7
CASES = [
    ((28, 28), [(5, 14, 14), (7, 6, 6)], 3),
    ((13, 17), [(3, 13, 17), (4, 5, 7)], 1),
    ((9, 9), [(2, 9, 9), (3, 4, 4), (5, 1, 1)], 2),
    ((224, 224), [(3, 56, 56), (4, 28, 28), (5, 14, 14), (6, 7, 7)], 2),
]


def random_mask(b, h, w, p=0.2):
    return (torch.rand(b, 1, h, w, dtype=torch.float64) < p).double()


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("case", CASES[:3])
def test_downscale_matches_loop(case, k):
    (h, w), layers, b = case
    mask = random_mask(b, h, w)
    for _, hl, wl in layers:
        got = downscale_mask(mask, (hl, wl), kernel_size=k)
        want = downscale_loop(mask[:, 0].numpy(), (hl, wl), k)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_downscale_accepts_bhw_and_uint8():
    mask = random_mask(2, 12, 12)
    a = downscale_mask(mask[:, 0].to(torch.uint8), (5, 5))
    b = downscale_mask(mask.float(), (5, 5))
    assert a.shape == (2, 5, 5) and torch.equal(a, b)


def test_downscale_dilates_by_kernel_radius():
    mask = torch.zeros(1, 1, 10, 10)
    mask[0, 0, 4, 4] = 1
    d = downscale_mask(mask, (10, 10))
    assert d[0, 3:6, 3:6].eq(1).all() and d.sum() == 9


@pytest.mark.parametrize("norm", ["l1", "l2sq"])
@pytest.mark.parametrize("compound", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_tap_matches_loop_and_analytic_gradient(case, norm, compound):
    (h, w), layers, b = case
    mask = random_mask(b, h, w, p=0.3)
    acts = [torch.randn(b, c, hl, wl, dtype=torch.float64, requires_grad=True) for c, hl, wl in layers]
    value = tap_penalty(acts, mask, norm=norm, compound=compound)
    want = tap_loop([a.detach().numpy() for a in acts], mask[:, 0].numpy(), norm=norm, compound=compound)
    assert value.item() == pytest.approx(want, rel=1e-5)

    value.backward()
    scale = 1.0 / (len(acts) * b)
    for a, d in zip(acts, downscale_masks(mask, [a.shape[-2:] for a in acts], compound=compound)):
        active = (a.detach() > 0).double()
        if norm == "l1":
            expected = scale * d[:, None] * active
        else:
            a_map = torch.relu(a.detach()).sum(1, keepdim=True)
            expected = scale * 2 * d[:, None] ** 2 * a_map * active
        torch.testing.assert_close(a.grad, expected, rtol=1e-5, atol=1e-6)


def test_tap_all_zero_and_all_one_masks():
    acts = [torch.randn(2, 3, 7, 7)]
    assert tap_penalty(acts, torch.zeros(2, 1, 14, 14)).item() == 0.0
    full = tap_penalty(acts, torch.ones(2, 1, 14, 14)).item()
    assert full == pytest.approx(torch.relu(acts[0]).sum().item() / 2, rel=1e-5)


def test_tap_bf16_accumulates_in_fp32():
    acts = [torch.rand(2, 64, 8, 8)]
    mask = random_mask(2, 16, 16).float()
    ref = tap_penalty(acts, mask)
    low = tap_penalty([acts[0].bfloat16()], mask)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=1e-2)


@pytest.mark.parametrize("norm", ["l1", "l2sq"])
def test_tap_returns_float64_for_float64_activations(norm):
    """float64 activations give a float64 penalty accumulated in float64: the loop's value to 1e-12 (an fp32
    accumulation is off by 1e-8 to 1e-7 here); fp32 / fp16 / bf16 give fp32."""
    (h, w), layers, b = CASES[3]
    mask = random_mask(b, h, w, p=0.3)
    acts = [torch.randn(b, c, hl, wl, dtype=torch.float64) for c, hl, wl in layers]
    value = tap_penalty(acts, mask, norm=norm, compound=True)
    want = tap_loop([a.numpy() for a in acts], mask[:, 0].numpy(), norm=norm, compound=True)
    assert value.dtype == torch.float64 and value.item() == pytest.approx(want, rel=1e-12)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert tap_penalty([a.to(dtype) for a in acts], mask.float(), norm=norm).dtype == torch.float32


def test_soft_masks_only_when_asked():
    acts = [torch.randn(1, 2, 4, 4)]
    soft = torch.full((1, 8, 8), 0.5)
    with pytest.raises(ValueError, match="mask must be binary"):
        tap_penalty(acts, soft)
    assert tap_penalty(acts, soft, soft=True).item() > 0


def test_input_size_refuses_masks_of_another_size():
    """Without input_size a mask only has to be at least each activation's size; with it, exactly the input's."""
    acts = [torch.randn(2, 3, 7, 7, requires_grad=True), torch.randn(2, 4, 3, 3)]
    mask = random_mask(2, 14, 12).float()
    with pytest.raises(ValueError, match=r"mask must be at the input's resolution \(H, W\) = \(14, 14\), got "
                                         r"shape \(2, 1, 14, 12\)"):
        tap_penalty(acts, mask, input_size=(14, 14))
    with pytest.raises(ValueError, match=r"mask must be at the input's resolution \(H, W\) = \(14, 14\)"):
        tap_penalty(acts, mask[:, 0], input_size=torch.Size([14, 14]), backend="torch")
    for bad in [(14,), (14, 0), (14.0, 12), (14, True), "14x12"]:
        with pytest.raises(ValueError, match=r"input_size must be the input's \(H, W\), two positive ints"):
            tap_penalty(acts, mask, input_size=bad)
    value = tap_penalty(acts, mask, input_size=(14, 12))
    assert value > 0 and torch.equal(value, tap_penalty(acts, mask))
    assert tap_penalty(acts, random_mask(2, 30, 9).float()) > 0  # without input_size: the current checks


def test_reference_checks_its_arguments_as_tap_penalty_does():
    """tap_penalty checks once and runs the reference on trusted inputs; the public reference checks itself."""
    from tap_fast.tap import tap_penalty_reference

    mask = random_mask(2, 14, 14).float()
    with pytest.raises(ValueError, match="activations must hold at least one"):
        tap_penalty_reference([], mask)
    with pytest.raises(ValueError, match=r"exceeds the mask size \(14, 14\)"):
        tap_penalty_reference([torch.randn(2, 3, 15, 7)], mask)
    with pytest.raises(ValueError, match="norm must be one of"):
        tap_penalty_reference([torch.randn(2, 3, 7, 7)], mask, norm="l2")
    acts = [torch.randn(2, 3, 7, 7), torch.randn(2, 2, 5, 5)]
    assert torch.equal(tap_penalty_reference(acts, mask, compound=True), tap_penalty(acts, mask, compound=True))
    growing = [torch.randn(2, 3, 5, 5), torch.randn(2, 3, 7, 7)]  # compound chains each D from the previous one
    with pytest.raises(ValueError, match=r"activations\[1\] spatial size \(7, 7\) exceeds activations\[0\]'s "
                                         r"\(5, 5\): compound=True"):
        tap_penalty(growing, mask, compound=True)
    with pytest.raises(ValueError, match=r"sizes must lie in \[1, the previous size \(5, 5\) \(compound=True\)\]"):
        downscale_masks(mask, [(5, 5), (7, 7)], compound=True)
    assert tap_penalty(growing, mask) > 0
