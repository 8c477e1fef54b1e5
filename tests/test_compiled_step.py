"""torch.compile(fullgraph=True) of a TAP training step: no graph breaks, same losses and parameters as eager.

The compiled function is the loss (forward + CE + lambda * TAP); its backward is compiled by AOTAutograd;
loss.backward() and the SGD step run eagerly around it, as in a usual compiled training loop.
- CPU, reference backend, Inductor, float64: losses and parameters after 3 SGD steps within rtol 1e-9,
  atol 1e-12 of eager. Inductor may reorder reductions, and in fp32 the reordered sums (about 1e-7 apart)
  can flip a near tie of a max-pool or a ReLU by step 3 and move a filter's gradient by 1e-4 (seen on one
  CPU and not another); float64 keeps the reordering at 1e-16.
- CPU, Triton backend through the interpreter, aot_eager (Inductor adds nothing for the opaque custom
  ops, and tracing them is what is under test) vs the eager reference: same tolerance; likewise the
  identity form vs itself eager.
- CUDA, Triton backend, mode="reduce-overhead" (CUDA graphs): no cudagraph skips; the compiled fused step
  matches the eager reference step within rtol 1e-4, atol 1e-5.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from tap_fast.models import build_model, tap_points
from tap_fast.tap import tap_penalty
from tap_fast.tapped_model import TappedModel

LAMBDA = 0.05
STEPS = 3
TOL = dict(rtol=1e-4, atol=1e-5)


def _data(device, batch=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 28, 28, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (batch,), generator=g)
    mask = (torch.rand(batch, 1, 28, 28, generator=g) < 0.2).to(dtype)
    return x.to(device), y.to(device), mask.to(device)


def _loss_fn(tapped, backend, norm):
    def loss(x, y, mask):
        logits, acts = tapped(x)
        return F.cross_entropy(logits, y) + LAMBDA * tap_penalty(acts, mask, norm=norm, validate=False,
                                                                 backend=backend)
    return loss


def _train(model, loss, data, steps=STEPS):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        value = loss(*data)
        value.backward()
        opt.step()
        losses.append(value.detach().clone())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def _eager_and_compiled(device, backend, norm, compile_kwargs, eager_backend=None, dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model("cnn2", 10).to(device, dtype)
    twin = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    data = _data(device, dtype=dtype)
    eager = _train(model, _loss_fn(TappedModel(model, tap_points("cnn2")), eager_backend or backend, norm), data)
    torch._dynamo.reset()
    compiled_loss = torch.compile(_loss_fn(TappedModel(twin, tap_points("cnn2")), backend, norm), fullgraph=True,
                                  **compile_kwargs)
    return initial, eager, _train(twin, compiled_loss, data)


def _assert_same(initial, eager, compiled, tol=TOL):
    (losses_e, params_e), (losses_c, params_c) = eager, compiled
    assert torch.isfinite(losses_e).all() and all(not torch.equal(p, q) for p, q in zip(initial, params_e))
    torch.testing.assert_close(losses_c, losses_e, **tol)
    for pe, pc in zip(params_e, params_c):
        torch.testing.assert_close(pc, pe, **tol)


def test_compiled_reference_step_cpu():
    results = _eager_and_compiled("cpu", "torch", "l1", {}, dtype=torch.float64)
    assert results[1][0].dtype == torch.float64
    _assert_same(*results, tol=dict(rtol=1e-9, atol=1e-12))


def test_compiled_triton_step_cpu_interpreter():
    pytest.importorskip("triton")
    from kernels.tap_launch import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1")
    _assert_same(*_eager_and_compiled("cpu", "triton", "l2sq", {"backend": "aot_eager"}, eager_backend="torch"))


def test_compiled_identity_form_cpu_interpreter():
    """tap_identity (an autograd.Function around the custom ops) also traces with fullgraph=True."""
    pytest.importorskip("triton")
    from kernels.tap_launch import interpreter_enabled
    from kernels.tap_op import fused_downscale_masks, tap_identity

    if not interpreter_enabled():
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1")

    def loss(z, u, mask):
        (d,) = fused_downscale_masks(mask, [z.shape[-2:]])
        out, penalty = tap_identity(z, d, norm="l2sq")
        return (out * u).sum() + 0.3 * penalty

    z = torch.randn(2, 5, 7, 6, requires_grad=True)
    u, mask = torch.randn(2, 5, 7, 6), (torch.rand(2, 1, 15, 13) < 0.3).float()
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_value, compiled_value = loss(z, u, mask), compiled(z, u, mask)
    torch.testing.assert_close(compiled_value, eager_value, **TOL)
    torch.testing.assert_close(torch.autograd.grad(compiled_value, z)[0], torch.autograd.grad(eager_value, z)[0],
                               **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("norm", ["l1", "l2sq"])
def test_compiled_triton_step_cuda_graphs(norm, exact_cuda):
    pytest.importorskip("triton")
    from kernels.tap_launch import interpreter_enabled

    if interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=0 to compile the kernels for the GPU")
    from torch._dynamo.utils import counters

    counters.clear()
    results = _eager_and_compiled("cuda", "triton", norm, {"mode": "reduce-overhead"}, eager_backend="torch")
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    _assert_same(*results)


def test_compiled_step_refuses_masks_not_at_the_images_size():
    """The size check runs while dynamo traces the step (shapes are static), so the compiled step refuses a
    mask that is not the images' H x W, as the eager one does."""
    from tap_fast.compiled_step import make_step

    torch.manual_seed(0)
    model = TappedModel(build_model("cnn2", 10), tap_points("cnn2")).train()
    step = make_step(model, torch.optim.SGD(model.parameters(), lr=0.01), method="tap", lam=0.1, mean=0.1, std=0.3,
                     compile=True, compile_backend="eager")
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (2,), generator=g)
    masks = (torch.rand(2, 1, 30, 30, generator=g) < 0.3).float()
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"mask must be at the input's resolution \(H, W\) = \(28, 28\)"):
        step(images, labels, masks)
    loss, _, penalty = step(images, labels, masks[..., 1:29, 1:29])
    assert torch.isfinite(loss) and penalty > 0
