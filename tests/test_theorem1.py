"""Theorem 1 in practice: TAP on the two-layer CNN zeroes masked activations and masked input gradients."""
import torch
import torch.nn.functional as F

from tap_fast import TappedModel, build_model, downscale_mask, input_gradient, tap_penalty, tap_points


def synthetic_batch(n, generator):
    """Class y puts a bright 6x6 block left (0) or right (1) of centre; a spurious 4x4 patch of value
    1 - y sits in the top-left corner and is masked."""
    y = torch.randint(0, 2, (n,), generator=generator)
    x = 0.1 * torch.randn(n, 1, 28, 28, generator=generator)
    for i in range(n):
        c = 6 if y[i] == 0 else 16
        x[i, 0, 11:17, c:c + 6] += 1.0
    x[:, 0, :4, :4] = (1.0 - y.float())[:, None, None]
    mask = torch.zeros(n, 1, 28, 28)
    mask[:, :, :4, :4] = 1
    return x, y, mask


def train(lam, steps=80):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TappedModel(build_model("cnn2", num_classes=2), tap_points("cnn2"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, y, mask = synthetic_batch(32, gen)
        logits, acts = model(x)
        loss = F.cross_entropy(logits, y) + lam * tap_penalty(acts, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def measure(model):
    x, y, mask = synthetic_batch(64, torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    logits, acts = model(x)
    accuracy = (logits.argmax(1) == y).float().mean().item()
    d = downscale_mask(mask, acts[0].shape[-2:])
    a_map = torch.relu(acts[0]).sum(1)
    masked_act = (a_map * (d > 0)).sum().item() / (d > 0).sum().item()
    unmasked_act = (a_map * (d == 0)).sum().item() / (d == 0).sum().item()
    g = input_gradient(logits, x).abs()[:, 0]
    masked_grad = g[mask[:, 0] > 0].mean().item()
    unmasked_grad = g[mask[:, 0] == 0].mean().item()
    return accuracy, masked_act, unmasked_act, masked_grad, unmasked_grad


def test_tap_drives_masked_activations_and_input_gradients_to_zero():
    acc, masked_act, unmasked_act, masked_grad, unmasked_grad = measure(train(lam=0.3))
    base_acc, base_masked_act, _, base_masked_grad, base_unmasked_grad = measure(train(lam=0.0))
    assert acc > 0.95 and base_acc > 0.95
    # Without TAP the spurious corner is active and salient; with TAP both vanish there ...
    assert base_masked_act > 0.1 and base_masked_grad > 0.1 * base_unmasked_grad
    assert masked_act < 1e-3 * base_masked_act
    assert masked_grad < 1e-3 * unmasked_grad
    # ... while the unmasked activations and gradients stay.
    assert unmasked_act > 0.01 and unmasked_act > 100 * masked_act and unmasked_grad > 0
