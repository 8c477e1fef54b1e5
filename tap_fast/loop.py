"""The training loop (section 5.3: SGD with momentum over shuffled static-shape batches) and its checkpoints.

:func:`fit` trains with :func:`~tap_fast.compiled_step.make_step` (optionally compiled, in a CUDA graph, in
bf16, and data-parallel over the processes ``torchrun`` starts), saving a checkpoint after every epoch.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from tap_fast.compiled_step import make_step
from tap_fast.datasets import read_saved, write_saved
from tap_fast.distributed import DistContext, all_reduce_sum, unwrap, wrap_ddp
from tap_fast.tapped_model import TappedModel


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, in the channels-last memory layout when asked (the same model)."""
    return model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)


def fit(model: TappedModel, feed: Iterable, *, method: str, lam: float, epochs: int, lr: float, momentum: float,
        mean: float, std: float, weight_decay: float = 0.0, norm: str = "l1", kernel_size: int = 3, compound: bool = False,
        checkpoint: Path | None = None, resume: bool = False, meta: dict | None = None, quiet: bool = False,
        desc: str = "train", compile: bool = False, cuda_graphs: bool = False, amp_dtype: torch.dtype | None = None,
        channels_last: bool = False, backend: str = "auto", class_weights: torch.Tensor | None = None,
        teacher: nn.Module | None = None, temperature: float | None = None, ctx: DistContext | None = None
        ) -> dict[str, list[float]]:
    """Train ``model`` with SGD (momentum, section 5.3) for ``epochs`` over a feed's batches.

    ``weight_decay`` is SGD's: it adds weight_decay * theta to every parameter's gradient, the gradient of an L2
    term (weight_decay / 2) * ||theta||^2 in the loss (an explicit c * ||theta||^2 is weight_decay = 2c).

    ``feed`` is one of the engine's feeds (:class:`~tap_fast.feeds.DeviceFeed` for in-memory sets,
    :class:`~tap_fast.dali_feed.FolderFeed` for streamed folders) built for this process's rank: it has
    ``set_epoch``, ``device`` and ``len``, and iterating yields static-shape (x uint8 (B, C, H, W), y (B,),
    mask (B, 1, H, W)) batches of one epoch. The step is :func:`~tap_fast.compiled_step.make_step` with
    ``compile``, ``cuda_graphs``, ``amp_dtype``, ``channels_last``, TAP's ``backend`` and the cross-entropy's
    ``class_weights``, and the distillation methods' frozen ``teacher`` (and KD's ``temperature``); it normalises x
    with ``mean`` and ``std``. With a multi-process ``ctx`` the model is wrapped in DDP, metrics are summed over
    ranks, and only the main rank prints and writes the checkpoint.

    With ``checkpoint`` it saves model, optimizer, epoch, history and RNG states after every epoch; with
    ``resume`` it continues from that file (whose ``meta`` must equal this run's). Losses are accumulated on
    the device and read once per epoch. Returns per-epoch "loss", "task_loss", "penalty" and "epoch_s".
    """
    device = torch.device(feed.device)
    ctx = ctx or DistContext(device=device)
    steps = len(feed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"loss": [], "task_loss": [], "penalty": [], "epoch_s": []}
    start_epoch = 0
    if resume and checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        check_resume(state, checkpoint, meta, epochs)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history, start_epoch = state["history"], state["epoch"]
    elif resume and not quiet and ctx.is_main:
        print(f"{desc}: no checkpoint at {checkpoint}; starting from epoch 1", file=sys.stderr)
    model.train()
    trained = wrap_ddp(model, ctx)
    # Built after the checkpoint is loaded: a CUDA graph holds the parameters and optimizer state it captured.
    step = make_step(trained, optimizer, method=method, lam=lam, mean=mean, std=std, norm=norm,
                     kernel_size=kernel_size, compound=compound, explain_in_eval=None, compile=compile,
                     cuda_graphs=cuda_graphs, amp_dtype=amp_dtype, channels_last=channels_last, backend=backend,
                     class_weights=class_weights, teacher=teacher, temperature=temperature)
    show = not quiet and ctx.is_main
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        feed.set_epoch(epoch)
        sums = torch.zeros(3, device=device)
        bar = tqdm(feed, total=steps, desc=f"{desc} {epoch + 1}/{epochs}", file=sys.stderr,
                   disable=not (show and sys.stderr.isatty()), leave=False, unit="batch")
        for x, y, mask in bar:
            out = step(x, y, None if method == "none" else mask)
            sums += torch.stack(out)
        loss, task_loss, penalty = (all_reduce_sum(sums, ctx) / (steps * ctx.world_size)).tolist()
        if not math.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss} in epoch {epoch + 1}; lower lr or lam")
        for name, value in zip(("loss", "task_loss", "penalty", "epoch_s"),
                               (loss, task_loss, penalty, time.perf_counter() - t0)):
            history[name].append(value)
        if show:
            print(f"{desc} epoch {epoch + 1}/{epochs}: loss {loss:.4f} (task {task_loss:.4f}, penalty "
                  f"{penalty:.4g}) {history['epoch_s'][-1]:.1f}s", file=sys.stderr)
        if checkpoint is not None and ctx.is_main:
            write_saved(checkpoint, {
                "model": unwrap(trained).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                "history": history, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, "meta": meta})
    return history


CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history", "torch_rng", "cuda_rng", "meta")  # what fit saves


def load_checkpoint(path: Path) -> dict:
    """The checkpoint :func:`fit` saved at ``path``, on the CPU (its RNG states must stay there). A file that is
    unreadable, truncated, foreign or lacks one of ``CHECKPOINT_KEYS`` is a ValueError naming it and what to do."""
    try:
        return read_saved(path, CHECKPOINT_KEYS)
    except ValueError as e:
        raise ValueError(f"{e}, which is no complete checkpoint: delete it, or pass overwrite (--overwrite) to "
                         "start the run again") from e


def changed_settings(state: dict, meta: dict | None) -> list[str]:
    """The settings (``meta`` keys, sorted) in which the run that saved checkpoint ``state`` differs from ``meta``."""
    saved, meta = state["meta"] or {}, meta or {}
    return sorted(k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k))


def check_resume(state: dict, path: Path, meta: dict | None, epochs: int) -> None:
    """Raise ValueError unless checkpoint ``state`` (read from ``path``) continues a run of ``meta`` that is to
    end at ``epochs``."""
    changed = changed_settings(state, meta)
    if changed:
        raise ValueError(f"cannot resume from {path}: it was written by a run with different settings {changed}; "
                         "pass the same settings, or overwrite (--overwrite) to replace it")
    if state["epoch"] > epochs:
        raise ValueError(f"epochs ({epochs}) is below the epoch of the checkpoint {path} ({state['epoch']}); "
                         f"pass epochs >= {state['epoch']} to resume")
