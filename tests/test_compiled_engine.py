"""make_step: the compiled / graph-captured / autocast step against the eager train_step it wraps.

Tolerances: the compiled (inductor) step reorders fp32 sums, so losses agree to rtol 1e-5 and parameters
after 4 SGD steps to atol 1e-5 (measured: ~5e-7); a replayed CUDA graph runs the eager kernels, but
cuDNN's weight-gradient algorithms may accumulate in another order, so on CUDA atol 1e-5, rtol 1e-4 (a
stale input or a skipped step moves parameters by ~1e-2); bf16 autocast against fp32 to 5e-2 relative
(bf16 keeps 8 mantissa bits). Equal for RRR / RBR, which stay eager under compile.
"""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from step_batches import uint8_batches
from tap_fast.compiled_step import make_step, rbr_scale
from tap_fast.models import build_model, tap_points
from tap_fast.tapped_model import TappedModel
from tap_fast.train_step import train_step

MEAN, STD = 0.1307, 0.3081
CUDA = torch.cuda.is_available()


def _model(arch="cnn2", device="cpu", seed=0):
    torch.manual_seed(seed)
    return TappedModel(build_model(arch, 10, input_size=28), tap_points(arch)).to(device)


def _train(step, batches):
    return [torch.stack(step(*b)).cpu() for b in batches]


def _eager_run(method, batches, device="cpu", lam=1e-3, **kw):
    model = _model(device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = [torch.stack(train_step(model, opt, *b, method=method, lam=lam, mean=MEAN, std=STD, **kw)).cpu()
              for b in batches]
    return model, losses


def _assert_params_close(a, b, atol, rtol=1e-4):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach().float().cpu(), q.detach().float().cpu(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method,backend", [("tap", "inductor"), ("none", "aot_eager")])
def test_compiled_step_matches_eager(method, backend):
    """TAP through inductor's code generation; "none" through dynamo + AOTAutograd only (aot_eager), which
    checks the same capture of forward, backward and optimizer step at a third of the compile time."""
    batches = uint8_batches(4, 6)
    ref_model, ref_losses = _eager_run(method, batches, backend="torch")
    torch._dynamo.reset()
    counters.clear()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = make_step(model, opt, method=method, lam=1e-3, mean=MEAN, std=STD, backend="torch", compile=True,
                     compile_backend=backend)
    losses = _train(step, batches)
    assert counters["stats"]["unique_graphs"] >= 2  # forward+loss and the optimizer step really compiled
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-5, atol=1e-6)
    _assert_params_close(model, ref_model, atol=1e-5)
    if method == "tap":
        assert float(losses[0][2]) > 0 and float(losses[0][0]) > float(losses[0][1])  # the penalty counted


@pytest.mark.parametrize("method", ["tap", "none"])
def test_forward_and_penalty_trace_as_one_graph(method):
    """The step's only graph breaks are PyTorch's own: Optimizer.zero_grad (skipped by dynamo),
    Tensor.backward, and the graph_break() calls in torch.optim's step wrapper. Forward + CE + TAP is one
    graph, and compiles with fullgraph=True."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y, m = uint8_batches(1, 5)[0]
    torch._dynamo.reset()
    ex = torch._dynamo.explain(train_step)(model, opt, x, y, m, method=method, lam=1e-3, mean=MEAN, std=STD,
                                           backend="torch")
    for reason in ex.break_reasons:
        frame = reason.user_stack[-1]
        in_optim = "torch/optim/" in frame.filename
        in_step = frame.filename.endswith("train_step.py") and any(
            s in (frame.line or "") for s in ("zero_grad", "backward", "optimizer.step"))
        assert in_optim or in_step, f"unexpected graph break at {frame.filename}:{frame.lineno}: {reason.reason}"
    first = " ".join(str(n.target) for n in ex.graphs[0].graph.nodes)
    assert first.count("conv2d") == 2 and "cross_entropy" in first
    assert ("adaptive_avg_pool2d" in first) == (method == "tap")

    def forward_loss(x, y, m):
        logits, acts = model(x.float().div(255.0).sub(MEAN).div(STD))
        loss = torch.nn.functional.cross_entropy(logits, y)
        if method == "tap":
            from tap_fast.tap import tap_penalty
            loss = loss + 1e-3 * tap_penalty(acts, m, validate=False, backend="torch")
        return loss

    torch._dynamo.reset()
    compiled = torch.compile(forward_loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, y, m), forward_loss(x, y, m))


@pytest.mark.parametrize("method", ["rrr", "rbr"])
def test_double_backward_methods_stay_eager_under_compile(method):
    batches = uint8_batches(2, 4)
    ref_model, ref_losses = _eager_run(method, batches, explain_in_eval=True)  # make_step's default
    torch._dynamo.reset()
    counters.clear()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = make_step(model, opt, method=method, lam=1e-3, mean=MEAN, std=STD, compile=True)
    losses = _train(step, batches)
    assert counters["stats"]["unique_graphs"] == 0
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=0, atol=0)
    _assert_params_close(model, ref_model, atol=0, rtol=0)


def test_bf16_autocast_and_channels_last():
    batches = uint8_batches(2, 5)
    ref_model, ref_losses = _eager_run("tap", batches)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = make_step(model, opt, method="tap", lam=1e-3, mean=MEAN, std=STD, amp_dtype=torch.bfloat16,
                     channels_last=True)
    assert model.model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    losses = _train(step, batches)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=5e-2, atol=1e-3)
    moved = sum((p - q).abs().sum() for p, q in zip(model.parameters(), _model().parameters()))
    assert moved > 0


def test_deepcopy_of_tapped_model_taps_its_own_layers():
    """The step tests build twin models; a deep copy's hooks must fill the copy's store."""
    model = _model()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.conv1.weight.add_(1.0)
    x = torch.randn(3, 1, 28, 28)
    (_, acts), (_, twin_acts) = model(x), twin(x)
    assert not torch.equal(acts[0], twin_acts[0])
    torch.testing.assert_close(twin_acts[0], twin.model.pool1(torch.relu(twin.model.conv1(x))))


def test_rbr_scale():
    assert rbr_scale(1) == 1.0 and rbr_scale(4) == 0.25


def test_step_explains_every_model_in_eval_mode():
    """The released code explains RRR in eval mode for every model: a dropout model without BatchNorm takes
    train_step's explain_in_eval=True step by default, not the step explained through dropout."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 28 * 28, 10))
    batch = uint8_batches(1, 6)[0]
    after = {}
    for name, explain in (("default", None), ("eval", True), ("train", False)):
        model = TappedModel(copy.deepcopy(net), ["1"])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(3)  # the same dropout draws in each training-mode forward
        if explain is None:
            make_step(model, opt, method="rrr", lam=10.0, mean=MEAN, std=STD)(*batch)
        else:
            train_step(model, opt, *batch, method="rrr", lam=10.0, mean=MEAN, std=STD, explain_in_eval=explain)
        after[name] = model.model[0].weight.detach().clone()
    assert torch.equal(after["default"], after["eval"])
    assert not torch.allclose(after["default"], after["train"])


def test_bad_arguments():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kw = dict(method="tap", lam=1e-3, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="method"):
        make_step(model, opt, **{**kw, "method": "xs"})
    for lam in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="lam"):
            make_step(model, opt, **{**kw, "lam": lam})
    with pytest.raises(ValueError, match="amp_dtype"):
        make_step(model, opt, **kw, amp_dtype=torch.float16)
    with pytest.raises(ValueError, match="norm"):
        make_step(model, opt, **kw, norm="l2")
    with pytest.raises(ValueError, match="backend"):
        make_step(model, opt, **kw, backend="cuda")
    with pytest.raises(ValueError, match="warmup_steps"):
        make_step(model, opt, **kw, warmup_steps=0)
    with pytest.raises(TypeError, match="model must be a TappedModel"):
        make_step(model.model, opt, **kw)
    with pytest.raises(TypeError, match="optimizer"):
        make_step(model, "sgd", **kw)
    with pytest.raises(TypeError, match="compile"):
        make_step(model, opt, **kw, compile="yes")
    if not CUDA:
        with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
            make_step(model, opt, **kw, cuda_graphs=True)


gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
def test_bad_arguments_cuda():
    model = _model(device="cuda")
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="capturable=True"):
        make_step(model, adam, method="tap", lam=1e-3, mean=MEAN, std=STD, cuda_graphs=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("method,compile", [("tap", False), ("none", False), ("rrr", False), ("tap", True),
                                            ("none", True)])
def test_cuda_graph_step_matches_eager(method, compile, exact_cuda):
    """Warm-up on a side stream, capture, replays, then an odd-sized batch that runs uncaptured."""
    batches = uint8_batches(8, 8, "cuda") + uint8_batches(1, 5, "cuda", seed=2) + uint8_batches(2, 8, "cuda", seed=3)
    ref_model, ref_losses = _eager_run(method, batches, device="cuda")
    torch._dynamo.reset()
    model = _model(device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = make_step(model, opt, method=method, lam=1e-3, mean=MEAN, std=STD, compile=compile, cuda_graphs=True)
    losses = _train(step, batches)
    assert step.captured
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-4, atol=1e-5)
    _assert_params_close(model, ref_model, atol=1e-5)


@gpu
@pytest.mark.gpu
def test_cuda_graph_hot_loop_never_syncs_and_outputs_persist():
    batches = uint8_batches(6, 16, "cuda")
    model = _model(device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = make_step(model, opt, method="tap", lam=1e-3, mean=MEAN, std=STD, cuda_graphs=True)
    for b in batches[:5]:  # warm-up and capture
        step(*b)
    sums = torch.zeros(3, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = step(*batches[0])
        second = step(*batches[1])
        sums += torch.stack(first) + torch.stack(second)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not torch.equal(torch.stack(first), torch.stack(second))  # replay did not overwrite the outputs
    assert torch.isfinite(sums).all()


@gpu
@pytest.mark.gpu
def test_cuda_bf16_channels_last_compiled_graph():
    batches = uint8_batches(6, 16, "cuda")
    _, ref_losses = _eager_run("tap", batches, device="cuda")
    torch._dynamo.reset()
    model = _model(device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = make_step(model, opt, method="tap", lam=1e-3, mean=MEAN, std=STD, compile=True, cuda_graphs=True,
                     amp_dtype=torch.bfloat16, channels_last=True)
    losses = _train(step, batches)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=5e-2, atol=1e-3)
