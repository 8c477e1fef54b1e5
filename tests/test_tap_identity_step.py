"""TAP in the forward, in the fused kernels' identity form (TappedModel.forward_tap, train_step / make_step
backend "identity"), against forward + tap_penalty_reference.

CPU runs use Triton's interpreter (TRITON_INTERPRET=1, set by conftest), fp32; CUDA runs (-m gpu with
TRITON_INTERPRET=0, as benchmarks/gpu_check.sh sets it) fp32 with TF32 off, and bf16 autocast.
Tolerances:
- logits: equal (the hooks return Z itself); penalty: rtol 1e-5, atol 1e-6 (order of fp32 sums), rtol 1e-4
  with bf16 activations.
- parameter gradients of CE + lam * penalty, lam set so that both terms are equal (dropping either would
  move the gradients by far more than the tolerance; checked): fp32 rtol 1e-5 plus atol 1e-5 of each
  tensor's largest entry, because BatchNorm's backward subtracts nearly equal sums, so entries near zero
  carry the fp32 rounding of the large ones (measured <= 2e-6 of it; the separate fused form differs from
  the reference alike). bf16 autocast: the identity form rounds grad(Z) = grad(Z out) + grad(penalty) to
  bf16 once, the reference rounds the penalty's part first and the sum again (measured on the CPU with
  _RefIdentity below, which rounds once: up to 2% relative norm difference per tensor, 1% over all
  parameters, on ResNet-18). So bf16 is compared with _RefIdentity: relative norm 1e-2 per tensor; and with
  the reference: 5e-2 over all parameters.
  (On the CPU, Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest: no CPU bf16 runs.)
- train_step after 3 SGD steps vs the reference backend: losses and parameters rtol 1e-5, atol 1e-6 (CPU),
  rtol 1e-4, atol 1e-5 (CUDA); make_step compiled with aot_eager (CPU) vs eager identity steps alike; on
  CUDA, make_step with a CUDA graph (eager or inductor) vs eager reference steps (bf16: see its test).
"""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F

from step_batches import uint8_batches
from tap_fast.compiled_step import make_step
from tap_fast.models import build_model, tap_points
from tap_fast.tap import tap_penalty, tap_penalty_reference
from tap_fast.tapped_model import TappedModel
from tap_fast.train_step import train_step

try:
    from kernels.tap_launch import interpreter_enabled

    TRITON, INTERPRET = True, interpreter_enabled()
except ImportError:
    TRITON, INTERPRET = False, False
ON_CPU = pytest.mark.skipif(not INTERPRET, reason="Triton on the CPU needs triton and TRITON_INTERPRET=1")
ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not TRITON or not torch.cuda.is_available() or INTERPRET,
                                               reason="needs triton, a CUDA device and TRITON_INTERPRET=0")]
MEAN, STD = 0.1307, 0.3081
STEPS = 3

# arch, batch, input (H, W), norm, kernel_size, mask kind: odd sizes (non-divisible downscales), odd masks
CASES = {
    "cnn2-l1": ("cnn2", 3, (28, 28), "l1", 3, "float"),
    "cnn2-l2sq-k5": ("cnn2", 3, (28, 28), "l2sq", 5, "bool3d"),
    "resnet18-l1": ("resnet18", 2, (39, 45), "l1", 3, "uint8"),
    "resnet18-l2sq-k1": ("resnet18", 2, (39, 45), "l2sq", 1, "float"),
}
CPU_FP32 = pytest.param("cpu", torch.float32, marks=ON_CPU, id="cpu-fp32")
CUDA_FP32 = pytest.param("cuda", torch.float32, marks=ON_CUDA, id="cuda-fp32")
CUDA_BF16 = pytest.param("cuda", torch.bfloat16, marks=ON_CUDA, id="cuda-bf16")


def _setup(case, device):
    arch, b, (h, w), norm, kernel_size, kind = CASES[case]
    torch.manual_seed(0)
    model = TappedModel(build_model(arch, 10, input_size=h), tap_points(arch)).to(device).train()
    x = torch.randn(b, 1, h, w, device=device)
    y = torch.randint(0, 10, (b,), device=device)
    mask = torch.rand(b, 1, h, w, device=device) < 0.3
    mask = {"float": mask.float(), "uint8": mask.to(torch.uint8), "bool3d": mask[:, 0]}[kind]
    return model, x, y, mask, dict(kernel_size=kernel_size, norm=norm)


class _RefIdentity(torch.autograd.Function):
    """Plain-PyTorch identity form of one layer: (Z, its eq. 8 term); backward returns
    (grad(Z out) + grad(penalty)) summed in fp32 and rounded to Z's dtype once, as the fused kernel does."""

    @staticmethod
    def forward(ctx, z, mask, kernel_size, norm):
        ctx.save_for_backward(z, mask)
        ctx.options = dict(kernel_size=kernel_size, norm=norm)
        return z.view_as(z), tap_penalty_reference([z], mask, **ctx.options)

    @staticmethod
    def backward(ctx, grad_z, grad_penalty):
        z, mask = ctx.saved_tensors
        with torch.enable_grad():
            z32 = z.detach().float().requires_grad_()
            (grad,) = torch.autograd.grad(tap_penalty_reference([z32], mask, **ctx.options), z32, grad_penalty)
        return (grad_z.float() + grad).to(z.dtype), None, None, None


def _ref_forward_tap(model, x, mask, kernel_size, norm):
    penalties = []

    def hook(module, args, output):
        output, penalty = _RefIdentity.apply(output, mask, kernel_size, norm)
        penalties.append(penalty)
        return output

    handles = [model.model.get_submodule(n).register_forward_hook(hook) for n in model.tap_names]
    try:
        logits, _ = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, sum(penalties) / len(penalties)


def _grads(model, logits, y, penalty, lam):
    return torch.autograd.grad(F.cross_entropy(logits, y) + lam * penalty, list(model.parameters()))


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _flat(grads):
    return torch.cat([g.float().flatten() for g in grads])


@pytest.mark.parametrize("device,dtype", [CPU_FP32, CUDA_FP32, CUDA_BF16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("form", ["identity", "separate"])
def test_forward_tap_matches_reference(case, form, device, dtype, request):
    if device == "cuda":
        request.getfixturevalue("exact_cuda")
    if form == "separate" and dtype != torch.float32 and case != "resnet18-l1":
        pytest.skip("bf16 compares with the identity form's rounding; one separate-form case suffices")
    model, x, y, mask, options = _setup(case, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with autocast:
        logits_ref, acts = model(x)
        penalty_ref = tap_penalty_reference(acts, mask, **options)
    task = F.cross_entropy(logits_ref, y)
    lam = float(task.detach() / penalty_ref.detach())  # both terms weigh alike
    ref = torch.autograd.grad(task + lam * penalty_ref, list(model.parameters()), retain_graph=True)
    task_only = _flat(torch.autograd.grad(task, list(model.parameters())))
    # each term's share of the gradient is far above the tolerance
    assert _rel(task_only, _flat(ref)) > 1e-2 and float(task_only.norm() / _flat(ref).norm()) > 1e-2

    with autocast:
        logits, penalty = model.forward_tap(x, mask, **options, identity=form == "identity")
    assert torch.equal(logits, logits_ref)
    assert penalty.dtype == torch.float32 and penalty.dim() == 0
    torch.testing.assert_close(penalty, penalty_ref, rtol=1e-5 if dtype == torch.float32 else 1e-4, atol=1e-6)
    grads = _grads(model, logits, y, penalty, lam)
    names = [n for n, _ in model.named_parameters()]
    if dtype == torch.float32:
        for name, g, r in zip(names, grads, ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()),
                                       msg=lambda m: f"{name}: {m}")
    elif form == "identity":
        with autocast:
            logits_once, penalty_once = _ref_forward_tap(model, x, mask, **options)
        once = _grads(model, logits_once, y, penalty_once, lam)
        for name, g, r in zip(names, grads, once):
            assert _rel(g, r) <= 1e-2, f"{name}: relative error {_rel(g, r):.3g} vs the identity reference"
        assert _rel(_flat(grads), _flat(ref)) <= 5e-2
    else:  # the separate form rounds the penalty's gradient to bf16 before autograd adds it, as the reference
        for name, g, r in zip(names, grads, ref):
            assert _rel(g, r) <= 1e-2, f"{name}: relative error {_rel(g, r):.3g} vs the reference"
    # nothing stays referenced, and the plain forward is unchanged
    state = model._taps
    assert state.source is None and not state.penalties and not state.outputs
    with autocast:
        _, acts_again = model(x)
    assert all(torch.equal(a, b) for a, b in zip(acts_again, acts))


@ON_CPU
def test_forward_tap_through_call_and_deepcopy():
    """model(x, masks) is forward_tap (the DDP route); a deep copy's hooks use the copy's state and weights."""
    model, x, y, mask, options = _setup("cnn2-l1", "cpu")
    logits, penalty = model.forward_tap(x, mask, **options)
    twin = copy.deepcopy(model)
    twin_logits, twin_penalty = twin(x, mask, **options)
    assert torch.equal(twin_logits, logits) and torch.equal(twin_penalty, penalty)
    with torch.no_grad():
        twin.model.conv1.weight.mul_(2.0)
    _, acts = twin(x)
    _, twin_penalty = twin.forward_tap(x, mask, **options)
    torch.testing.assert_close(twin_penalty, tap_penalty_reference(acts, mask, **options), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(twin_penalty, penalty)
    assert torch.equal(model.forward_tap(x, mask, **options)[1], penalty)


@ON_CPU
def test_backward_adds_into_the_downstream_gradient(monkeypatch):
    """The identity form's point: one tap_grad launch per tap, given the gradient arriving at Z^l from
    downstream (grad_out): d(CE + (1/L) sum_{k > l} penalty_k)/dZ^l of the plain forward."""
    from kernels import tap_launch

    grad_outs = {}

    def recording(grad_penalty, z, w, n_layers, grad_out=None, w_off=0):
        assert n_layers == 1 and grad_out is not None and tuple(z.shape) not in grad_outs
        grad_outs[tuple(z.shape)] = grad_out.clone()
        return real(grad_penalty, z, w, n_layers, grad_out, w_off)

    real = tap_launch.tap_grad
    monkeypatch.setattr(tap_launch, "tap_grad", recording)
    model, x, y, mask, options = _setup("cnn2-l1", "cpu")
    logits, penalty = model.forward_tap(x, mask, **options)
    (F.cross_entropy(logits, y) + penalty).backward()
    logits, acts = model(x)
    assert set(grad_outs) == {tuple(a.shape) for a in acts}
    for i, a in enumerate(acts):
        downstream = F.cross_entropy(logits, y) + sum(tap_penalty_reference([b], mask, **options) / len(acts)
                                                      for b in acts[i + 1:])
        (expected,) = torch.autograd.grad(downstream, a, retain_graph=True)
        torch.testing.assert_close(grad_outs[tuple(a.shape)], expected, rtol=1e-5, atol=1e-6)
        assert expected.abs().max() > 1e-3


@ON_CPU
@pytest.mark.parametrize("identity", [True, False])
@pytest.mark.parametrize("norm", ["l1", "l2sq"])
def test_forward_tap_compound_matches_reference(identity, norm):
    """compound=True (released code): each layer's D is pooled from the previous layer's, in the order the
    layers run; penalty and parameter gradients as the reference's."""
    model, x, y, mask, _ = _setup("resnet18-l1", "cpu")
    options = dict(kernel_size=3, norm=norm, compound=True)
    logits_ref, acts = model(x)
    penalty_ref = tap_penalty_reference(acts, mask, **options)
    assert not torch.allclose(penalty_ref, tap_penalty_reference(acts, mask, kernel_size=3, norm=norm))
    ref = _grads(model, logits_ref, y, penalty_ref, 1.0)
    logits, penalty = model.forward_tap(x, mask, **options, identity=identity)
    torch.testing.assert_close(penalty, penalty_ref, rtol=1e-5, atol=1e-6)
    for (name, _), g, r in zip(model.named_parameters(), _grads(model, logits, y, penalty, 1.0), ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()), msg=lambda m: f"{name}: {m}")


@ON_CPU
@pytest.mark.parametrize("form", ["identity", "separate", "after the forward"])
def test_each_layer_gradient_when_the_backward_reaches_it(form, monkeypatch):
    """Memory: in training (forward_tap, either form) layer l's dZ is computed only after the backward has
    left layer l + 1, so no two layers' TAP gradients are alive at the backward's start (the memory peak).
    tap_penalty after the forward (one node for all layers) computes them all first: shown for contrast."""
    from kernels import tap_launch

    events = []
    real = tap_launch.planned_grad  # every form's gradient launch (tap_grad plans, then calls it)

    def recording(plan, grad_penalty, z, w, grad_out=None):
        events.append(("tap_grad", tuple(z.shape[1:])))
        return real(plan, grad_penalty, z, w, grad_out)

    monkeypatch.setattr(tap_launch, "planned_grad", recording)
    model, x, y, mask, options = _setup("resnet18-l1", "cpu")
    shapes = [tuple(a.shape[1:]) for a in model(x)[1]]
    for name, shape in zip(model.tap_names, shapes):
        model.model.get_submodule(name).register_full_backward_hook(
            lambda m, gi, go, shape=shape: events.append(("left", shape)))
    if form == "after the forward":
        logits, acts = model(x)
        penalty = tap_penalty(acts, mask, backend="triton", validate=False, **options)
    else:
        logits, penalty = model.forward_tap(x, mask, **options, identity=form == "identity")
    (F.cross_entropy(logits, y) + penalty).backward()
    order = [e for e in events if e[0] == "tap_grad" or e[1] != shapes[0]]
    if form == "after the forward":
        assert order[:len(shapes)] == [("tap_grad", s) for s in shapes]
        return
    # deepest layer first; each layer's gradient right after the backward left the next (deeper) layer
    expected = [("tap_grad", shapes[-1])]
    for deeper, shape in zip(shapes[::-1], shapes[-2::-1]):
        expected += [("left", deeper), ("tap_grad", shape)]
    assert order == expected


@ON_CPU
@pytest.mark.parametrize("identity", [True, False])
def test_forward_tap_refuses_a_tap_modified_in_place(identity):
    """A tapped output that the model then modifies in place (a conv followed by ReLU(inplace=True)) cannot
    carry TAP inside the forward: ValueError naming the tap, before any wrong gradient."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(inplace=True),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    model = TappedModel(net, ["0"])
    x, mask = torch.randn(2, 1, 9, 9), (torch.rand(2, 1, 9, 9) < 0.3).float()
    with pytest.raises(ValueError, match="tap '0' is modified in place"):
        model.forward_tap(x, mask, identity=identity)
    assert model._taps.source is None and not model._taps.versions
    logits, acts = TappedModel(net, ["1"])(x)  # tapping the in-place module works
    penalty = TappedModel(net, ["1"]).forward_tap(x, mask, identity=identity)[1]
    torch.testing.assert_close(penalty, tap_penalty_reference(acts, mask), rtol=1e-5, atol=1e-6)


def _cnn2(device):
    torch.manual_seed(0)
    model = TappedModel(build_model("cnn2", 10), tap_points("cnn2")).to(device).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _run(step, batches):
    return torch.stack([torch.stack(step(*b)) for b in batches]).cpu()


def _eager_step(model, optimizer, backend, norm="l1"):
    return lambda *b: train_step(model, optimizer, *b, method="tap", lam=1e-2, mean=MEAN, std=STD, norm=norm,
                                 backend=backend)


def _assert_same_training(result, expected, initial, tol):
    (losses, model), (ref_losses, ref_model) = result, expected
    assert torch.isfinite(ref_losses).all() and (ref_losses[:, 2] > 0).all()
    torch.testing.assert_close(losses, ref_losses, **tol)
    for (name, p), q, p0 in zip(model.named_parameters(), ref_model.parameters(), initial):
        assert not torch.equal(q, p0)
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=ON_CPU), pytest.param("cuda", marks=ON_CUDA)])
@pytest.mark.parametrize("norm", ["l1", "l2sq"])
def test_train_step_identity_matches_reference(device, norm, request):
    if device == "cuda":
        request.getfixturevalue("exact_cuda")
    tol = dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=1e-4, atol=1e-5)
    batches = uint8_batches(STEPS, 3, device)
    ref_model, ref_opt = _cnn2(device)
    initial = [p.detach().clone() for p in ref_model.parameters()]
    ref_losses = _run(_eager_step(ref_model, ref_opt, "torch", norm), batches)
    model, opt = _cnn2(device)
    losses = _run(_eager_step(model, opt, "identity", norm), batches)
    _assert_same_training((losses, model), (ref_losses, ref_model), initial, tol)


@ON_CPU
def test_compiled_identity_step_matches_eager():
    """make_step(compile=True) traces forward + hooks + identity form (aot_eager: no code generation, the
    same kernels); forward_tap alone traces with fullgraph=True."""
    from torch._dynamo.utils import counters

    batches = uint8_batches(STEPS, 3)
    ref_model, ref_opt = _cnn2("cpu")
    initial = [p.detach().clone() for p in ref_model.parameters()]
    ref_losses = _run(_eager_step(ref_model, ref_opt, "identity"), batches)
    torch._dynamo.reset()
    counters.clear()
    model, opt = _cnn2("cpu")
    step = make_step(model, opt, method="tap", lam=1e-2, mean=MEAN, std=STD, backend="identity", compile=True,
                     compile_backend="aot_eager")
    losses = _run(step, batches)
    assert counters["stats"]["unique_graphs"] >= 2
    _assert_same_training((losses, model), (ref_losses, ref_model), initial, dict(rtol=1e-5, atol=1e-6))

    x, _, mask = batches[0]
    x = x.float()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, mask: model(x, mask), fullgraph=True, backend="eager")
    for got, want in zip(compiled(x, mask), model.forward_tap(x, mask)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compile", [False, True], ids=["graph", "inductor-graph"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.gpu
@pytest.mark.skipif(not TRITON or not torch.cuda.is_available() or INTERPRET,
                    reason="needs triton, a CUDA device and TRITON_INTERPRET=0")
def test_cuda_graph_identity_step(compile, amp, exact_cuda):
    """make_step with a CUDA graph (and inductor) on the identity form vs the eager reference step, 6 steps
    (3 uncaptured, capture, 2 replays). fp32: rtol 1e-4, atol 1e-5; bf16 vs the bf16 reference: losses rtol
    2e-2, each parameter's update within 5e-2 relative norm (grad(Z) is rounded once instead of twice, and
    inductor may keep bf16 intermediates in fp32; test_compiled_engine's bf16 tolerance)."""
    batches = uint8_batches(6, 8, "cuda")
    ref_model, ref_opt = _cnn2("cuda")
    initial = [p.detach().clone() for p in ref_model.parameters()]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp is not None):
        ref_losses = _run(_eager_step(ref_model, ref_opt, "torch"), batches)
    torch._dynamo.reset()
    model, opt = _cnn2("cuda")
    step = make_step(model, opt, method="tap", lam=1e-2, mean=MEAN, std=STD, backend="identity", compile=compile,
                     cuda_graphs=True, amp_dtype=amp)
    losses = _run(step, batches)
    assert step.captured
    if amp is None:
        _assert_same_training((losses, model), (ref_losses, ref_model), initial, dict(rtol=1e-4, atol=1e-5))
        return
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=1e-4)
    for (name, p), q, p0 in zip(model.named_parameters(), ref_model.parameters(), initial):
        assert _rel(p - p0, q - p0) <= 5e-2, f"{name}: update differs by {_rel(p - p0, q - p0):.3g}"


# Bad inputs: ValueError naming the argument.

@ON_CPU
@pytest.mark.parametrize("kwargs,masks_shape,match", [
    (dict(norm="l3"), None, "norm"),
    (dict(kernel_size=2), None, "kernel_size"),
    ({}, (2, 2, 28, 28), "masks"),
    ({}, (2, 1, 27, 28), "masks"),
    ({}, (3, 1, 28, 28), "masks"),
])
def test_forward_tap_bad_inputs(kwargs, masks_shape, match):
    model, opt = _cnn2("cpu")
    x = torch.randn(2, 1, 28, 28)
    masks = (torch.rand(masks_shape or (2, 1, 28, 28)) < 0.5).float()
    with pytest.raises(ValueError, match=match):
        model.forward_tap(x, masks, **kwargs)
    assert model._taps.source is None
    images, labels = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (2,))
    if kwargs:
        with pytest.raises(ValueError, match=match):
            train_step(model, opt, images, labels, masks, method="tap", lam=1.0, mean=MEAN, std=STD,
                       backend="identity", **kwargs)


@ON_CPU
def test_identity_backend_errors(monkeypatch):
    model, opt = _cnn2("cpu")
    images, labels = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (2,))
    masks = torch.ones(2, 1, 28, 28)
    with pytest.raises(ValueError, match="masks"):
        train_step(model, opt, images, labels, None, method="tap", lam=1.0, mean=MEAN, std=STD, backend="identity")
    with pytest.raises(ValueError, match="backend.*identity"):
        make_step(model, opt, method="tap", lam=1.0, mean=MEAN, std=STD, backend="fused")
    with pytest.raises(ValueError, match="backend"):  # tap_penalty alone cannot do the identity form
        tap_penalty(model(images.float())[1], masks, backend="identity")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for call in (lambda: make_step(model, opt, method="tap", lam=1.0, mean=MEAN, std=STD, backend="identity"),
                 lambda: model.forward_tap(images.float(), masks)):
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            call()
    make_step(model, opt, method="none", lam=0.0, mean=MEAN, std=STD, backend="identity")  # TAP's backend only
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    for call in (lambda: make_step(model, opt, method="tap", lam=1.0, mean=MEAN, std=STD, backend="identity"),
                 lambda: model.forward_tap(images.float(), masks)):
        with pytest.raises(ValueError, match="triton package"):
            call()
