"""Teacher annotations (section 4.2): saliency, eq. 14 thresholding, random baseline, precision / recall."""
import dataclasses

import pytest
import torch
import torch.nn as nn

from tap_fast.annotations import annotation_quality, random_masks, saliency_maps, threshold_saliency
from tap_fast.config import TrainConfig, resolve
from tap_fast.experiments import annotate
from tap_fast.preparation import load, prepare


def _tiny_model():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 7, 4))


def test_saliency_matches_hand_computation_and_lies_in_unit_interval():
    model = _tiny_model()
    images = torch.randint(0, 256, (5, 2, 5, 7), dtype=torch.uint8)
    mean, std = 0.3, 0.2
    sal = saliency_maps(model, images, mean=mean, std=std, batch_size=2)  # uneven batches: 2 + 2 + 1
    assert sal.shape == (5, 1, 5, 7) and sal.dtype == torch.float32
    assert float(sal.min()) >= 0.0 and torch.allclose(sal.amax((1, 2, 3)), torch.ones(5))

    x = (images.float() / 255 - mean) / std
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(torch.log_softmax(model(x), 1).sum(), x)
    e = g.abs().sum(1, keepdim=True)
    torch.testing.assert_close(sal, e / e.amax((2, 3), keepdim=True), rtol=1e-5, atol=1e-7)


def test_saliency_restores_training_mode_and_handles_zero_gradient():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Dropout(0.5), nn.Flatten(), nn.Linear(2 * 16, 3))
    with torch.no_grad():
        model[3].weight.zero_()  # logits do not depend on the input: all-zero input gradient
    model.train()
    sal = saliency_maps(model, torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8), mean=0.0, std=1.0)
    assert model.training
    assert torch.equal(sal, torch.zeros(3, 1, 4, 4))


def test_saliency_rejects_float_images():
    with pytest.raises(ValueError, match="images must be a uint8"):
        saliency_maps(_tiny_model(), torch.rand(2, 2, 5, 7), mean=0.0, std=1.0)


def test_threshold_rule_is_strict_less_than_tau():
    sal = torch.tensor([[[[0.0, 0.009, 0.01], [0.05, 0.2, 1.0]]]])
    assert threshold_saliency(sal, 0.01, rule="threshold").tolist() == [[[[1, 1, 0], [0, 0, 0]]]]
    assert threshold_saliency(sal, 0.1, rule="threshold").tolist() == [[[[1, 1, 1], [1, 0, 0]]]]
    assert threshold_saliency(sal, 0.1, rule="threshold").dtype == torch.uint8
    with pytest.raises(ValueError, match="tau must lie in"):
        threshold_saliency(sal, 0.0)
    with pytest.raises(ValueError, match=r"rule must be one of \('quantile', 'threshold'\)"):
        threshold_saliency(sal, 0.1, rule="top")


def _lowest(values, k):
    """Reference: the indices of the k smallest values, ties to the lower index."""
    return sorted(sorted(range(len(values)), key=lambda i: (values[i], i))[:k])


@pytest.mark.parametrize("tau", [0.01, 0.05, 0.1, 0.37, 1.0])
def test_quantile_rule_masks_exactly_the_lowest_tau_fraction_per_image(tau):
    """The released rule: round(tau * H * W) pixels of each image, its lowest-saliency ones (99 pixels: 1, 5,
    10, 37, 99 of them), whatever the image's saliency scale."""
    g = torch.Generator().manual_seed(0)
    sal = torch.rand(6, 1, 9, 11, generator=g) * torch.rand(6, 1, 1, 1, generator=g)
    masks = threshold_saliency(sal, tau)
    assert masks.dtype == torch.uint8 and masks.shape == sal.shape
    k = round(tau * 99)
    assert masks.sum((1, 2, 3)).tolist() == [k] * 6
    for m, e in zip(masks, sal):
        assert m.flatten().nonzero().flatten().tolist() == _lowest(e.flatten().tolist(), k)


def test_quantile_rule_breaks_ties_by_pixel_index():
    """Equal saliencies: the first pixels in row-major order are masked (a stable sort on the pixel index);
    round(tau * H * W) rounds halves to even (tau 0.3125 of 8 pixels: 2.5 -> 2)."""
    sal = torch.tensor([[[[0.5, 0.0, 0.2, 0.0], [0.0, 0.7, 0.0, 0.1]]]])
    assert threshold_saliency(sal, 0.375).tolist() == [[[[0, 1, 0, 1], [1, 0, 0, 0]]]]  # 3 of the four zeros
    assert threshold_saliency(sal, 0.3125).tolist() == [[[[0, 1, 0, 1], [0, 0, 0, 0]]]]
    assert threshold_saliency(torch.zeros(2, 1, 3, 3), 0.34).tolist() == [[[[1, 1, 1], [0, 0, 0], [0, 0, 0]]]] * 2


def test_random_annotations_follow_the_quantile_rule():
    """Random masks copy each teacher mask's count: round(tau * H * W) per image under the quantile rule."""
    sal = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    teacher = threshold_saliency(sal, 0.01)
    rnd = random_masks(teacher, generator=torch.Generator().manual_seed(7))
    assert rnd.sum((1, 2, 3)).tolist() == [8] * 5 and not torch.equal(rnd, teacher)  # round(7.84)


def test_precision_recall_hand_example():
    truth = torch.zeros(2, 1, 3, 3, dtype=torch.uint8)
    truth[0, 0, 0, :2] = 1  # 2 spurious pixels in image 0
    truth[1, 0, 2, 2] = 1  # 1 in image 1
    masks = torch.zeros_like(truth)
    masks[0, 0, 0, 0] = 1  # hit
    masks[0, 0, 1, 1] = 1  # miss
    masks[1, 0, 2, 2] = 1  # hit
    masks[1, 0, 0, 0] = 1  # miss
    q = annotation_quality(masks, truth)
    assert q == {"precision": 2 / 4, "recall": 2 / 3, "fraction": 4 / 18}
    assert annotation_quality(torch.zeros_like(truth), truth) == {"precision": 0.0, "recall": 0.0, "fraction": 0.0}
    with pytest.raises(ValueError, match="same shape"):
        annotation_quality(masks[:1], truth)


def test_random_masks_keep_per_image_counts():
    ref = (torch.rand(7, 1, 6, 5) < torch.linspace(0.0, 1.0, 7).view(7, 1, 1, 1)).to(torch.uint8)
    rnd = random_masks(ref, generator=torch.Generator().manual_seed(1), batch_size=3)
    assert rnd.shape == ref.shape and rnd.dtype == torch.uint8
    assert torch.equal(rnd.sum((1, 2, 3)), ref.sum((1, 2, 3)))
    assert not torch.equal(rnd, ref)
    assert torch.equal(rnd, random_masks(ref, generator=torch.Generator().manual_seed(1), batch_size=3))
    positions = torch.stack([random_masks(ref[3:4], generator=torch.Generator().manual_seed(s))[0, 0]
                             for s in range(200)]).float().mean(0)
    assert positions.min() > 0.2 and positions.max() < 0.8  # every pixel is drawn sometimes, none always


def test_teacher_annotations_on_digits():
    config = TrainConfig(dataset="digits", method="tap", annotations="teacher", lam=0.01, epochs=2, teacher_lr=0.05,
                         batch_size=64, teacher_fraction=0.25, tau=0.1, limit_test=60, quiet=True, device="cpu")
    ds = load(config)
    cfg = resolve(config, ds)
    data = prepare(cfg, ds)
    n_teacher = round(0.25 * len(ds.train))
    assert data.train.masks.shape == data.train.images.shape and data.train.placement is None  # contaminated set
    assert len(data.train.labels) == data.train_size == len(ds.train) - n_teacher
    info = data.annotation_info
    assert info["teacher"]["train_size"] == n_teacher
    assert 0.0 < info["fraction"] < 1.0 and 0.0 <= info["precision"] <= 1.0 and 0.0 <= info["recall"] <= 1.0
    assert set(info["teacher"]["metrics"]) == {"contaminated", "permuted", "clean"}
    assert info["teacher"]["learned"] is True  # accuracy above the majority class's share
    # A trained teacher finds the 4x4 decoys less salient than the digits: better than random annotations.
    rnd = prepare(resolve(TrainConfig(**{**vars(config), "annotations": "random"}), ds), ds)
    assert torch.equal(rnd.train.masks.sum((1, 2, 3)), data.train.masks.sum((1, 2, 3)))
    assert info["recall"] > rnd.annotation_info["recall"]


def test_a_teacher_no_better_than_a_constant_predictor_is_flagged_and_warned_about(capsys):
    """evaluate_teacher: a teacher whose clean test metric does not beat the constant predictor's is recorded as
    not learned, with a warning naming the flags that train it more; one that beats it passes quietly."""
    from tap_fast.preparation import evaluate_teacher

    ds = load(TrainConfig(dataset="digits", device="cpu"))
    test = {v: ds.test.images[:60] for v in ("contaminated", "permuted", "clean")}
    labels = ds.test.labels[:60]

    class Constant(torch.nn.Module):  # logits for one class, whatever the image
        def __init__(self, cls):
            super().__init__()
            self.cls = cls

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((x.shape[0],), self.cls), 10).float()

    class Oracle(torch.nn.Module):  # the true labels of the 60 test images, in order
        def forward(self, x):
            return torch.nn.functional.one_hot(labels[:x.shape[0]], 10).float()

    majority = int(torch.bincount(labels).argmax())
    record = evaluate_teacher(Constant(majority), {"train_size": 5, "epochs": 1}, ds, test, labels)
    assert record["learned"] is False and record["metrics"]["clean"]["accuracy"] < 0.5
    err = capsys.readouterr().err
    assert "warning: the teacher (5 clean images, 1 epochs) scores accuracy" in err and "--teacher-epochs" in err
    assert evaluate_teacher(Oracle(), {"train_size": 5, "epochs": 1}, ds, test, labels)["learned"] is True
    assert capsys.readouterr().err == ""


def test_teacher_trains_at_teacher_lr_with_the_released_l2_term(monkeypatch):
    """train_teacher: SGD at teacher_lr, and the explicit L2 term c * ||theta||^2 as SGD weight decay 2c."""
    import tap_fast.preparation as preparation

    seen = {}
    monkeypatch.setattr(preparation, "fit", lambda model, feed, **kw: seen.update(kw))
    config = TrainConfig(dataset="digits", method="tap", annotations="teacher", limit_train=100, lr=0.05,
                         teacher_lr=3e-3, teacher_weight_decay=2e-4, quiet=True, device="cpu")
    ds = load(config)
    preparation.train_teacher(resolve(config, ds), ds, ds.train, torch.device("cpu"))
    assert seen["lr"] == 3e-3 and seen["weight_decay"] == 4e-4
    assert (TrainConfig().teacher_lr, TrainConfig().teacher_weight_decay) == (1e-4, 1e-4)  # the released values


def test_annotation_masks_are_cached_in_run_dir(tmp_path, monkeypatch):
    config = TrainConfig(dataset="digits", method="tap", annotations="teacher", lam=0.01, epochs=1, lr=0.05,
                         batch_size=128, limit_train=300, limit_test=30, quiet=True, device="cpu",
                         run_dir=str(tmp_path))
    ds = load(config)
    cfg = resolve(config, ds)
    first = prepare(cfg, ds)
    assert (tmp_path / "annotations.pt").is_file()
    import tap_fast.preparation as preparation

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was trained again although the masks were cached")

    monkeypatch.setattr(preparation, "train_teacher", no_teacher)
    second = prepare(cfg, ds)
    assert torch.equal(first.train.masks, second.train.masks)
    assert second.annotation_info == first.annotation_info
    assert first.annotation_info["tau_rule"] == "quantile"
    for changed in ({"tau_rule": "threshold"}, {"teacher_lr": 0.1}, {"teacher_weight_decay": 0.0}):
        with pytest.raises(AssertionError, match="trained again"):
            prepare(dataclasses.replace(cfg, **changed), ds)


def test_annotate_reports_quality_per_tau(tmp_path):
    record = annotate(TrainConfig(dataset="digits", epochs=1, lr=0.05, batch_size=128, limit_train=300,
                                  limit_test=30, quiet=True, device="cpu", run_dir=str(tmp_path)),
                      taus=(0.01, 0.1))
    assert set(record["taus"]) == {"0.01", "0.1"}
    low, high = record["taus"]["0.01"]["teacher"], record["taus"]["0.1"]["teacher"]
    assert low["fraction"] <= high["fraction"] and low["recall"] <= high["recall"]  # raising tau marks more
    saved = torch.load(tmp_path / "masks_tau0.1.pt", weights_only=True)
    assert torch.equal(saved["teacher"].sum((1, 2, 3)), saved["random"].sum((1, 2, 3)))
    assert saved["truth"].sum() == 16 * saved["truth"].shape[0]  # one 4x4 decoy per image
