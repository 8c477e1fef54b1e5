"""DDP over 2 CPU processes (gloo, started by torchrun) trains exactly like 1 process at the same global batch.

Each rank takes half of every global batch (feeds.epoch_order with its rank), DDP averages gradients, and
the epoch metrics are summed over ranks. Against one process with the whole batch: parameters after 8 SGD
steps within atol 2e-6 / rtol 1e-5 and epoch losses within rtol 1e-5 (only the order of fp32 sums differs:
measured <= 1e-7). RBR, whose penalty is a batch sum of terms built from the batch-mean task loss, needs the
rank factor rbr_scale; the test also checks that without it the runs differ.

Run as a script (``python tests/test_ddp.py OUT``) this file is the per-rank worker.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
from launch_ddp import torchrun

from tap_fast import distributed as D
from tap_fast.compiled_step import make_step
from tap_fast.feeds import epoch_order
from tap_fast.models import build_model, tap_points
from tap_fast.tapped_model import TappedModel

GLOBAL_BATCH, N, EPOCHS, SEED = 8, 34, 2, 3  # 34 % 8 = 2 samples dropped per epoch; 4 steps per epoch
METHODS = {"tap": 1e-3, "rrr": 1e-3, "rbr": 5.0}
MEAN, STD = 0.1307, 0.3081


def _data():
    g = torch.Generator().manual_seed(SEED)
    images = torch.randint(0, 256, (N, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (N,), generator=g)
    masks = (torch.rand(N, 1, 28, 28, generator=g) > 0.7).to(torch.uint8)
    return images, labels, masks


def train(method: str, ctx: D.DistContext, *, scale_rbr: bool = True, lam: float | None = None
          ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Train cnn2 for EPOCHS on this rank's shares; return (parameters, per-epoch global metric means)."""
    images, labels, masks = _data()
    torch.manual_seed(0)
    model = D.wrap_ddp(TappedModel(build_model("cnn2", 10), tap_points("cnn2")), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # scale_rbr=False undoes make_step's rank factor: each rank then minimises the single-process loss.
    lam = (METHODS[method] if lam is None else lam) * (1 if scale_rbr else ctx.world_size)
    step = make_step(model, optimizer, method=method, lam=lam, mean=MEAN, std=STD)
    batch = D.per_rank_batch_size(GLOBAL_BATCH, ctx.world_size)
    history = []
    for epoch in range(EPOCHS):
        order = epoch_order(N, epoch=epoch, seed=SEED, rank=ctx.rank, world_size=ctx.world_size)
        sums, n_steps = torch.zeros(3), len(order) // batch
        for k in range(n_steps):
            idx = order[k * batch:(k + 1) * batch]
            sums += torch.stack(step(images[idx], labels[idx], masks[idx]))
        history.append(D.all_reduce_sum(sums, ctx) / (n_steps * ctx.world_size))
    return [p.detach().clone() for p in D.unwrap(model).parameters()], torch.stack(history)


def _worker(out: str) -> None:
    ctx = D.init_distributed("cpu")
    try:
        assert ctx.world_size == 2 and ctx.enabled
        results = {m: train(m, ctx) for m in METHODS}
        results["rbr-unscaled"] = train("rbr", ctx, scale_rbr=False)
        torch.save(results, Path(out) / f"rank{ctx.rank}.pt")
    finally:
        D.shutdown(ctx)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun([__file__, str(out)])
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("method", list(METHODS))
def test_two_process_ddp_matches_one_process(ddp_results, method):
    ref_params, ref_history = train(method, D.DistContext())
    params, history = ddp_results[0][method]
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    for p, q in zip(params, ddp_results[1][method][0]):  # DDP keeps the ranks identical
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    torch.testing.assert_close(history, ref_history, atol=1e-6, rtol=1e-5)
    assert float(ref_history[0, 2]) > 0 and float(ref_history[0, 0]) > float(ref_history[0, 1])


def test_rbr_without_rank_scaling_differs(ddp_results):
    ref_params, ref_history = train("rbr", D.DistContext())
    params, history = ddp_results[0]["rbr-unscaled"]
    assert torch.isfinite(history).all()
    assert max(float((p - q).abs().max()) for p, q in zip(params, ref_params)) > 1e-4
    # unscaled, each rank's summed RBR term weighs world_size times the single-process one
    single_double_lam = train("rbr", D.DistContext(), lam=2 * METHODS["rbr"])[0]
    for p, q in zip(params, single_double_lam):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)


def test_single_process_context_and_helpers():
    ctx = D.init_distributed("cpu", env={})
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    model = TappedModel(build_model("cnn2", 10), tap_points("cnn2"))
    assert D.wrap_ddp(model, ctx) is model and D.unwrap(model) is model
    assert D.unwrap(torch.compile(model)) is model
    t = torch.arange(3.0)
    assert D.all_reduce_sum(t, ctx) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert D.per_rank_batch_size(256, 4) == 64
    assert D.backend_for(torch.device("cpu")) == "gloo" and D.backend_for(torch.device("cuda", 1)) == "nccl"
    assert D.env_ranks({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)


@pytest.mark.parametrize("cuda_graphs,expected", [(True, "0"), (False, "1")])
def test_nccl_group_for_cuda_graphs(monkeypatch, cuda_graphs, expected):
    """A DDP step captured in a CUDA graph needs NCCL's async error handling off when the group is made
    (torchrun sets it to 1); the CUDA calls are faked, what init_process_group sees is real."""
    seen = {}

    def fake_init(backend, **kw):
        seen.update(backend=backend, handling=os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"), **kw)

    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", fake_init)
    ctx = D.init_distributed("cuda", env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
                             cuda_graphs=cuda_graphs)
    assert ctx.device == torch.device("cuda", 1) and (ctx.rank, ctx.world_size) == (1, 2)
    assert seen["backend"] == "nccl" and seen["handling"] == expected


@pytest.mark.parametrize("env,match", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"RANK": "a", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "integers"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK < WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "RANK < WORLD_SIZE"),
])
def test_bad_environment(env, match):
    with pytest.raises(ValueError, match=match):
        D.env_ranks(env)


def test_bad_batch_split():
    with pytest.raises(ValueError, match="not divisible by world_size=3"):
        D.per_rank_batch_size(256, 3)
    with pytest.raises(ValueError, match="global_batch_size"):
        D.per_rank_batch_size(0, 1)
    with pytest.raises(ValueError, match="world_size"):
        D.per_rank_batch_size(8, 0)


if __name__ == "__main__":
    _worker(sys.argv[1])
