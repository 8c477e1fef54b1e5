"""Section 5's experiments: one run, the lambda sweep of section 5.3 and Figure 8's annotation quality.

:func:`train` loads, prepares (:mod:`tap_fast.preparation`), trains (:func:`tap_fast.loop.fit`) and
evaluates the final-epoch model on every test version (Appendix G); :func:`sweep` trains once per lambda;
:func:`annotate` measures a teacher's annotations; :func:`explain` measures a trained run's Appendix D overlap
and draws its maps; :func:`save_json` writes any of their records.
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
from tap_fast.choices import OVERLAP_IMAGES, SWEEP_SELECTIONS, TAUS
from tap_fast.config import (TrainConfig, check_config, resolve, resolve_device, run_meta, signal_options,
                             step_options, sweep_lambdas)
from tap_fast.datasets import Dataset, clean_split, stratified_take
from tap_fast.distributed import DistContext, env_ranks, init_distributed, shutdown
from tap_fast.evaluation import HIGHER_IS_BETTER, constant_baseline, evaluate_variants, shortcut_drop
from tap_fast.explanations import explanation_maps, overlap, write_maps
from tap_fast.loop import changed_settings, check_resume, fit, load_checkpoint, place_model
from tap_fast.models import build_model, tap_points
from tap_fast.preparation import (PreparedData, contaminate_split, contamination_kind, evaluate_teacher, load, prepare,
                                  split_versions, stratified_subset, train_teacher, variant_seed)
from tap_fast.tapped_model import TappedModel


def _checkpoint(config: TrainConfig) -> Path | None:
    return Path(config.run_dir) / "checkpoint.pt" if config.run_dir else None


def _saved_meta(config: TrainConfig) -> dict | None:
    """The meta of the checkpoint a resumed run continues (None when it starts afresh)."""
    path = _checkpoint(config)
    return (load_checkpoint(path)["meta"] or {}) if config.resume and path is not None and path.is_file() else None


def check_run_dir(config: TrainConfig) -> None:
    """Before any data is loaded: refuse a ``run_dir`` whose checkpoint the run would replace without
    ``overwrite`` (or, with ``resume``, one it cannot continue); print "resuming from epoch N" when it resumes.
    A checkpoint that cannot be read is a ValueError naming it."""
    path = _checkpoint(config)
    if path is None or config.overwrite or not path.is_file():
        return
    state = load_checkpoint(path)
    meta = run_meta(resolve(config), state["meta"])
    saved_batch = (state["meta"] or {}).get("batch_size")
    if config.batch_size is None and isinstance(saved_batch, int) and saved_batch <= meta["batch_size"]:
        meta["batch_size"] = saved_batch  # the default batch, capped at the set's size (known only after loading)
    if config.resume:
        try:
            check_resume(state, path, meta, config.epochs)
        except ValueError as e:
            saved = (state["meta"] or {}).get("teacher_epochs")
            if config.teacher_epochs is None and saved not in (None, meta.get("teacher_epochs")):
                raise ValueError(f"{e} (teacher_epochs follows epochs unless given: pass teacher_epochs "
                                 f"(--teacher-epochs) {saved} to keep the checkpoint's teacher)") from None
            raise
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
        if ds.unmasked is not None:
            print(f"{desc}: images without a mask (no spurious pixels) per split: {ds.unmasked}", file=sys.stderr)
    torch.manual_seed(config.seed)
    _, channels, _, side = ds.val.images.shape  # the training images' (streamed ones stay on disk)
    model = place_model(build_model(config.arch, ds.num_classes, channels, weights=config.weights, input_size=side),
                        device, config.channels_last)
    with TappedModel(model, tap_points(config.arch)) as tapped:
        history = fit(tapped, data.train, method=config.method, lam=config.lam, epochs=config.epochs, lr=config.lr,
                      momentum=config.momentum, mean=ds.mean, std=ds.std, norm=config.norm,
                      kernel_size=config.kernel_size, compound=config.compound, checkpoint=_checkpoint(config),
                      resume=config.resume, meta=run_meta(config, _saved_meta(config)), quiet=config.quiet,
                      desc=desc,
                      class_weights=data.class_weights, teacher=data.teacher, temperature=config.temperature,
                      **step_options(config), ctx=ctx)
    train_s = time.perf_counter() - start
    eval_start = time.perf_counter()
    kw = {"metric": ds.metric, "mean": ds.mean, "std": ds.std, "batch_size": 4 * config.batch_size}
    metrics = evaluate_variants(model, data.test, data.test_labels, **kw)
    validation = evaluate_variants(model, data.val, data.val_labels, **kw)
    overlap_record = run_overlap(config, ds, model, OVERLAP_IMAGES) if config.overlap else None
    return {
        "config": dataclasses.asdict(config),
        "metric": ds.metric,
        "metrics": metrics,
        "validation": validation,
        "shortcut_drop": shortcut_drop(metrics, ds.metric) if "permuted" in metrics else None,
        "overlap": overlap_record,
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
    """The sweep's run of ``lam``, checkpointed in its own folder lam_{repr(float(lam))} of ``run_dir`` (exact, so
    distinct lambdas such as 0.1 and 0.12 never share one)."""
    run_dir = str(Path(config.run_dir) / f"lam_{float(lam)!r}") if config.run_dir else None
    return dataclasses.replace(config, lam=float(lam), run_dir=run_dir)


def _lower_better(metric: str, value: float) -> float:
    """``value`` of the task metric negated where higher is better, so that lower is always better."""
    return -value if HIGHER_IS_BETTER[metric] else value


def sweep(config: TrainConfig, lambdas: list[float] | None = None, *, grid: str | None = None,
          select: str = "loss") -> dict:
    """Section 5.3: train once per lambda (default :func:`sweep_lambdas` on ``grid``, "decade" unless given)
    on the same prepared data and select on the permuted validation set SC(X*, permute(y))_val: the lowest
    cross-entropy (``select="loss"``, the paper's rule) or the best task metric (``"metric"``); ties go to
    the first lambda. A run whose permuted validation metric is no better than the constant predictor's
    (:func:`tap_fast.evaluation.constant_baseline` on the validation labels) is ``degenerate``; the record
    names the selected lambda (``best_lam``, ``degenerate``) and the best non-degenerate one under the same
    rule (``best_non_degenerate_lam``, None when every run is degenerate or diverged)."""
    start = time.perf_counter()
    if config.method == "none":
        raise ValueError("method must be one of tap, rrr, rbr, at, jt, kd for a lambda sweep, got 'none'")
    if select not in SWEEP_SELECTIONS:
        raise ValueError(f"select must be one of {SWEEP_SELECTIONS}, got {select!r}")
    if lambdas is not None and grid is not None:
        raise ValueError("give lambdas (--lambdas) or a grid (--grid), not both")
    given = lambdas is not None
    lambdas = list(lambdas) if given else sweep_lambdas(config.method, grid or "decade")
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
    metric = dataset.metric
    constant, baseline = constant_baseline(metric, data.val_labels)
    runs = []
    for lam in lambdas:
        if config.compile:
            torch._dynamo.reset()  # one compiled step per lambda would reach dynamo's recompile limit
        run_start = time.perf_counter()
        try:
            result = run(_lambda_run(config, lam), data)
        except FloatingPointError as e:  # a lambda too large for this lr diverges: record, go on
            runs.append({"lam": float(lam), "val_permuted_loss": math.inf, "diverged": str(e),
                         "timing": {"total_s": time.perf_counter() - run_start}})
            continue
        permuted = result["validation"]["permuted"]
        runs.append({"lam": float(lam), "val_permuted_loss": permuted["loss"], "val_permuted_metric": permuted[metric],
                     "degenerate": _lower_better(metric, permuted[metric]) >= _lower_better(metric, baseline),
                     "metrics": result["metrics"], "validation": result["validation"],
                     "shortcut_drop": result["shortcut_drop"], "loss_per_epoch": result["loss_per_epoch"],
                     "task_loss_per_epoch": result["task_loss_per_epoch"],
                     "penalty_per_epoch": result["penalty_per_epoch"],
                     "timing": {**result["timing"], "total_s": time.perf_counter() - run_start}})

    def score(r: dict) -> float:
        return r["val_permuted_loss"] if select == "loss" else _lower_better(metric, r["val_permuted_metric"])

    trained = [r for r in runs if "diverged" not in r and math.isfinite(score(r))]
    best = min(trained, key=score, default=None)
    best_learned = min((r for r in trained if not r["degenerate"]), key=score, default=None)
    rule = ("lowest permuted validation loss" if select == "loss" else
            f"{'highest' if HIGHER_IS_BETTER[metric] else 'lowest'} permuted validation {metric}")
    return {"config": dataclasses.asdict(config), "metric": metric, "runs": runs,
            "grid": None if given else grid or "decade", "selection": select, "selection_rule": rule,
            "constant_baseline": {"predictor": "median class" if metric == "mae" else "majority class",
                                  "class": constant, metric: baseline},
            "best_lam": None if best is None else best["lam"],
            "degenerate": None if best is None else best["degenerate"],
            "best_non_degenerate_lam": None if best_learned is None else best_learned["lam"],
            "timing": {"total_s": time.perf_counter() - start}}


def annotate(config: TrainConfig, taus: tuple[float, ...] = TAUS) -> dict:
    """Figure 8 / Appendix K: pre-train one teacher on the clean split, threshold its saliency on the
    contaminated rest at each tau (by ``tau_rule``), and report precision / recall against the ground-truth
    masks for the teacher's and the random annotations, with the teacher's test metrics. With ``run_dir``, the masks are
    saved there as masks_tau{tau}.pt ({"teacher": uint8, "random": uint8, "truth": uint8})."""
    if not taus or any(not 0.0 < float(t) <= 1.0 for t in taus):
        raise ValueError(f"taus must be a non-empty list of thresholds in (0, 1], got {taus!r}")
    start = time.perf_counter()
    config = dataclasses.replace(config, feed="memory")  # the teacher's share and the rest are held in memory
    dataset = load(config)
    config = resolve(dataclasses.replace(config, method="tap", annotations="teacher", lam=0.0), dataset)
    device = torch.device(config.device)
    teacher_split, rest = clean_split(dataset.train, config.teacher_fraction, seed=config.seed)
    kind = contamination_kind(config, dataset)
    if kind is None and dataset.train.masks is None:
        raise ValueError("annotate measures a teacher against known spurious pixels: the data set has none "
                         "(pass --contamination, or --masks-dir / --boxes with dataset 'folder')")
    images, truth = contaminate_split(rest, dataset, kind, "contaminated", variant_seed(config.seed, 1),
                                      **signal_options(config))
    teacher, record = train_teacher(config, dataset, teacher_split, device)
    test = stratified_subset(dataset.test, config.limit_test)
    versions = split_versions(test, dataset, kind, variant_seed(config.seed, 3), **signal_options(config))
    record = evaluate_teacher(teacher, record, dataset, {k: v.to(device) for k, v in versions.items()},
                              test.labels.to(device))
    saliency = saliency_maps(teacher, images.to(device), mean=dataset.mean, std=dataset.std).cpu()
    per_tau = {}
    for tau in taus:
        masks = threshold_saliency(saliency, tau, rule=config.tau_rule)
        rnd = random_masks(masks, generator=torch.Generator().manual_seed(variant_seed(config.seed, 7)))
        per_tau[f"{tau:g}"] = {"teacher": annotation_quality(masks, truth), "random": annotation_quality(rnd, truth)}
        if config.run_dir:
            Path(config.run_dir).mkdir(parents=True, exist_ok=True)
            torch.save({"teacher": masks, "random": rnd, "truth": truth}, Path(config.run_dir) / f"masks_tau{tau:g}.pt")
    return {"config": dataclasses.asdict(config), "metric": dataset.metric, "teacher": record, "taus": per_tau,
            "annotated_images": len(rest), "timing": {"total_s": time.perf_counter() - start}}


def overlap_set(config: TrainConfig, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The run's contaminated test set as :func:`run` evaluates it (``limit_test``'s subset, contaminated with
    the seed's test draw; the user's test split as given when no contamination is asked for) with its
    spurious masks: uint8 images (N, C, H, W), masks (N, 1, H, W) and labels (N,), on the CPU. None when the
    set has no spurious pixel (no contamination, and no user mask marks one)."""
    kind = contamination_kind(config, dataset)
    test = stratified_subset(dataset.test, config.limit_test)
    if kind is None and (test.masks is None or not test.masks.any()):
        return None
    images, masks = contaminate_split(test, dataset, kind, "contaminated", variant_seed(config.seed, 3),
                                      **signal_options(config))
    return images, masks, test.labels


def run_overlap(config: TrainConfig, dataset: Dataset, model: torch.nn.Module, limit: int | None = None
                ) -> dict | None:
    """``{"images": N, "maps": {"input_gradient": {"recall", "precision"}, tap: {...}, ...}}``: Appendix D's
    overlap (:func:`tap_fast.explanations.overlap`, one row of Tables 4-5) of the trained ``model`` (tapped at
    ``tap_points(config.arch)``) on :func:`overlap_set`, or on a fixed class-stratified subset of at most
    ``limit`` of its images; None when the set has no spurious masks."""
    found = overlap_set(config, dataset)
    if found is None:
        return None
    images, masks, labels = found
    if limit is not None and limit < len(labels):
        keep = stratified_take(labels, limit, torch.Generator().manual_seed(0))[0]
        images, masks = images[keep], masks[keep]
    device = next(model.parameters()).device
    with TappedModel(model, tap_points(config.arch)) as tapped:
        rows = overlap(tapped, images.to(device), masks.to(device), mean=dataset.mean, std=dataset.std,
                       batch_size=config.batch_size)
    return {"images": int(images.shape[0]), "maps": rows}


def explain(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, images: int = 8, seed: int = 0,
            overwrite: bool = False, device: str = "auto", data_dir: str | None = None) -> dict:
    """Appendix D for a trained run: its overlap on the whole contaminated test set (:func:`run_overlap`,
    Tables 4-5) written to ``out_dir``/overlap.json, and ``out_dir``/maps.png (Figures 1, 11, 12) for
    ``images`` test images drawn at random by ``seed``. Returns the record of overlap.json.

    The model and its data set come from ``checkpoint`` (a ``checkpoint.pt`` of :func:`train`, whose meta holds
    the run's configuration); ``data_dir`` replaces the data set's folder it recorded. An ``out_dir`` that
    exists and is not empty is refused unless ``overwrite`` (which replaces those two files only)."""
    path, out = Path(checkpoint), Path(out_dir)
    if not isinstance(images, int) or isinstance(images, bool) or images < 1:
        raise ValueError(f"images (--images) must be a positive int (test images in maps.png), got {images!r}")
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}: give the --run-dir of a `tap-fast train --run-dir` run, or "
                         "its --checkpoint file")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for overlap.json and maps.png")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty: pass --overwrite to replace its overlap.json and "
                         "maps.png, or give a new folder")
    state = load_checkpoint(path)
    if not state["meta"]:
        raise ValueError(f"checkpoint {path} records no run configuration (meta): it was not written by train")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in state["meta"].items() if k in fields})
    config = dataclasses.replace(config, device=str(resolve_device(device)), quiet=True,
                                 data_dir=config.data_dir if data_dir is None else data_dir)
    dataset = load(config)
    found = overlap_set(config, dataset)
    if found is None:
        raise ValueError(f"{path}: the run's data set ({config.dataset} {config.data_dir}) has no spurious masks "
                         "to overlap with: train with --contamination, --masks-dir or --boxes")
    test_images, masks, _ = found
    _, channels, _, side = dataset.val.images.shape
    model = place_model(build_model(config.arch, dataset.num_classes, channels, weights=None, input_size=side),
                        torch.device(config.device), config.channels_last)
    with TappedModel(model, tap_points(config.arch)) as tapped:
        try:
            tapped.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} does not fit a {config.arch} for {config.dataset} with "
                             f"{dataset.num_classes} classes ({' '.join(str(e).split())[:150]}...)") from e
    record = run_overlap(config, dataset, model)
    shown = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(seed))[:images].sort().values
    with TappedModel(model, tap_points(config.arch)) as tapped:
        maps = explanation_maps(tapped, test_images[shown].to(config.device), mean=dataset.mean, std=dataset.std)
    out.mkdir(parents=True, exist_ok=True)
    write_maps(out / "maps.png", test_images[shown], masks[shown], {k: v.cpu() for k, v in maps.items()})
    result = {"checkpoint": str(path), "epoch": state["epoch"], "config": dataclasses.asdict(config),
              "overlap": record, "maps_png": {"test_indices": shown.tolist(), "columns": ["image", "mask", *maps]}}
    save_json(result, out / "overlap.json")
    return result


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
