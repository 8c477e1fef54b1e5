"""The paper's CNNs with their TAP tap points (Appendix B, section 5.2, Appendix H)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from tap_fast.choices import ARCH_NAMES
from tap_fast.datasets import read_saved


class TwoLayerCNN(nn.Module):
    """Appendix B / released code: conv(100,3,p1)-ReLU-MaxPool2 [tap] -> conv(100,3,p0)-ReLU-MaxPool2 [tap]
    -> Linear. At 28x28 the taps are 100x14x14 and 100x6x6 and the head is Linear(3600, K)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        if input_size < 8:
            raise ValueError(f"input_size must be at least 8 for TwoLayerCNN, got {input_size}")
        self.conv1 = nn.Conv2d(in_channels, 100, 3, stride=1, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(100, 100, 3, stride=1, padding=0)
        self.pool2 = nn.MaxPool2d(2)
        side = (input_size // 2 - 2) // 2
        self.fc = nn.Linear(100 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


@dataclass(frozen=True)
class Arch:
    """A supported architecture: its builder, its TAP tap points and its first conv / head names."""
    build: object
    taps: tuple[str, ...]
    first_conv: str
    head: str
    weights_enum: str | None = None


# Tap points: the paper's choices; for EfficientNet-B0 and MobileNet-v2 (Appendix H, "4 evenly spaced
# stages") the last stage at each of the strides 4, 8, 16, 32, mirroring ResNet-18's four stages.
# In the order of ARCH_NAMES: cnn2, vgg16, resnet18, densenet121, efficientnet_b0, mobilenet_v2.
ARCHS: dict[str, Arch] = dict(zip(ARCH_NAMES, (
    Arch(TwoLayerCNN, ("pool1", "pool2"), "conv1", "fc"),
    Arch(torchvision.models.vgg16, ("features.4", "features.9", "features.16", "features.23", "features.30"),
         "features.0", "classifier.6", "VGG16_Weights"),
    Arch(torchvision.models.resnet18, ("layer1", "layer2", "layer3", "layer4"), "conv1", "fc", "ResNet18_Weights"),
    Arch(torchvision.models.densenet121, ("features.denseblock1", "features.denseblock2", "features.denseblock3",
                                          "features.denseblock4"), "features.conv0", "classifier",
         "DenseNet121_Weights"),
    Arch(torchvision.models.efficientnet_b0, ("features.2", "features.3", "features.5", "features.7"),
         "features.0.0", "classifier.1", "EfficientNet_B0_Weights"),
    Arch(torchvision.models.mobilenet_v2, ("features.3", "features.6", "features.13", "features.17"),
         "features.0.0", "classifier.1", "MobileNet_V2_Weights"),
), strict=True))


def tap_points(arch: str) -> tuple[str, ...]:
    """Module names whose outputs TAP targets for ``arch``."""
    return _arch(arch).taps


def _arch(arch: str) -> Arch:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    return ARCHS[arch]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _imagenet_state_dict(arch: str, weights: str | os.PathLike) -> dict:
    """Load ImageNet weights from a local file or torch's hub cache; never downloads. A file that cannot be
    read as a state dict is a ValueError naming it."""
    if str(weights) != "imagenet":
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        remedy = "pass weights=PATH to a state dict saved with torch.save"
    else:
        spec = _arch(arch)
        if spec.weights_enum is None:
            raise ValueError(f"weights='imagenet' is not available for arch {arch!r} (trained from scratch)")
        url = getattr(torchvision.models, spec.weights_enum).DEFAULT.url
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if not path.is_file():
            raise FileNotFoundError(f"ImageNet weights for {arch} are not available offline: expected {path}. "
                                    f"Download {url} there, or pass weights=PATH to a local state dict")
        remedy = f"delete it and download {url} there again"
    try:
        return read_saved(path)
    except ValueError as e:
        raise ValueError(f"weights unreadable: {e}; {remedy}") from e


# torchvision's DenseNet checkpoints use the old key names "denselayer1.norm.1.weight"; its own loader renames
# them to "denselayer1.norm1.weight" (torchvision.models.densenet._load_state_dict). So do we.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _rename_old_densenet_keys(state_dict: dict) -> dict:
    renamed = {}
    for key, value in state_dict.items():
        match = _OLD_DENSENET_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def build_model(arch: str, num_classes: int, in_channels: int = 1, weights: str | os.PathLike | None = None,
                input_size: int = 28) -> nn.Module:
    """A model of ``arch`` for ``num_classes`` and 1 or 3 input channels.

    ``weights``: None (random init), "imagenet" (from torch's hub cache, offline only) or a path to a
    state dict of the torchvision model. With one input channel, pretrained first-conv filters are summed
    over RGB. ``input_size`` is used by "cnn2" only.
    """
    spec = _arch(arch)
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if arch == "cnn2":
        if weights is not None:
            raise ValueError("weights must be None for arch 'cnn2' (the paper trains it from scratch)")
        return TwoLayerCNN(in_channels, num_classes, input_size)
    model = spec.build()
    if weights is not None:
        state_dict = _imagenet_state_dict(arch, weights)
        try:
            model.load_state_dict(_rename_old_densenet_keys(state_dict) if arch == "densenet121" else state_dict)
        except RuntimeError as e:  # missing / unexpected keys, mismatched shapes: a long multi-line message
            detail = " ".join(str(e).split())
            raise ValueError(f"weights {weights} do not fit arch {arch!r} ({detail[:150]}...); pass weights=PATH to "
                             f"a state dict of torchvision's {arch}") from e
    if in_channels == 1:
        old = model.get_submodule(spec.first_conv)
        new = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
        with torch.no_grad():
            new.weight.copy_(old.weight.sum(1, keepdim=True))
            if old.bias is not None:
                new.bias.copy_(old.bias)
        _set_module(model, spec.first_conv, new)
    head = model.get_submodule(spec.head)
    _set_module(model, spec.head, nn.Linear(head.in_features, num_classes))
    return model
