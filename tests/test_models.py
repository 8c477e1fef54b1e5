"""Architectures and their TAP tap points (Appendix B, section 5.2, Appendix H)."""
import re

import pytest
import torch
import torchvision

from tap_fast import TappedModel, build_model, tap_penalty, tap_points

# Documented activation shapes (C, H, W) at the taps for a 224x224 input (28x28 for cnn2).
EXPECTED = {
    "cnn2": [(100, 14, 14), (100, 6, 6)],
    "vgg16": [(64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7)],
    "resnet18": [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
    "densenet121": [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (1024, 7, 7)],
    "efficientnet_b0": [(24, 56, 56), (40, 28, 28), (112, 14, 14), (320, 7, 7)],
    "mobilenet_v2": [(24, 56, 56), (32, 28, 28), (96, 14, 14), (320, 7, 7)],
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_presets_give_documented_shapes(arch):
    size = 28 if arch == "cnn2" else 224
    model = TappedModel(build_model(arch, num_classes=3, in_channels=1), tap_points(arch)).eval()
    with torch.no_grad():
        logits, acts = model(torch.randn(1, 1, size, size))
    assert logits.shape == (1, 3)
    assert [tuple(a.shape[1:]) for a in acts] == EXPECTED[arch]


def test_tap_gradient_reaches_first_layer_three_channels():
    model = TappedModel(build_model("resnet18", num_classes=5, in_channels=3), tap_points("resnet18"))
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, :16, :16] = 1
    logits, acts = model(x)
    assert logits.shape == (2, 5)
    tap_penalty(acts, mask).backward()
    assert model.model.conv1.weight.grad.abs().sum() > 0


def test_imagenet_weights_offline_error_is_immediate(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not available offline"):
        build_model("resnet18", num_classes=2, weights="imagenet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("resnet18", num_classes=2, weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="weights must be None for arch 'cnn2'"):
        build_model("cnn2", num_classes=2, weights="imagenet")


def test_local_weights_are_loaded_and_summed_for_greyscale(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", num_classes=2, in_channels=1, weights=path)
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.layer3[0].conv2.weight, reference.layer3[0].conv2.weight)
    assert model.fc.out_features == 2


def test_densenet_checkpoints_with_old_key_names_load(tmp_path):
    reference = torchvision.models.densenet121()
    # as in torchvision's file: old key names, and no num_batches_tracked (it predates them)
    old_style = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
                 for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_style
    torch.save(old_style, tmp_path / "densenet121.pth")
    model = build_model("densenet121", num_classes=2, in_channels=3, weights=tmp_path / "densenet121.pth")
    torch.testing.assert_close(model.features.denseblock2.denselayer3.conv2.weight,
                               reference.features.denseblock2.denselayer3.conv2.weight)


def test_unknown_arch_and_tap_name():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("alexnet", num_classes=2)
    with pytest.raises(ValueError, match="arch must be one of"):
        tap_points("resnet50")
    with pytest.raises(ValueError, match=r"tap_names \['layer9'\] are not modules"):
        TappedModel(build_model("resnet18", num_classes=2), ["layer1", "layer9"])
    with pytest.raises(ValueError, match="tap_names must be a non-empty list"):
        TappedModel(build_model("cnn2", num_classes=2), [])
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        build_model("cnn2", num_classes=2, in_channels=2)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        build_model("cnn2", num_classes=1)


def test_tapped_model_works_on_any_cnn():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2))
    logits, acts = TappedModel(net, ["0", "1"])(torch.randn(3, 1, 9, 9))
    assert logits.shape == (3, 2) and [a.shape for a in acts] == [(3, 4, 7, 7)] * 2
