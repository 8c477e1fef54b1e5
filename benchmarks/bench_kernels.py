"""pytest-benchmark: fused Triton TAP vs eager reference vs torch.compile(reference), forward and
forward+backward, on a few tap shapes of ``kernel_table.MODELS``. Skipped without CUDA (gpu_check.sh runs
the ResNet-18 batch-128 bf16 ones).

    python -m pytest benchmarks/bench_kernels.py --benchmark-group-by=param:model,param:batch,param:dtype
(``benchmarks/kernel_table.py`` prints the full table with bandwidths.)
"""
import pytest
import torch

pytest.importorskip("triton")

from kernel_table import IMPLS, make_impl, make_inputs  # noqa: E402

# Collected everywhere (so selections can be checked on the CPU), run on CUDA only.
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel benchmarks need a CUDA device")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIGS = [("cnn2", 256), ("resnet18", 16), ("resnet18", 128), ("vgg16", 16), ("densenet121", 128)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("model,batch", CONFIGS)
@pytest.mark.parametrize("phase", ["fwd", "fwd_bwd"])
def test_tap_penalty(benchmark, phase, model, batch, dtype, impl):
    zs, mask = make_inputs(model, batch, DTYPES[dtype], torch.device("cuda"))
    penalty = make_impl(impl, "l1")

    def run():
        p = penalty(zs, mask)
        if phase == "fwd_bwd":
            torch.autograd.grad(p, zs)
        torch.cuda.synchronize()

    run()  # compile / warm up
    benchmark(run)
