"""Data-parallel training over the processes that ``torchrun`` starts: DDP with NCCL on GPUs, gloo on CPUs.

Each rank reads a disjoint, equal share of every global batch (:func:`per_rank_batch_size`; the shares are
drawn by :func:`tap_fast.feeds.epoch_order` with the rank and world size), runs the same training step on
it, and DDP averages the gradients. Losses that are batch means (cross-entropy, TAP of eq. 8, RRR) then
give exactly the gradient of the global-batch mean; :func:`tap_fast.compiled_step.make_step` rescales the
summed RBR term (see ``rbr_scale`` there). Epoch metrics are summed over ranks with :func:`all_reduce_sum`,
and only rank 0 (``is_main``) prints and writes checkpoints.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and the device it trains on."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints and saves."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains (a process group is initialised)."""
        return self.world_size > 1


def env_ranks(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK; (0, 1, 0) when unset."""
    env = os.environ if env is None else env
    if not any(k in env for k in ENV_VARS):
        return 0, 1, 0
    missing = [k for k in ENV_VARS if k not in env]
    if missing:
        raise ValueError(f"environment variables {missing} are not set: torchrun sets RANK, WORLD_SIZE and "
                         "LOCAL_RANK together")
    try:
        rank, world_size, local_rank = (int(env[k]) for k in ENV_VARS)
    except ValueError as e:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                         f"{[env[k] for k in ENV_VARS]}") from e
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got RANK={rank}, "
                         f"WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}")
    return rank, world_size, local_rank


def backend_for(device: torch.device) -> str:
    """The process-group backend for ``device``: "nccl" for CUDA, "gloo" for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: str | torch.device = "auto", env: Mapping[str, str] | None = None, *,
                     cuda_graphs: bool = False) -> DistContext:
    """Read torchrun's environment and, when WORLD_SIZE > 1, join the process group (env:// rendezvous:
    MASTER_ADDR / MASTER_PORT, which torchrun sets).

    ``device``: "auto" (cuda:LOCAL_RANK when CUDA is available, else the CPU), "cuda" (cuda:LOCAL_RANK),
    "cpu", or an explicit device. Without torchrun's variables this is a single-process context.
    ``cuda_graphs``: the DDP step will be captured in a CUDA graph, which needs NCCL's asynchronous error
    handling off before the group is made (torch's CUDA-graph notes, "Usage with DistributedDataParallel";
    torchrun turns it on): TORCH_NCCL_ASYNC_ERROR_HANDLING is set to 0 in this process.
    """
    rank, world_size, local_rank = env_ranks(env)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if cuda_graphs and device.type == "cuda":
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
        dist.init_process_group(backend_for(device), init_method="env://", rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, device)


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    """Samples each rank takes per step: global / world size, which must divide evenly (equal shares keep
    every rank's batch mean a mean over the same number of samples, so averaged gradients equal the
    global-batch gradient)."""
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if global_batch_size % world_size:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by world_size={world_size}: "
                         "every rank must take an equal share of each batch")
    return global_batch_size // world_size


def wrap_ddp(model: nn.Module, ctx: DistContext, *, sync_batchnorm: bool = False) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when ``ctx.enabled``, else ``model`` itself.

    ``model`` (a :class:`~tap_fast.tapped_model.TappedModel` on ``ctx.device``) keeps its forward hooks: DDP calls
    its forward, which returns (logits, activations). Every parameter reaches the logits, so
    find_unused_parameters stays off. BatchNorm normalises over each rank's share unless ``sync_batchnorm``
    (then over the global batch, as a single process does).
    """
    if not ctx.enabled:
        return model
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP and torch.compile wrappers (whose state dict checkpoints should hold)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (e.g. per-epoch metric sums, read once per epoch)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (a no-op for a single process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
