"""The ``tap-fast`` command line: train, sweep, annotate, explain and demo (also ``python -m tap_fast``).

``torchrun --nproc_per_node=N -m tap_fast train ...`` trains data-parallel (DDP); only rank 0 prints and
writes files. The parser takes its choices from :mod:`tap_fast.choices`, and the engine (torch) is imported
once the arguments are parsed, so that ``--help`` and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

from kernels import NORMS
from tap_fast.choices import (AMP_MODES, ANNOTATIONS, ARCH_NAMES, CLASS_WEIGHTS, CONTAMINATIONS, DATASETS, FEEDS,
                              METHODS, OVERLAP_IMAGES, PERMUTES, STEP_BACKENDS, SWEEP_GRIDS, SWEEP_SELECTIONS,
                              TAG_MASKS, TAG_STYLES, TAU_RULES, TAUS)

# The demo: No XS and TAP on the embedded digits (and a Base model on clean digits), sized for a laptop CPU:
# the decoys are picked up within a few epochs; later the digits are memorised and the contrast shrinks.
DEMO = {"epochs": 4, "lr": 0.05, "batch_size": 64}
DEMO_QUICK = {"epochs": 1, "lr": 0.05, "batch_size": 64, "limit_train": 300, "limit_test": 100}
DEMO_RUNS = (("Base", {"method": "none", "clean_train": True}), ("No XS", {"method": "none"}),
             ("TAP", {"method": "tap"}))


def _int_at_least(text: str, low: int, what: str) -> int:
    """Parse an integer of at least ``low`` for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _float_in(text: str, what: str, *, low: float, high: float = math.inf, low_inclusive: bool = False,
              high_inclusive: bool = True) -> float:
    """Parse a finite float between ``low`` and ``high`` (each bound included or not) for argparse."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float_in(text, "a positive number", low=0.0)


def _non_negative_float(text: str) -> float:
    return _float_in(text, "a finite number >= 0", low=0.0, low_inclusive=True)


def _fraction(text: str) -> float:
    return _float_in(text, "in (0, 1)", low=0.0, high=1.0, high_inclusive=False)


def tau_value(text: str) -> float:
    """Eq. 14's tau, a fraction of pixels or a threshold on saliency normalised to a per-image maximum of 1
    (--tau-rule): (0, 1], as check_config."""
    return _float_in(text, "in (0, 1] (eq. 14's tau: a fraction of pixels or a saliency threshold)", low=0.0,
                     high=1.0)


def seed_list(text: str) -> list[int]:
    """argparse type of --seeds: distinct comma-separated integers (a repeated seed repeats a run)."""
    try:
        seeds = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must be distinct comma-separated integers, got {text!r}")
    return seeds


def _lambda_list(text: str) -> list[float]:
    return [_non_negative_float(t) for t in text.split(",") if t.strip()]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="data set (digits is embedded; the others read --data-dir; folder: your own images in "
                        "--data-dir/{train,val,test}/<class>/<image>, val/ optional)")
    p.add_argument("--data-dir", help="folder (or file) holding the data set; nothing is downloaded")
    p.add_argument("--cache-dir", help="pneu/knee: keep decoded images here")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="folder: 1 (greyscale) or 3 (RGB)")
    p.add_argument("--masks-dir", help="folder: the spurious pixels, a PNG per image at the image's relative path "
                                       "(nonzero = spurious; an image without one has none)")
    p.add_argument("--boxes", help="folder: a CSV path,x0,y0,x1,y1 of boxes of spurious pixels (original image "
                                   "pixels, x1 and y1 exclusive; any number of rows per image)")
    p.add_argument("--soft-masks", action="store_true",
                   help="folder: mask grey levels / 255 are weights (default: masks must be binary)")
    p.add_argument("--contamination", choices=CONTAMINATIONS,
                   help="add a synthetic spurious signal: decoy (4x4 corner patches), tag (text tags) or stripe "
                        "(Appendix F); default: the data set's own (decoy for MNIST/digits, tag for PNEU/KNEE), "
                        "none for folder")
    p.add_argument("--permute", choices=PERMUTES, default="random",
                   help="the permuted sets SC(X*, permute(y)): random (a random signal per image, which can be its "
                        "own; binary tasks swap: the paper and the released code) or derangement (one permutation "
                        "of the labels without fixed points per seed)")
    p.add_argument("--tag-mask", choices=TAG_MASKS, default="box",
                   help="a text tag's ground-truth mask: box (its whole box, as annotators draw and the released "
                        "code masks) or ink (its written pixels only)")
    p.add_argument("--tag-style", choices=TAG_STYLES, default="font",
                   help="text tags on images under 77 px (where the 22 px tag of 224 px images would be smaller "
                        "than the font's 8 px render): font (that render, white and legible; 8 x 20 px on 28 px "
                        "images) or shrunk (burnt into a 224 px image that is then shrunk by area averaging: "
                        "grey, 2.75 x 6.75 px at 28 px)")
    p.add_argument("--image-size", type=positive_int, help="resize images to this side (default: data set's)")
    p.add_argument("--limit-train", type=positive_int, help="use at most N training images (stratified)")
    p.add_argument("--limit-test", type=positive_int,
                   help="evaluate on a fixed class-stratified subset of N test images")
    p.add_argument("--limit-val", type=positive_int,
                   help="validate on a fixed class-stratified subset of N validation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines on stderr")
    p.add_argument("--out", help="write the result as JSON to this file")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=sorted(ARCH_NAMES), help="model (default: cnn2 for 28x28 data, resnet18 otherwise)")
    p.add_argument("--weights", default="auto",
                   help="auto (ImageNet for deep CNNs, none for cnn2), none, imagenet (offline hub cache) or a "
                        "state-dict path")
    p.add_argument("--method", choices=METHODS, default="none",
                   help="XS loss: none (No XS / Base), tap, rrr, rbr; or Appendix M's distillation from the teacher "
                        "of --teacher-fraction: at (attention transfer), jt (Jacobian transfer), kd (knowledge "
                        "distillation)")
    p.add_argument("--annotations", choices=ANNOTATIONS, default="ground-truth",
                   help="masks: ground truth, a teacher's thresholded saliency (eq. 14), or random")
    p.add_argument("--clean-train", action="store_true", help="train on clean data: the Base model (method none)")
    p.add_argument("--norm", choices=NORMS, default="l1",
                   help="TAP norm: l1 (eq. 8) or l2sq (squared, the released code)")
    p.add_argument("--lam", type=_non_negative_float,
                   help="lambda of eq. 3 (default: tuned value for method, norm, arch and data set)")
    p.add_argument("--temperature", type=positive_float,
                   help="method kd: the temperature T of Hinton et al. (default 4; Table 21 gives none)")
    p.add_argument("--tau", type=tau_value, default=0.01, help="teacher threshold of eq. 14 (see --tau-rule)")
    p.add_argument("--teacher-fraction", type=_fraction, default=0.1,
                   help="share of train held out clean for the teacher (paper: 0.1 or 0.01)")
    p.add_argument("--teacher-epochs", type=positive_int, help="teacher's epochs (default: --epochs)")
    _add_teacher_args(p, "--teacher-lr")
    p.add_argument("--epochs", type=positive_int, default=50)
    p.add_argument("--lr", type=positive_float, help="SGD learning rate (default 1e-3 cnn2, 1e-5 deep CNNs)")
    p.add_argument("--momentum", type=_non_negative_float, default=0.9)
    p.add_argument("--batch-size", type=positive_int, help="default 256 (MNIST, digits), 16 (medical)")
    p.add_argument("--kernel-size", type=positive_int, default=3, help="max-pool window of D(M, l), eq. 7")
    p.add_argument("--class-weights", choices=CLASS_WEIGHTS, default="none",
                   help="balanced: inverse class frequency in the cross-entropy and inside RBR (as the released "
                        "code does for PNEU)")
    p.add_argument("--feed", choices=FEEDS, default="auto",
                   help="training batches: memory (the set on the device, contaminated per batch), dali or "
                        "torchvision (folders streamed from disk); auto: memory, or streaming for an image folder "
                        "whose decoded training images and masks exceed 4 GiB")
    p.add_argument("--compound", action="store_true",
                   help="downscale each layer's mask from the previous one's (released code)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last model layout (default on; same model, faster convolutions)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (rrr, rbr and jt stay eager)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the whole training step as one CUDA graph")
    p.add_argument("--amp", choices=AMP_MODES, default="none", help="autocast the step: none (fp32) or bf16")
    p.add_argument("--tap-backend", choices=STEP_BACKENDS, default="auto",
                   help="TAP's kernels (method tap only): auto (identity on CUDA with Triton, else torch), "
                        "torch (PyTorch after the forward), triton or identity (fused Triton kernels inside the "
                        "forward, one layer at a time: separate or identity form); triton and identity need "
                        "Triton and a CUDA device, or TRITON_INTERPRET=1 on the CPU")
    p.add_argument("--run-dir", help="folder for checkpoints (every epoch) and cached annotations")
    p.add_argument("--resume", action="store_true", help="continue from --run-dir/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start again, replacing the checkpoint in --run-dir (without --resume or --overwrite, a run "
                        "dir holding a checkpoint is refused)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="record Appendix D's overlap (eq. 17 recall / precision of the top-quartile input gradients "
                        f"and activations with the spurious masks) in the JSON, on at most {OVERLAP_IMAGES} "
                        "contaminated test images (default on; skipped without spurious masks)")


def _add_teacher_args(p: argparse.ArgumentParser, *lr_flags: str) -> None:
    """The teacher's options (section 4.2): eq. 14's rule and the released teachers' SGD settings."""
    p.add_argument("--tau-rule", choices=TAU_RULES, default="quantile",
                   help="quantile: mask the tau fraction of lowest-saliency pixels of each image (the released "
                        "code, behind Tables 12-17); threshold: saliency < tau (eq. 14 as printed)")
    p.add_argument(*lr_flags, dest="teacher_lr", type=positive_float, default=1e-4,
                   help="teacher's SGD learning rate (default: 1e-4, the released teachers')")
    p.add_argument("--teacher-weight-decay", type=_non_negative_float, default=1e-4,
                   help="c of the teacher's explicit L2 term c * ||theta||^2 (default: 1e-4, the released "
                        "teachers'; SGD weight decay 2c)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tap-fast", description="Targeted Activation Penalty (Zhang, Williams, Toni, AAAI 2024) experiments")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sweep,annotate,explain,demo}")
    p = sub.add_parser("train", help="train and evaluate one model (JSON with contaminated/permuted/clean "
                                     "metrics); under torchrun, data-parallel")
    _add_data_args(p)
    _add_train_args(p)
    p = sub.add_parser("sweep", help="section 5.3: train per lambda, select on the permuted validation set")
    _add_data_args(p)
    _add_train_args(p)
    lambdas = p.add_mutually_exclusive_group()
    lambdas.add_argument("--lambdas", type=_lambda_list,
                         help="comma-separated lambdas (default: --grid over 1e-9..1 for tap/rrr, 1..1e9 for rbr, "
                              "1e-9..1e4 for at/jt/kd)")
    lambdas.add_argument("--grid", choices=SWEEP_GRIDS,
                         help="lambdas over section 5.3's range: decade (1e-9, 1e-8, ..., the paper's; default) or "
                              "half (1 and 3 per decade: 1e-9, 3e-9, 1e-8, ...)")
    p.add_argument("--select", choices=SWEEP_SELECTIONS, default="loss",
                   help="select the lambda with the lowest permuted validation loss (loss, section 5.3; default) or "
                        "the best permuted validation task metric (metric); either way a model no better than "
                        "the constant majority-class (MAE: median-class) predictor is flagged degenerate")
    p = sub.add_parser("annotate", help="Figure 8: teacher annotation precision/recall against ground truth")
    _add_data_args(p)
    p.add_argument("--teacher-fraction", type=_fraction, default=0.1)
    p.add_argument("--tau", type=tau_value, nargs="+", default=list(TAUS), help="thresholds of eq. 14")
    p.add_argument("--epochs", type=positive_int, default=50, help="teacher's epochs")
    _add_teacher_args(p, "--lr", "--teacher-lr")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--run-dir", help="save masks_tau*.pt here")
    p = sub.add_parser("explain", help="Appendix D of a trained run: overlap of top-quartile input gradients and "
                                       "activations with the spurious masks (overlap.json) and its maps (maps.png)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", dest="run", help="the --run-dir of a `tap-fast train` run (its checkpoint.pt)")
    source.add_argument("--checkpoint", help="a checkpoint.pt file of a run, instead of --run-dir")
    p.add_argument("--out", dest="out_dir", required=True,
                   help="folder for overlap.json and maps.png (an existing non-empty one only with --overwrite)")
    p.add_argument("--images", type=positive_int, default=8,
                   help="test images in maps.png, drawn at random by --seed (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images drawn for maps.png")
    p.add_argument("--data-dir", help="the run's data set, if it moved (default: the folder the run recorded)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="write overlap.json and maps.png into a non-empty --out")
    p.set_defaults(out=None)  # main writes no --out JSON: explain writes its own files
    p = sub.add_parser("demo", help="No XS vs TAP on the embedded digits: the shortcut and its removal")
    p.add_argument("--quick", action="store_true", help="a few-second smoke run (too short to show the effect)")
    p.add_argument("--epochs", type=positive_int, help=f"epochs per model (default {DEMO['epochs']})")
    p.add_argument("--seeds", type=seed_list, default=[0, 1],
                   help="comma-separated seeds to average over (default: 0,1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default="tap_fast_demo.json", help="JSON result file (default: %(default)s)")
    return parser


def _config(args: argparse.Namespace, **overrides):
    """The TrainConfig of a command's arguments (``--weights none`` -> None) with ``overrides``."""
    from tap_fast.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if "weights" in values:
        values["weights"] = None if values["weights"] == "none" else values["weights"]
    values.update(overrides)
    return TrainConfig(**values)


def _check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument errors for the paths a command reads and writes, before torch is imported or data loaded."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and not Path(data_dir).exists():
        parser.error(f"argument --data-dir: {data_dir} does not exist")
    if getattr(args, "dataset", "digits") != "digits" and data_dir is None:
        parser.error(f"argument --data-dir: required for --dataset {args.dataset} (only digits is embedded)")
    if getattr(args, "resume", False) and getattr(args, "run_dir", None) is None:
        parser.error("argument --resume: needs --run-dir (the folder holding checkpoint.pt)")
    outputs = {"--out": (getattr(args, "out", None), False), "--run-dir": (getattr(args, "run_dir", None), True),
               "--cache-dir": (getattr(args, "cache_dir", None), True)}
    for flag, (path, folder) in outputs.items():
        problem = None if path is None else _unwritable(Path(path).absolute(), folder)
        if problem:
            parser.error(f"argument {flag}: {problem}")


def _unwritable(path: Path, folder: bool) -> str | None:
    """Why the folder (or file) ``path`` cannot be written, creating the folders above it (None: it can)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    kind = "folder" if folder else "file"
    if existing == path and path.is_dir() != folder:
        return f"{path} is a {'file' if folder else 'folder'}; give the path of a {kind}"
    if existing != path and not existing.is_dir():
        return f"cannot create {path}: {existing} is a file"
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        return f"cannot write {path}: {existing} is not writable"
    return None


def _flag_message(message: str) -> str:
    """A library error in the command line's terms: a leading config field name prefixed with its flag
    ("argument --lam: lam ..."), and ``field=`` written as ``--field``."""
    from tap_fast.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flagged = re.sub(r"\b([a-z_]+)=", lambda m: f"--{m[1].replace('_', '-')} " if m[1] in fields else m[0], message)
    word = message.split(" ", 1)[0]
    if word in fields:
        return f"argument --{word.replace('_', '-')}: {flagged}"
    return flagged


def drop_header(metric: str) -> str:
    """The shortcut drop's column header, with its direction (evaluation.shortcut_drop, positive = reliance
    on the spurious signal): contaminated - permuted, or permuted - contaminated for MAE (lower is better)."""
    from tap_fast.evaluation import HIGHER_IS_BETTER

    first, second = ("contaminated", "permuted") if HIGHER_IS_BETTER[metric] else ("permuted", "contaminated")
    return f"drop ({first} - {second})"


def model_name(config: dict) -> str:
    """A run's name in tables: Base (trained on clean data), No XS (method none), else TAP, RRR or RBR."""
    if config["clean_train"]:
        return "Base"
    return "No XS" if config["method"] == "none" else config["method"].upper()


def _versions(metrics: dict) -> list[str]:
    return [v for v in ("test", "contaminated", "permuted", "clean") if v in metrics]


def format_table(rows: list[tuple[str, dict]], metric: str) -> str:
    """The metric per run on each test version (the split as given, contaminated, permuted, clean: those the
    runs have) and the shortcut drop (:func:`drop_header`) when there is one."""
    versions = _versions(rows[0][1]["metrics"])
    drop = drop_header(metric) if rows[0][1].get("shortcut_drop") is not None else ""
    lines = [f"{'model':<8}" + "".join(f" {v:>12}" for v in versions) + (f" {drop}" if drop else "")]
    for name, result in rows:
        m = result["metrics"]
        lines.append(f"{name:<8}" + "".join(f" {m[v][metric]:>12.3f}" for v in versions)
                     + (f" {result['shortcut_drop']:>{len(drop)}.3f}" if drop else ""))
    return "\n".join(lines)


def format_sweep(record: dict) -> str:
    """The sweep's table: per lambda the permuted validation loss, the task metric on each validation and test
    version, the test shortcut drop and whether the run is selected or degenerate (no better than the
    constant predictor on the permuted validation set); then the selection and, when it is degenerate, the
    best non-degenerate lambda under the same rule."""
    from tap_fast.evaluation import HIGHER_IS_BETTER

    metric, base = record["metric"], record["constant_baseline"]
    trained = [r for r in record["runs"] if "diverged" not in r]
    val = _versions(trained[0]["validation"]) if trained else []
    test = _versions(trained[0]["metrics"]) if trained else []
    heads = ["val permuted loss", *(f"val {v}" for v in val), *(f"test {v}" for v in test),
             f"test {drop_header(metric)}"]
    lines = [f"{metric} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better) per lambda; the constant "
             f"predictor ({base['predictor']} {base['class']}) scores {base[metric]:.3f} on the permuted validation "
             "set", f"{'lambda':<8}" + "".join(f"  {h:>8}" for h in heads) + "  note"]
    for r in record["runs"]:
        if "diverged" in r:
            lines.append(f"{r['lam']:<8g} diverged: {r['diverged']}")
            continue
        values = [r["val_permuted_loss"], *(r["validation"][v][metric] for v in val),
                  *(r["metrics"][v][metric] for v in test), r["shortcut_drop"]]
        notes = (["selected"] if r["lam"] == record["best_lam"] else []) + (["degenerate"] if r["degenerate"] else [])
        lines.append(f"{r['lam']:<8g}" + "".join(f"  {x:>{max(8, len(h))}.3f}" for x, h in zip(values, heads))
                     + f"  {', '.join(notes)}".rstrip())
    if record["best_lam"] is None:
        return "\n".join([*lines, "no lambda selected: every run diverged"])
    lines.append(f"selected lambda {record['best_lam']:g} ({record['selection_rule']})")
    if record["degenerate"]:
        other = record["best_non_degenerate_lam"]
        lines.append(f"DEGENERATE: lambda {record['best_lam']:g}'s permuted validation {metric} is no better than the "
                     f"constant predictor's {base[metric]:.3f}; best non-degenerate lambda: "
                     + ("none (every run is degenerate)" if other is None else f"{other:g}"))
    return "\n".join(lines)


def _mean_record(records: list[dict], metric: str) -> dict:
    """A record whose metrics and shortcut drop are the means over ``records`` (seeds)."""
    n = len(records)
    metrics = {v: {metric: sum(r["metrics"][v][metric] for r in records) / n} for v in records[0]["metrics"]}
    return {"metrics": metrics, "shortcut_drop": sum(r["shortcut_drop"] for r in records) / n}


def run_demo(args: argparse.Namespace) -> dict:
    """The main job: Base, No XS and TAP on contaminated digits, averaged over seeds; print the contrast."""
    from tap_fast.config import TrainConfig
    from tap_fast.experiments import train

    start = time.perf_counter()
    settings = dict(DEMO_QUICK if args.quick else DEMO)
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    runs = {}
    for name, overrides in DEMO_RUNS:
        runs[name] = []
        for seed in args.seeds:
            if not args.quiet:
                print(f"training {name}, seed {seed} ...", file=sys.stderr)
            runs[name].append(train(TrainConfig(dataset="digits", seed=seed, device=args.device, quiet=args.quiet,
                                                 **settings, **overrides)))
    means = {name: _mean_record(records, "accuracy") for name, records in runs.items()}
    print(f"Digits with label-coded corner decoys (section 5.1), cnn2, {settings['epochs']} epochs; test accuracy, "
          f"mean over seeds {args.seeds}; drop = contaminated - permuted:")
    print(format_table(list(means.items()), "accuracy"))
    drops = {name: m["shortcut_drop"] for name, m in means.items()}
    verdict = ("TAP removes most of No XS's reliance on the decoys" if drops["TAP"] <= drops["No XS"] / 2
               and drops["No XS"] > 0.01 else "no clear contrast at this budget (try more --epochs or --seeds)")
    print(f"Shortcut drop: No XS {drops['No XS']:.3f}, TAP {drops['TAP']:.3f}: {verdict}.")
    total = time.perf_counter() - start
    print(f"total time {total:.1f}s")
    return {"demo": "digits", "quick": args.quick, "settings": settings, "seeds": args.seeds, "mean": means,
            "drops": drops, "runs": runs, "timing": {"total_s": total}}


def _interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """The line Ctrl-C prints: with a run dir to continue from, the command that resumes there."""
    run_dir = getattr(args, "run_dir", None)
    if not hasattr(args, "resume") or run_dir is None or not Path(run_dir).is_dir():
        return f"tap-fast {args.command}: interrupted"
    again = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
    return f"tap-fast {args.command}: interrupted; to continue from --run-dir {run_dir}: tap-fast {shlex.join(again)}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_paths(parser, args)
    from tap_fast.distributed import env_ranks
    from tap_fast.experiments import annotate, explain, is_main_process, save_json, sweep, train

    main_rank = is_main_process()
    try:
        if args.command != "train" and env_ranks()[1] > 1:
            raise ValueError(f"only `train` runs under torchrun (data-parallel); run `{args.command}` as one "
                             "process")
        if args.command == "train":
            record = train(_config(args))
            if main_rank:
                print(format_table([(model_name(record["config"]), record)], record["metric"]))
        elif args.command == "sweep":
            record = sweep(_config(args), args.lambdas, grid=args.grid, select=args.select)
            print(format_sweep(record))
        elif args.command == "annotate":
            record = annotate(_config(args, teacher_epochs=args.epochs, tau=min(args.tau)), tuple(args.tau))
            for tau, q in record["taus"].items():
                print(f"tau {tau}: teacher precision {q['teacher']['precision']:.3f} recall "
                      f"{q['teacher']['recall']:.3f}; random precision {q['random']['precision']:.3f} recall "
                      f"{q['random']['recall']:.3f}")
        elif args.command == "explain":
            from tap_fast.explanations import format_overlap

            record = explain(args.checkpoint or Path(args.run) / "checkpoint.pt", args.out_dir, images=args.images,
                             seed=args.seed, overwrite=args.overwrite, device=args.device, data_dir=args.data_dir)
            print(f"Appendix D overlap on {record['overlap']['images']} contaminated test images (eq. 17):")
            print(format_overlap(record["overlap"]["maps"]))
            print(f"wrote {Path(args.out_dir) / 'overlap.json'} and {Path(args.out_dir) / 'maps.png'}", file=sys.stderr)
        else:
            record = run_demo(args)
    except (ValueError, FileNotFoundError, FloatingPointError, ImportError) as e:
        print(f"tap-fast {args.command}: error: {_flag_message(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if main_rank:
            print(_interrupted(args, sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return 130
    if args.out and main_rank:
        save_json(record, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
