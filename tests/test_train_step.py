"""train_step normalises uint8 batches with feeds.normalise (the one place that maps pixels to model inputs)."""
import pytest
import torch

import tap_fast.train_step as train_step_module
from tap_fast.feeds import normalise
from tap_fast.models import build_model, tap_points
from tap_fast.tapped_model import TappedModel

MEAN, STD = 0.2, 0.4


@pytest.mark.parametrize("method", ["none", "tap", "rrr"])
def test_train_step_feeds_the_model_feeds_normalise(method, monkeypatch):
    calls = []

    def spy(images, mean, std):
        calls.append((mean, std))
        return normalise(images, mean, std)

    monkeypatch.setattr(train_step_module, "normalise", spy)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 1, 13, 13), dtype=torch.uint8, generator=g)  # odd size, random pixels
    labels = torch.randint(0, 10, (3,), generator=g)
    masks = (torch.rand(3, 1, 13, 13, generator=g) < 0.3).to(torch.uint8)
    before = images.clone()
    net = build_model("cnn2", 10, input_size=13)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss, task, penalty = train_step_module.train_step(TappedModel(net, tap_points("cnn2")), opt, images, labels,
                                                       masks, method=method, lam=0.5, mean=MEAN, std=STD)
    assert calls == [(MEAN, STD)]
    assert torch.equal(images, before)  # the caller's uint8 batch is untouched by the in-place normalisation
    torch.testing.assert_close(seen[0], (before.float() / 255 - MEAN) / STD, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(loss) and (penalty > 0) == (method != "none")  # rrr: the input gradient still flows


@pytest.mark.parametrize("method,backend", [("tap", "torch"), ("tap", "identity"), ("rrr", "auto")])
def test_train_step_refuses_masks_not_at_the_images_size(method, backend):
    """TAP's mask must be the images' H x W (tap_penalty(input_size=...)), not just at least each tap's."""
    if backend == "identity":
        pytest.importorskip("triton")
        from kernels import interpreter_enabled

        if not interpreter_enabled():
            pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (2,), generator=g)
    masks = (torch.rand(2, 1, 32, 30, generator=g) < 0.3).float()
    net = build_model("cnn2", 10)
    before = [p.detach().clone() for p in net.parameters()]
    model, opt = TappedModel(net, tap_points("cnn2")), torch.optim.SGD(net.parameters(), lr=0.1)
    name = "masks" if backend == "identity" else "mask"
    with pytest.raises(ValueError, match=rf"{name} must be at the input's resolution \(H, W\) = \(28, 28\), got "
                                         r"shape \(2, 1, 32, 30\)"):
        train_step_module.train_step(model, opt, images, labels, masks, method=method, lam=0.5, mean=MEAN, std=STD,
                                     backend=backend)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    _, _, penalty = train_step_module.train_step(model, opt, images, labels, masks[..., :28, :28], method=method,
                                                 lam=0.5, mean=MEAN, std=STD, backend=backend)
    assert penalty > 0


@pytest.mark.parametrize("method", ["none", "rbr"])
def test_class_weights_weight_the_cross_entropy_and_rbr(method):
    """class_weights are F.cross_entropy's weight: the weighted mean, in the task loss and in RBR's (checked
    against explicit computations on the model before the step, on random inputs and unequal weights)."""
    import copy

    import torch.nn.functional as F

    from tap_fast.input_gradients import rbr_penalty

    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (5, 1, 11, 11), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 1, 2, 1])
    masks = (torch.rand(5, 1, 11, 11, generator=g) < 0.3).to(torch.uint8)
    weights = torch.tensor([0.5, 2.0, 1.25] + [1.0] * 7)
    net = build_model("cnn2", 10, input_size=11).eval()  # no dropout: the explicit pass sees the same model
    before = copy.deepcopy(net)
    x = normalise(images, MEAN, STD).requires_grad_(True)
    logits = before(x)
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    task = (weights[labels] * per_sample).sum() / weights[labels].sum()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    _, task_step, penalty = train_step_module.train_step(
        TappedModel(net, tap_points("cnn2")), opt, images, labels, masks, method=method, lam=1.0, mean=MEAN,
        std=STD, class_weights=weights)
    torch.testing.assert_close(task_step, task.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(task, per_sample.mean())  # the weights matter here
    if method == "rbr":
        expected = rbr_penalty(logits, x, masks, labels, before.parameters(), class_weights=weights)
        unweighted = rbr_penalty(logits, x, masks, labels, before.parameters())
        torch.testing.assert_close(penalty, expected.detach(), rtol=1e-4, atol=1e-8)
        assert not torch.allclose(expected, unweighted)


def test_balanced_class_weights_are_inverse_frequencies():
    from tap_fast.config import TrainConfig
    from tap_fast.preparation import class_weights

    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    w = class_weights(TrainConfig(class_weights="balanced", device="cpu"), labels, 4)
    torch.testing.assert_close(w, torch.tensor([6 / 12, 6 / 4, 6 / 8, 0.0]))  # n / (K n_c); absent class: 0
    assert class_weights(TrainConfig(device="cpu"), labels, 4) is None
