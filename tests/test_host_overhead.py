"""benchmarks/host_overhead.py runs on the CPU (and the meta device) with its kernels stubbed: the JSON has
every key with a positive finite time, the stubs were really launched (the fused forms' launch counts, and
every timed call), and the real kernels are back afterwards. No timing assertions. A few seconds."""
import json
import math

import pytest

pytest.importorskip("triton")

from bench_scripts import load_script  # noqa: E402

KEYS = ["fused_fwd_us", "fused_fwd_bwd_us", "identity_fwd_us", "identity_fwd_bwd_us", "separate_fwd_us",
        "separate_fwd_bwd_us", "eager_fwd_us", "eager_fwd_bwd_us", "floor_fwd_us", "floor_fwd_bwd_us",
        "fused_vs_eager_fwd", "fused_vs_eager_fwd_bwd", "identity_vs_eager_fwd_bwd", "separate_vs_eager_fwd_bwd"]
N_LAYERS = 4  # ResNet-18's taps
ROUNDS, INNER, WARMUP = 3, 2, 2


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_host_overhead_json(tmp_path, monkeypatch, device):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main sets it for the CPU; restored after the test
    ho = load_script("host_overhead")
    from kernels import tap_launch

    real = {name: getattr(tap_launch, name) for name in ho.KERNEL_NAMES}
    out = tmp_path / "h.json"
    inner = ["--inner", str(INNER)] if device == "meta" else []  # the CPU: as many calls as fill a round
    ho.main(["--device", device, "--rounds", str(ROUNDS), *inner, "--warmup", str(WARMUP), "--json", str(out)])
    data = json.loads(out.read_text())

    for key in KEYS:
        assert isinstance(data[key], float) and math.isfinite(data[key]) and data[key] > 0, (key, data[key])
    assert data["machine"]["torch"] and data["machine"]["cpu_count"] >= 1
    assert data["shapes"] == ("scaled" if device == "cpu" else "real")
    if device == "meta":
        assert data["layers"][0] == [128, 64, 56, 56] and data["mask"] == [128, 1, 224, 224]

    # the list form: L + 1 launches forward (one per layer, one sum), L backward
    launches = data["launches"]
    assert launches["fused_fwd"] == {"tap_forward_kernel": N_LAYERS, "scaled_sum_kernel": 1}
    assert sum(launches["fused_fwd"].values()) == N_LAYERS + 1
    assert launches["fused_bwd"] == {"tap_backward_kernel": N_LAYERS}
    for form in ("identity", "separate"):  # per layer: its forward and its sum
        assert launches[f"{form}_fwd"] == {"tap_forward_kernel": N_LAYERS, "scaled_sum_kernel": N_LAYERS}
        assert launches[f"{form}_bwd"] == {"tap_backward_kernel": N_LAYERS}

    # every timed call went through the stubs: the calls made of each case times its launches, plus the count
    fwd = {"tap_forward_kernel": N_LAYERS, "scaled_sum_kernel": 1}
    per_layer = {"tap_forward_kernel": N_LAYERS, "scaled_sum_kernel": N_LAYERS}
    bwd = {"tap_backward_kernel": N_LAYERS}
    per_case = {"fused_fwd": fwd, "fused_fwd_bwd": {**fwd, **bwd}, "identity_fwd": per_layer,
                "identity_fwd_bwd": {**per_layer, **bwd}, "separate_fwd": per_layer,
                "separate_fwd_bwd": {**per_layer, **bwd}}
    if device == "meta":
        assert data["inner"] == {case: INNER for case in data["calls"]}
    assert all(data["inner"][case] >= 1 and n == WARMUP + 3 + ROUNDS * data["inner"][case]
               for case, n in data["calls"].items()), (data["inner"], data["calls"])
    expected = {name: sum(launches[k].get(name, 0) for k in launches) for name in ho.KERNEL_NAMES}
    for case, n in data["calls"].items():
        for name, per_call in per_case.get(case, {}).items():
            expected[name] += n * per_call
    assert data["stub_calls"] == expected and expected["downscale_kernel"] == 0

    for name, kernel in real.items():
        assert getattr(tap_launch, name) is kernel, f"{name} was not restored"
