"""The TAP kernels compile for Hopper (sm_90a) without a GPU: Triton's full pipeline down to a cubin.

The interpreter (tests/test_kernels.py) accepts code that the compiler rejects; this catches that on
machines without a GPU. It also checks that D's divisions are IEEE (no approximate div.full.f32, which
would break bit-equality with torch) and that the activation loads are vectorised. Runs in a subprocess,
since the kernels must be defined with TRITON_INTERPRET=0. About 10 s.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kernels.tap_kernels import downscale_kernel, scaled_sum_kernel, tap_backward_kernel, tap_forward_kernel

    def compile_ptx(fn, sig, consts, div16=()):
        # pointers and the ints in div16 are divisible by 16, as Triton specialises them at launch
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in sig
                 if sig[n].startswith("*") or n in div16}
        src = ASTSource(fn=fn, signature={**sig, **{c: "constexpr" for c in consts}}, constexprs=consts,
                        attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], fn.__name__
        return kernel.asm["ptx"]

    ints = lambda *names: {n: "i32" for n in names}
    for k, bin_w, mean_mode in ((3, 2, 0), (1, 32, 0), (3, 3, 1), (1, 5, 2)):
        ptx = compile_ptx(downscale_kernel, {"src_ptr": "*fp32", "out_ptr": "*fp32",
                                             **ints("N", "H", "W", "HO", "WO", "max_bin_h"), "mean_factor": "fp32"},
                          {"K": k, "BIN_W": bin_w, "MEAN_MODE": mean_mode, "BLOCK": 256})
        assert "div.full" not in ptx and ("div.rn.f32" in ptx or mean_mode == 2), "D must use IEEE division"
    for dtype, unit, l2sq, bin_w in (("fp32", "stride_zp", False, 4), ("bf16", "stride_zc", True, 1)):
        aligned = ints("C", "HW", "stride_zb", "stride_zc", "stride_zp")
        aligned.pop(unit)
        sig = {"z_ptr": "*" + dtype, "src_ptr": "*fp32", "partial_ptr": "*fp32", "w_ptr": "*fp32", **aligned,
               **ints("H", "W", "SH", "SW", "max_bin_h"), "mean_factor": "fp32"}
        ptx = compile_ptx(tap_forward_kernel, sig, {"L2SQ": l2sq, "MEAN_MODE": 0, "BIN_W": bin_w, "BLOCK_C": 32,
                                                    "BLOCK_P": 128, unit: 1}, div16=aligned)
        assert "ld.global.v4.b32" in ptx, "activation loads should be 16-byte vectors"
        assert "div.full" not in ptx and "div.rn.f32" in ptx, "D must use IEEE division"
    compile_ptx(scaled_sum_kernel, {"x_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "scale": "fp32"},
                {"BLOCK": 4096})
    for dtype, unit, has_grad_out in (("bf16", "p", True), ("fp32", "c", False)):
        sig = {"z_ptr": "*" + dtype, "w_ptr": "*fp32", "g_ptr": "*fp32", "gout_ptr": "*" + dtype,
               "gin_ptr": "*" + dtype, "scale": "fp32", **ints("C", "HW")}
        consts = {"HAS_GRAD_OUT": has_grad_out, "BLOCK_C": 32, "BLOCK_P": 128}
        for t in "zoi":
            sig.update(ints(*(f"stride_{t}{s}" for s in "bcp" if s != unit)))
            consts[f"stride_{t}{unit}"] = 1
        ptx = compile_ptx(tap_backward_kernel, sig, consts, div16=sig)
        assert "ld.global.v4.b32" in ptx, "activation loads should be 16-byte vectors"
    print("compiled")
""")


def test_kernels_compile_for_sm90():
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no offline NVIDIA compile API: {e}")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
