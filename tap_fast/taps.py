"""Tap points: collect the outputs Z^l of named modules with forward hooks, for any CNN."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


class TappedModel(nn.Module):
    """Wraps ``model`` so that ``forward(x)`` returns ``(logits, [Z^l for each tap name])``.

    The activations are the named modules' outputs, in the order of ``tap_names``; they stay in the
    autograd graph, so a penalty on them trains the model. Works for any nn.Module.
    """

    def __init__(self, model: nn.Module, tap_names: Sequence[str]):
        super().__init__()
        if isinstance(tap_names, str) or len(tap_names) == 0:
            raise ValueError(f"tap_names must be a non-empty list of module names, got {tap_names!r}")
        modules = dict(model.named_modules())
        missing = [n for n in tap_names if n not in modules or n == ""]
        if missing:
            known = [n for n in modules if n][:12]
            raise ValueError(f"tap_names {missing} are not modules of {type(model).__name__}; "
                             f"known names include {known}")
        self.model = model
        self.tap_names = tuple(tap_names)
        self._outputs: dict[str, torch.Tensor] = {}
        for name in self.tap_names:
            modules[name].register_forward_hook(_TapHook(name, self._outputs))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._outputs.clear()
        logits = self.model(x)
        acts = [self._outputs[n] for n in self.tap_names]
        self._outputs.clear()
        return logits, acts


class _TapHook:
    """Forward hook storing a module's output in ``store[name]``. An object, not a closure, so that
    copy.deepcopy of a TappedModel gives hooks that fill the copy's store, not the original's."""

    def __init__(self, name: str, store: dict[str, torch.Tensor]):
        self.name, self.store = name, store

    def __call__(self, module: nn.Module, args, output) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ValueError(f"tap {self.name!r} must output a (B, C, H, W) tensor, got "
                             f"{getattr(output, 'shape', type(output).__name__)}")
        self.store[self.name] = output
