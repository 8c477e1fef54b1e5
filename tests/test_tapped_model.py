"""TappedModel's life cycle and its taps: close() / a with block leave the user's model without any hook of
ours; a module that runs twice per forward is refused unless repeated_calls="all" (then every call is an
activation, in call order); a tap that never runs is a ValueError naming it. forward_tap runs the fused
kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest)."""
import copy

import pytest
import torch
import torch.nn as nn

from tap_fast.tap import tap_penalty
from tap_fast.tapped_model import TappedModel

try:
    from kernels.tap_launch import interpreter_enabled

    INTERPRET = interpreter_enabled()
except ImportError:
    INTERPRET = False
ON_CPU = pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs triton and TRITON_INTERPRET=1")
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


class Shared(nn.Module):
    """stem -> block -> relu -> block (the same module twice) -> head; ``unused`` never runs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.block = nn.Conv2d(3, 3, 3, padding=1)
        self.unused = nn.Conv2d(3, 3, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))

    def forward(self, x):
        return self.head(self.block(torch.relu(self.block(self.stem(x)))))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))


def _hooks(model):
    """Every hook dict of every module, as {module name: {dict name: hook ids}}."""
    return {name: {d: list(getattr(m, d)) for d in HOOK_DICTS} for name, m in model.named_modules()}


def _data(b=3, hw=(11, 9)):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, 1, *hw, generator=g), (torch.rand(b, 1, *hw, generator=g) < 0.4).float()


def test_close_removes_every_hook_and_keeps_the_users():
    net = _net()
    seen = []
    net[2].register_forward_hook(lambda m, a, out: seen.append(out.shape))  # the user's own hook stays
    before = _hooks(net)
    x, _ = _data()
    plain = net(x)
    tapped = TappedModel(net, ["0", "2"])
    assert _hooks(net) != before
    logits, acts = tapped(x)
    assert torch.equal(logits, plain) and [a.shape for a in acts] == [(3, 4, 11, 9), (3, 5, 5, 4)]
    tapped.close()
    assert _hooks(net) == before
    tapped.close()  # closing twice does nothing
    assert _hooks(net) == before
    seen.clear()
    assert torch.equal(net(x), plain) and seen == [(3, 5, 5, 4)]
    with pytest.raises(RuntimeError, match="TappedModel is closed"):
        tapped(x)
    with pytest.raises(RuntimeError, match="TappedModel is closed"):
        tapped(x, torch.zeros(3, 1, 11, 9))


def test_with_block_closes_on_exit_also_after_an_error():
    net = _net()
    before = _hooks(net)
    x, _ = _data()
    with TappedModel(net, ["2"]) as tapped:
        logits, (z,) = tapped(x)
        assert z.shape == (3, 5, 5, 4) and _hooks(net) != before
    assert _hooks(net) == before
    with pytest.raises(RuntimeError, match="TappedModel is closed"):
        tapped(x)
    with pytest.raises(KeyError, match="raised inside"):
        with TappedModel(net, ["0", "2"]):
            raise KeyError("raised inside")
    assert _hooks(net) == before


def test_closing_a_deep_copy_leaves_the_original_tapped():
    tapped = TappedModel(_net(), ["0"])
    twin = copy.deepcopy(tapped)
    twin.close()
    assert not twin.model[0]._forward_hooks and len(tapped.model[0]._forward_hooks) == 1
    x, _ = _data()
    logits, (z,) = tapped(x)
    torch.testing.assert_close(z, tapped.model[0](x))


def test_hooks_record_only_inside_their_wrappers_forward():
    """Calling the model itself, or through a second TappedModel on it, leaves the first one's taps alone."""
    net = _net()
    first, second = TappedModel(net, ["0"]), TappedModel(net, ["0", "2"])
    x, _ = _data()
    net(x)
    _, acts_second = second(x)
    logits, (z,) = first(x)
    assert torch.equal(z, acts_second[0]) and torch.equal(logits, net(x))
    assert not first._taps.outputs and not second._taps.outputs


def test_a_module_that_runs_twice_is_refused_unless_all_calls_are_asked_for():
    net = Shared()
    x, mask = _data()
    with pytest.raises(ValueError, match=r"tap 'block' runs more than once in one forward.*repeated_calls='all'"):
        TappedModel(net, ["stem", "block"])(x)
    with pytest.raises(ValueError, match="repeated_calls must be one of"):
        TappedModel(net, ["block"], repeated_calls="first")
    with pytest.raises(ValueError, match="tap_names must not repeat a name"):
        TappedModel(net, ["block", "stem", "block"])
    tapped = TappedModel(net, ["block", "stem"], repeated_calls="all")
    logits, acts = tapped(x)
    s = net.stem(x)
    z1 = net.block(s)
    z2 = net.block(torch.relu(z1))
    assert len(acts) == 3 and not torch.allclose(z1, z2)
    for got, want in zip(acts, (z1, z2, s)):  # taps in tap_names order, each tap's calls in call order
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(logits, net(x))
    # each call is a layer of eq. 8 and trains the shared block: its gradient is the mean of the calls' own
    def grad(zs):
        return torch.autograd.grad(tap_penalty(zs, mask, input_size=(11, 9)), net.block.weight, retain_graph=True)[0]

    g1, g2 = grad(acts[:1]), grad(acts[1:2])
    assert g2.abs().sum() > 0 and not torch.allclose(g1, g2)
    torch.testing.assert_close(grad(acts[:2]), (g1 + g2) / 2)


@ON_CPU
@pytest.mark.parametrize("identity", [True, False])
def test_forward_tap_refuses_or_taps_every_call(identity):
    net = Shared()
    x, mask = _data()
    refused = TappedModel(net, ["block"])
    with pytest.raises(ValueError, match="tap 'block' runs more than once"):
        refused.forward_tap(x, mask, identity=identity)
    assert refused._taps.source is None and not refused._taps.penalties and not refused._taps.versions
    tapped = TappedModel(net, ["stem", "block"], repeated_calls="all")
    logits_ref, acts = tapped(x)
    logits, penalty = tapped.forward_tap(x, mask, identity=identity)
    assert torch.equal(logits, logits_ref)
    torch.testing.assert_close(penalty, tap_penalty(acts, mask), rtol=1e-5, atol=1e-6)
    assert penalty > 0 and not torch.allclose(penalty, tap_penalty(acts[:2], mask))


def test_a_tap_that_never_runs_is_named():
    net = Shared()
    x, mask = _data()
    tapped = TappedModel(net, ["stem", "unused", "head.0"])
    with pytest.raises(ValueError, match=r"tap_names \['unused'\] did not run in the forward of Shared "
                                         r"\(the taps that ran: \['stem', 'head.0'\]\)"):
        tapped(x)
    with pytest.raises(ValueError, match=r"must output a \(B, C, H, W\) tensor"):  # head.1 is Flatten
        TappedModel(net, ["head.1"])(x)
    assert not tapped._taps.outputs
    if INTERPRET:
        with pytest.raises(ValueError, match=r"tap_names \['unused'\] did not run"):
            TappedModel(net, ["unused", "stem"]).forward_tap(x, mask)
    logits, (z,) = TappedModel(net, ["stem"])(x)  # the model itself still works
    torch.testing.assert_close(z, net.stem(x))


@ON_CPU
def test_forward_tap_refuses_masks_not_at_the_input_size():
    tapped = TappedModel(_net(), ["0", "2"])
    x, mask = _data()
    larger = torch.nn.functional.pad(mask, (0, 2, 0, 2))
    with pytest.raises(ValueError, match=r"masks must be at the input's resolution \(H, W\) = \(11, 9\)"):
        tapped(x, larger)
    with pytest.raises(ValueError, match=r"masks must have the input's batch size 3"):
        tapped.forward_tap(x, mask[:2])
    logits, penalty = tapped(x, mask)
    torch.testing.assert_close(penalty, tap_penalty(tapped(x)[1], mask, input_size=(11, 9)), rtol=1e-5,
                               atol=1e-6)
