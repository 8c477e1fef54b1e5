"""Section 5's experiments: one run, the lambda sweep of section 5.3 and Figure 8's annotation quality.

:func:`train` loads, prepares (:mod:`tap_fast.preparation`), trains (:func:`tap_fast.loop.fit`) and
evaluates the final-epoch model on every test version (Appendix G); :func:`sweep` trains once per lambda;
:func:`annotate` measures a teacher's annotations; :func:`save_json` writes any of their records.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from tap_fast.annotations import annotation_quality, random_masks, saliency_maps, threshold_saliency
from tap_fast.choices import TAUS
from tap_fast.config import (TrainConfig, check_config, resolve, resolve_device, run_meta, step_options,
                             sweep_lambdas)
from tap_fast.datasets import clean_split
from tap_fast.distributed import DistContext, env_ranks, init_distributed, shutdown
from tap_fast.evaluation import evaluate_variants, shortcut_drop
from tap_fast.loop import changed_settings, check_resume, fit, load_checkpoint, place_model
from tap_fast.models import build_model, tap_points
from tap_fast.preparation import (PreparedData, contaminate_split, contamination_kind, load, prepare, split_versions,
                                  stratified_subset, train_teacher, variant_seed)
from tap_fast.tapped_model import TappedModel


def _checkpoint(config: TrainConfig) -> Path | None:
    return Path(config.run_dir) / "checkpoint.pt" if config.run_dir else None


def check_run_dir(config: TrainConfig) -> None:
    """Before any data is loaded: refuse a ``run_dir`` whose checkpoint the run would replace without
    ``overwrite`` (or, with ``resume``, one it cannot continue); print "resuming from epoch N" when it resumes.
    A checkpoint that cannot be read is a ValueError naming it."""
    path = _checkpoint(config)
    if path is None or config.overwrite or not path.is_file():
        return
    state = load_checkpoint(path)
    meta = run_meta(resolve(config))
    if config.resume:
        check_resume(state, path, meta, config.epochs)
        if not config.quiet and is_main_process():
            print(f"{config.run_dir}: resuming from epoch {state['epoch'] + 1}" if state["epoch"] < config.epochs
                  else f"{config.run_dir}: all {config.epochs} epochs are done; evaluating", file=sys.stderr)
        return
    changed = changed_settings(state, meta)
    if changed:
        raise ValueError(f"run_dir {config.run_dir} holds a checkpoint of another configuration (settings {changed} "
                         "differ): pass overwrite (--overwrite) to replace it, or another run_dir")
    raise ValueError(f"run_dir {config.run_dir} holds a checkpoint of this configuration (epoch {state['epoch']} of "
                     f"{config.epochs}): pass resume (--resume) to continue it, or overwrite (--overwrite) to start "
                     "again")


def run(config: TrainConfig, data: PreparedData, ctx: DistContext | None = None) -> dict:
    """Train a model for a resolved ``config`` on prepared data and return the result record.

    With a multi-process ``ctx`` it trains data-parallel; every rank then evaluates the same final model on
    the whole test and validation sets and returns the same record."""
    start = time.perf_counter()
    ds = data.dataset
    device = torch.device(config.device)
    desc = "base" if config.clean_train else config.method
    if not config.quiet and (ctx is None or ctx.is_main):
        print(f"{desc}: {ds.name} train {data.train_size} / val {data.val_labels.numel()} / test "
              f"{data.test_labels.numel()} images, device {device}, feed {getattr(data.train, 'backend', 'memory')}, arch "
              f"{config.arch}, lr {config.lr:g}, lambda {config.lam:g}, batch {config.batch_size}", file=sys.stderr)
    torch.manual_seed(config.seed)
    _, channels, _, side = ds.val.images.shape  # the training images' (streamed ones stay on disk)
    model = place_model(build_model(config.arch, ds.num_classes, channels, weights=config.weights, input_size=side),
                        device, config.channels_last)
    with TappedModel(model, tap_points(config.arch)) as tapped:
        history = fit(tapped, data.train, method=config.method, lam=config.lam, epochs=config.epochs, lr=config.lr,
                      momentum=config.momentum, mean=ds.mean, std=ds.std, norm=config.norm,
                      kernel_size=config.kernel_size, compound=config.compound, checkpoint=_checkpoint(config),
                      resume=config.resume, meta=run_meta(config), quiet=config.quiet, desc=desc,
                      class_weights=data.class_weights, **step_options(config), ctx=ctx)
    train_s = time.perf_counter() - start
    eval_start = time.perf_counter()
    kw = {"metric": ds.metric, "mean": ds.mean, "std": ds.std, "batch_size": 4 * config.batch_size}
    metrics = evaluate_variants(model, data.test, data.test_labels, **kw)
    validation = evaluate_variants(model, data.val, data.val_labels, **kw)
    return {
        "config": dataclasses.asdict(config),
        "metric": ds.metric,
        "metrics": metrics,
        "validation": validation,
        "shortcut_drop": shortcut_drop(metrics, ds.metric) if "permuted" in metrics else None,
        "loss_per_epoch": history["loss"],
        "task_loss_per_epoch": history["task_loss"],
        "penalty_per_epoch": history["penalty"],
        "annotations": data.annotation_info,
        "sizes": {"train": data.train_size, "val": int(data.val_labels.numel()),
                  "test": int(data.test_labels.numel())},
        "timing": {"train_s": train_s, "eval_s": time.perf_counter() - eval_start, "epoch_s": history["epoch_s"]},
        "environment": {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                        "processes": 1 if ctx is None else ctx.world_size},
    }


def train(config: TrainConfig) -> dict:
    """Load, contaminate, annotate, train and evaluate one configuration; returns the result record.

    Started by ``torchrun --nproc_per_node=N`` it joins the process group (gloo on the CPU, NCCL on GPUs,
    one GPU per local rank), trains with DDP at the global ``batch_size`` and leaves the group at the end;
    every rank returns the same record (the caller writes it on ``is_main_process()`` only).
    """
    start = time.perf_counter()
    check_config(config)
    check_run_dir(config)
    ctx = init_distributed(resolve_device(config.device), cuda_graphs=config.cuda_graphs)
    try:
        if ctx.enabled:
            config = dataclasses.replace(config, device=str(ctx.device))
        dataset = load(config)
        config = resolve(config, dataset)
        data = prepare(config, dataset, ctx)
        prepared_s = time.perf_counter() - start
        result = run(config, data, ctx)
    finally:
        shutdown(ctx)
    result["timing"].update(prepare_s=prepared_s, total_s=time.perf_counter() - start)
    return result


def is_main_process() -> bool:
    """True unless this process is a non-zero rank started by torchrun (those must not print or write)."""
    return env_ranks()[0] == 0


def _lambda_run(config: TrainConfig, lam: float) -> TrainConfig:
    """The sweep's run of ``lam``, checkpointed in its own folder lam_{lam:.0e} of ``run_dir``."""
    run_dir = str(Path(config.run_dir) / f"lam_{lam:.0e}") if config.run_dir else None
    return dataclasses.replace(config, lam=float(lam), run_dir=run_dir)


def sweep(config: TrainConfig, lambdas: list[float] | None = None) -> dict:
    """Section 5.3: train once per lambda (default :func:`sweep_lambdas`) on the same prepared data and select
    the lambda with the lowest cross-entropy on the permuted validation set SC(X*, permute(y))_val."""
    start = time.perf_counter()
    if config.method == "none":
        raise ValueError("method must be 'tap', 'rrr' or 'rbr' for a lambda sweep, got 'none'")
    lambdas = list(lambdas) if lambdas is not None else sweep_lambdas(config.method)
    if not lambdas or any(not (lam >= 0 and math.isfinite(lam)) for lam in lambdas):
        raise ValueError(f"lambdas must be a non-empty list of finite numbers >= 0, got {lambdas!r}")
    check_config(config)
    for lam in lambdas:
        check_run_dir(_lambda_run(config, lam))
    dataset = load(config)
    if contamination_kind(config, dataset) is None:
        raise ValueError("the sweep selects lambda on the permuted validation set, which needs a contamination: "
                         "pass --contamination decoy|tag|stripe for dataset 'folder'")
    config = resolve(dataclasses.replace(config, lam=lambdas[0]), dataset)
    data = prepare(config, dataset)
    runs = []
    for lam in lambdas:
        if config.compile:
            torch._dynamo.reset()  # one compiled step per lambda would reach dynamo's recompile limit
        try:
            result = run(_lambda_run(config, lam), data)
        except FloatingPointError as e:  # a lambda too large for this lr diverges: record, go on
            runs.append({"lam": float(lam), "val_permuted_loss": math.inf, "diverged": str(e)})
            continue
        runs.append({"lam": float(lam), "val_permuted_loss": result["validation"]["permuted"]["loss"],
                     "metrics": result["metrics"], "validation": result["validation"],
                     "loss_per_epoch": result["loss_per_epoch"]})
    finite = [r for r in runs if math.isfinite(r["val_permuted_loss"])]
    best = min(finite, key=lambda r: r["val_permuted_loss"]) if finite else None
    return {"config": dataclasses.asdict(config), "metric": dataset.metric, "runs": runs,
            "best_lam": None if best is None else best["lam"], "selection": "min permuted validation loss",
            "timing": {"total_s": time.perf_counter() - start}}


def annotate(config: TrainConfig, taus: tuple[float, ...] = TAUS) -> dict:
    """Figure 8 / Appendix K: pre-train one teacher on the clean split, threshold its saliency on the
    contaminated rest at each tau, and report precision / recall against the ground-truth masks for the
    teacher's and the random annotations, with the teacher's test metrics. With ``run_dir``, the masks are
    saved there as masks_tau{tau}.pt ({"teacher": uint8, "random": uint8, "truth": uint8})."""
    if not taus or any(not 0.0 < float(t) <= 1.0 for t in taus):
        raise ValueError(f"taus must be a non-empty list of thresholds in (0, 1], got {taus!r}")
    start = time.perf_counter()
    dataset = load(config)
    config = resolve(dataclasses.replace(config, method="tap", annotations="teacher", lam=0.0), dataset)
    device = torch.device(config.device)
    teacher_split, rest = clean_split(dataset.train, config.teacher_fraction, seed=config.seed)
    kind = contamination_kind(config, dataset)
    if kind is None and dataset.train.masks is None:
        raise ValueError("annotate measures a teacher against known spurious pixels: the data set has none "
                         "(pass --contamination, or --masks-dir / --boxes with dataset 'folder')")
    images, truth = contaminate_split(rest, dataset, kind, "contaminated", variant_seed(config.seed, 1))
    teacher, record = train_teacher(config, dataset, teacher_split, device)
    test = stratified_subset(dataset.test, config.limit_test)
    record["metrics"] = evaluate_variants(
        teacher, {k: v.to(device) for k, v in split_versions(test, dataset, kind, variant_seed(config.seed, 3)).items()},
        test.labels.to(device), metric=dataset.metric, mean=dataset.mean, std=dataset.std)
    saliency = saliency_maps(teacher, images.to(device), mean=dataset.mean, std=dataset.std).cpu()
    per_tau = {}
    for tau in taus:
        masks = threshold_saliency(saliency, tau)
        rnd = random_masks(masks, generator=torch.Generator().manual_seed(variant_seed(config.seed, 7)))
        per_tau[f"{tau:g}"] = {"teacher": annotation_quality(masks, truth), "random": annotation_quality(rnd, truth)}
        if config.run_dir:
            Path(config.run_dir).mkdir(parents=True, exist_ok=True)
            torch.save({"teacher": masks, "random": rnd, "truth": truth}, Path(config.run_dir) / f"masks_tau{tau:g}.pt")
    return {"config": dataclasses.asdict(config), "metric": dataset.metric, "teacher": record, "taus": per_tau,
            "annotated_images": len(rest), "timing": {"total_s": time.perf_counter() - start}}


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def save_json(record: dict, path: str | os.PathLike) -> None:
    """Write ``record`` as indented standard JSON (NaN / inf become null), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(record), indent=2, allow_nan=False) + "\n")
