"""Fused Triton kernels for TAP (Liger-Kernel split).

- ``kernels.tap_kernels``: the pure ``@triton.jit`` kernels;
- ``kernels.tap_launch``: launch wrappers (block sizes, grids, strides) on real tensors;
- ``kernels.tap_op``: ``torch.library`` custom ops with fake and autograd registrations, and the public
  entry points ``fused_tap_penalty``, ``fused_pooled_mask``, ``fused_downscale_masks`` and ``tap_identity``.

Importing this package does not import Triton; the submodules do.
"""
