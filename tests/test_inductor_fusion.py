"""benchmarks/inductor_fusion.py: the counting rules on a hand-written wrapper, and on the compiled cnn2 step
what TAP adds to No XS in Inductor's CPU code; the compiled step's TAP formulation (backend "auto" is
"torch" under compile) trains as the eager step does."""
from collections import Counter

import pytest
import torch
import torch._dynamo

import tap_fast.compiled_step as compiled_step
from bench_scripts import load_script
from tap_fast.train_step import train_step

fusion = load_script("inductor_fusion")

# Inductor's CPU wrapper, cut down: a kernel of two loop nests (a pointwise pass writing Z, then a channel
# sum reading it back), an extern call, a reused buffer and a view.
WRAPPER = '''
cpp_fused_relu_sum_0 = async_compile.cpp_pybinding(['const float*', 'float*', 'float*'], r"""
extern "C"  void  kernel(const float* in_ptr0,
                       float* out_ptr0,
                       float* out_ptr1)
{
    #pragma omp parallel
    {
        #pragma omp for
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(600L); x0+=static_cast<int64_t>(1L))
        {
            auto tmp0 = in_ptr0[static_cast<int64_t>(x0)];
            out_ptr0[static_cast<int64_t>(x0)] = tmp0;
        }
        #pragma omp for
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(20L); x0+=static_cast<int64_t>(1L))
        {
            float tmp_acc0 = 0;
            for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(30L); x1+=static_cast<int64_t>(1L))
            {
                auto tmp0 = out_ptr0[static_cast<int64_t>(x1 + 30L*x0)];
                tmp_acc0 = tmp_acc0 + tmp0;
            }
            out_ptr1[static_cast<int64_t>(x0)] = tmp_acc0;
        }
    }
}
""")


class Runner:
    def call(self, args):
        primals_1, primals_2 = args
        buf0 = extern_kernels.convolution(primals_1, primals_2, None, stride=(1, 1))
        assert_tensor_metadata(buf0, (2, 30, 10), (300, 10, 1), torch.float32, 'torch.ops.aten.convolution.default')
        buf1 = empty_strided_cpu((2, 30, 10), (300, 10, 1), torch.float32)
        buf2 = empty_strided_cpu((2, 10), (10, 1), torch.float32)
        cpp_fused_relu_sum_0(buf0, buf1, buf2)
        buf3 = buf0; del buf0  # reuse
        extern_kernels.mm(reinterpret_tensor(buf1, (20, 30), (30, 1), 0), primals_2, out=buf3)
        return (buf2, )


def get_args():
    primals_1 = rand_strided((2, 3, 10), (30, 10, 1), device='cpu', dtype=torch.float32)
    primals_2 = rand_strided((30, 30), (30, 1), device='cpu', dtype=torch.float32)
    return [primals_1, primals_2]
'''.replace('r"""', "r'''").replace('""")', "''')")


def test_counting_rules_on_a_wrapper():
    graph = fusion.parse_graph(WRAPPER)
    assert [k["kind"] for k in graph["kernels"]] == ["extern", "cpp", "extern"]
    assert [sorted((n, m) for n, _, _, m in p["buffers"]) for p in graph["passes"]] == [
        [("buf0", "w"), ("primals_1", "r"), ("primals_2", "r")],
        [("buf0", "r"), ("buf1", "w")],  # the pointwise loop nest
        [("buf1", "r"), ("buf2", "w")],  # the channel sum, its own loop nest: a second pass over buf1
        [("buf1", "r"), ("buf3", "w"), ("primals_2", "r")]]
    counts = fusion.count([graph], [(600, 4), (20, 4)])
    assert counts["kernels"] == 3 and counts["extern"] == 2 and counts["passes"] == 4
    # 600-element buffers: buf0 (written, read), buf1 (written, read twice), buf3 = buf0 reused (written)
    assert counts["z_reads"] == [3, 0] and counts["z_writes"] == [3, 1] and counts["z_kernels"] == [3, 1]
    assert counts["z_traffic"] == [6.0, 1.0]


@pytest.fixture(scope="module")
def cnn2_records():
    """The No XS and the TAP step of cnn2 (batch 3, 28 x 28) compiled with make_step's defaults."""
    none = fusion.capture_step("cnn2", "none", "auto")
    tap = fusion.capture_step("cnn2", "tap", "auto")
    return none, tap


def _graphs(run, phase):
    return [fusion.parse_graph(code) for code in run[0][phase]]


def test_tap_adds_only_fused_work_on_cnn2(cnn2_records):
    """What the compiled TAP step adds to the No XS step (Inductor's CPU code, torch 2.14): no opaque launch
    but the mask's adaptive pool, and in each graph at most one kernel that touches a tapped activation.
    Forward: layer 1's relu mask, channel sum (eq. 6) and masked reduction run in the max-pool kernel that
    writes Z^1, layer 2's in the loss kernel, which did not read Z^2 before; backward: the kernel that adds
    layer 1's gradient to what the (extern) convolution backward returns. The custom op in its separate form
    adds 3 such kernels forward and 4 backward, and 5 opaque launches."""
    none, tap = cnn2_records
    taps = none[1]
    for phase, added_externs in (("forward", ["torch.ops.aten._adaptive_avg_pool2d.default"]), ("backward", [])):
        counts = [fusion.count(_graphs(run, phase), taps) for run in (none, tap)]
        extra = fusion.difference(counts[1], counts[0])
        externs = [Counter(k["name"] for g in _graphs(run, phase) for k in g["kernels"] if k["kind"] == "extern")
                   for run in (none, tap)]
        assert sorted((externs[1] - externs[0]).elements()) == added_externs  # D(M, 2) at 28 -> 6: aten
        assert sum(extra["z_kernels"]) <= 1, extra
        # less than a separate gradient pass (read Z, write dZ, read dZ back: 3 Z-sized transfers)
        assert max(extra["z_traffic"]) < 3, extra
        if phase == "forward":
            assert extra["z_kernels"][0] == 0, extra


def test_compiled_tap_step_equals_eager(cnn2_records):
    """The compiled step's loss and parameters after one SGD step (hence its gradients) equal the eager
    reference step's; Inductor reorders fp32 sums only."""
    _, (_, _, out, compiled_model) = cnn2_records
    model, batch = fusion.make_model_and_batch("cnn2", 3, None, "cpu", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ref = train_step(model, opt, *batch, method="tap", lam=1e-2, mean=0.1307, std=0.3081, backend="torch")
    assert float(ref[2]) > 0
    torch.testing.assert_close(torch.stack(out), torch.stack(ref), rtol=1e-5, atol=1e-6)
    for p, q in zip(compiled_model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_compiled_auto_backend_is_torch(monkeypatch):
    """make_step(compile=True) hands train_step backend "torch" for "auto" and explicit backends unchanged;
    uncompiled, "auto" is train_step's to resolve."""
    seen = []

    def spy(*args, backend, **kwargs):
        seen.append(backend)
        zero = torch.zeros(())
        return zero, zero, zero

    monkeypatch.setattr(compiled_step, "train_step", spy)
    model, batch = fusion.make_model_and_batch("cnn2", 2, None, "cpu", 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for compile, backend in ((True, "auto"), (True, "identity"), (False, "auto")):
        torch._dynamo.reset()
        step = compiled_step.make_step(model, opt, method="tap", lam=1e-2, mean=0.1, std=0.3, backend=backend,
                                       compile=compile, compile_backend="eager")
        step(*batch)
    assert seen == ["torch", "identity", "auto"]
