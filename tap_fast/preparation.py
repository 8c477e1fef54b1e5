"""Data preparation for a run (section 5.1): the training feed, the evaluation sets and the annotations.

:func:`prepare` builds the feed :func:`~tap_fast.loop.fit` trains from: the clean uint8 training split on the
device in a :class:`~tap_fast.feeds.DeviceFeed`, contaminated per batch (SC(X*, y) and its ground-truth
masks, united with the user's own masks), or the contaminated split with a teacher's (section 4.2:
:func:`train_teacher` on a clean share of the training split, then :func:`teacher_annotations`) or random
masks. Val and test are contaminated once as uint8 device tensors (contaminated, permuted and clean
versions; the user's own data set, uncontaminated unless asked, is evaluated on its test split as given).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from tap_fast.annotations import annotation_quality, random_masks, saliency_maps, threshold_saliency
from tap_fast.choices import DISTILLATION_METHODS
from tap_fast.config import (DEFAULT_ARCH, TrainConfig, check_config, needs_teacher, signal_options, step_options,
                             without_unsaved_defaults)
from tap_fast.contamination import VARIANTS, contaminate
from tap_fast.datasets import (FOLDER_DATASETS, Dataset, FileSplit, Split, clean_split, folder_split, load_dataset,
                               read_saved, stratified_take, write_saved)
from tap_fast.distributed import DistContext, per_rank_batch_size
from tap_fast.evaluation import HIGHER_IS_BETTER, constant_baseline, evaluate_variants
from tap_fast.dali_feed import FolderFeed, dali_available
from tap_fast.feeds import DeviceFeed
from tap_fast.folder_dataset import list_user_folder
from tap_fast.loop import fit, place_model
from tap_fast.masks import check_mask_values
from tap_fast.models import build_model, tap_points
from tap_fast.tapped_model import TappedModel

VAL_VARIANTS = ("contaminated", "permuted")  # section 5.3 tunes lambda on the permuted validation loss
MEMORY_FEED_BYTES = 4 << 30  # --feed auto: a "folder" set is held in memory up to this decoded size (4 GiB)
# The settings a teacher (train_teacher) depends on: the keys of its cached masks and model in run_dir (permute:
# the permuted test set of its recorded metrics).
TEACHER_FIELDS = ("dataset", "data_dir", "limit_train", "image_size", "channels", "seed", "arch", "weights",
                  "teacher_lr", "teacher_weight_decay", "batch_size", "momentum", "teacher_fraction", "teacher_epochs",
                  "permute", "contamination", "tag_mask", "tag_style", "class_weights", "amp", "channels_last")


@dataclass
class PreparedData:
    """A run's training feed (uint8 batches with their masks) and its evaluation sets as uint8 device tensors."""
    dataset: Dataset
    train: DeviceFeed | FolderFeed
    train_size: int
    class_weights: torch.Tensor | None  # of the cross-entropy (and RBR), on the device; None: unweighted
    val: dict[str, torch.Tensor]
    val_labels: torch.Tensor
    test: dict[str, torch.Tensor]
    test_labels: torch.Tensor
    annotation_info: dict
    teacher: TappedModel | None = None  # methods at / jt / kd: the frozen teacher (distillation_teacher)


def resolve_feed(config: TrainConfig) -> str:
    """The feed of a run: "memory" (the set on the device), or "dali" / "torchvision" (the training split of an
    image folder, "folder", "pneu" or "knee", streamed from disk). "auto" streams a folder whose decoded
    training images and masks would exceed ``MEMORY_FEED_BYTES``, with DALI when it is installed."""
    if config.feed != "auto":
        return config.feed
    if config.dataset not in ("folder", *FOLDER_DATASETS):
        return "memory"
    side = config.image_size or 224
    n = (len(list_user_folder(config.data_dir).splits["train"]) if config.dataset == "folder"
         else len(folder_split(config.dataset, config.data_dir, "train")[0]))
    decoded = n * (config.channels + 1) * side * side  # uint8 images and masks
    return "memory" if decoded <= MEMORY_FEED_BYTES else ("dali" if dali_available() else "torchvision")


def load(config: TrainConfig) -> Dataset:
    """The data set named by ``config`` (validated first); its training split stays on disk when the run
    streams it (:func:`resolve_feed`)."""
    check_config(config)
    return load_dataset(config.dataset, config.data_dir, image_size=config.image_size,
                        limit_train=config.limit_train, seed=config.seed, cache_dir=config.cache_dir,
                        channels=config.channels, masks_dir=config.masks_dir, boxes=config.boxes,
                        soft_masks=config.soft_masks, stream_train=resolve_feed(config) != "memory")


def contamination_kind(config: TrainConfig, dataset: Dataset) -> str | None:
    """The run's contamination: ``config.contamination``, else the data set's own (None: none)."""
    return config.contamination or dataset.contamination


def variant_seed(seed: int, k: int) -> int:
    """The seed of a run's k-th random draw: 1 train, 2 val, 3 test contamination, 7 random masks."""
    return seed * 1000 + k


def contaminate_split(split: Split, dataset: Dataset, kind: str | None, variant: str, seed: int, *,
                      permute: str = "random", tag_mask: str = "box", tag_style: str = "font"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images with the spurious signal ``kind`` and their masks (uint8; united with the split's own
    masks when it has them); kind None: the images as given. ``permute``, ``tag_mask`` and ``tag_style`` as
    ``contaminate``'s (a config's: ``signal_options(config)``)."""
    if kind is None:
        images, masks = split.images, torch.zeros_like(split.images[:, :1])
    else:
        images, masks = contaminate(split.images, split.labels, kind, dataset.num_classes, variant=variant,
                                    seed=seed, permute=permute, tag_mask=tag_mask, tag_style=tag_style)
    return images, (masks if split.masks is None else torch.maximum(masks.to(split.masks.dtype), split.masks))


def stratified_subset(split: Split, n: int | None) -> Split:
    """A fixed, class-stratified subset of n images (folder data sets are listed class by class, so the
    first n would often hold one class only)."""
    if n is None or n >= len(split):
        return split
    return split.subset(stratified_take(split.labels, n, torch.Generator().manual_seed(0))[0])


def split_versions(split: Split, dataset: Dataset, kind: str | None, seed: int,
                   variants: tuple[str, ...] = VARIANTS, **signal: str) -> dict[str, torch.Tensor]:
    """Versions of a split's images (contaminated and permuted ones share signal positions; ``signal``:
    contaminate's options, ``signal_options(config)``). The user's own data set adds "test", the split as given
    (the only version when no contamination is asked for)."""
    given = {"test": split.images} if dataset.contamination is None else {}
    if kind is None:
        return given
    return {**given, **{v: contaminate_split(split, dataset, kind, v, seed, **signal)[0] for v in variants}}


def class_weights(config: TrainConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """"balanced": n / (num_classes * n_c) per class c of ``labels`` (inverse class frequency, scikit-learn's
    rule; a class without images gets weight 0), on the run's device; "none": None."""
    if config.class_weights == "none":
        return None
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    weights = torch.where(counts > 0, len(labels) / (num_classes * counts.clamp(min=1)), 0.0)
    return weights.float().to(config.device)


def device_feed(images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, num_classes: int,
                ctx: DistContext, *, kind: str | None = None, variant: str = "contaminated",
                masks: torch.Tensor | None = None) -> DeviceFeed:
    """The uint8 training feed of this process's rank: images contaminated per batch with ``kind`` (seeded as
    the run's training contamination), masks united with ``masks``, shuffled by the run's seed. A set
    smaller than one global batch gives one batch of all of this rank's share (the teacher's small split)."""
    share = images.shape[0] // ctx.world_size
    return DeviceFeed(images, labels, kind=kind, num_classes=num_classes, variant=variant,
                      batch_size=min(per_rank_batch_size(config.batch_size, ctx.world_size), share), mean=None,
                      std=None, seed=config.seed, contamination_seed=variant_seed(config.seed, 1),
                      device=config.device, rank=ctx.rank, world_size=ctx.world_size, masks=masks,
                      **signal_options(config))


def folder_feed(files: FileSplit, config: TrainConfig, dataset: Dataset, ctx: DistContext, *, kind: str | None,
                variant: str) -> FolderFeed:
    """The streaming training feed of this process's rank (DALI or torchvision, ``config.feed``): the batches of
    :func:`device_feed` over the same split held in memory, read from disk."""
    device = torch.device(config.device)
    share = len(files.files) // ctx.world_size
    return FolderFeed(files.files, files.labels, kind=kind, num_classes=dataset.num_classes, variant=variant,
                      batch_size=min(per_rank_batch_size(config.batch_size, ctx.world_size), share), mean=None,
                      std=None, seed=config.seed, contamination_seed=variant_seed(config.seed, 1),
                      image_size=dataset.val.images.shape[-1], channels=dataset.val.images.shape[1],
                      masks=None if config.clean_train else files.masks,
                      boxes=None if config.clean_train else files.boxes, soft_masks=config.soft_masks,
                      device_id=(device.index or 0) if device.type == "cuda" else None, rank=ctx.rank,
                      world_size=ctx.world_size, backend=resolve_feed(config), **signal_options(config))


def prepare(config: TrainConfig, dataset: Dataset, ctx: DistContext | None = None) -> PreparedData:
    """The training feed and evaluation sets of ``dataset`` for a resolved ``config``, with its annotations.

    Teacher / random annotations hold out ``teacher_fraction`` of the training split as the teacher's clean
    data (section 5.1) and train the student on the contaminated rest. Methods at / jt / kd hold out the same
    share for the teacher they distil from (Appendix M, ``data.teacher``) and feed the rest as ground-truth
    runs do (its masks unused). Masks are validated once here. Every rank of ``ctx`` prepares the whole
    (identical) evaluation data; a teacher is trained data-parallel.
    """
    device = torch.device(config.device)
    ctx = ctx or DistContext(device=device)
    kind = contamination_kind(config, dataset)
    train, info = dataset.train, {"kind": config.annotations if config.method != "none" else None}
    with_teacher = needs_teacher(config)
    if with_teacher and dataset.streamed_train is not None:
        raise ValueError("a teacher (teacher or random annotations, methods at / jt / kd) trains on a share of "
                         "the whole training split: use --feed memory")
    teacher_split = None
    if with_teacher:
        teacher_split, train = clean_split(train, config.teacher_fraction, seed=config.seed)
    variant = "clean" if config.clean_train else "contaminated"
    test, val = stratified_subset(dataset.test, config.limit_test), stratified_subset(dataset.val, config.limit_val)
    data = PreparedData(
        dataset=dataset, train=None, train_size=len(train),
        class_weights=class_weights(config, train.labels, dataset.num_classes),
        val={k: v.to(device)
             for k, v in split_versions(val, dataset, kind, variant_seed(config.seed, 2), VAL_VARIANTS,
                                        **signal_options(config)).items()},
        val_labels=val.labels.to(device),
        test={k: v.to(device) for k, v in split_versions(test, dataset, kind, variant_seed(config.seed, 3),
                                                         **signal_options(config)).items()},
        test_labels=test.labels.to(device), annotation_info=info)
    if dataset.unmasked is not None:
        info["images_without_mask"] = dataset.unmasked
    if dataset.streamed_train is not None:
        data.train = folder_feed(dataset.streamed_train, config, dataset, ctx, kind=kind, variant=variant)
        data.train_size = len(dataset.streamed_train.files)
        data.class_weights = class_weights(config, dataset.streamed_train.labels, dataset.num_classes)
        return data
    if config.method in DISTILLATION_METHODS:
        data.teacher, teacher_info = distillation_teacher(config, dataset, teacher_split, data.test,
                                                          data.test_labels, ctx)
        info.update(kind=None, **teacher_info)  # the student trains as with ground truth, its masks unused
    if not with_teacher or data.teacher is not None:
        user_masks = None if config.clean_train or train.masks is None else train.masks
        if user_masks is not None and config.method != "none":
            check_mask_values(user_masks, soft=config.soft_masks, name="training masks")
        data.train = device_feed(train.images, train.labels, config, dataset.num_classes, ctx, kind=kind, variant=variant,
                                 masks=user_masks)
        return data
    images, truth = contaminate_split(train, dataset, kind, variant, variant_seed(config.seed, 1),
                                      **signal_options(config))
    masks, teacher_info = teacher_annotations(config, dataset, teacher_split, images.to(device), data.test,
                                              data.test_labels, ctx)
    info.update(teacher_info)
    info.update(annotation_quality(masks.cpu(), truth.cpu()))
    check_mask_values(masks, name="training masks")
    data.train = device_feed(images, train.labels, config, dataset.num_classes, ctx, masks=masks)
    return data


def _teacher_net(config: TrainConfig, dataset: Dataset, teacher_split: Split, device: torch.device,
                 weights: str | None) -> nn.Module:
    """The teacher's model (the data set's default arch) for ``teacher_split``'s images, on ``device``."""
    return place_model(build_model(DEFAULT_ARCH[config.dataset], dataset.num_classes, teacher_split.images.shape[1],
                                   weights=weights, input_size=teacher_split.images.shape[-1]), device,
                       config.channels_last)


def _read_cache(cache: Path | None, key: dict, fields: tuple[str, ...], what: str) -> dict | None:
    """The record cached at ``cache`` (with ``key`` and ``fields``) when its key is ``key`` (a setting its saved
    key lacks counts at TrainConfig's default: a field added after it was written); None when there is none,
    it is another configuration's, or it is unreadable (said on stderr: it is rebuilt)."""
    if cache is None or not cache.is_file():
        return None
    try:
        saved = read_saved(cache, ("key", *fields))
    except ValueError as e:
        print(f"{what}: cache unusable, {e}; training the teacher again to rebuild it", file=sys.stderr)
        return None
    old = saved["key"]
    return saved if isinstance(old, dict) and old == without_unsaved_defaults(key, old) else None


def distillation_teacher(config: TrainConfig, dataset: Dataset, teacher_split: Split, test: dict[str, torch.Tensor],
                         test_labels: torch.Tensor, ctx: DistContext | None = None) -> tuple[TappedModel, dict]:
    """Appendix M's teacher for AT / JT / KD: the teacher of teacher annotations (:func:`train_teacher` on the
    clean ``teacher_split``), frozen (eval mode, no parameter gradients) and tapped at its arch's preset layers.

    Trained once and cached in ``run_dir``/teacher.pt (written by the main rank; reused when the settings of
    ``TEACHER_FIELDS`` match). Returns the tapped teacher on ``test``'s device and ``{"teacher": record}``, the
    record with its test metrics (Appendix K)."""
    device = test_labels.device
    key = {f: getattr(config, f) for f in TEACHER_FIELDS}
    cache = Path(config.run_dir) / "teacher.pt" if config.run_dir else None
    saved = _read_cache(cache, key, ("model", "info"), "distillation teacher")
    if saved is not None:
        teacher = _teacher_net(config, dataset, teacher_split, device, None)
        teacher.load_state_dict(saved["model"])
        info = json.loads(saved["info"])
    else:
        teacher, record = train_teacher(config, dataset, teacher_split, device, ctx)
        record = evaluate_teacher(teacher, record, dataset, test, test_labels)
        info = {"teacher": record}
        if cache is not None and (ctx is None or ctx.is_main):
            write_saved(cache, {"key": key, "model": teacher.state_dict(), "info": json.dumps(info)})
    teacher.requires_grad_(False)
    return TappedModel(teacher, tap_points(DEFAULT_ARCH[config.dataset])).eval(), info


def train_teacher(config: TrainConfig, dataset: Dataset, teacher_split: Split, device: torch.device,
                  ctx: DistContext | None = None) -> tuple[nn.Module, dict]:
    """Pre-train a teacher on the clean ``teacher_split`` (section 4.2) without XS for ``teacher_epochs``.

    Its architecture is the data set's default (cnn2 for the 28x28 sets, ResNet-18 for PNEU and KNEE, as in
    section 5.3); it trains at ``teacher_lr`` with the explicit L2 term ``teacher_weight_decay`` * ||theta||^2
    (the released teachers': 1e-4 and 1e-4; SGD weight decay 2 * teacher_weight_decay, see
    :func:`~tap_fast.loop.fit`) and the run's batch size, momentum, seed and step options (compile, CUDA graphs,
    amp), data-parallel over ``ctx``. Returns the model (eval mode) and a record of its size and
    training time.
    """
    start = time.perf_counter()
    arch = DEFAULT_ARCH[config.dataset]
    weights = config.weights if arch == config.arch else (None if arch == "cnn2" else "imagenet")
    torch.manual_seed(config.seed)
    teacher = _teacher_net(config, dataset, teacher_split, device, weights)
    feed = device_feed(teacher_split.images, teacher_split.labels, config, dataset.num_classes,
                       ctx or DistContext(device=device))
    with TappedModel(teacher, tap_points(arch)) as tapped:
        fit(tapped, feed, method="none", lam=0.0, epochs=config.teacher_epochs, lr=config.teacher_lr,
            weight_decay=2 * config.teacher_weight_decay, momentum=config.momentum, mean=dataset.mean,
            std=dataset.std, quiet=config.quiet, desc="teacher",
            class_weights=class_weights(config, teacher_split.labels, dataset.num_classes), **step_options(config),
            ctx=ctx)
    teacher.eval()
    return teacher, {"arch": arch, "train_size": len(teacher_split), "epochs": config.teacher_epochs,
                     "train_s": time.perf_counter() - start}


def evaluate_teacher(teacher: nn.Module, record: dict, dataset: Dataset, test: dict[str, torch.Tensor],
                     test_labels: torch.Tensor) -> dict:
    """``record`` (from :func:`train_teacher`) with the teacher's test ``metrics`` (Appendix K) and ``learned``:
    whether its clean test metric beats the constant predictor's (:func:`~tap_fast.evaluation.constant_baseline`).
    A teacher that did not learn is warned about on stderr: its saliency, and so its annotations or its
    distillation targets, are an untrained network's."""
    metric = dataset.metric
    record["metrics"] = evaluate_variants(teacher, test, test_labels, metric=metric, mean=dataset.mean,
                                          std=dataset.std)
    _, baseline = constant_baseline(metric, test_labels)
    clean = record["metrics"]["clean"][metric]
    record["learned"] = clean > baseline if HIGHER_IS_BETTER[metric] else clean < baseline
    if not record["learned"]:
        print(f"warning: the teacher ({record['train_size']} clean images, {record['epochs']} epochs) scores "
              f"{metric} {clean:.3f} on the clean test set, no better than the constant predictor's {baseline:.3f}: "
              "its saliency is an untrained network's; train it longer (--teacher-epochs) or faster (--teacher-lr)",
              file=sys.stderr, flush=True)
    return record


def teacher_annotations(config: TrainConfig, dataset: Dataset, teacher_split: Split, images: torch.Tensor,
                        test: dict[str, torch.Tensor], test_labels: torch.Tensor, ctx: DistContext | None = None
                        ) -> tuple[torch.Tensor, dict]:
    """Masks for ``images`` from a teacher pre-trained on the clean ``teacher_split`` (eq. 13-14, ``tau`` by
    ``tau_rule``: :func:`~tap_fast.annotations.threshold_saliency`), or random masks with the teacher's number
    of ones per image (``annotations="random"``).

    Computed once and cached in ``run_dir``/annotations.pt (written by the main rank; reused when the
    settings match). Returns the uint8 masks (on the images' device) and a record of the teacher with its
    test metrics (Appendix K).
    """
    key = {f: getattr(config, f) for f in (*TEACHER_FIELDS, "tau", "tau_rule", "annotations")}
    cache = Path(config.run_dir) / "annotations.pt" if config.run_dir else None
    saved = _read_cache(cache, key, ("masks", "info"), "teacher annotations")
    if saved is not None:
        return saved["masks"].to(images.device), json.loads(saved["info"])
    teacher, record = train_teacher(config, dataset, teacher_split, images.device, ctx)
    record = evaluate_teacher(teacher, record, dataset, test, test_labels)
    masks = threshold_saliency(saliency_maps(teacher, images, mean=dataset.mean, std=dataset.std), config.tau,
                               rule=config.tau_rule)
    if config.annotations == "random":
        masks = random_masks(masks, generator=torch.Generator().manual_seed(variant_seed(config.seed, 7)))
    info = {"teacher": record, "tau": config.tau, "tau_rule": config.tau_rule}
    if cache is not None and (ctx is None or ctx.is_main):
        write_saved(cache, {"key": key, "masks": masks.cpu(), "info": json.dumps(info)})
    return masks, info
