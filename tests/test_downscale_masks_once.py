"""downscale_masks pools the mask once for all layers (compound=False): bit-identical to one
downscale_mask per layer, for binary, soft and bf16 masks, awkward sizes and every kernel size."""
import pytest
import torch

from tap_fast.masks import downscale_mask, downscale_masks


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("kind", ["uint8", "soft", "bf16"])
def test_once_equals_per_layer(kernel_size, kind):
    raw = torch.rand(3, 1, 23, 17)
    mask = {"uint8": (raw > 0.8).to(torch.uint8), "soft": raw, "bf16": raw.to(torch.bfloat16)}[kind]
    sizes = [(23, 17), (11, 8), (5, 3), (1, 1)]
    got = downscale_masks(mask, sizes, kernel_size)
    for d, size in zip(got, sizes):
        want = downscale_mask(mask, size, kernel_size)
        assert d.dtype == want.dtype and torch.equal(d, want)


def test_once_checks_kernel_size():
    with pytest.raises(ValueError, match="kernel_size"):
        downscale_masks(torch.zeros(1, 1, 8, 8), [(4, 4)], kernel_size=2)
