"""tap_fast: fast Targeted Activation Penalty (TAP) training (Zhang, Williams, Toni, AAAI 2024)."""
from tap_fast.compiled_step import make_step
from tap_fast.contamination import contaminate
from tap_fast.datasets import load_dataset
from tap_fast.input_gradients import input_gradient, rbr_penalty, rrr_penalty
from tap_fast.masks import check_mask_values, downscale_mask, downscale_masks
from tap_fast.models import ARCHS, TwoLayerCNN, build_model, tap_points
from tap_fast.tap import tap_penalty, tap_penalty_reference
from tap_fast.taps import TappedModel

__all__ = [
    "ARCHS", "TappedModel", "TwoLayerCNN", "build_model", "check_mask_values", "contaminate", "downscale_mask",
    "downscale_masks", "input_gradient", "load_dataset", "make_step", "rbr_penalty", "rrr_penalty", "tap_penalty",
    "tap_penalty_reference", "tap_points",
]
__version__ = "0.1.0"
