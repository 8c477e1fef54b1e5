"""The training loop (section 5.3: SGD with momentum over shuffled static-shape batches) and its checkpoints.

:func:`fit` trains with :func:`~tap_fast.compiled_step.make_step` (optionally compiled, in a CUDA graph, in
bf16, and data-parallel over the processes ``torchrun`` starts), saving a checkpoint after every epoch.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from tap_fast.compiled_step import make_step
from tap_fast.distributed import DistContext, all_reduce_sum, per_rank_batch_size, unwrap, wrap_ddp
from tap_fast.feeds import epoch_order
from tap_fast.tapped_model import TappedModel


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, in the channels-last memory layout when asked (the same model)."""
    return model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)


def fit(model: TappedModel, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None, *,
        method: str, lam: float, epochs: int, lr: float, momentum: float, batch_size: int, seed: int,
        mean: float, std: float, norm: str = "l1", kernel_size: int = 3, compound: bool = False,
        checkpoint: Path | None = None, resume: bool = False, meta: dict | None = None, quiet: bool = False,
        desc: str = "train", compile: bool = False, cuda_graphs: bool = False, amp_dtype: torch.dtype | None = None,
        channels_last: bool = False, backend: str = "auto", ctx: DistContext | None = None
        ) -> dict[str, list[float]]:
    """Train ``model`` with SGD (momentum, section 5.3) for ``epochs`` over shuffled index batches.

    Each epoch reads :func:`~tap_fast.feeds.epoch_order` (seeded by ``seed`` and the epoch) in batches of
    ``batch_size``; the last partial batch is dropped (static shapes; a set smaller than one batch gives one
    batch of all of it). The step is :func:`~tap_fast.compiled_step.make_step` with ``compile``,
    ``cuda_graphs``, ``amp_dtype``, ``channels_last`` and TAP's ``backend``. With a multi-process ``ctx`` the
    model is wrapped in DDP, ``batch_size`` is the global batch (each rank takes an equal, disjoint share),
    metrics are summed over ranks, and only the main rank prints and writes the checkpoint.

    With ``checkpoint`` it saves model, optimizer, epoch, history and RNG states after every epoch; with
    ``resume`` it continues from that file (whose ``meta`` must equal this run's). Losses are accumulated on
    the device and read once per epoch. Returns per-epoch "loss", "task_loss", "penalty" and "epoch_s".
    """
    ctx = ctx or DistContext(device=images.device)
    device = images.device
    n = images.shape[0]
    share = n // ctx.world_size
    if share < 1:
        raise ValueError(f"images has {n} samples, fewer than the {ctx.world_size} processes")
    per_rank = min(per_rank_batch_size(batch_size, ctx.world_size), share)
    steps = share // per_rank
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    history: dict[str, list[float]] = {"loss": [], "task_loss": [], "penalty": [], "epoch_s": []}
    start_epoch = 0
    if resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
        if state["meta"] != meta:
            diff = sorted(k for k in set(state["meta"]) | set(meta or {})
                          if state["meta"].get(k) != (meta or {}).get(k))
            raise ValueError(f"cannot resume from {checkpoint}: it was written by a run with different "
                             f"settings {diff}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history, start_epoch = state["history"], state["epoch"]
        if start_epoch > epochs:
            raise ValueError(f"epochs ({epochs}) is below the epoch of the checkpoint {checkpoint} "
                             f"({start_epoch}); pass epochs >= {start_epoch} to resume")
    elif resume and not quiet and ctx.is_main:
        print(f"{desc}: no checkpoint at {checkpoint}; starting from epoch 1", file=sys.stderr)
    model.train()
    trained = wrap_ddp(model, ctx)
    # Built after the checkpoint is loaded: a CUDA graph holds the parameters and optimizer state it captured.
    step = make_step(trained, optimizer, method=method, lam=lam, mean=mean, std=std, norm=norm,
                     kernel_size=kernel_size, compound=compound, explain_in_eval=None, compile=compile,
                     cuda_graphs=cuda_graphs, amp_dtype=amp_dtype, channels_last=channels_last, backend=backend)
    show = not quiet and ctx.is_main
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        order = epoch_order(n, epoch=epoch, seed=seed, rank=ctx.rank, world_size=ctx.world_size).to(device)
        sums = torch.zeros(3, device=device)
        bar = tqdm(range(steps), desc=f"{desc} {epoch + 1}/{epochs}", file=sys.stderr,
                   disable=not (show and sys.stderr.isatty()), leave=False, unit="batch")
        for k in bar:
            idx = order[k * per_rank:(k + 1) * per_rank]
            out = step(images[idx], labels[idx], None if masks is None else masks[idx])
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
            save_checkpoint(checkpoint, {
                "model": unwrap(trained).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                "history": history, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, "meta": meta})
    return history


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to ``path`` atomically (a temporary file, then a rename), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
