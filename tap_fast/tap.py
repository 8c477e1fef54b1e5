"""The Targeted Activation Penalty (eq. 6-8) with a plain-PyTorch reference and backend dispatch."""
from __future__ import annotations

from collections.abc import Sequence

import torch

# kernels/__init__ imports neither triton nor tap_fast: the one definition of NORMS, shared with kernels/
from kernels import NORMS
from tap_fast.choices import TAP_BACKENDS as BACKENDS
from tap_fast.masks import as_mask_batch, check_kernel_size, check_mask_values, downscale_trusted


def check_tap_inputs(activations: Sequence[torch.Tensor], mask: torch.Tensor, norm: str, kernel_size: int,
                     compound: bool, input_size: Sequence[int] | None = None) -> torch.Tensor:
    """Validate the arguments of :func:`tap_penalty` (all but the mask's values); return the mask as
    (B, 1, H, W)."""
    if isinstance(activations, torch.Tensor) or not isinstance(activations, (list, tuple)):
        raise TypeError("activations must be a list or tuple of (B, C_l, H_l, W_l) tensors, got "
                        f"{type(activations).__name__}")
    if len(activations) == 0:
        raise ValueError("activations must hold at least one (B, C_l, H_l, W_l) tensor, got an empty list")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    check_kernel_size(kernel_size)
    if input_size is not None and not (
            isinstance(input_size, (tuple, list)) and len(input_size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_size)):
        raise ValueError(f"input_size must be the input's (H, W), two positive ints, got {input_size!r}")
    mask = as_mask_batch(mask, size=input_size)
    batch, _, mask_h, mask_w = mask.shape
    device, prev = mask.device, None
    for i, a in enumerate(activations):
        shape = a.shape if isinstance(a, torch.Tensor) else None
        if shape is None or len(shape) != 4:
            raise ValueError(f"activations[{i}] must be a (B, C_l, H_l, W_l) tensor, got "
                             f"{tuple(shape) if shape is not None else type(a).__name__}")
        if not a.is_floating_point():
            raise TypeError(f"activations[{i}] must be floating point, got {a.dtype}")
        if shape[0] != batch:
            raise ValueError(f"mask batch size {batch} does not match activations[{i}] batch size {shape[0]}")
        h, w = shape[2], shape[3]
        if h > mask_h or w > mask_w:
            raise ValueError(f"activations[{i}] spatial size {(h, w)} exceeds the mask size {(mask_h, mask_w)}: "
                             "mask must be at input resolution")
        if compound and prev is not None and (h > prev[0] or w > prev[1]):
            raise ValueError(f"activations[{i}] spatial size {(h, w)} exceeds activations[{i - 1}]'s "
                             f"{prev}: compound=True downscales each layer's mask from the previous layer's")
        if a.device != device:
            raise ValueError(f"mask is on {device} but activations[{i}] is on {a.device}")
        prev = (h, w)
    return mask


_ACCEPTED: dict = {}  # signatures of the calls check_tap_inputs accepted (see _check_tap_inputs_cached)
_MAX_ACCEPTED = 4096
_FUSED = None  # (kernels.tap_launch, kernels.tap_op), imported on first use (they import triton)


def _check_tap_inputs_cached(activations, mask, norm, kernel_size, compound, input_size):
    """:func:`check_tap_inputs`, run once per signature: the types of the arguments, each tensor's shape,
    dtype and device, and the options (with their types, so that 3.0 is not taken for 3). Everything it
    checks is a function of these, so a call with a signature it accepted before passes unchecked; any other
    is checked in full (and raises as it does). Returns the mask as (B, 1, H, W)."""
    if torch.compiler.is_compiling():  # traced once per graph anyway; keys of symbolic shapes do not hash
        return check_tap_inputs(activations, mask, norm, kernel_size, compound, input_size)
    try:
        key = (type(activations), type(mask), mask.shape, mask.device, norm, type(kernel_size), kernel_size,
               compound, None if input_size is None else (type(input_size), *[(type(s), s) for s in input_size]),
               *[(type(a), a.shape, a.dtype, a.device) for a in activations])
        accepted = key in _ACCEPTED
    except (AttributeError, TypeError):  # not tensors, unhashable or odd options: the full check says why
        return check_tap_inputs(activations, mask, norm, kernel_size, compound, input_size)
    if not accepted:
        mask = check_tap_inputs(activations, mask, norm, kernel_size, compound, input_size)
        if len(_ACCEPTED) < _MAX_ACCEPTED:
            _ACCEPTED[key] = True
        return mask
    return mask if mask.dim() == 4 else mask.unsqueeze(1)


def _fused():
    """The modules kernels.tap_launch and kernels.tap_op (their functions are looked up at each call, so that
    a patched one is the one called)."""
    global _FUSED
    if _FUSED is None:
        import kernels.tap_launch
        import kernels.tap_op
        _FUSED = kernels.tap_launch, kernels.tap_op
    return _FUSED


def tap_penalty_reference(activations: Sequence[torch.Tensor], mask: torch.Tensor, *, kernel_size: int = 3,
                          norm: str = "l1", compound: bool = False) -> torch.Tensor:
    """Plain-PyTorch eq. 8, batch mean: mean_b (1/L) sum_l sum_hw f(D(M,l) * A^l), A^l = sum_c relu(Z^l_c).

    f is |.| for norm="l1" (the paper) and (.)^2 for "l2sq" (the released code). Accumulates in fp32 (fp16 /
    bf16 / fp32 activations: an fp32 result, which the training step adds to its fp32 loss) or in fp64 for
    float64 activations (a float64 result).
    relu(Z) is written where(Z <= 0, 0, Z), with the same values and gradient: when Z is a ReLU's output,
    Z <= 0 is the mask that ReLU's own backward uses, so under torch.compile the two share one saved mask
    and TAP's gradient fuses into that backward (measured in benchmarks/inductor_fusion.py). Checks shapes
    as :func:`tap_penalty` does, not the mask's values.
    """
    mask = check_tap_inputs(activations, mask, norm, kernel_size, compound)
    return _reference(activations, mask, kernel_size, norm, compound)


def _reference(activations: Sequence[torch.Tensor], mask: torch.Tensor, kernel_size: int, norm: str,
               compound: bool) -> torch.Tensor:
    """:func:`tap_penalty_reference` of checked inputs (``mask`` (B, 1, H, W))."""
    total = None
    for z, d in zip(activations, downscale_trusted(mask, [a.shape[-2:] for a in activations], kernel_size, compound)):
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        a_map = torch.where(z <= 0, 0, z).sum(1, dtype=acc)  # eq. 6
        x = d.to(acc) * a_map
        per_sample = (x if norm == "l1" else x.square()).sum((1, 2))
        total = per_sample.mean() if total is None else total + per_sample.mean()
    return total / len(activations)


def tap_penalty(activations: Sequence[torch.Tensor], mask: torch.Tensor, *, kernel_size: int = 3,
                norm: str = "l1", compound: bool = False, soft: bool = False, validate: bool = True,
                backend: str = "auto", input_size: Sequence[int] | None = None) -> torch.Tensor:
    """TAP, eq. 8: the batch mean over samples of (1/L) sum_l || D(M,l) * sum_c relu(Z^l_c) ||.

    Args:
        activations: list of (B, C_l, H_l, W_l) outputs of the targeted layers (pre- or post-ReLU).
        mask: (B, 1, H, W) or (B, H, W) at input resolution, 1 = spurious pixel.
        kernel_size: max-pool window of D (eq. 7).
        norm: "l1" (eq. 8) or "l2sq" (squared Frobenius norm, the authors' released code).
        compound: downscale each layer's mask from the previous layer's (released code).
        soft: accept soft masks in [0, 1] instead of binary ones.
        validate: check mask values (NaN, binary) on the host; turn off inside compiled or captured steps
            after validating the data once.
        backend: "torch" (reference), "triton" (fused kernel, CUDA or TRITON_INTERPRET=1), or "auto"
            (Triton on CUDA tensors when available, else the reference).
        input_size: the model input's (H, W): the mask must have exactly that size (``TappedModel`` and the
            training step pass it); None only asks that it be at least each activation's.
    Returns:
        a scalar tensor: float64 for float64 activations (the reference), else fp32 (fp16 / bf16 activations
        accumulate in fp32, as the training step needs).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    mask = _check_tap_inputs_cached(activations, mask, norm, kernel_size, compound, input_size)
    if validate:
        check_mask_values(mask, soft=soft)
    if backend == "auto":
        backend = "triton" if mask.is_cuda and triton_available() else "torch"
    if backend == "torch":
        return _reference(activations, mask, kernel_size, norm, compound)
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not installed; "
                         "use backend='torch' or 'auto'")
    launch, op = _fused()
    launch.check_launchable(mask, "activations")
    return op.fused_tap_penalty(list(activations), mask, kernel_size=kernel_size, norm=norm, compound=compound)


def triton_available() -> bool:
    """Whether the triton package imports (the fused kernels are optional)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
