"""Task metrics over a whole test set (section 5.2): accuracy (MNIST), binary F-score (PNEU), MAE (KNEE)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from tap_fast.feeds import normalise

METRICS = ("accuracy", "f1", "mae")
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "mae": False}


def _check_pair(pred: torch.Tensor, labels: torch.Tensor) -> None:
    if pred.shape != labels.shape or pred.dim() != 1 or pred.numel() == 0:
        raise ValueError(f"pred and labels must be non-empty 1-D tensors of equal length, got "
                         f"{tuple(pred.shape)} and {tuple(labels.shape)}")


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predicted classes equal to the labels."""
    _check_pair(pred, labels)
    return (pred == labels).double().mean().item()


def binary_f1(pred: torch.Tensor, labels: torch.Tensor, positive: int = 1) -> float:
    """F-score of the ``positive`` class (pneumonia in PNEU): 2 TP / (2 TP + FP + FN); 0.0 when undefined."""
    _check_pair(pred, labels)
    p, t = pred == positive, labels == positive
    tp = (p & t).sum().item()
    denominator = 2 * tp + (p & ~t).sum().item() + (~p & t).sum().item()
    return 2 * tp / denominator if denominator else 0.0


def mean_absolute_error(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean |predicted grade - true grade| over the set (ordinal KNEE grades as class indices)."""
    _check_pair(pred, labels)
    return (pred.double() - labels.double()).abs().mean().item()


METRIC_FUNCTIONS = {"accuracy": accuracy, "f1": binary_f1, "mae": mean_absolute_error}


def shortcut_drop(metrics: dict, metric: str) -> float:
    """How much worse the task metric is on the permuted test set than on the contaminated one: the
    reliance on the spurious signal (positive = shortcut): contaminated - permuted for accuracy and F1,
    permuted - contaminated for MAE (lower is better)."""
    change = metrics["contaminated"][metric] - metrics["permuted"][metric]
    return change if HIGHER_IS_BETTER[metric] else -change


def constant_baseline(metric: str, labels: torch.Tensor) -> tuple[int, float]:
    """The class a model that learned nothing predicts for every image, and its metric on ``labels``: the
    majority class for accuracy (its share) and F1; for MAE the median class (the lower median), the
    constant with the lowest MAE. Ties between classes go to the lowest index."""
    labels = labels.cpu()
    constant = int(labels.median()) if metric == "mae" else int(torch.bincount(labels).argmax())
    return constant, task_metric(metric, torch.full_like(labels, constant), labels)


def task_metric(metric: str, pred: torch.Tensor, labels: torch.Tensor) -> float:
    """The named metric ("accuracy", "f1" or "mae") of class predictions over the whole set."""
    if metric not in METRIC_FUNCTIONS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return METRIC_FUNCTIONS[metric](pred, labels)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, *, mean: float, std: float,
                   batch_size: int = 1024) -> torch.Tensor:
    """Eval-mode logits of a uint8 (N, C, H, W) image tensor, batch by batch, on the images' device."""
    was_training = model.training
    model.eval()
    try:
        out = [model(normalise(images[i:i + batch_size], mean, std))
               for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, metric: str, mean: float,
             std: float, batch_size: int = 1024) -> dict[str, float]:
    """``{metric: value, "loss": mean cross-entropy}`` over the whole set (not averaged per batch)."""
    logits = predict_logits(model, images, mean=mean, std=std, batch_size=batch_size)
    labels = labels.to(logits.device)
    return {metric: task_metric(metric, logits.argmax(1), labels),
            "loss": F.cross_entropy(logits.float(), labels).item()}


def evaluate_variants(model: nn.Module, variants: Mapping[str, torch.Tensor], labels: torch.Tensor, *,
                      metric: str, mean: float, std: float, batch_size: int = 1024) -> dict[str, dict[str, float]]:
    """:func:`evaluate` on each version of a split, e.g. ``{"contaminated": X1, "permuted": X2, "clean": X3}``
    (Appendix G), all sharing ``labels``."""
    return {name: evaluate(model, images, labels, metric=metric, mean=mean, std=std, batch_size=batch_size)
            for name, images in variants.items()}
