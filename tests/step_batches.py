"""Test helper: reproducible uint8 MNIST-shaped training batches with binary masks."""
import torch


def uint8_batches(n, batch, device="cpu", seed=1):
    """``n`` batches of (uint8 images (batch, 1, 28, 28), int64 labels in [0, 10), uint8 masks, ~30% ones)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 256, (batch, 1, 28, 28), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (batch,), generator=g)
        m = (torch.rand(batch, 1, 28, 28, generator=g) > 0.7).to(torch.uint8)
        out.append((x.to(device), y.to(device), m.to(device)))
    return out
