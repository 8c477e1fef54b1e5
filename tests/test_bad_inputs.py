"""Bad input to the TAP API raises ValueError/TypeError naming the argument."""
import sys

import pytest
import torch

from tap_fast import downscale_mask, tap_penalty

ACTS = [torch.randn(2, 3, 7, 7)]
MASK = torch.zeros(2, 1, 14, 14)


@pytest.mark.parametrize("acts, mask, kwargs, error, match", [
    ([], MASK, {}, ValueError, "activations must hold at least one"),
    (ACTS[0], MASK, {}, TypeError, "activations must be a list or tuple"),
    ([torch.randn(2, 3, 7)], MASK, {}, ValueError, r"activations\[0\] must be a \(B, C_l, H_l, W_l\)"),
    ([torch.randint(0, 3, (2, 3, 7, 7))], MASK, {}, TypeError, r"activations\[0\] must be floating"),
    (ACTS, torch.zeros(3, 1, 14, 14), {}, ValueError, "mask batch size 3 does not match activations"),
    (ACTS, torch.zeros(2, 1, 5, 5), {}, ValueError, "exceeds the mask size"),
    (ACTS, torch.zeros(2, 2, 14, 14), {}, ValueError, r"mask must have shape \(B, H, W\) or \(B, 1, H, W\)"),
    (ACTS, MASK.numpy(), {}, TypeError, "mask must be a torch.Tensor"),
    (ACTS, torch.full((2, 1, 14, 14), float("nan")), {}, ValueError, "mask contains NaN"),
    (ACTS, torch.full((2, 1, 14, 14), 2.0), {}, ValueError, "mask must be binary"),
    (ACTS, torch.full((2, 1, 14, 14), 1.5), {"soft": True}, ValueError, r"mask must lie in \[0, 1\]"),
    (ACTS, MASK, {"norm": "l2"}, ValueError, "norm must be one of"),
    (ACTS, MASK, {"backend": "cuda"}, ValueError, "backend must be one of"),
    (ACTS, MASK, {"kernel_size": 2}, ValueError, "kernel_size must be a positive odd int"),
])
def test_tap_penalty_rejects(acts, mask, kwargs, error, match):
    with pytest.raises(error, match=match):
        tap_penalty(acts, mask, **kwargs)


def test_an_accepted_signature_does_not_let_a_bad_call_through():
    """tap_penalty checks its inputs once per signature (argument types, shapes, dtypes, devices, options): a
    call that passed before passes again with the same result; a call differing in any checked part, even
    only by an option's type, is checked again and refused."""
    acts, mask = [torch.randn(2, 3, 7, 7)], torch.randint(0, 2, (2, 1, 14, 14)).float()
    first = tap_penalty(acts, mask, backend="torch")
    assert torch.equal(tap_penalty(acts, mask, backend="torch"), first)
    for kwargs, error, match in (({"kernel_size": 3.0}, ValueError, "kernel_size must be a positive odd int"),
                                 ({"norm": "l2"}, ValueError, "norm must be one of"),
                                 ({"input_size": (14, 15)}, ValueError, "mask must be at the input's resolution")):
        with pytest.raises(error, match=match):
            tap_penalty(acts, mask, backend="torch", **kwargs)
    with pytest.raises(ValueError, match="mask batch size 3 does not match"):
        tap_penalty(acts, torch.zeros(3, 1, 14, 14), backend="torch")
    with pytest.raises(ValueError, match=r"exceeds the mask size"):
        tap_penalty([torch.randn(2, 3, 15, 15)], mask, backend="torch")
    with pytest.raises(TypeError, match=r"activations\[0\] must be floating"):
        tap_penalty([acts[0].to(torch.int64)], mask, backend="torch")


def test_downscale_rejects_bad_size():
    with pytest.raises(ValueError, match="size must lie in"):
        downscale_mask(MASK, (15, 7))
    with pytest.raises(ValueError, match="size must lie in"):
        downscale_mask(MASK, (0, 7))


def test_triton_backend_without_triton_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now fails, as when it is absent
    assert tap_penalty(ACTS, torch.ones(2, 1, 14, 14)).item() > 0  # "auto" takes the reference
    with pytest.raises(ValueError, match="backend='triton' needs the triton package"):
        tap_penalty(ACTS, MASK, backend="triton")
