"""Appendix M's distillation baselines (tap_fast.distillation): AT, JT and KD against plain per-sample loops on
random inputs of awkward shapes (batch 1 included), gradients that reach the student and never the teacher, and
their wiring: the training step, the config's defaults (Table 21), the CLI and the prepared, cached teacher."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tap_fast.compiled_step import make_step
from tap_fast.distillation import at_penalty, class_input_gradient, jt_penalty, kd_penalty
from tap_fast.feeds import normalise
from tap_fast.models import build_model, tap_points
from tap_fast.tapped_model import TappedModel

MEAN, STD = 0.3, 0.25


def _bins(n_in: int, n_out: int) -> list[tuple[int, int]]:
    return [(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]  # adaptive pooling's bins


def _bilinear_taps(n_in: int, n_out: int) -> list[tuple[int, int, float]]:
    """align_corners=False: source coordinate (i + 0.5) n_in / n_out - 0.5, clamped at 0."""
    taps = []
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        taps.append((i0, min(i0 + 1, n_in - 1), src - i0))
    return taps


def _resize(q: torch.Tensor, size) -> torch.Tensor:
    """(h, w) -> size: the bin means where both sides shrink (or stay), else bilinear, written out."""
    (h, w), (hs, ws) = q.shape, tuple(size)
    if h >= hs and w >= ws:
        return torch.stack([torch.stack([q[r0:r1, c0:c1].mean() for c0, c1 in _bins(w, ws)])
                            for r0, r1 in _bins(h, hs)])
    return torch.stack([torch.stack([(1 - a) * ((1 - b) * q[r0, c0] + b * q[r0, c1])
                                     + a * ((1 - b) * q[r1, c0] + b * q[r1, c1])
                                     for c0, c1, b in _bilinear_taps(w, ws)])
                        for r0, r1, a in _bilinear_taps(h, hs)])


def at_loop(student, teacher):
    """Zagoruyko and Komodakis' term per sample: the deepest layers paired, Q = sum_c A_c^2 over the channels."""
    n, batch = min(len(student), len(teacher)), student[0].shape[0]
    total = 0.0
    for b in range(batch):
        for zs, zt in zip(student[-n:], teacher[-n:]):
            qs = (zs[b] ** 2).sum(0)
            qt = _resize((zt[b] ** 2).sum(0), qs.shape)
            total = total + (qs.flatten() / qs.norm() - qt.flatten() / qt.norm()).norm()
    return total / batch


def jt_loop(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Per sample: the input gradients of the true-class logit, each over its L2 norm, squared distance."""
    total = 0.0
    for b in range(x.shape[0]):
        xb = x[b:b + 1].detach().requires_grad_(True)
        (gs,) = torch.autograd.grad(student(xb)[0, y[b]], xb, create_graph=True)
        (gt,) = torch.autograd.grad(teacher(xb)[0, y[b]], xb)
        total = total + ((gs.flatten() / gs.norm() - gt.flatten() / gt.norm()) ** 2).sum()
    return total / x.shape[0]


def kd_loop(s: torch.Tensor, t: torch.Tensor, temperature: float):
    """T^2 sum_k p_t,k (log p_t,k - log p_s,k) per sample, p = softmax(logits / T), batch mean."""
    total = 0.0
    for b in range(s.shape[0]):
        es, et = torch.exp(s[b] / temperature), torch.exp(t[b] / temperature)
        ps, pt = es / es.sum(), et / et.sum()
        total = total + sum(pt[k] * (torch.log(pt[k]) - torch.log(ps[k])) for k in range(s.shape[1]))
    return temperature ** 2 * total / s.shape[0]


# (student shapes C x H x W, teacher shapes): the deepest pair, teacher maps that shrink (9x11 -> 4x6, uneven
# overlapping bins), grow (2x2 -> 3x3), stay, or grow on one side and shrink on the other (5x2 -> 3x3).
AT_CASES = {"more-student-layers": ([(3, 7, 5), (2, 4, 6), (5, 3, 3)], [(4, 9, 11), (1, 2, 2)]),
            "more-teacher-layers": ([(2, 7, 5), (3, 3, 3)], [(2, 8, 8), (6, 7, 5), (4, 5, 2)])}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(AT_CASES))
def test_at_penalty_matches_the_per_sample_loop(case, batch):
    g = torch.Generator().manual_seed(batch)
    student_shapes, teacher_shapes = AT_CASES[case]
    student = [torch.randn(batch, *s, generator=g, dtype=torch.float64).requires_grad_(True) for s in student_shapes]
    teacher = [torch.randn(batch, *s, generator=g, dtype=torch.float64).requires_grad_(True) for s in teacher_shapes]
    value = at_penalty(student, teacher)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, at_loop(student, teacher), rtol=1e-10, atol=1e-12)
    value.backward()
    paired = student[-min(len(student), len(teacher)):]
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in paired)  # the student's paired layers
    assert all(z.grad is None for z in teacher) and all(z.grad is None for z in student[:-len(paired)])
    assert at_penalty([s.detach().half() for s in student], [t.detach().half() for t in teacher]).dtype == torch.float32


def test_at_of_a_zero_teacher_map_is_the_unit_norm_of_the_students():
    """F.normalize's eps keeps a zero map zero: each layer then adds || Q_s / ||Q_s|| || = 1."""
    student = [torch.randn(2, 3, 5, 4), torch.randn(2, 2, 3, 3)]
    teacher = [torch.zeros(2, 1, 5, 4), torch.zeros(2, 4, 3, 3)]
    torch.testing.assert_close(at_penalty(student, teacher), torch.tensor(2.0))


def _net(in_channels: int, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 3, 2), nn.Tanh(),
                         nn.Flatten(), nn.LazyLinear(4)).double()


@pytest.mark.parametrize("batch", [1, 4])
def test_jt_penalty_matches_the_per_sample_loop_and_trains_only_the_student(batch):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 2, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (batch,), generator=g)
    student, teacher = _net(2, 5, 0), _net(2, 3, 1)
    student(x), teacher(x)  # materialise the lazy heads
    xs = x.clone().requires_grad_(True)
    # The teacher's gradient keeps its graph here: jt_penalty itself must stop it.
    xt = x.clone().requires_grad_(True)
    teacher_grad = class_input_gradient(teacher(xt), xt, y, create_graph=True)
    value = jt_penalty(class_input_gradient(student(xs), xs, y, create_graph=True), teacher_grad)
    expected = jt_loop(student, teacher, x, y)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    value.backward()
    def grads():  # the head's bias does not enter an input gradient: its grad stays None
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in student.parameters()]

    student_grads = grads()
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad()
    expected.backward()  # the loop's double backward: the same parameter gradients
    for got, want in zip(student_grads, grads()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert sum(gr.abs().sum() for gr in student_grads) > 0


@pytest.mark.parametrize("batch", [1, 5])
def test_kd_penalty_matches_the_per_sample_loop_and_its_gradient(batch):
    g = torch.Generator().manual_seed(batch)
    s = (3 * torch.randn(batch, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = (3 * torch.randn(batch, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    value = kd_penalty(s, t, temperature=2.5)
    torch.testing.assert_close(value, kd_loop(s, t, 2.5), rtol=1e-10, atol=1e-12)
    value.backward()
    # d/ds of T^2 KL(p_t || p_s), batch mean: T (p_s - p_t) / B
    expected = 2.5 * (torch.softmax(s / 2.5, 1) - torch.softmax(t / 2.5, 1)) / batch
    torch.testing.assert_close(s.grad, expected.detach(), rtol=1e-10, atol=1e-12)
    assert t.grad is None
    with pytest.raises(ValueError, match="temperature must be a positive finite number, got 0"):
        kd_penalty(s, t, temperature=0)
    with pytest.raises(ValueError, match=r"student_logits and teacher_logits must be \(B, K\) of one shape"):
        kd_penalty(s, t[:, :5], temperature=1.0)


class SmallTeacher(nn.Sequential):
    """A teacher whose taps differ from cnn2's (6x6, 2x2 at 13 px): 13x13 (unpaired), 4x4 (grown to 6x6) and
    3x3 (shrunk to 2x2)."""

    TAPS = ["1", "4", "6"]

    def __init__(self):
        super().__init__(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3), nn.Conv2d(3, 4, 1), nn.ReLU(),
                         nn.Conv2d(4, 5, 2), nn.ReLU(), nn.Flatten(), nn.Linear(45, 10))


def _explicit_loss(method, student, teacher, x, y, temperature):
    logits, acts = TappedModel(student, tap_points("cnn2"))(x)
    with torch.no_grad():
        teacher_logits, teacher_acts = TappedModel(teacher, SmallTeacher.TAPS)(x)
    penalty = {"at": lambda: at_loop(acts, teacher_acts), "kd": lambda: kd_loop(logits, teacher_logits, temperature),
               "jt": lambda: jt_loop(student, teacher, x, y)}[method]()
    return F.cross_entropy(logits, y), penalty


@pytest.mark.parametrize("method", ["at", "jt", "kd"])
def test_the_step_adds_the_explicit_penalty_and_leaves_the_teacher_alone(method):
    """One SGD step (no momentum) of make_step equals p - lr * grad(CE + lambda * the loop's penalty), computed
    on copies; the penalty moves the student (the update differs from CE's alone); the teacher, handed over in
    train mode with parameters that require grad, is put in eval mode and gets neither gradient nor update."""
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (3, 1, 13, 13), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (3,), generator=g)
    torch.manual_seed(0)
    student, teacher = build_model("cnn2", 10, input_size=13), SmallTeacher()
    lam, lr, temperature = 2.0, 0.5, 3.0 if method == "kd" else None
    ref, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher).eval()
    task, penalty = _explicit_loss(method, ref, ref_teacher, normalise(images, MEAN, STD), labels, temperature)
    grads = torch.autograd.grad(task + lam * penalty, list(ref.parameters()), retain_graph=True)
    task_grads = torch.autograd.grad(task, list(ref.parameters()))
    teacher_before = copy.deepcopy(teacher.state_dict())
    tapped_teacher = TappedModel(teacher, SmallTeacher.TAPS).train()
    step = make_step(TappedModel(student, tap_points("cnn2")), torch.optim.SGD(student.parameters(), lr=lr),
                     method=method, lam=lam, mean=MEAN, std=STD, teacher=tapped_teacher, temperature=temperature)
    loss, task_step, penalty_step = step(images, labels, None)
    assert not teacher.training
    # fp32 (KD's KL sums nearly cancelling terms: ~3e-5 relative)
    torch.testing.assert_close(penalty_step, penalty.detach().float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, (task + lam * penalty).detach(), rtol=1e-5, atol=1e-5)
    for p, q, gr, gt in zip(student.parameters(), ref.parameters(), grads, task_grads):
        torch.testing.assert_close(p.detach(), (q - lr * gr).detach(), rtol=1e-4, atol=1e-6)
    assert sum((gr - gt).abs().sum() for gr, gt in zip(grads, task_grads)) > 1e-3  # the penalty's own gradient
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_make_step_takes_a_teacher_and_temperature_only_where_they_apply():
    model = TappedModel(build_model("cnn2", 10), tap_points("cnn2"))
    teacher = TappedModel(build_model("cnn2", 10), tap_points("cnn2"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(lam=1.0, mean=MEAN, std=STD)
    with pytest.raises(TypeError, match="teacher must be a TappedModel .* for method 'at', got NoneType"):
        make_step(model, opt, method="at", **kw)
    with pytest.raises(ValueError, match=r"teacher applies to methods \('at', 'jt', 'kd'\) only, got method 'tap'"):
        make_step(model, opt, method="tap", teacher=teacher, **kw)
    with pytest.raises(ValueError, match="temperature must be a positive finite number, got None"):
        make_step(model, opt, method="kd", teacher=teacher, **kw)
    with pytest.raises(ValueError, match="temperature applies to method 'kd' only, got method 'jt'"):
        make_step(model, opt, method="jt", teacher=teacher, temperature=2.0, **kw)


def test_table21_lambdas_and_the_kd_temperature_are_the_defaults():
    from tap_fast.config import TrainConfig, default_lambda, resolve, sweep_lambdas

    assert default_lambda("at", "l1", "mnist", "cnn2", "ground-truth") == 1.0
    assert default_lambda("jt", "l1", "digits", "cnn2", "teacher") == 1e-7
    assert default_lambda("kd", "l1", "pneu", "resnet18", "ground-truth") == 1e4
    assert default_lambda("jt", "l1", "pneumoniamnist", "densenet121", "teacher") == 1e-9
    assert default_lambda("at", "l1", "knee", "vgg16", "teacher") == 1e3
    with pytest.raises(ValueError, match=r"no default lambda for method 'kd'.*pass lam \(--lam\)"):
        default_lambda("kd", "l1", "knee", "efficientnet_b0", "teacher")
    assert sweep_lambdas("jt")[0] == pytest.approx(1e-9) and sweep_lambdas("jt")[-1] == pytest.approx(1e4)
    kd = resolve(TrainConfig(method="kd", device="cpu", epochs=3))
    assert (kd.temperature, kd.lam, kd.teacher_epochs) == (4.0, 1.0, 3)  # a teacher is trained for AT / JT / KD
    assert resolve(TrainConfig(method="kd", temperature=2.0, device="cpu")).temperature == 2.0
    assert resolve(TrainConfig(method="at", device="cpu")).temperature is None


@pytest.mark.parametrize("argv,message", [
    (["--method", "tap", "--temperature", "2"], "argument --temperature: temperature applies to method 'kd' only"),
    (["--method", "kd", "--annotations", "random"], "argument --annotations: annotations 'random' draws masks"),
])
def test_cli_refuses_distillation_options_where_they_do_not_apply(argv, message, capsys):
    from tap_fast.cli import main

    assert main(["train", "--dataset", "digits", "--epochs", "1", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_non_positive_temperature(capsys):
    from tap_fast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--method", "kd", "--temperature", "0"])
    assert exc.value.code == 2 and "argument --temperature: must be a positive number" in capsys.readouterr().err


def test_a_kd_run_distils_from_the_cached_frozen_teacher(tmp_path, monkeypatch):
    """The teacher of teacher annotations (its share of the training split held out), frozen and cached in
    run_dir/teacher.pt: a second run reuses it without training another."""
    import tap_fast.preparation as preparation
    from tap_fast.config import TrainConfig, resolve
    from tap_fast.experiments import train

    config = TrainConfig(dataset="digits", method="kd", limit_train=64, limit_test=16, limit_val=16, epochs=1,
                         device="cpu", quiet=True, run_dir=str(tmp_path), lr=0.05, batch_size=16)
    first = train(config)
    assert first["sizes"]["train"] == 64 - round(0.1 * 64)
    assert first["annotations"]["kind"] is None and first["annotations"]["teacher"]["train_size"] == 6
    assert first["penalty_per_epoch"][0] > 0 and first["config"]["temperature"] == 4.0
    saved = torch.load(tmp_path / "teacher.pt", weights_only=False)
    monkeypatch.setattr(preparation, "train_teacher", lambda *a, **k: pytest.fail("the cached teacher was not used"))
    dataset = preparation.load(config)
    data = preparation.prepare(resolve(config, dataset), dataset)
    assert not data.teacher.training and not any(p.requires_grad for p in data.teacher.parameters())
    assert all(torch.equal(v, saved["model"][k]) for k, v in data.teacher.model.state_dict().items())
    assert json.loads(saved["info"]) == {"teacher": first["annotations"]["teacher"]}


def test_at_and_kd_trace_as_one_graph_with_the_teacher_forward():
    """What make_step compiles for AT and KD (COMPILED_METHODS): the student's forward, the teacher's under
    no_grad and both penalties, with fullgraph=True (no graph break), equal to eager."""
    model = TappedModel(build_model("cnn2", 10), tap_points("cnn2"))
    teacher = TappedModel(build_model("cnn2", 10), tap_points("cnn2")).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 1, 28, 28, generator=g), torch.randint(0, 10, (3,), generator=g)

    def loss(x, y):
        logits, acts = model(x)
        with torch.no_grad():
            teacher_logits, teacher_acts = teacher(x)
        return F.cross_entropy(logits, y) + at_penalty(acts, teacher_acts) + kd_penalty(logits, teacher_logits,
                                                                                         temperature=4.0)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(loss, backend="eager", fullgraph=True)(x, y), loss(x, y))


def test_jt_stays_eager_under_compile():
    """JT's double backward does not compile: make_step(compile=True) runs it eagerly (no graph), bit-identical."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (2,), generator=g)
    runs = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = TappedModel(build_model("cnn2", 10), tap_points("cnn2"))
        teacher = TappedModel(build_model("cnn2", 10), tap_points("cnn2"))
        torch._dynamo.reset()
        counters.clear()
        step = make_step(model, torch.optim.SGD(model.parameters(), lr=0.1), method="jt", lam=1.0, mean=MEAN,
                         std=STD, teacher=teacher, compile=compile)
        runs.append((torch.stack(step(images, labels, None)), [p.detach() for p in model.parameters()]))
        assert counters["stats"]["unique_graphs"] == 0
    assert runs[0][0][2] > 0 and torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))
