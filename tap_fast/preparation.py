"""Data preparation for a run (section 5.1): each split contaminated once, and the training annotations.

:func:`prepare` contaminates each split once as uint8 tensors on the device (train: SC(X*, y) with its
masks; val and test: contaminated, permuted and clean versions) and builds the training masks: the ground
truth, or a teacher's (section 4.2: :func:`train_teacher` on a clean share of the training split, then
:func:`teacher_annotations`), or random ones.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from tap_fast.annotations import annotation_quality, random_masks, saliency_maps, threshold_saliency
from tap_fast.config import DEFAULT_ARCH, TrainConfig, check_config, needs_teacher, step_options
from tap_fast.contamination import VARIANTS, contaminate
from tap_fast.datasets import Dataset, Split, clean_split, load_dataset, stratified_take
from tap_fast.distributed import DistContext
from tap_fast.evaluation import evaluate_variants
from tap_fast.loop import fit, place_model, save_checkpoint
from tap_fast.masks import check_mask_values
from tap_fast.models import build_model, tap_points
from tap_fast.tapped_model import TappedModel

VAL_VARIANTS = ("contaminated", "permuted")  # section 5.3 tunes lambda on the permuted validation loss


@dataclass
class PreparedData:
    """A data set contaminated once, as uint8 device tensors, with the training annotations."""
    dataset: Dataset
    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_masks: torch.Tensor | None
    val: dict[str, torch.Tensor]
    val_labels: torch.Tensor
    test: dict[str, torch.Tensor]
    test_labels: torch.Tensor
    annotation_info: dict


def load(config: TrainConfig) -> Dataset:
    """The data set named by ``config`` (validated first)."""
    check_config(config)
    return load_dataset(config.dataset, config.data_dir, image_size=config.image_size,
                        limit_train=config.limit_train, seed=config.seed, cache_dir=config.cache_dir)


def variant_seed(seed: int, k: int) -> int:
    """The seed of a run's k-th random draw: 1 train, 2 val, 3 test contamination, 7 random masks."""
    return seed * 1000 + k


def contaminate_split(split: Split, dataset: Dataset, variant: str, seed: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images with the data set's spurious signal and their ground-truth masks (uint8)."""
    return contaminate(split.images, split.labels, dataset.contamination, dataset.num_classes, variant=variant,
                       seed=seed)


def stratified_subset(split: Split, n: int | None) -> Split:
    """A fixed, class-stratified subset of n images (folder data sets are listed class by class, so the
    first n would often hold one class only)."""
    if n is None or n >= len(split):
        return split
    return split.subset(stratified_take(split.labels, n, torch.Generator().manual_seed(0))[0])


def split_versions(split: Split, dataset: Dataset, seed: int, variants: tuple[str, ...] = VARIANTS
                   ) -> dict[str, torch.Tensor]:
    """Versions of a split's images (contaminated and permuted ones share signal positions)."""
    return {v: contaminate_split(split, dataset, v, seed)[0] for v in variants}


def prepare(config: TrainConfig, dataset: Dataset, ctx: DistContext | None = None) -> PreparedData:
    """Contaminate ``dataset`` for a resolved ``config`` and build its training annotations.

    Teacher / random annotations hold out ``teacher_fraction`` of the training split as the teacher's clean
    data (section 5.1) and train the student on the contaminated rest. Masks are validated once here.
    Every rank of ``ctx`` prepares the whole (identical) data; a teacher is trained data-parallel.
    """
    device = torch.device(config.device)
    train, info = dataset.train, {"kind": config.annotations if config.method != "none" else None}
    with_teacher = needs_teacher(config)
    teacher_split = None
    if with_teacher:
        teacher_split, train = clean_split(train, config.teacher_fraction, seed=config.seed)
    variant = "clean" if config.clean_train else "contaminated"
    images, truth = contaminate_split(train, dataset, variant, variant_seed(config.seed, 1))
    test, val = stratified_subset(dataset.test, config.limit_test), stratified_subset(dataset.val, config.limit_val)
    data = PreparedData(
        dataset=dataset, train_images=images.to(device), train_labels=train.labels.to(device), train_masks=None,
        val={k: v.to(device)
             for k, v in split_versions(val, dataset, variant_seed(config.seed, 2), VAL_VARIANTS).items()},
        val_labels=val.labels.to(device),
        test={k: v.to(device) for k, v in split_versions(test, dataset, variant_seed(config.seed, 3)).items()},
        test_labels=test.labels.to(device), annotation_info=info)
    if config.method == "none":
        return data
    masks = truth
    if with_teacher:
        masks, teacher_info = teacher_annotations(config, dataset, teacher_split, data.train_images, data.test,
                                                  data.test_labels, ctx)
        info.update(teacher_info)
        info.update(annotation_quality(masks.cpu(), truth.cpu()))
    check_mask_values(masks, name="training masks")
    data.train_masks = masks.to(device)
    return data


def train_teacher(config: TrainConfig, dataset: Dataset, teacher_split: Split, device: torch.device,
                  ctx: DistContext | None = None) -> tuple[nn.Module, dict]:
    """Pre-train a teacher on the clean ``teacher_split`` (section 4.2) without XS for ``teacher_epochs``.

    Its architecture is the data set's default (cnn2 for the 28x28 sets, ResNet-18 for PNEU and KNEE, as in
    section 5.3); it uses the run's learning rate, batch size, momentum, seed and step options (compile,
    CUDA graphs, amp), data-parallel over ``ctx``. Returns the model (eval mode) and a record of its size and
    training time.
    """
    start = time.perf_counter()
    arch = DEFAULT_ARCH[config.dataset]
    weights = config.weights if arch == config.arch else (None if arch == "cnn2" else "imagenet")
    torch.manual_seed(config.seed)
    teacher = place_model(build_model(arch, dataset.num_classes, teacher_split.images.shape[1], weights=weights,
                                      input_size=teacher_split.images.shape[-1]), device, config.channels_last)
    fit(TappedModel(teacher, tap_points(arch)), teacher_split.images.to(device), teacher_split.labels.to(device),
        None, method="none", lam=0.0, epochs=config.teacher_epochs, lr=config.lr, momentum=config.momentum,
        batch_size=config.batch_size, seed=config.seed, mean=dataset.mean, std=dataset.std, quiet=config.quiet,
        desc="teacher", **step_options(config), ctx=ctx)
    teacher.eval()
    return teacher, {"arch": arch, "train_size": len(teacher_split), "epochs": config.teacher_epochs,
                     "train_s": time.perf_counter() - start}


def teacher_annotations(config: TrainConfig, dataset: Dataset, teacher_split: Split, images: torch.Tensor,
                        test: dict[str, torch.Tensor], test_labels: torch.Tensor, ctx: DistContext | None = None
                        ) -> tuple[torch.Tensor, dict]:
    """Masks for ``images`` from a teacher pre-trained on the clean ``teacher_split`` (eq. 13-14, threshold
    ``tau``), or random masks with the teacher's number of ones per image (``annotations="random"``).

    Computed once and cached in ``run_dir``/annotations.pt (written by the main rank; reused when the
    settings match). Returns the uint8 masks (on the images' device) and a record of the teacher with its
    test metrics (Appendix K).
    """
    key = {f: getattr(config, f) for f in ("dataset", "data_dir", "limit_train", "image_size", "seed", "arch",
                                          "weights", "lr", "batch_size", "momentum", "teacher_fraction",
                                          "teacher_epochs", "tau", "annotations", "amp", "channels_last")}
    cache = Path(config.run_dir) / "annotations.pt" if config.run_dir else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved["key"] == key:
            return saved["masks"].to(images.device), json.loads(saved["info"])
    teacher, record = train_teacher(config, dataset, teacher_split, images.device, ctx)
    record["metrics"] = evaluate_variants(teacher, test, test_labels, metric=dataset.metric, mean=dataset.mean,
                                          std=dataset.std)
    masks = threshold_saliency(saliency_maps(teacher, images, mean=dataset.mean, std=dataset.std), config.tau)
    if config.annotations == "random":
        masks = random_masks(masks, generator=torch.Generator().manual_seed(variant_seed(config.seed, 7)))
    info = {"teacher": record, "tau": config.tau}
    if cache is not None and (ctx is None or ctx.is_main):
        save_checkpoint(cache, {"key": key, "masks": masks.cpu(), "info": json.dumps(info)})
    return masks, info
