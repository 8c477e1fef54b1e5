"""Fused Triton kernels for TAP (Liger-Kernel split).

- ``kernels.tap_kernels``: the pure ``@triton.jit`` kernels;
- ``kernels.tap_launch``: launch wrappers (block sizes, grids, strides, cached launch plans) on real tensors;
- ``kernels.tap_op``: ``torch.library`` custom ops with fake and autograd registrations (used where
  torch.compile traces), the eager autograd Functions, and the entry points ``fused_tap_penalty``,
  ``fused_downscale_masks``, ``MaskSource`` and ``tap_identity``.

Imports run one way: nothing here imports ``tap_fast``. Importing this package does not import Triton (the
submodules do), so ``tap_fast`` can ask :func:`interpreter_enabled` without defining the kernels.
"""
import os

NORMS = ("l1", "l2sq")


def check_kernel_size(kernel_size: int) -> None:
    """ValueError unless ``kernel_size`` (the max-pool window of eq. 7) is a positive odd int."""
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1/true/on, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")
