"""train_step normalises uint8 batches with feeds.normalise (the one place that maps pixels to model inputs)."""
import pytest
import torch

import tap_fast.train_step as train_step_module
from tap_fast.feeds import normalise
from tap_fast.models import build_model, tap_points
from tap_fast.taps import TappedModel

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
