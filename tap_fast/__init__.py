"""tap_fast: fast Targeted Activation Penalty (TAP) training (Zhang, Williams, Toni, AAAI 2024).

The public names below are imported from their modules on first use (PEP 562), so that importing the package
(as ``tap-fast --help`` does) does not import torch.
"""
import importlib

# Public name -> the module of tap_fast that defines it.
_EXPORTS = {
    "make_step": "compiled_step", "contaminate": "contamination", "load_dataset": "datasets",
    "input_gradient": "input_gradients", "rbr_penalty": "input_gradients", "rrr_penalty": "input_gradients",
    "check_mask_values": "masks", "downscale_mask": "masks", "downscale_masks": "masks", "ARCHS": "models",
    "TwoLayerCNN": "models", "build_model": "models", "tap_points": "models", "tap_penalty": "tap",
    "tap_penalty_reference": "tap", "TappedModel": "tapped_model",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tap_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tap_fast.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
