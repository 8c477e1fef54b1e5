"""pytest-benchmark: full training steps (forward, CE + lambda * penalty, backward, SGD) of No XS, TAP,
RRR and RBR, built by ``benchmarks/step_table.py`` (random pixels with contamination masks, rotating over 4 batches).

    python -m pytest benchmarks/bench_steps.py --benchmark-group-by=param:config -q

CPU: the two-layer CNN at 28x28 with batch 64 and 256 and ResNet-18 at 64x64 with batch 16 (TAP is the
plain-PyTorch reference there); on a GPU also the paper's Table 1 setting (224x224, batch 16), steps in
CUDA graphs, with the fused TAP and the reference as separate rows. Compare rows within a group (a
shared CPU's load changes between groups); ``benchmarks/step_table.py`` interleaves rows for ratios.
"""
import itertools

import pytest
import torch

from step_table import build_step, make_data, parse_config, row_label

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CONFIGS = ["cnn2@28:64", "cnn2@28:256", "resnet18@64:16"]
ROWS = ["none", "tap", "rrr", "rbr"]
if CUDA:
    CONFIGS += ["vgg16@224:16", "resnet18@224:16", "densenet121@224:16"]
    ROWS += ["tap-ref"]
ROUNDS = {"none": 10, "tap": 10, "tap-ref": 10, "rrr": 5, "rbr": 3} if not CUDA else dict.fromkeys(ROWS, 30)


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("config", CONFIGS)
def test_step(benchmark, config, row):
    cfg = parse_config(config)
    data = make_data(cfg, cfg.batch, DEVICE)
    step = build_step(cfg, row, DEVICE, cuda_graphs=CUDA)
    for batch in data + data[:1]:  # warm-up; on CUDA the graph is captured on the 4th call
        step(*batch)
    batches = itertools.cycle(data)

    def run():
        step(*next(batches))
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = config
    benchmark.extra_info.update(label=row_label(row, DEVICE), images=cfg.batch)
    benchmark.pedantic(run, rounds=ROUNDS[row], warmup_rounds=1, iterations=1)
