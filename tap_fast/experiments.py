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
import time
from pathlib import Path

import torch

from tap_fast.annotations import annotation_quality, random_masks, saliency_maps, threshold_saliency
from tap_fast.choices import TAUS
from tap_fast.config import (RUNTIME_FIELDS, TrainConfig, check_config, resolve, resolve_device, step_options,
                             sweep_lambdas)
from tap_fast.datasets import clean_split
from tap_fast.distributed import DistContext, env_ranks, init_distributed, shutdown
from tap_fast.evaluation import evaluate_variants, shortcut_drop
from tap_fast.loop import fit, place_model
from tap_fast.models import build_model, tap_points
from tap_fast.preparation import (PreparedData, contaminate_split, load, prepare, split_versions, stratified_subset,
                                  train_teacher, variant_seed)
from tap_fast.tapped_model import TappedModel


def run(config: TrainConfig, data: PreparedData, ctx: DistContext | None = None) -> dict:
    """Train a model for a resolved ``config`` on prepared data and return the result record.

    With a multi-process ``ctx`` it trains data-parallel; every rank then evaluates the same final model on
    the whole test and validation sets and returns the same record."""
    start = time.perf_counter()
    ds = data.dataset
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = place_model(build_model(config.arch, ds.num_classes, data.train_images.shape[1],
                                    weights=config.weights, input_size=data.train_images.shape[-1]),
                        device, config.channels_last)
    meta = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}
    history = fit(TappedModel(model, tap_points(config.arch)), data.train_images, data.train_labels,
                  data.train_masks, method=config.method, lam=config.lam, epochs=config.epochs, lr=config.lr,
                  momentum=config.momentum, batch_size=config.batch_size, seed=config.seed, mean=ds.mean,
                  std=ds.std, norm=config.norm, kernel_size=config.kernel_size, compound=config.compound,
                  checkpoint=Path(config.run_dir) / "checkpoint.pt" if config.run_dir else None,
                  resume=config.resume, meta=meta, quiet=config.quiet,
                  desc="base" if config.clean_train else config.method, **step_options(config), ctx=ctx)
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
        "shortcut_drop": shortcut_drop(metrics, ds.metric),
        "loss_per_epoch": history["loss"],
        "task_loss_per_epoch": history["task_loss"],
        "penalty_per_epoch": history["penalty"],
        "annotations": data.annotation_info,
        "sizes": {"train": int(data.train_labels.numel()), "val": int(data.val_labels.numel()),
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


def sweep(config: TrainConfig, lambdas: list[float] | None = None) -> dict:
    """Section 5.3: train once per lambda (default :func:`sweep_lambdas`) on the same prepared data and select
    the lambda with the lowest cross-entropy on the permuted validation set SC(X*, permute(y))_val."""
    start = time.perf_counter()
    if config.method == "none":
        raise ValueError("method must be 'tap', 'rrr' or 'rbr' for a lambda sweep, got 'none'")
    lambdas = list(lambdas) if lambdas is not None else sweep_lambdas(config.method)
    if not lambdas or any(not (lam >= 0 and math.isfinite(lam)) for lam in lambdas):
        raise ValueError(f"lambdas must be a non-empty list of finite numbers >= 0, got {lambdas!r}")
    dataset = load(config)
    config = resolve(dataclasses.replace(config, lam=lambdas[0]), dataset)
    data = prepare(config, dataset)
    runs = []
    for lam in lambdas:
        run_dir = str(Path(config.run_dir) / f"lam_{lam:.0e}") if config.run_dir else None
        if config.compile:
            torch._dynamo.reset()  # one compiled step per lambda would reach dynamo's recompile limit
        try:
            result = run(dataclasses.replace(config, lam=float(lam), run_dir=run_dir), data)
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
    images, truth = contaminate_split(rest, dataset, "contaminated", variant_seed(config.seed, 1))
    teacher, record = train_teacher(config, dataset, teacher_split, device)
    test = stratified_subset(dataset.test, config.limit_test)
    record["metrics"] = evaluate_variants(
        teacher, {k: v.to(device) for k, v in split_versions(test, dataset, variant_seed(config.seed, 3)).items()},
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
