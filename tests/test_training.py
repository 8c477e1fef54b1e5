"""Training step, metrics over whole sets, evaluation on the three test versions, checkpoint / resume."""
import copy
import dataclasses
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tap_fast.contamination import contaminate, permuted_signal, signal_seed
from tap_fast.datasets import stratified_take
from tap_fast.distributed import DistContext
from tap_fast.evaluation import (accuracy, binary_f1, evaluate, evaluate_variants, mean_absolute_error,
                                 shortcut_drop, task_metric)
from tap_fast.feeds import epoch_order
from tap_fast.input_gradients import rbr_penalty, rrr_penalty
from tap_fast.models import build_model, tap_points
from tap_fast.tap import tap_penalty_reference
from tap_fast.tapped_model import TappedModel
from tap_fast.train_step import train_step
from tap_fast.config import TrainConfig, check_config, default_lambda, resolve, sweep_lambdas
from tap_fast.experiments import sweep, train
from tap_fast.loop import fit
from tap_fast.preparation import device_feed, load, prepare, variant_seed

MEAN, STD = 0.2, 0.4


# --- metrics ----------------------------------------------------------------------------------------------

def test_metrics_match_hand_computations():
    assert accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75
    # TP = 2 (positions 0, 4), FP = 1 (1), FN = 1 (2): F1 = 2*2 / (2*2 + 1 + 1)
    assert binary_f1(torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 1, 0, 1])) == pytest.approx(4 / 6)
    assert binary_f1(torch.tensor([0, 0]), torch.tensor([0, 0])) == 0.0  # no positives at all: defined as 0
    assert mean_absolute_error(torch.tensor([0, 2, 4, 1]), torch.tensor([1, 2, 1, 1])) == 1.0
    assert task_metric("mae", torch.tensor([3]), torch.tensor([0])) == 3.0
    with pytest.raises(ValueError, match="metric must be one of"):
        task_metric("auc", torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="equal length"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0]))


def test_shortcut_drop_is_positive_when_permuted_is_worse():
    assert shortcut_drop({"contaminated": {"accuracy": 0.98}, "permuted": {"accuracy": 0.90}},
                         "accuracy") == pytest.approx(0.08)
    assert shortcut_drop({"contaminated": {"mae": 0.40}, "permuted": {"mae": 0.65}}, "mae") == pytest.approx(0.25)
    assert shortcut_drop({"contaminated": {"f1": 0.7}, "permuted": {"f1": 0.8}}, "f1") == pytest.approx(-0.1)


def test_binary_f1_agrees_with_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(3)
    pred, labels = torch.randint(0, 2, (101,), generator=g), torch.randint(0, 2, (101,), generator=g)
    assert binary_f1(pred, labels) == pytest.approx(metrics.f1_score(labels.numpy(), pred.numpy()))


class _FixedLogits(nn.Module):
    """Logits read from pixel values, so predictions are known without training."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        value = x[:, 0, 0, 0] * STD + MEAN  # the top-left pixel / 255
        k = torch.arange(self.num_classes, dtype=x.dtype)
        return -(value[:, None] * 10 - k).square()


def test_evaluate_covers_the_whole_set_not_batch_means():
    images = torch.zeros(11, 1, 2, 2, dtype=torch.uint8)
    pred = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1])
    images[:, 0, 0, 0] = (pred * 25.5).round().to(torch.uint8)  # value / 255 * 10 = class
    labels = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    expected_f1 = binary_f1(pred, labels)  # TP 1, FP 5, FN 1 -> 2 / 8
    assert expected_f1 == pytest.approx(1 / 4)
    for batch_size in (1, 3, 4, 100):
        out = evaluate(_FixedLogits(2), images, labels, metric="f1", mean=MEAN, std=STD, batch_size=batch_size)
        assert out["f1"] == pytest.approx(expected_f1)
    per_batch = [binary_f1(pred[i:i + 4], labels[i:i + 4]) for i in range(0, 11, 4)]
    assert sum(per_batch) / len(per_batch) != pytest.approx(expected_f1)  # what averaging per batch would give
    logits = _FixedLogits(2)((images.float() / 255 - MEAN) / STD)
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_evaluate_variants_on_contaminated_permuted_clean_decoys():
    """A model that reads only the decoy's brightness 255 - 25 y (section 5.1) is perfect on SC(X*, y),
    right on SC(X*, permute(y)) only where the random permuted signal is the label, and blind on clean data."""

    class DecoyReader(nn.Module):
        def forward(self, x):
            pixel = (x * STD + MEAN) * 255
            corners = torch.stack([pixel[:, 0, :4, :4], pixel[:, 0, :4, -4:], pixel[:, 0, -4:, :4],
                                   pixel[:, 0, -4:, -4:]], 1).amax((1, 2, 3))  # decoy value, or 0 if none
            return -(corners[:, None] - (255 - 25 * torch.arange(10.0))).square()

    labels = torch.arange(10).repeat(7)
    images = torch.zeros(70, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 10:18, 10:18] = 200  # a "digit" away from the corners
    versions = {v: contaminate(images, labels, "decoy", 10, variant=v, seed=5)[0]
                for v in ("contaminated", "permuted", "clean")}
    out = evaluate_variants(DecoyReader(), versions, labels, metric="accuracy", mean=MEAN, std=STD, batch_size=16)
    signal = permuted_signal(labels, 10, generator=torch.Generator().manual_seed(signal_seed(5)))
    assert out["contaminated"]["accuracy"] == 1.0
    assert 0 < (signal == labels).sum() < 70
    assert out["permuted"]["accuracy"] == pytest.approx((signal == labels).double().mean().item())
    assert out["clean"]["accuracy"] == pytest.approx(0.1)  # value 0 reads as class 9 (nearest 255 - 225 = 30)


# --- the training step ------------------------------------------------------------------------------------

def _batch(b=3, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 1, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (b,), generator=g)
    masks = (torch.rand(b, 1, size, size, generator=g) < 0.3).to(torch.uint8)
    return images, labels, masks


def _reference_loss(net, images, labels, masks, method, lam, norm):
    x = ((images.float() / 255 - MEAN) / STD).requires_grad_(method in ("rrr", "rbr"))
    tapped = TappedModel(net, tap_points("cnn2"))
    logits, acts = tapped(x)
    ce = F.cross_entropy(logits, labels)
    if method == "tap":
        return ce + lam * tap_penalty_reference(acts, masks, norm=norm)
    if method == "rrr":
        return ce + lam * rrr_penalty(logits, x, masks, normalize_mask=True, reduction="mean")
    if method == "rbr":
        return ce + lam * rbr_penalty(logits, x, masks, labels, net.parameters(), reduction="sum")
    return ce


@pytest.mark.parametrize("method,lam,norm", [("none", 0.0, "l1"), ("tap", 0.3, "l1"), ("tap", 0.05, "l2sq"),
                                             ("rrr", 0.2, "l1"), ("rbr", 7.0, "l1")])
def test_train_step_applies_gradient_of_ce_plus_lambda_penalty(method, lam, norm):
    images, labels, masks = _batch()
    net = build_model("cnn2", 10, input_size=12)
    ref_net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.0)  # step = -gradient
    loss, task, penalty = train_step(TappedModel(net, tap_points("cnn2")), opt, images, labels, masks,
                                     method=method, lam=lam, mean=MEAN, std=STD, norm=norm)
    assert not loss.requires_grad and loss.dim() == 0
    ref = _reference_loss(ref_net, images, labels, masks, method, lam, norm)
    grads = torch.autograd.grad(ref, list(ref_net.parameters()))
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, task + lam * penalty, rtol=1e-5, atol=1e-6)
    assert (penalty > 0) == (method != "none")
    for p_new, p_old, g in zip(net.parameters(), ref_net.parameters(), grads):
        torch.testing.assert_close(p_old - p_new, g, rtol=1e-4, atol=1e-6)


def test_train_step_explains_batchnorm_models_in_eval_mode():
    """RBR through a training-mode BatchNorm would need 3rd-order derivatives; the released code explains
    in eval mode. The task loss still uses the training-mode forward."""
    images, labels, masks = _batch(b=4, size=8)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 64, 10))
    ref_net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.0)
    train_step(TappedModel(net, ["2"]), opt, images, labels, masks, method="rbr", lam=3.0, mean=MEAN, std=STD,
               explain_in_eval=True)
    x = (images.float() / 255 - MEAN) / STD
    ce = F.cross_entropy(ref_net(x), labels)  # train mode: also updates the running statistics
    ref_net.eval()
    xe = x.clone().requires_grad_(True)
    penalty = rbr_penalty(ref_net(xe), xe, masks, labels, ref_net.parameters())
    ref_net.train()
    grads = torch.autograd.grad(ce + 3.0 * penalty, list(ref_net.parameters()))
    for p_new, p_old, g in zip(net.parameters(), ref_net.parameters(), grads):
        torch.testing.assert_close(p_old - p_new, g, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(net[1].running_mean, ref_net[1].running_mean)
    assert net.training


def test_train_step_rejects_unknown_method():
    images, labels, masks = _batch()
    net = build_model("cnn2", 10, input_size=12)
    with pytest.raises(ValueError, match="method must be one of"):
        train_step(TappedModel(net, tap_points("cnn2")), torch.optim.SGD(net.parameters(), lr=0.1), images,
                   labels, masks, method="tapp", lam=1.0, mean=MEAN, std=STD)


# --- configuration ----------------------------------------------------------------------------------------

def test_default_lambdas_follow_norm_and_appendix_c():
    assert default_lambda("none", "l1", "mnist", "cnn2", "ground-truth") == 0.0
    assert default_lambda("tap", "l1", "digits", "cnn2", "ground-truth") == 1e-2  # measured for eq. 8's L1
    assert default_lambda("tap", "l2sq", "mnist", "cnn2", "ground-truth") == 1e-3  # Table 2 (released code)
    assert default_lambda("tap", "l2sq", "mnist", "cnn2", "teacher") == 1e-4  # Table 3
    assert default_lambda("rbr", "l1", "mnist", "cnn2", "ground-truth") == 1e4
    assert default_lambda("rrr", "l1", "pneu", "densenet121", "ground-truth") == 1e-7
    assert default_lambda("rbr", "l2sq", "knee", "vgg16", "random") == 1e9
    with pytest.raises(ValueError, match="--lam"):
        default_lambda("tap", "l1", "knee", "resnet18", "ground-truth")
    assert sweep_lambdas("tap")[0] == pytest.approx(1e-9) and sweep_lambdas("tap")[-1] == 1.0
    assert len(sweep_lambdas("rbr")) == 10 and sweep_lambdas("rbr")[-1] == pytest.approx(1e9)


@pytest.mark.parametrize("changes,match", [
    ({"dataset": "cifar"}, "dataset must be one of"), ({"arch": "resnet50"}, "arch must be one of"),
    ({"method": "xs"}, "method must be one of"), ({"lam": -1.0}, "lam must be"), ({"epochs": 0}, "epochs must be"),
    ({"tau": 1.5}, "tau must lie"), ({"teacher_fraction": 1.0}, "teacher_fraction must lie"),
    ({"clean_train": True, "method": "tap"}, "clean_train"), ({"resume": True}, "resume needs run_dir"),
    ({"kernel_size": 2}, "kernel_size must be a positive odd int"), ({"momentum": 1.0}, "momentum must lie"),
    ({"tap_backend": "cuda"}, "tap_backend must be one of"), ({"tau_rule": "top"}, "tau_rule must be one of"),
    ({"permute": "swap"}, "permute must be one of"), ({"tag_mask": "outline"}, "tag_mask must be one of"),
    ({"tag_style": "tiny"}, "tag_style must be one of"),
    ({"teacher_lr": 0.0}, "teacher_lr must be a finite number > 0"),
    ({"teacher_weight_decay": -1e-4}, "teacher_weight_decay must be a finite number >= 0")])
def test_check_config_names_the_bad_field(changes, match):
    with pytest.raises(ValueError, match=match):
        check_config(dataclasses.replace(TrainConfig(), **changes))


@pytest.mark.parametrize("tau,ok", [(0.01, True), (1.0, True), (1e-9, True), (0.0, False), (1.0001, False),
                                    (float("nan"), False)])
def test_tau_range_is_eq14s_threshold_range(tau, ok):
    """tau thresholds saliency maps normalised to a per-image maximum of 1 (eq. 13-14): (0, 1] as in
    annotations.threshold_saliency; the CLI takes the same range (tests/test_cli.py)."""
    config = TrainConfig(tau=tau)
    if ok:
        check_config(config)
    else:
        with pytest.raises(ValueError, match=r"tau must lie in \(0, 1\]"):
            check_config(config)


@pytest.mark.parametrize("backend", ["triton", "identity"])
def test_check_config_needs_cuda_or_the_interpreter_for_triton_backends(backend, monkeypatch):
    config = TrainConfig(method="tap", tap_backend=backend, device="cpu")
    check_config(config)  # conftest sets TRITON_INTERPRET=1: Triton's CPU interpreter runs the kernels
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=rf"tap_backend '{backend}' runs Triton kernels.*CUDA device.*"
                                         r"TRITON_INTERPRET=1"):
        check_config(config)
    check_config(dataclasses.replace(config, tap_backend="torch"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now fails, as when absent
    with pytest.raises(ValueError, match=rf"tap_backend '{backend}' needs the triton package"):
        check_config(config)


@pytest.mark.parametrize("method", ["none", "rrr", "rbr"])
def test_check_config_refuses_a_tap_backend_without_tap(method):
    check_config(TrainConfig(method=method, tap_backend="auto"))
    with pytest.raises(ValueError, match=rf"tap_backend 'torch' .*method 'tap' only.*got method '{method}'"):
        check_config(TrainConfig(method=method, tap_backend="torch"))


def test_prepare_contaminates_each_split_once_with_ground_truth_masks():
    config = TrainConfig(dataset="digits", method="tap", limit_train=100, limit_test=40, device="cpu")
    ds = load(config)
    config = resolve(config, ds)
    data = prepare(config, ds)
    feed = data.train  # the clean set on the device, contaminated per batch as contaminate(all)[batch]
    assert torch.equal(feed.images, ds.train.images) and feed.placement is not None and feed.batch_size == 100
    images, truth = contaminate(ds.train.images, ds.train.labels, "decoy", 10, seed=variant_seed(config.seed, 1))
    order = feed.order()
    x, y, mask = next(iter(feed))
    assert torch.equal(x, images[order]) and torch.equal(y, ds.train.labels[order])
    assert torch.equal(mask, truth[order].float()) and torch.equal(mask.sum((1, 2, 3)), torch.full((100,), 16.0))
    assert set(data.test) == {"contaminated", "permuted", "clean"} and len(data.test_labels) == 40
    assert torch.equal(data.test["clean"], ds.test.subset(stratified_take(ds.test.labels, 40,
                                                                          torch.Generator().manual_seed(0))[0]).images)
    assert torch.equal(data.test_labels.bincount(minlength=10).clamp(max=1), torch.ones(10, dtype=torch.long))
    differs = (data.test["contaminated"] != data.test["permuted"]).any(1, keepdim=True)
    same_place = (data.test["contaminated"] != data.test["clean"]).any(1, keepdim=True)
    assert differs.any() and not (differs & ~same_place).any()  # permuting changes only decoy pixels
    base = prepare(dataclasses.replace(config, method="none", clean_train=True), ds)
    assert base.train.placement is None and base.train.masks is None and torch.equal(base.train.images, ds.train.images)


# --- fit: checkpoints and resume --------------------------------------------------------------------------

def _tiny(tmp_path, name, **kw):
    return TrainConfig(dataset="digits", method="tap", lam=0.01, limit_train=96, limit_test=20, lr=0.05,
                       batch_size=40, quiet=True, device="cpu", run_dir=str(tmp_path / name), **kw)


def test_resume_equals_training_straight_through(tmp_path):
    straight = train(_tiny(tmp_path, "straight", epochs=3))
    train(_tiny(tmp_path, "resumed", epochs=2))
    resumed = train(_tiny(tmp_path, "resumed", epochs=3, resume=True))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert resumed["loss_per_epoch"] == straight["loss_per_epoch"] and len(straight["loss_per_epoch"]) == 3
    assert resumed["metrics"] == straight["metrics"]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    train(_tiny(tmp_path, "run", epochs=2))
    with pytest.raises(ValueError, match="different settings.*'lam'"):
        train(dataclasses.replace(_tiny(tmp_path, "run", epochs=3, resume=True), lam=0.5))
    with pytest.raises(ValueError, match="epochs \\(1\\) is below the epoch of the checkpoint"):
        train(_tiny(tmp_path, "run", epochs=1, resume=True))


def test_train_record_and_sweep_selection(tmp_path):
    record = train(_tiny(tmp_path, "one", epochs=1))
    assert set(record["metrics"]) == {"contaminated", "permuted", "clean"}
    assert set(record["metrics"]["clean"]) == {"accuracy", "loss"}
    assert record["sizes"] == {"train": 96, "val": len(load(TrainConfig()).val), "test": 20}
    assert record["config"]["lam"] == 0.01 and len(record["penalty_per_epoch"]) == 1
    out = sweep(_tiny(tmp_path, "sweep", epochs=1), [1e-3, 1.0])
    losses = {r["lam"]: r["val_permuted_loss"] for r in out["runs"]}
    assert set(losses) == {1e-3, 1.0} and out["best_lam"] == min(losses, key=losses.get)
    assert (tmp_path / "sweep" / "lam_1.0" / "checkpoint.pt").is_file()
    near = sweep(_tiny(tmp_path, "near", epochs=1), [0.1, 0.12])  # one folder each, not a shared lam_1e-01
    assert [r["lam"] for r in near["runs"]] == [0.1, 0.12]
    assert sorted(p.name for p in (tmp_path / "near").iterdir()) == ["lam_0.1", "lam_0.12"]


# --- fit: static-shape batches, data-parallel shares ------------------------------------------------------

def _indexed_images(n, size=12):
    """Images whose pixels all hold their index, so a forward hook can tell which samples a batch held."""
    return torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, size, size).contiguous()


def _fit_batches(n, batch_size, ctx=None, epochs=2):
    """The samples of each batch fit trains on, from the run's feed (preparation.device_feed)."""
    seen = []
    net = build_model("cnn2", 10, input_size=12)
    net.register_forward_pre_hook(lambda m, args: seen.append(
        ((args[0][:, 0, 0, 0] * STD + MEAN) * 255).round().long().tolist()))
    labels = torch.arange(n) % 10
    config = TrainConfig(batch_size=batch_size, seed=4, device="cpu")
    feed = device_feed(_indexed_images(n), labels, config, 10, ctx or DistContext())
    fit(TappedModel(net, tap_points("cnn2")), feed, method="none", lam=0.0, epochs=epochs, lr=0.01, momentum=0.9,
        mean=MEAN, std=STD, quiet=True, ctx=ctx)
    return seen


def test_fit_drops_the_last_partial_batch_and_reshuffles_each_epoch():
    seen = _fit_batches(11, 4)
    assert [len(b) for b in seen] == [4, 4, 4, 4]  # 11 = 2 * 4 + 3: the 3 are dropped, each epoch
    for epoch in range(2):
        assert sum(seen[2 * epoch:2 * epoch + 2], []) == epoch_order(11, epoch=epoch, seed=4)[:8].tolist()
    assert seen[:2] != seen[2:]
    assert [len(b) for b in _fit_batches(3, 4, epochs=1)] == [3]  # a set smaller than a batch: one batch of it


def test_fit_weight_decay_is_sgds():
    """One step without momentum: theta - lr * (grad + wd * theta), the gradient of CE + (wd / 2) ||theta||^2."""
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randint(0, 256, (8, 1, 12, 12), generator=g, dtype=torch.uint8), torch.arange(8)
    net = build_model("cnn2", 10, input_size=12)
    ref = copy.deepcopy(net)
    feed = device_feed(images, labels, TrainConfig(batch_size=8, device="cpu"), 10, DistContext())
    fit(TappedModel(net, tap_points("cnn2")), feed, method="none", lam=0.0, epochs=1, lr=0.1, momentum=0.0,
        mean=MEAN, std=STD, weight_decay=0.3, quiet=True)
    params = list(ref.parameters())
    l2 = sum(p.square().sum() for p in params)
    loss = F.cross_entropy(ref((images.float() / 255 - MEAN) / STD), labels) + 0.3 / 2 * l2
    for p_new, p_old, grad in zip(net.parameters(), params, torch.autograd.grad(loss, params)):
        torch.testing.assert_close(p_new, p_old - 0.1 * grad, rtol=1e-5, atol=1e-6)


def test_fit_reads_its_ranks_share_of_each_global_batch(tmp_path):
    """Rank 1 of 2 (DDP over a 1-process gloo group, so it runs here) takes half of every global batch: the
    odd positions of the epoch's permutation, in batches of 8 / 2 = 4."""
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        seen = _fit_batches(21, 8, ctx=DistContext(rank=1, world_size=2), epochs=1)
    finally:
        dist.destroy_process_group()
    assert [len(b) for b in seen] == [4, 4]  # 21 // 2 = 10 per rank: 2 batches of 4, 2 dropped
    assert sum(seen, []) == epoch_order(21, epoch=0, seed=4, rank=1, world_size=2)[:8].tolist()
    with pytest.raises(ValueError, match="global_batch_size=9 is not divisible by world_size=2"):
        _fit_batches(21, 9, ctx=DistContext(rank=1, world_size=2), epochs=1)


def test_step_options_are_checked():
    with pytest.raises(ValueError, match="amp must be one of"):
        check_config(TrainConfig(amp="fp16"))
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        train(TrainConfig(cuda_graphs=True, device="cpu", limit_train=20, quiet=True))


# --- the engine end to end on a GPU (benchmarks/gpu_check.sh runs these with -m gpu) ----------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda(tmp_path, name, **kw):
    return dataclasses.replace(_tiny(tmp_path, name), device="cuda", **kw)


@pytest.mark.gpu
@cuda_only
def test_train_on_cuda_compiled_in_a_cuda_graph_equals_eager(tmp_path, exact_cuda):
    """`train` with the step compiled and captured in a CUDA graph (3 warm-up steps, then replays from the
    second epoch on) gives the eager step's per-epoch losses and test metrics (fp32, TF32 off; inductor
    reorders fp32 sums: rtol 1e-3 after 8 steps)."""
    import torch._dynamo

    eager = train(_cuda(tmp_path, "eager", epochs=4))
    torch._dynamo.reset()
    graphed = train(_cuda(tmp_path, "graphed", epochs=4, compile=True, cuda_graphs=True))
    torch._dynamo.reset()
    assert graphed["environment"]["device"].startswith("cuda")
    for key in ("loss_per_epoch", "penalty_per_epoch"):
        assert graphed[key] == pytest.approx(eager[key], rel=1e-3)
    for variant, m in eager["metrics"].items():
        assert graphed["metrics"][variant]["loss"] == pytest.approx(m["loss"], rel=1e-3)


@pytest.mark.gpu
@cuda_only
def test_train_on_cuda_resumes_a_graphed_run(tmp_path, exact_cuda):
    """A CUDA-graph run stopped after 2 epochs and resumed from its GPU checkpoint (the graph is captured
    again) ends where the straight 4-epoch run ends."""
    straight = train(_cuda(tmp_path, "straight", epochs=4, cuda_graphs=True))
    train(_cuda(tmp_path, "resumed", epochs=2, cuda_graphs=True))
    resumed = train(_cuda(tmp_path, "resumed", epochs=4, cuda_graphs=True, resume=True))
    assert resumed["loss_per_epoch"] == pytest.approx(straight["loss_per_epoch"], rel=1e-5)
    assert resumed["metrics"]["permuted"]["loss"] == pytest.approx(straight["metrics"]["permuted"]["loss"],
                                                                   rel=1e-5)


@pytest.mark.gpu
@cuda_only
def test_train_on_cuda_bf16_in_a_cuda_graph_equals_eager_bf16(tmp_path, exact_cuda):
    """bf16 autocast captured in a CUDA graph gives the eager bf16 run's per-epoch losses (rtol 2e-2: bf16
    rounding may differ where cuDNN picks other kernels under capture)."""
    eager = train(_cuda(tmp_path, "eager", epochs=4, amp="bf16"))
    graphed = train(_cuda(tmp_path, "graphed", epochs=4, amp="bf16", cuda_graphs=True))
    assert graphed["config"]["amp"] == "bf16"
    assert graphed["loss_per_epoch"] == pytest.approx(eager["loss_per_epoch"], rel=2e-2)
