"""Loop-based NumPy implementations of eq. 6-8, independent of the code under test."""
import math

import numpy as np


def downscale_loop(mask: np.ndarray, size, k: int = 3) -> np.ndarray:
    """mask (B, H, W) -> (B, H_l, W_l): max over the k x k window (clipped at borders), then the mean over
    adaptive bins [floor(i H / H_l), ceil((i + 1) H / H_l))."""
    b, h, w = mask.shape
    hl, wl = size
    r = k // 2
    mp = np.empty_like(mask, dtype=np.float64)
    for i in range(h):
        for j in range(w):
            mp[:, i, j] = mask[:, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].max(axis=(1, 2))
    out = np.empty((b, hl, wl))
    for i in range(hl):
        h0, h1 = (i * h) // hl, math.ceil((i + 1) * h / hl)
        for j in range(wl):
            w0, w1 = (j * w) // wl, math.ceil((j + 1) * w / wl)
            out[:, i, j] = mp[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return out


def tap_loop(acts, mask: np.ndarray, k: int = 3, norm: str = "l1", compound: bool = False) -> float:
    """Eq. 8 with explicit loops over samples, layers and pixels; batch mean."""
    b = mask.shape[0]
    total = 0.0
    prev = mask
    for z in acts:
        d = downscale_loop(prev if compound else mask, z.shape[-2:], k)
        prev = d
        for s in range(b):
            for i in range(z.shape[2]):
                for j in range(z.shape[3]):
                    a = np.maximum(z[s, :, i, j], 0).sum()
                    v = d[s, i, j] * a
                    total += v if norm == "l1" else v * v
    return total / (b * len(acts))
