"""The TAP kernels compile for Hopper (sm_90a) without a GPU: Triton's full pipeline down to a cubin, in the
configurations the launch wrappers produce.

The interpreter (tests/test_kernels.py) accepts code that the compiler rejects; this catches that on
machines without a GPU. The launches are recorded from the fused paths themselves at the ResNet-18 batch-128
shapes (``benchmarks/kernel_registers.py``: plans targeting an H200's 2 x 132 programs, Triton's launch-time
specialisation): layer 1 from the 224 x 224 mask (K=3, BIN_W=4) and layer 2 from layer 1's bin sums (K=1,
BIN_W=2), bf16 and fp32 activations, NCHW (stride_zp=1) and channels_last (stride_zc=1), "l1" and "l2sq",
the list and identity forms (backward with and without grad_out), compound downscaling and a bf16 mask
(D_DTYPE="bf16"). Checks: D's divisions are IEEE (no approximate div.full.f32, which would break
bit-equality with torch), the activation loads are 16-byte vectors, and the forward, backward and sum
kernels neither spill nor use a stack frame (ptxas -v). Runs in a subprocess, since the kernels must be
defined with TRITON_INTERPRET=0. About 20 s with a cold Triton cache on 2 cores.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "benchmarks")
    import kernel_registers as kr

    two = kr.LAYERS[:2]  # layer 1 from the mask, layer 2 chained on its bin sums
    launches = []
    for dtype, layout, norm in (("bf16", "NCHW", "l1"), ("bf16", "channels_last", "l2sq"),
                                ("fp32", "NCHW", "l2sq"), ("fp32", "channels_last", "l1")):
        launches += kr.record_launches(layers=two, dtypes=(dtype,), layouts=(layout,), norms=(norm,),
                                       forms=("list", "identity"))
    launches += kr.record_launches(layers=two, dtypes=("bf16",), layouts=("NCHW",), norms=("l1",),
                                   forms=("list-compound",))
    launches += kr.record_launches(layers=two[:1], dtypes=("bf16",), layouts=("channels_last",), norms=("l1",),
                                   forms=("list",), mask_dtype="bf16")
    configs = kr.configurations(launches, usage=False)

    seen = set()
    for cfg in configs:
        c, ptx, name = cfg.constexprs, cfg.ptx, cfg.kernel
        assert cfg.cubin, name
        assert "div.full" not in ptx, f"{name} {c}: D must use IEEE division"
        if name in ("tap_forward_kernel", "downscale_kernel") and c["MEAN_MODE"] == 0:
            assert "div.rn.f32" in ptx, f"{name} {c}: D must use IEEE division"
        if name in ("tap_forward_kernel", "tap_backward_kernel"):
            assert "ld.global.v4.b32" in ptx, f"{name} {c} {cfg.signature}: activation loads should be 16-byte vectors"
        if name != "downscale_kernel":
            usage = kr.ptxas_usage(ptx)
            spilled = usage["spill_store_bytes"] + usage["spill_load_bytes"] + usage["stack_bytes"]
            assert spilled == 0, (name, c, usage)
        z = cfg.signature.get("z_ptr")
        if name == "tap_forward_kernel":
            layout = "NCHW" if c.get("stride_zp") == 1 else "channels_last" if c.get("stride_zc") == 1 else "?"
            seen.add((name, z, layout, c["K"], c["BIN_W"], c["L2SQ"], c["D_DTYPE"]))
        elif name == "tap_backward_kernel":
            seen.add((name, z, c["HAS_GRAD_OUT"]))
        elif name == "downscale_kernel":
            seen.add((name, c["K"], c["BIN_W"]))
        else:
            seen.add((name,))

    expected = {("scaled_sum_kernel",), ("downscale_kernel", 3, 4), ("downscale_kernel", 3, 2),
                ("tap_forward_kernel", "*bf16", "NCHW", 1, 1, False, "fp32"),  # compound: D maps as they are
                ("tap_forward_kernel", "*bf16", "channels_last", 3, 4, False, "bf16")}  # bf16 mask
    for z, layout, l2sq in (("*bf16", "NCHW", False), ("*bf16", "channels_last", True),
                            ("*fp32", "NCHW", True), ("*fp32", "channels_last", False)):
        expected |= {("tap_forward_kernel", z, layout, 3, 4, l2sq, "fp32"),
                     ("tap_forward_kernel", z, layout, 1, 2, l2sq, "fp32"),
                     ("tap_backward_kernel", z, False), ("tap_backward_kernel", z, True)}
    assert expected <= seen, sorted(expected - seen, key=str)
    print("compiled", len(configs), "binaries from", len(launches), "launches")
""")


def test_kernels_compile_for_sm90():
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no offline NVIDIA compile API: {e}")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, (result.stdout[-2000:] + result.stderr[-3000:])
