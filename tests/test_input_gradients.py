"""RRR and RBR (eq. 4 and the RBR baseline) against torch.func computations of the same quantities."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from tap_fast import input_gradient, rbr_penalty, rrr_penalty


def small_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 7 * 5, 3)).double()


def data(b=3):
    x = torch.randn(b, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(b, 1, 7, 5) < 0.4).double()
    y = torch.randint(0, 3, (b,))
    return x, mask, y


def func_input_gradients(model, x):
    params = dict(model.named_parameters())

    def summed_log_prob(xi):
        return F.log_softmax(functional_call(model, params, (xi[None],)), dim=1).sum()

    return vmap(grad(summed_log_prob))(x.detach())


@pytest.mark.parametrize("channel_reduction", ["sum", "none"])
@pytest.mark.parametrize("normalize_mask", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rrr_matches_torch_func(normalize_mask, reduction, channel_reduction):
    """sum: sum_hw (M * sum_c grad_c)^2 (the released code); none: sum_chw (M * grad_c)^2 (Ross et al.)."""
    model = small_net()
    x, mask, _ = data()
    value = rrr_penalty(model(x), x, mask, normalize_mask=normalize_mask, reduction=reduction,
                        channel_reduction=channel_reduction)
    g = func_input_gradients(model, x)
    if channel_reduction == "sum":
        g = g.sum(1, keepdim=True)
    m = mask * (35 / mask.sum((1, 2, 3), keepdim=True)) if normalize_mask else mask
    per_sample = (m * g).square().sum((1, 2, 3))
    want = per_sample.mean() if reduction == "mean" else per_sample.sum()
    torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-12)


def test_rrr_sums_rgb_channels_before_squaring_by_default():
    """For C = 3 the released code squares the channel sum of the input gradient: the default; C = 1 is the
    same either way."""
    torch.manual_seed(2)
    rgb = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(4, 1, 6, 6) < 0.5).double()
    g = func_input_gradients(rgb, x)
    want = (mask * (g[:, 0] + g[:, 1] + g[:, 2]).unsqueeze(1)).square().sum((1, 2, 3)).mean()
    torch.testing.assert_close(rrr_penalty(rgb(x), x, mask), want, rtol=1e-10, atol=1e-14)
    per_channel = rrr_penalty(rgb(x), x, mask, channel_reduction="none")
    assert not torch.isclose(per_channel, want)
    grey = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    x1 = x[:, :1].detach().requires_grad_(True)
    assert torch.equal(rrr_penalty(grey(x1), x1, mask), rrr_penalty(grey(x1), x1, mask, channel_reduction="none"))
    with pytest.raises(ValueError, match=r"channel_reduction must be one of \('sum', 'none'\)"):
        rrr_penalty(rgb(x), x, mask, channel_reduction="mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_penalties_return_the_inputs_dtype(dtype):
    model = small_net().to(dtype)
    x, mask, y = data()
    x = x.detach().to(dtype).requires_grad_(True)
    assert rrr_penalty(model(x), x, mask).dtype == dtype
    assert rbr_penalty(model(x), x, mask, y, model.parameters()).dtype == dtype


def test_input_gradient_matches_finite_differences():
    model = small_net()
    x, _, _ = data(1)
    g = input_gradient(model(x), x)
    eps, idx = 1e-6, (0, 1, 3, 2)
    xp, xm = x.detach().clone(), x.detach().clone()
    xp[idx] += eps
    xm[idx] -= eps
    f = lambda t: F.log_softmax(model(t), dim=1).sum()  # noqa: E731
    fd = (f(xp) - f(xm)) / (2 * eps)
    assert g[idx].item() == pytest.approx(fd.item(), rel=1e-6)


def test_rrr_gradient_reaches_parameters_and_matches_finite_differences():
    model = small_net()
    x, mask, _ = data()
    value = rrr_penalty(model(x), x, mask)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # directional derivative along a random parameter direction
    direction = [torch.randn_like(p) for p in model.parameters()]
    analytic = sum((p.grad * v).sum() for p, v in zip(model.parameters(), direction))
    eps = 1e-6

    def penalty_at(sign):
        with torch.no_grad():
            for p, v in zip(model.parameters(), direction):
                p.add_(sign * eps * v)
        xi = x.detach().requires_grad_(True)
        out = rrr_penalty(model(xi), xi, mask).detach()
        with torch.no_grad():
            for p, v in zip(model.parameters(), direction):
                p.sub_(sign * eps * v)
        return out

    fd = (penalty_at(1) - penalty_at(-1)) / (2 * eps)
    assert analytic.item() == pytest.approx(fd.item(), rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rbr_matches_explicit_computation(reduction):
    model = small_net()
    x, mask, y = data()
    value = rbr_penalty(model(x), x, mask, y, model.parameters(), reduction=reduction)

    params = {k: v.detach() for k, v in model.named_parameters()}

    def summed_param_grads(xs):
        grads = grad(lambda p: F.cross_entropy(functional_call(model, p, (xs,)), y))(params)
        return sum(g.sum() for g in grads.values())

    influence = grad(summed_param_grads)(x.detach())
    per_sample = (mask * influence * func_input_gradients(model, x)).square().sum((1, 2, 3))
    want = per_sample.mean() if reduction == "mean" else per_sample.sum()
    assert want.item() > 0
    torch.testing.assert_close(value, want, rtol=1e-9, atol=1e-14)
    value.backward()
    assert model[0].weight.grad.abs().sum() > 0


def test_bad_inputs_name_the_argument():
    model = small_net()
    x, mask, y = data()
    with pytest.raises(ValueError, match="inputs must require grad"):
        xd = x.detach()
        rrr_penalty(model(xd), xd, mask)
    with pytest.raises(ValueError, match="mask must have the input's batch size 3"):
        rrr_penalty(model(x), x, mask[:2])
    with pytest.raises(ValueError, match="mask contains NaN"):
        rrr_penalty(model(x), x, mask * float("nan"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        rrr_penalty(model(x), x, mask, reduction="max")
    with pytest.raises(ValueError, match="parameters must contain"):
        rbr_penalty(model(x), x, mask, y, [])
    with pytest.raises(ValueError, match="parameters must include parameters of the model"):
        rbr_penalty(model(x), x, mask, y, [torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"targets must be \(B,\) int64"):
        rbr_penalty(model(x), x, mask, y.float(), model.parameters())
    with pytest.raises(ValueError, match=r"targets must be \(B,\) int64"):
        rbr_penalty(model(x), x, mask, y[:2], model.parameters())


def test_rbr_without_input_grad_raises_as_rrr_does():
    model = small_net()
    x, mask, y = data()
    xd = x.detach()
    logits = model(xd)
    with pytest.raises(ValueError) as rrr_error:
        rrr_penalty(logits, xd, mask)
    with pytest.raises(ValueError) as rbr_error:
        rbr_penalty(logits, xd, mask, y, model.parameters())
    assert str(rbr_error.value) == str(rrr_error.value)
    assert str(rrr_error.value).startswith("inputs must require grad")


@pytest.mark.parametrize("penalty", ["rrr", "rbr"])
def test_masks_not_at_the_inputs_size_are_refused(penalty):
    model = small_net()
    x, mask, y = data()
    wider = torch.cat([mask, mask[..., :1]], dim=-1)
    args = (y, model.parameters()) if penalty == "rbr" else ()
    fn = rbr_penalty if penalty == "rbr" else rrr_penalty
    with pytest.raises(ValueError, match=r"mask must be at the input's resolution \(H, W\) = \(7, 5\)"):
        fn(model(x), x, wider, *args)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(model(x), x, mask, *args, reduction="max")
    assert fn(model(x), x, mask, *args) > 0
