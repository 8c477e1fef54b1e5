"""Reproduce the MNIST rows of Table 9 (ground-truth annotations), Table 12 (teacher annotations) and Table 18
(distillation baselines, Appendix M), and the same rows on PneumoniaMNIST (real chest X-rays at 28 px with the
text tags of section 5.1 drawn at 28 px, ``--tag-style``, font by default; the paper did not run it).

Each row is trained for several seeds with ``tap_fast.experiments.train`` and reported as mean (std) of the
final-epoch task metric (accuracy on MNIST, pneumonia F1 on PneumoniaMNIST) on the contaminated, permuted and
clean test sets, beside the paper's numbers, and with Appendix D's overlap (eq. 17: recall and precision of the
top-quartile input gradients and of each tapped layer's activations against the spurious masks, on the whole
contaminated test set; ``tap-fast explain`` on the run's final checkpoint, which also writes its maps.png into
the run's folder, ``appendix_d/``). A row without a default lambda (PneumoniaMNIST's, where the paper gives none
for the two-layer CNN) takes the one section 5.3's sweep selects (lowest permuted validation loss over the decade
grid, ``--sweep-epochs`` epochs, seed 0; the best non-degenerate one if that is degenerate), kept in
``OUT_DIR/sweeps/`` and reused on resume; ``--lam METHOD=VALUE`` fixes a method's lambda instead. RBR, the
slowest, can train on a stated subset (``--rbr-limit-train``).

Writes ``DATASET_results.json`` and ``DATASET_results.md`` to ``--out-dir`` after every finished (row, seed),
and checkpoints every run after each epoch in its own folder of ``--run-dir`` (default ``--out-dir``/runs): a
killed run started again with ``--resume`` skips the (row, seed) pairs in the JSON and continues the unfinished
one from its last checkpoint.

Full run (GPU; the paper's settings: 50 epochs, lr 1e-3, batch 256, 5 seeds):
    python benchmarks/reproduce_mnist.py --data-dir ../shared/data/mnist --out-dir runs/mnist
A short CPU run to check the pipeline:
    python benchmarks/reproduce_mnist.py --data-dir ../shared/data/mnist --epochs 1 --limit-train 2000 \\
        --limit-test 500 --seeds 0 --rows base,noxs,tap --lr 0.05
PneumoniaMNIST (class-weighted cross-entropy, as the released code trains PNEU):
    python benchmarks/reproduce_mnist.py --dataset pneumoniamnist --data-dir ../shared/data/pneumoniamnist \\
        --out-dir runs/pneumoniamnist --epochs 10 --seeds 0 --taus 0.01
Continue a killed run: the same command with --resume (which may also add rows, seeds, taus or teachers, not drop any).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tap_fast.choices import TAG_STYLES  # noqa: E402
from tap_fast.cli import positive_float, positive_int, seed_list, tau_value  # noqa: E402
from tap_fast.datasets import load_dataset  # noqa: E402
from tap_fast.config import TrainConfig, resolve  # noqa: E402
from tap_fast.experiments import explain, save_json, sweep, train  # noqa: E402

VARIANTS = ("contaminated", "permuted", "clean")
# Settings per data set beside the paper's hyper-parameters: PNEU's cross-entropy is class-weighted in the
# released code (PneumoniaMNIST's train split is 74% pneumonia).
DATASET_SETTINGS = {"mnist": {}, "pneumoniamnist": {"class_weights": "balanced"}}
MAPS_SHOWN = 8  # images in each run's appendix_d/maps.png
# Table 9: accuracy (std) over five runs, ground-truth annotations, two-layer CNN.
PAPER_TABLE9 = {
    "Base": ((0.988, 0.001), (0.987, 0.001), (0.988, 0.001)),
    "No XS": ((0.995, 0.001), (0.819, 0.006), (0.627, 0.017)),
    "RRR": ((0.987, 0.001), (0.987, 0.001), (0.987, 0.001)),
    "RBR": ((0.992, 0.001), (0.982, 0.001), (0.982, 0.004)),
    "TAP": ((0.983, 0.001), (0.979, 0.002), (0.979, 0.002)),
}
# Table 12: TAP with teacher annotations; per tau: (10% teacher, 1% teacher, random) for each test set.
PAPER_TABLE12 = {
    0.01: {"contaminated": ((0.990, 0.001), (0.989, 0.001), (0.987, 0.001)),
           "permuted": ((0.966, 0.007), (0.965, 0.006), (0.961, 0.006)),
           "clean": ((0.961, 0.009), (0.961, 0.009), (0.956, 0.008))},
    0.05: {"contaminated": ((0.986, 0.001), (0.985, 0.001), (0.982, 0.000)),
           "permuted": ((0.963, 0.005), (0.962, 0.006), (0.956, 0.011)),
           "clean": ((0.961, 0.008), (0.961, 0.008), (0.954, 0.012))},
    0.1: {"contaminated": ((0.984, 0.001), (0.984, 0.001), (0.980, 0.001)),
          "permuted": ((0.960, 0.007), (0.958, 0.009), (0.955, 0.008)),
          "clean": ((0.958, 0.009), (0.957, 0.010), (0.953, 0.010))},
}
TEACHERS = {"10%": ("teacher", 0.1, 0), "1%": ("teacher", 0.01, 1), "random": ("random", 0.1, 2)}
# Table 18 (Appendix M): the distillation baselines from the same 10% / 1% teachers, per test set.
PAPER_TABLE18 = {
    ("at", 0.1): ((0.995, 0.000), (0.851, 0.010), (0.689, 0.035)),
    ("jt", 0.1): ((0.996, 0.000), (0.820, 0.007), (0.640, 0.025)),
    ("kd", 0.1): ((0.984, 0.000), (0.968, 0.000), (0.970, 0.003)),
    ("at", 0.01): ((0.994, 0.000), (0.822, 0.015), (0.642, 0.033)),
    ("jt", 0.01): ((0.996, 0.000), (0.820, 0.007), (0.640, 0.025)),
    ("kd", 0.01): ((0.966, 0.002), (0.929, 0.006), (0.922, 0.009)),
}
GROUND_TRUTH_ROWS = {"base": ("Base", {"method": "none", "clean_train": True}), "noxs": ("No XS", {"method": "none"}),
                     "rrr": ("RRR", {"method": "rrr"}), "rbr": ("RBR", {"method": "rbr"}),
                     "tap": ("TAP", {"method": "tap"})}
DISTILLATION_ROWS = ("at", "jt", "kd")  # each with the 10% and the 1% teacher (Table 18)
ROW_KEYS = (*GROUND_TRUTH_ROWS, "teacher", *DISTILLATION_ROWS)
# Arguments that change what a run computes, and the selection of runs its JSON holds (rewritten from the
# current selection): a resumed run must have the same settings, and may add to the selection (rows, seeds,
# taus, teachers) but not drop from it.
SELECTION_ARGS = ("rows", "seeds", "taus", "teachers")
RUN_ARGS = ("dataset", "data_dir", "epochs", "lr", "batch_size", "norm", "compound", "limit_train", "limit_test",
            "rbr_limit_train", "sweep", "sweep_epochs", "lam", "tag_style", "teacher_epochs", "teacher_lr",
            *SELECTION_ARGS)
LAMBDA_METHODS = ("tap", "rrr", "rbr", *DISTILLATION_ROWS)


def rows(selected: list[str], taus: list[float], dataset: str = "mnist",
         teachers: tuple[str, ...] = tuple(TEACHERS)) -> list[tuple[str, dict, tuple | None]]:
    """(row name, TrainConfig overrides, paper values per test set or None) for keys of ``ROW_KEYS``, the
    teacher and distillation rows for the ``teachers`` labels of ``TEACHERS`` (distillation: 10% and 1% only);
    the paper's values are MNIST's (None for other data sets)."""
    if dataset != "mnist":
        return [(name, overrides, None) for name, overrides, _ in rows(selected, taus, teachers=teachers)]
    out = []
    for key in selected:
        if key in GROUND_TRUTH_ROWS:
            name, overrides = GROUND_TRUTH_ROWS[key]
            out.append((name, overrides, PAPER_TABLE9[name]))
        elif key in DISTILLATION_ROWS:
            for label in (t for t in teachers if TEACHERS[t][0] == "teacher"):
                fraction = TEACHERS[label][1]
                out.append((f"{key.upper()} {label}", {"method": key, "teacher_fraction": fraction},
                            PAPER_TABLE18[key, fraction]))
        else:
            for tau in taus:
                for label, (source, fraction, column) in ((t, TEACHERS[t]) for t in teachers):
                    paper = PAPER_TABLE12.get(tau)
                    out.append((f"TAP {label} tau={tau:g}",
                                {"method": "tap", "annotations": source, "teacher_fraction": fraction,
                                 "tau": tau},
                                tuple(paper[v][column] for v in VARIANTS) if paper else None))
    return out


def row_keys(text: str) -> list[str]:
    """argparse type of --rows: comma-separated keys of ``ROW_KEYS``."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROW_KEYS]
    if not keys or unknown or len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(f"must be distinct comma-separated rows of {list(ROW_KEYS)}, got {text!r}")
    return keys


def method_list(text: str) -> list[str]:
    """argparse type of --sweep: comma-separated methods with a lambda."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods or any(m not in LAMBDA_METHODS for m in methods):
        raise argparse.ArgumentTypeError(f"must be comma-separated methods of {list(LAMBDA_METHODS)}, got {text!r}")
    return methods


def lambda_map(text: str) -> dict[str, float]:
    """argparse type of --lam: comma-separated METHOD=VALUE pairs, VALUE a finite number >= 0."""
    out = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        method, _, value = item.partition("=")
        try:
            lam = float(value)
        except ValueError:
            lam = math.nan
        if method.strip() not in LAMBDA_METHODS or not (math.isfinite(lam) and lam >= 0) or method.strip() in out:
            raise argparse.ArgumentTypeError(f"must be comma-separated METHOD=VALUE pairs, each method once, of "
                                             f"{list(LAMBDA_METHODS)} and a finite VALUE >= 0, got {text!r}")
        out[method.strip()] = lam
    if not out:
        raise argparse.ArgumentTypeError(f"must name at least one METHOD=VALUE pair, got {text!r}")
    return out


def teacher_list(text: str) -> list[str]:
    """argparse type of --teachers: distinct comma-separated labels of ``TEACHERS``, in that order."""
    labels = [t.strip() for t in text.split(",") if t.strip()]
    if not labels or any(t not in TEACHERS for t in labels) or len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"must be distinct comma-separated teachers of {list(TEACHERS)}, got {text!r}")
    return [t for t in TEACHERS if t in labels]


def tau_list(text: str) -> list[float]:
    """argparse type of --taus: distinct comma-separated thresholds in (0, 1]."""
    taus = [tau_value(t) for t in text.split(",")]
    if len(set(taus)) != len(taus):
        raise argparse.ArgumentTypeError(f"must be distinct comma-separated thresholds, got {text!r}")
    return taus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=tuple(DATASET_SETTINGS), default="mnist")
    parser.add_argument("--data-dir", required=True,
                        help="folder with mnist.npz or the IDX files (pneumoniamnist: with pneumoniamnist.npz)")
    parser.add_argument("--out-dir", default="runs/reproduce_mnist")
    parser.add_argument("--run-dir", help="checkpoints, one folder per row and seed (default: OUT_DIR/runs)")
    parser.add_argument("--resume", action="store_true",
                        help="skip the (row, seed) pairs in OUT_DIR/DATASET_results.json; continue the others "
                             "from their checkpoints")
    parser.add_argument("--rows", type=row_keys, default=[k for k in ROW_KEYS if k not in DISTILLATION_ROWS],
                        help="comma-separated: base, noxs, rrr, rbr, tap (Table 9 rows), teacher (Table 12 rows: "
                             "10%%, 1%% teachers and random annotations per tau); also at, jt, kd (Table 18 rows; "
                             "not in the default, so a run started without them resumes as before)")
    parser.add_argument("--taus", type=tau_list, default=[0.01, 0.05, 0.1])
    parser.add_argument("--teachers", type=teacher_list, default=list(TEACHERS),
                        help="comma-separated: the teachers of the teacher rows (10%%, 1%%, random) and of the "
                             "distillation rows (10%%, 1%%); default all")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=positive_int, default=50)
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--norm", choices=("l1", "l2sq"), default="l1",
                        help="TAP norm; l2sq with --compound is the released code's form (Appendix C lambdas)")
    parser.add_argument("--compound", action="store_true")
    parser.add_argument("--limit-train", type=positive_int)
    parser.add_argument("--limit-test", type=positive_int)
    parser.add_argument("--rbr-limit-train", type=positive_int,
                        help="RBR rows (and their sweep) train on this class-stratified subset of the training set")
    parser.add_argument("--sweep", type=method_list, default=[],
                        help="comma-separated methods (tap, rrr, rbr, at, jt, kd) whose lambda section 5.3's sweep "
                             "chooses even where a default exists (rows without one are always swept)")
    parser.add_argument("--lam", type=lambda_map, default={},
                        help="fixed lambdas, e.g. tap=1e-3,at=10: every row of the method uses it, in place of "
                             "the default and of the sweep")
    parser.add_argument("--sweep-epochs", type=positive_int,
                        help="epochs of each sweep run (default: --epochs)")
    parser.add_argument("--teacher-epochs", type=positive_int,
                        help="epochs of the teachers behind the teacher and distillation rows (default: --epochs)")
    parser.add_argument("--teacher-lr", type=positive_float,
                        help="the teachers' SGD learning rate (default: the released teachers' 1e-4)")
    parser.add_argument("--tag-style", choices=TAG_STYLES, default="font",
                        help="PneumoniaMNIST's 28 px tags: the font's smallest render (default) or the 224 px tag "
                             "shrunk with the image (README, 'Tags on small images')")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    both = [m for m in args.sweep if m in args.lam]
    if both:
        parser.error(f"argument --lam: {both} also in --sweep; give each method a fixed lambda or a sweep, not both")
    selected = rows(args.rows, args.taus, args.dataset, args.teachers)
    empty = [k for k in args.rows if not rows([k], args.taus, args.dataset, args.teachers)]
    if empty:
        parser.error(f"argument --teachers: {','.join(args.teachers)} leaves no row of {empty} (the distillation rows "
                     "have the 10% and 1% teachers only)")
    used = {overrides.get("method") for _, overrides, _ in selected}
    for flag, methods in (("--sweep", args.sweep), ("--lam", list(args.lam))):
        unused = [m for m in methods if m not in used]
        if unused:
            parser.error(f"argument {flag}: no row of --rows {','.join(args.rows)} uses {unused}")
    try:  # before any training: a missing folder, or one without MNIST, is an argument error
        load_dataset(args.dataset, args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"argument --data-dir: {e}")
    if args.rbr_limit_train is not None and args.rbr_limit_train < args.batch_size:
        parser.error(f"argument --rbr-limit-train: {args.rbr_limit_train} images are fewer than a batch "
                     f"(--batch-size {args.batch_size})")
    args.run_dir = args.run_dir or str(Path(args.out_dir) / "runs")
    args.finished = finished_runs(parser, args) if args.resume else {}
    args.swept = {}  # the sweeps this invocation ran, by sweep.json path
    return args


def finished_runs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[tuple[str, int], dict]:
    """The per-seed records of a previous run's JSON by (row, seed); its RUN_ARGS must equal ``args``', but for
    SELECTION_ARGS, which ``args`` may extend (a seed or a row more), never shrink."""
    path = results_path(args, ".json")
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    # an argument added after the JSON was written counts with its default
    before = {k: saved["args"][k] if k in saved["args"] else parser.get_default(k) for k in RUN_ARGS}
    differ = [f"{k} {before[k]!r} != {getattr(args, k)!r}" for k in RUN_ARGS
              if k not in SELECTION_ARGS and before[k] != getattr(args, k)]
    differ += [f"{k} {before[k]!r} not all in {getattr(args, k)!r}" for k in SELECTION_ARGS
               if any(v not in getattr(args, k) for v in before[k])
               and (k != "taus" or "teacher" in before["rows"])  # taus make only the teacher rows
               and (k != "teachers" or any(r in before["rows"] for r in ("teacher", *DISTILLATION_ROWS)))]
    if differ:
        parser.error(f"argument --resume: {path} was written with other settings ({'; '.join(differ)}); "
                     "use another --out-dir, or the same settings and a selection of rows, seeds, taus and teachers "
                     "that keeps the saved ones")
    return {(r["row"], run["seed"]): run for r in saved["results"] for run in r["runs"]}


def saved_rows(args: argparse.Namespace) -> dict[str, tuple[dict, dict | None]]:
    """With ``--resume``, each saved row's (overrides with its lambda, sweep) by row name; else {}."""
    path = results_path(args, ".json")
    if not (args.resume and path.is_file()):
        return {}
    return {r["row"]: (r["overrides"], r.get("sweep")) for r in json.loads(path.read_text())["results"]}


def results_path(args: argparse.Namespace, suffix: str) -> Path:
    return Path(args.out_dir) / f"{args.dataset}_results{suffix}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def row_config(overrides: dict, seed: int, args: argparse.Namespace, **fields) -> TrainConfig:
    """A row's TrainConfig: the script's settings, the data set's, the row's ``overrides``, then ``fields``."""
    subset = {}
    if overrides.get("method") == "rbr" and args.rbr_limit_train:  # a subset of --limit-train's, if given
        subset = {"limit_train": min(args.rbr_limit_train, args.limit_train or args.rbr_limit_train)}
    return TrainConfig(**{"dataset": args.dataset, "data_dir": args.data_dir, "epochs": args.epochs, "lr": args.lr,
                          "batch_size": args.batch_size, "norm": args.norm, "compound": args.compound, "seed": seed,
                          "limit_train": args.limit_train, "limit_test": args.limit_test, "device": args.device,
                          "quiet": args.quiet, "resume": args.resume, "overlap": False, "tag_style": args.tag_style,
                          **{k: getattr(args, k) for k in ("teacher_epochs", "teacher_lr") if getattr(args, k)},
                          **DATASET_SETTINGS[args.dataset], **overrides, **subset, **fields})


def swept_lambda(overrides: dict, args: argparse.Namespace, pending: bool = True) -> dict | None:
    """Section 5.3's choice for a row whose method is in ``--sweep`` or has no default lambda here (None
    otherwise): ``{"lam", "degenerate", "sweep"}`` from :func:`tap_fast.experiments.sweep` (decade grid,
    permuted validation loss, ``--sweep-epochs``, seed 0; the best non-degenerate lambda where the chosen one
    is degenerate, and ``degenerate`` true where every one is), run once per method and annotation setting, on
    the config of the first row of that setting the run reaches (its tau and teacher: the rows of one setting
    share it), and kept in OUT_DIR/sweeps/ (reused on resume). Without ``pending`` runs (every seed of the row
    finished) only a kept sweep is read, none is run."""
    if overrides.get("method", "none") == "none":
        return None
    config = row_config(overrides, 0, args)
    if config.method not in args.sweep:
        try:
            resolve(config)
            return None
        except ValueError:  # no default lambda for this method, data set and architecture
            pass
    setting = "gt" if config.annotations == "ground-truth" and config.method not in DISTILLATION_ROWS else "teacher"
    folder = Path(args.out_dir) / "sweeps" / f"{config.method}-{setting}"
    path = folder / "sweep.json"
    if path in args.swept or (args.resume and path.is_file()):  # rows of one method share its sweep
        record = args.swept.get(path) or json.loads(path.read_text())
    elif not pending:
        return None
    else:
        print(f"sweeping lambda for {config.method} ({setting} annotations), {args.sweep_epochs or args.epochs} "
              "epochs per lambda", file=sys.stderr, flush=True)
        try:
            record = sweep(dataclasses.replace(config, epochs=args.sweep_epochs or args.epochs, run_dir=str(folder)))
        except ValueError as e:  # e.g. an earlier invocation's sweep runs in the folder, without --resume
            raise SystemExit(f"the {config.method} sweep for {folder}: {e}") from None
        save_json(record, path)
        args.swept[path] = record
    fallback = record["best_non_degenerate_lam"]
    lam = fallback if record["degenerate"] and fallback is not None else record["best_lam"]
    if lam is None:
        raise SystemExit(f"every lambda of the {config.method} sweep in {path} diverged: pass another --lr")
    return {"lam": lam, "degenerate": record["degenerate"] and fallback is None, "sweep": str(path)}


def appendix_d(run_dir: Path, args: argparse.Namespace) -> dict:
    """Eq. 17's recall and precision per map of the run's final model on its whole contaminated test set, with
    maps.png of ``MAPS_SHOWN`` test images, both in ``run_dir``/appendix_d (``tap-fast explain``)."""
    result = explain(run_dir / "checkpoint.pt", run_dir / "appendix_d", images=MAPS_SHOWN, overwrite=True,
                     device=args.device, data_dir=args.data_dir)
    return result["overlap"]["maps"]


def train_seed(name: str, overrides: dict, seed: int, args: argparse.Namespace) -> dict:
    """One (row, seed) run, checkpointed in its own folder: test metrics, Appendix D overlap, lambda and time,
    or divergence."""
    run_dir = Path(args.run_dir) / slug(name) / f"seed{seed}"
    config = row_config(overrides, seed, args, run_dir=str(run_dir))
    start = time.perf_counter()
    try:
        record = train(config)
    except FloatingPointError as e:  # the paper reports such runs as "did not converge"
        return {"seed": seed, "diverged": str(e), "lam": None, "time_s": time.perf_counter() - start}
    return ({v: record["metrics"][v][record["metric"]] for v in VARIANTS}
            | {"seed": seed, "lam": record["config"]["lam"], "annotations": record["annotations"],
               "train_size": record["sizes"]["train"], "time_s": record["timing"]["total_s"],
               "overlap": appendix_d(run_dir, args)})


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def row_record(name: str, overrides: dict, swept: dict | None, *, paper: tuple | None, runs: list[dict]) -> dict:
    """A row's mean (std) over its finished seeds, and its mean overlap per map and measure."""
    converged = [s for s in runs if "diverged" not in s]
    ours = {v: summarise([s[v] for s in converged]) if converged else (math.nan, math.nan) for v in VARIANTS}
    with_overlap = [s["overlap"] for s in converged if s.get("overlap")]
    overlap = {m: {k: statistics.fmean(o[m][k] for o in with_overlap) for k in ("recall", "precision")}
               for m in (with_overlap[0] if with_overlap else {})}
    return {"row": name, "overrides": overrides, "lam": next((s["lam"] for s in converged), None), "ours": ours,
            "paper": paper, "overlap": overlap, "sweep": swept, "runs": runs, "diverged": len(runs) - len(converged),
            "time_s": statistics.fmean(s["time_s"] for s in runs) if runs else math.nan}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    """The metric table beside the paper's, then the Appendix D overlap table."""
    metric = "accuracy" if args.dataset == "mnist" else "pneumonia F1"
    paper = ("Paper: Table 9 (ground truth), Table 12 (teacher), Table 18 (distillation)." if args.dataset == "mnist"
             else "The paper did not run this data set.")
    lines = [f"{args.dataset}, two-layer CNN: {metric} mean (std) over seeds {args.seeds}; epochs {args.epochs}, "
             f"lr {args.lr}, batch {args.batch_size}, norm {args.norm}, limit_train {args.limit_train}, "
             f"limit_test {args.limit_test}, RBR limit_train {args.rbr_limit_train}"
             + (f", tags {args.tag_style}" if args.dataset != "mnist" else "")
             + "".join(f", {k} {getattr(args, k):g}" for k in ("teacher_epochs", "teacher_lr") if getattr(args, k))
             + f". {paper}"
             + (f" Lambda marked * was chosen by section 5.3's sweep ({args.sweep_epochs or args.epochs} epochs per "
                "lambda)." if any(r.get("sweep") for r in results) else "")
             + (" Lambdas fixed by --lam: " + ", ".join(f"{m} {v:g}" for m, v in args.lam.items()) + "."
                if args.lam else ""), "",
             "| row | lambda | contaminated | permuted | clean | paper contaminated | paper permuted | paper clean "
             "| time/run (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ours = [f"{m:.3f} ({s:.3f})" for m, s in (r["ours"][v] for v in VARIANTS)]
        theirs = [f"{m:.3f} ({s:.3f})" for m, s in r["paper"]] if r["paper"] else ["-"] * 3
        lam = "-" if r["lam"] is None else f"{r['lam']:g}" + "*" * bool(r.get("sweep"))
        notes = [f"{r['diverged']} diverged"] * bool(r["diverged"])
        notes += ["every swept lambda degenerate"] * bool((r.get("sweep") or {}).get("degenerate"))
        notes += [f"{len(r['runs'])} of {len(args.seeds)} seeds"] * (len(r["runs"]) < len(args.seeds))
        note = f" ({', '.join(notes)})" if notes else ""
        lines.append(f"| {r['row']}{note} | {lam} | {' | '.join(ours)} | {' | '.join(theirs)} | {r['time_s']:.1f} |")
    maps = next((list(r["overlap"]) for r in results if r.get("overlap")), [])
    if maps:
        lines += ["", "Appendix D (eq. 17), whole contaminated test set, mean over seeds: recall / precision of the "
                  "top-quartile input gradient and of each tapped layer's activations (upsampled) against the "
                  "spurious masks; lower is less reliance on the spurious signal.", "",
                  "| row | " + " | ".join(maps) + " |", "| --- |" + " --- |" * len(maps)]
        for r in results:
            cells = [f"{r['overlap'][m]['recall']:.3f} / {r['overlap'][m]['precision']:.3f}" if m in r["overlap"]
                     else "-" for m in maps]
            lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(results: list[dict], args: argparse.Namespace) -> str:
    """Replace the JSON (atomically: a kill leaves the previous one) and the markdown table; return the table."""
    settings = {k: v for k, v in vars(args).items() if k not in ("finished", "swept")}
    path = results_path(args, ".json")
    save_json({"args": settings, "results": results}, path.with_suffix(".json.tmp"))
    os.replace(path.with_suffix(".json.tmp"), path)
    table = markdown(results, args)
    results_path(args, ".md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = rows(args.rows, args.taus, args.dataset, args.teachers)
    total, done = len(selected) * len(args.seeds), 0
    records = dict(args.finished)  # (row, seed) -> its record: the saved ones, then each trained
    settled = saved_rows(args)  # row -> (overrides with its lambda, sweep): saved, then as each row is reached

    def finished_rows() -> list[dict]:  # every selected row with a record (also rows a resume has not reached)
        out = []
        for name, overrides, paper in selected:
            runs = [records[name, s] for s in args.seeds if (name, s) in records]
            if runs:
                out.append(row_record(name, *settled.get(name, (overrides, None)), paper=paper, runs=runs))
        return out

    for name, overrides, paper in selected:
        # also for a row whose seeds all finished: its record keeps the sweep (the table's * and notes)
        fixed = args.lam.get(overrides.get("method"))
        swept = None if fixed is not None else swept_lambda(overrides, args,
                                                            any((name, s) not in args.finished for s in args.seeds))
        if fixed is not None or swept:
            overrides = {**overrides, "lam": swept["lam"] if swept else fixed}
        settled[name] = (overrides, swept)
        for seed in args.seeds:
            done += 1
            step = f"[{done}/{total}] {name}, seed {seed}"
            if (name, seed) in records:
                run_dir = Path(args.run_dir) / slug(name) / f"seed{seed}"
                record = records[name, seed]
                if "overlap" not in record and "diverged" not in record and (run_dir / "checkpoint.pt").is_file():
                    record["overlap"] = appendix_d(run_dir, args)  # a record written before overlaps were
                print(f"{step}: in {results_path(args, '.json')}, skipped", file=sys.stderr, flush=True)
                continue
            print(f"{step}: training", file=sys.stderr, flush=True)
            records[name, seed] = train_seed(name, overrides, seed, args)
            write(finished_rows(), args)
            outcome = records[name, seed].get("diverged") or " ".join(f"{v} {records[name, seed][v]:.3f}"
                                                                      for v in VARIANTS)
            print(f"{step}: {outcome} ({records[name, seed]['time_s']:.1f} s)", file=sys.stderr, flush=True)
        row = row_record(name, overrides, swept, paper=paper, runs=[records[name, s] for s in args.seeds])
        print(f"{name:<24} " + "  ".join(f"{v} {m:.3f} ({s:.3f})" for v, (m, s) in row["ours"].items())
              + (" paper: " + " ".join(f"{m:.3f}" for m, _ in paper) if paper else "")
              + (f" ({row['diverged']} seeds diverged)" if row["diverged"] else ""), flush=True)
    table = write(finished_rows(), args)
    print(table)
    print(f"wrote {results_path(args, '.json')} and {results_path(args, '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
