"""One run's configuration and the paper's defaults for it (section 5.3, Appendix C's Tables 2 and 3).

:class:`TrainConfig` holds a run; :func:`check_config` validates it and :func:`resolve` replaces its None /
"auto" fields by the defaults for the data set and architecture (:func:`default_lambda`, ``DEFAULT_ARCH``,
``DEFAULT_BATCH_SIZE``, ``DEFAULT_LR``) and the device (:func:`resolve_device`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from kernels import NORMS, check_kernel_size, interpreter_enabled
from tap_fast.choices import (AMP_MODES, ANNOTATIONS, ARCH_NAMES, CLASS_WEIGHTS, CONTAMINATIONS, DATASETS,
                              DISTILLATION_METHODS, FEEDS, METHODS, PERMUTES, STEP_BACKENDS, SWEEP_GRIDS, TAG_MASKS,
                              TAG_STYLES, TAU_RULES)
from tap_fast.datasets import Dataset
from tap_fast.distillation import check_temperature
from tap_fast.tap import triton_available

AMP = dict(zip(AMP_MODES, (None, torch.bfloat16), strict=True))  # autocast dtype of the step (weights stay fp32)
# Data set -> the paper's data set whose settings it follows (Table 2 / 3 rows, batch size, models).
# The user's own folders follow PNEU's (ResNet-18, batch 16); no lambda is known for them.
FAMILY = {"digits": "mnist", "mnist": "mnist", "pneumoniamnist": "pneu", "pneu": "pneu", "knee": "knee",
          "folder": "folder"}
DEFAULT_ARCH = {"digits": "cnn2", "mnist": "cnn2", "pneumoniamnist": "cnn2", "pneu": "resnet18", "knee": "resnet18",
                "folder": "resnet18"}
DEFAULT_BATCH_SIZE = {"mnist": 256, "pneu": 16, "knee": 16, "folder": 16}  # section 5.3
DEFAULT_LR = {"cnn2": 1e-3}  # section 5.3: 1e-3 for the two-layer CNN, 1e-5 for the pretrained deep CNNs
DEEP_LR = 1e-5

# Appendix C: lambda (TAP, RRR, RBR) per (data set, arch), Table 2 for ground-truth annotations ("gt") and
# Table 3 for teacher annotations ("teacher"). Their TAP values were tuned for the released code's "l2sq".
_TABLE2 = {("pneu", "densenet121"): (1e-4, 1e-7, 1e6), ("pneu", "resnet18"): (1e-3, 1e-3, 1e7),
           ("pneu", "vgg16"): (1e-7, 1e-3, 1e5), ("knee", "densenet121"): (1e-5, 1e-2, 1e5),
           ("knee", "resnet18"): (1e-5, 1e-2, 1e5), ("knee", "vgg16"): (1e-6, 1e-2, 1e3),
           ("mnist", "cnn2"): (1e-3, 1e-3, 1e4)}
_TABLE3 = {("pneu", "densenet121"): (1e-6, 1e-8, 1e5), ("pneu", "resnet18"): (1e-6, 1e-4, 1e2),
           ("pneu", "vgg16"): (1e-7, 1e-3, 1e0), ("knee", "densenet121"): (1e-5, 1e-2, 1e3),
           ("knee", "resnet18"): (1e-5, 1e-1, 1e4), ("knee", "vgg16"): (1e-6, 1e-2, 1e9),
           ("mnist", "cnn2"): (1e-4, 1e-2, 1e4)}
# Appendix M, Table 21: lambda (AT, JT, KD) per (data set, arch), students of the teacher-annotation teachers.
_TABLE21 = {("pneu", "densenet121"): (1e2, 1e-9, 1e-4), ("pneu", "resnet18"): (1e0, 1e-3, 1e4),
            ("pneu", "vgg16"): (1e3, 1e-6, 1e2), ("knee", "densenet121"): (1e3, 1e1, 1e1),
            ("knee", "resnet18"): (1e3, 1e1, 1e3), ("knee", "vgg16"): (1e3, 1e1, 1e2),
            ("mnist", "cnn2"): (1e0, 1e-7, 1e0)}
# Keys (family, arch, method, setting); Appendix H adds EfficientNet-B0 with ground-truth annotations.
PAPER_LAMBDAS = {
    **{(family, arch, method, setting): lam
       for setting, table in (("gt", _TABLE2), ("teacher", _TABLE3)) for (family, arch), lams in table.items()
       for method, lam in zip(("tap", "rrr", "rbr"), lams)},
    **{(family, arch, method, "teacher"): lam for (family, arch), lams in _TABLE21.items()
       for method, lam in zip(DISTILLATION_METHODS, lams)},
    ("pneu", "efficientnet_b0", "tap", "gt"): 1e-6, ("knee", "efficientnet_b0", "tap", "gt"): 1e-5,
    ("knee", "efficientnet_b0", "rrr", "gt"): 1e-6, ("knee", "efficientnet_b0", "rbr", "gt"): 1e3,
}
# TAP with the L1 norm of eq. 8 (this package's default): values measured with this code (cnn2 on MNIST).
L1_TAP_LAMBDAS = {("mnist", "cnn2", "gt"): 1e-2, ("mnist", "cnn2", "teacher"): 1e-3}
# Section 5.3: lambda is tuned in log steps over these ranges.
SWEEP_RANGE = {"tap": (-9, 0), "rrr": (-9, 0), "rbr": (0, 9),
               **dict.fromkeys(DISTILLATION_METHODS, (-9, 4))}  # Appendix M: 1e-9 .. 1e4 for AT, JT, KD
# KD's temperature T (Hinton et al. 2015): Table 21 gives none, so 4, a common choice.
KD_TEMPERATURE = 4.0


@dataclass
class TrainConfig:
    """One training run. ``None`` fields take the paper's defaults for the data set and architecture."""
    dataset: str = "digits"
    data_dir: str | None = None
    cache_dir: str | None = None  # pneu / knee: decoded images are kept there
    channels: int = 1  # "folder": 1 (greyscale) or 3 (RGB)
    masks_dir: str | None = None  # "folder": a PNG mask per image (nonzero = spurious)
    boxes: str | None = None  # "folder": a CSV of boxes path,x0,y0,x1,y1 (the original image's pixels)
    soft_masks: bool = False  # "folder": mask grey levels / 255 as weights instead of binary masks
    contamination: str | None = None  # None: the data set's own (decoy / tag; none for "folder")
    class_weights: str = "none"  # "balanced": inverse class frequency in the cross-entropy and RBR
    feed: str = "auto"  # how training batches are made: memory, dali, torchvision, or auto
    arch: str | None = None
    weights: str | None = "auto"  # "auto": ImageNet for deep CNNs (offline hub cache), none for cnn2
    method: str = "none"
    annotations: str = "ground-truth"
    clean_train: bool = False  # the "Base" model: trained on clean data, method "none"
    norm: str = "l1"
    lam: float | None = None
    temperature: float | None = None  # method "kd": T of Hinton et al.; None: KD_TEMPERATURE
    tau: float = 0.01
    tau_rule: str = "quantile"  # eq. 14: mask the tau fraction of lowest-saliency pixels (released), or E < tau
    permute: str = "random"  # SC(X*, permute(y)): a random signal per image (binary: swap), or a derangement
    tag_mask: str = "box"  # a text tag's mask: its whole box (annotators draw boxes; released), or its ink
    tag_style: str = "font"  # tags on images under 77 px: the font's smallest render, or shrunk from 224 px
    teacher_fraction: float = 0.1
    teacher_epochs: int | None = None  # default: epochs
    teacher_lr: float = 1e-4  # the released teachers' SGD learning rate
    teacher_weight_decay: float = 1e-4  # c of the released teachers' explicit L2 term c * ||theta||^2
    epochs: int = 50
    lr: float | None = None
    momentum: float = 0.9
    batch_size: int | None = None
    kernel_size: int = 3
    compound: bool = False
    channels_last: bool = True  # memory layout only (same model; ~2x faster convs on a CPU)
    compile: bool = False  # torch.compile the step (RRR, RBR and JT stay eager)
    tap_backend: str = "auto"  # TAP's kernels: auto, torch, triton, identity (choices.STEP_BACKENDS)
    cuda_graphs: bool = False  # capture the whole step in one CUDA graph (CUDA only)
    amp: str = "none"  # "none" (fp32) or "bf16" autocast
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    limit_val: int | None = None
    image_size: int | None = None
    device: str = "auto"
    run_dir: str | None = None
    resume: bool = False
    overwrite: bool = False  # replace a checkpoint in run_dir instead of refusing to
    quiet: bool = False
    overlap: bool = True  # record Appendix D's overlap (eq. 17) on the contaminated test set after training


# Fields that do not change what a run computes (checked when resuming).
RUNTIME_FIELDS = ("epochs", "device", "run_dir", "resume", "overwrite", "quiet", "cache_dir", "channels_last",
                  "compile", "cuda_graphs", "tap_backend", "feed", "overlap")


def without_unsaved_defaults(settings: dict, saved: dict) -> dict:
    """``settings`` (TrainConfig fields) without those that ``saved`` (a checkpoint's or a cache's record of
    them) lacks and that hold TrainConfig's default: fields added after it was written count at their
    default, so that it still matches."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in settings.items() if k in saved or k not in defaults or v != defaults[k]}


def run_meta(config: TrainConfig, saved: dict | None = None) -> dict:
    """What a resolved ``config`` computes (all but RUNTIME_FIELDS): its checkpoints' ``meta``; given the
    ``saved`` meta of a checkpoint to resume, :func:`without_unsaved_defaults` of it."""
    meta = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}
    return meta if saved is None else without_unsaved_defaults(meta, saved)


def default_lambda(method: str, norm: str, dataset: str, arch: str, annotations: str) -> float:
    """lambda of eq. 3 for a run: 0 for "none"; Appendix C's choice for RRR / RBR and for TAP with "l2sq";
    this package's measured value for TAP with "l1"; Table 21's for AT / JT / KD (whatever ``annotations``).
    Raises ValueError where none is known."""
    if method == "none":
        return 0.0
    setting = "gt" if annotations == "ground-truth" and method not in DISTILLATION_METHODS else "teacher"
    family = FAMILY[dataset]
    table, key = ((L1_TAP_LAMBDAS, (family, arch, setting)) if method == "tap" and norm == "l1"
                  else (PAPER_LAMBDAS, (family, arch, method, setting)))
    if key not in table:
        hint = " (or use --norm l2sq for Appendix C's values)" if method == "tap" and norm == "l1" else ""
        raise ValueError(f"no default lambda for method {method!r} with norm {norm!r}, arch {arch!r} on "
                         f"{dataset!r} with {annotations} annotations: pass lam (--lam) or tune it with "
                         f"`tap-fast sweep`{hint}")
    return table[key]


def sweep_lambdas(method: str, grid: str = "decade") -> list[float]:
    """Section 5.3's range: 1e-9 .. 1 for TAP and RRR, 1 .. 1e9 for RBR (Appendix M: 1e-9 .. 1e4 for AT, JT,
    KD), in steps of a factor 10 ("decade", the paper's grid) or with 3 x 10^k between them ("half": 1e-9,
    3e-9, 1e-8, ..., 3e-1, 1)."""
    if method not in SWEEP_RANGE:
        raise ValueError(f"method must be one of {tuple(SWEEP_RANGE)} for a lambda sweep, got {method!r}")
    if grid not in SWEEP_GRIDS:
        raise ValueError(f"grid must be one of {SWEEP_GRIDS}, got {grid!r}")
    lo, hi = SWEEP_RANGE[method]
    steps = (1,) if grid == "decade" else (1, 3)
    return [float(f"{m}e{e}") for e in range(lo, hi) for m in steps] + [float(f"1e{hi}")]


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; otherwise "cpu" or an available CUDA device ("cuda", "cuda:1").
    Raises ValueError naming ``device`` for anything else."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu' or a CUDA device such as 'cuda:0', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or a CUDA device such as 'cuda:0', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} was requested but there are {torch.cuda.device_count()} CUDA "
                         "device(s)")
    return dev


def check_config(config: TrainConfig) -> None:
    """Raise ValueError naming the first invalid field of ``config``."""
    choices = {"dataset": DATASETS, "method": METHODS, "annotations": ANNOTATIONS, "norm": NORMS, "amp": AMP_MODES,
               "tap_backend": STEP_BACKENDS, "contamination": (None, *CONTAMINATIONS), "class_weights": CLASS_WEIGHTS,
               "feed": FEEDS, "channels": (1, 3), "tau_rule": TAU_RULES, "permute": PERMUTES, "tag_mask": TAG_MASKS,
               "tag_style": TAG_STYLES}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {tuple(allowed)}, got {getattr(config, name)!r}")
    if config.arch is not None and config.arch not in ARCH_NAMES:
        raise ValueError(f"arch must be one of {sorted(ARCH_NAMES)}, got {config.arch!r}")
    positive_ints = ("epochs", "batch_size", "teacher_epochs", "limit_train", "limit_test", "limit_val",
                     "image_size")
    for name in positive_ints:
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_kernel_size(config.kernel_size)
    if not isinstance(config.overlap, bool):
        raise ValueError(f"overlap must be True or False, got {config.overlap!r}")
    if not 0.0 <= config.momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {config.momentum!r}")
    if config.lr is not None and not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr!r}")
    if config.lam is not None and not (config.lam >= 0 and math.isfinite(config.lam)):
        raise ValueError(f"lam must be a finite number >= 0, got {config.lam!r}")
    if not 0.0 < config.tau <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {config.tau!r}")
    if not 0.0 < config.teacher_fraction < 1.0:
        raise ValueError(f"teacher_fraction must lie in (0, 1), got {config.teacher_fraction!r}")
    if not (config.teacher_lr > 0 and math.isfinite(config.teacher_lr)):
        raise ValueError(f"teacher_lr must be a finite number > 0, got {config.teacher_lr!r}")
    if not (config.teacher_weight_decay >= 0 and math.isfinite(config.teacher_weight_decay)):
        raise ValueError(f"teacher_weight_decay must be a finite number >= 0, got {config.teacher_weight_decay!r}")
    _check_distillation(config)
    if config.clean_train and config.method != "none":
        raise ValueError(f"clean_train trains the Base model without XS: method must be 'none', got "
                         f"{config.method!r}")
    _check_tap_backend(config)
    _check_folder_options(config)
    if config.resume and config.run_dir is None:
        raise ValueError("resume needs run_dir (--run-dir), the folder holding checkpoint.pt")
    if config.resume and config.overwrite:
        raise ValueError("overwrite starts run_dir's checkpoint again, resume (--resume) continues it: pass one")


def _check_distillation(config: TrainConfig) -> None:
    """temperature only with method "kd" (and positive); no random annotations for AT / JT / KD, which learn from
    the teacher itself and use no masks."""
    if config.temperature is not None:
        if config.method != "kd":
            raise ValueError(f"temperature applies to method 'kd' only, got method {config.method!r}")
        check_temperature(config.temperature)
    if config.method in DISTILLATION_METHODS and config.annotations == "random":
        raise ValueError(f"annotations 'random' draws masks, which method {config.method!r} does not use (it "
                         "learns from the teacher itself): leave annotations at its default")


def _check_folder_options(config: TrainConfig) -> None:
    """channels 3, masks_dir, boxes and soft_masks are for the user's own folders (dataset "folder")."""
    given = [f for f in ("masks_dir", "boxes") if getattr(config, f) is not None]
    if config.dataset != "folder":
        wrong = given + (["channels"] if config.channels != 1 else []) + (["soft_masks"] if config.soft_masks else [])
        if wrong:
            raise ValueError(f"{', '.join(wrong)} apply to dataset 'folder' (the user's own images) only, got "
                             f"dataset {config.dataset!r}")
    if len(given) == 2:
        raise ValueError("give masks_dir (--masks-dir) or boxes (--boxes), not both")
    if config.soft_masks and config.masks_dir is None:
        raise ValueError("soft_masks reads the grey levels of mask files: it needs masks_dir (--masks-dir)")


def _check_tap_backend(config: TrainConfig) -> None:
    """A non-"auto" tap_backend only with method "tap"; "triton" / "identity" need the triton package and a
    CUDA device, or TRITON_INTERPRET=1 (Triton's CPU interpreter)."""
    backend = config.tap_backend
    if backend == "auto":
        return
    if config.method != "tap":
        raise ValueError(f"tap_backend {backend!r} picks TAP's kernels and applies to method 'tap' only, got "
                         f"method {config.method!r}; leave tap_backend 'auto'")
    if backend == "torch":
        return
    if not triton_available():
        raise ValueError(f"tap_backend {backend!r} needs the triton package, which is not installed; use "
                         "tap_backend 'auto' or 'torch'")
    device = resolve_device(config.device)
    if device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"tap_backend {backend!r} runs Triton kernels, which need a CUDA device (device is "
                         f"{str(device)!r}) or TRITON_INTERPRET=1 for Triton's CPU interpreter; use tap_backend "
                         "'auto' or 'torch' on the CPU")


def resolve(config: TrainConfig, dataset: Dataset | None = None) -> TrainConfig:
    """``config`` with its None / "auto" fields replaced by the paper's defaults for its data set.

    With the loaded ``dataset``, a default batch size is capped at the training set's size (after the
    teacher's share is held out) and a larger ``batch_size`` given is a ValueError; without it (a check
    before loading) the defaults alone are filled in."""
    arch = config.arch or DEFAULT_ARCH[config.dataset]
    weights = config.weights
    if weights == "auto":
        weights = None if arch == "cnn2" else "imagenet"
    lam = config.lam if config.lam is not None else default_lambda(config.method, config.norm, config.dataset,
                                                                   arch, config.annotations)
    batch_size = config.batch_size or DEFAULT_BATCH_SIZE[FAMILY[config.dataset]]
    if dataset is not None:
        n = dataset.train_size
        n -= round(config.teacher_fraction * n) if needs_teacher(config) else 0  # clean_split's held-out share
        if config.batch_size is not None and config.batch_size > n:
            raise ValueError(f"batch_size {config.batch_size} exceeds the {n} training images; pass batch_size "
                             f"(--batch-size) <= {n}")
        batch_size = min(batch_size, n)
    return dataclasses.replace(
        config, arch=arch, weights=weights, lam=float(lam),
        temperature=(KD_TEMPERATURE if config.temperature is None else config.temperature) if config.method == "kd"
        else None,
        lr=config.lr if config.lr is not None else DEFAULT_LR.get(arch, DEEP_LR), batch_size=batch_size,
        teacher_epochs=(config.teacher_epochs or config.epochs) if needs_teacher(config) else None,
        device=str(_checked_device(config)))


def _checked_device(config: TrainConfig) -> torch.device:
    device = resolve_device(config.device)
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got device {str(device)!r}")
    return device


def needs_teacher(config: TrainConfig) -> bool:
    """Whether the run trains a teacher: for its masks (section 4.2: teacher or random annotations) or to
    distil from (Appendix M: AT, JT, KD)."""
    return config.method in DISTILLATION_METHODS or (config.method != "none" and config.annotations != "ground-truth")


def step_options(config: TrainConfig) -> dict:
    """fit's step options (compile, CUDA graphs, amp, channels_last, TAP backend) from a config."""
    return {"compile": config.compile, "cuda_graphs": config.cuda_graphs, "amp_dtype": AMP[config.amp],
            "channels_last": config.channels_last, "backend": config.tap_backend}


def signal_options(config: TrainConfig) -> dict:
    """contaminate's options from a config: the permuted sets' signal (permute), the tags' masks (tag_mask) and
    small images' tags (tag_style)."""
    return {"permute": config.permute, "tag_mask": config.tag_mask, "tag_style": config.tag_style}

