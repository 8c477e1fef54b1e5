"""The lambda sweep (section 5.3, issue 12 point 5): grids, selection by loss or metric, the degenerate flag
against the constant predictor, the per-run JSON and the printed tables."""
import dataclasses
import json

import pytest
import torch

from tap_fast import experiments
from tap_fast.cli import drop_header, format_table, main, model_name
from tap_fast.config import TrainConfig, sweep_lambdas
from tap_fast.evaluation import constant_baseline

TINY = ["--dataset", "digits", "--epochs", "1", "--limit-train", "64", "--limit-test", "32", "--limit-val", "32",
        "--batch-size", "32", "--lr", "0.05", "--quiet", "--device", "cpu", "--method", "tap"]


def test_grids_cover_section_5_3s_ranges():
    assert sweep_lambdas("rbr", "half") == [1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6,
                                            3e6, 1e7, 3e7, 1e8, 3e8, 1e9]
    assert sweep_lambdas("tap", "half") == [1e-9, 3e-9, 1e-8, 3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4,
                                            1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
    assert sweep_lambdas("rrr") == [1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0]
    with pytest.raises(ValueError, match="grid must be one of"):
        sweep_lambdas("tap", "third")


def test_constant_baseline_matches_brute_force():
    g = torch.Generator().manual_seed(12)
    labels = torch.randint(0, 5, (37,), generator=g)
    counts = torch.bincount(labels, minlength=5)
    majority = int(counts.argmax())
    assert constant_baseline("accuracy", labels) == (majority, counts.max().item() / 37)
    # MAE: the best constant over every class, by brute force (the median minimises it)
    maes = [(labels - c).abs().double().mean().item() for c in range(5)]
    constant, mae = constant_baseline("mae", labels)
    assert mae == pytest.approx(min(maes)) and maes[constant] == pytest.approx(min(maes))
    binary = torch.tensor([1, 0, 1, 1, 0, 1, 1])  # majority 1: TP 5, FP 2, FN 0 -> F1 = 10 / 12
    assert constant_baseline("f1", binary) == (1, pytest.approx(10 / 12))
    assert constant_baseline("f1", 1 - binary) == (0, 0.0)  # majority 0: no positive predicted
    assert constant_baseline("accuracy", torch.tensor([2, 0, 2, 0, 1])) == (0, 0.4)  # tie: the lowest class


def _stub_run(spec, metric="accuracy"):
    """experiments.run replaced: lambda -> (permuted validation loss, permuted validation metric minus the
    constant predictor's on the run's validation labels)."""
    def run(config, data):
        loss, offset = spec[config.lam]
        value = constant_baseline(metric, data.val_labels)[1] + offset
        test = {v: {metric: value + 0.01 * i, "loss": loss} for i, v in enumerate(("contaminated", "permuted", "clean"))}
        return {"metrics": test, "shortcut_drop": 0.25,
                "validation": {"contaminated": {metric: 0.9, "loss": 0.1}, "permuted": {metric: value, "loss": loss}},
                "loss_per_epoch": [loss], "task_loss_per_epoch": [loss], "penalty_per_epoch": [config.lam],
                "timing": {"train_s": 1.0, "eval_s": 0.5, "epoch_s": [1.0]}}
    return run


# lambda -> (permuted validation loss, permuted validation accuracy minus the majority class share)
SPEC = {1e-3: (0.8, 0.1), 1e-2: (0.4, 0.0), 1e-1: (0.9, 0.3), 1.0: (0.6, -0.05)}


@pytest.mark.parametrize("select,best,degenerate,learned", [("loss", 1e-2, True, 1e-3),
                                                             ("metric", 1e-1, False, 1e-1)])
def test_selection_and_the_degenerate_flag(monkeypatch, select, best, degenerate, learned):
    monkeypatch.setattr(experiments, "run", _stub_run(SPEC))
    out = experiments.sweep(TrainConfig(method="tap", limit_train=64, limit_test=32, device="cpu", quiet=True),
                            list(SPEC), select=select)
    assert [r["degenerate"] for r in out["runs"]] == [False, True, False, True]  # 1e-2 equals the majority share
    assert (out["best_lam"], out["degenerate"], out["best_non_degenerate_lam"]) == (best, degenerate, learned)
    assert out["selection"] == select and out["constant_baseline"]["predictor"] == "majority class"


def test_metric_selection_on_mae_takes_the_lowest_and_flags_the_median_guess(monkeypatch):
    real_load = experiments.load
    monkeypatch.setattr(experiments, "load", lambda c: dataclasses.replace(real_load(c), metric="mae"))
    # offsets of the permuted validation MAE from the median class's: 0 is degenerate, lower is better
    monkeypatch.setattr(experiments, "run", _stub_run({1e-3: (0.5, -0.2), 1e-2: (0.3, 0.0), 0.1: (0.9, -0.4)}, "mae"))
    config = TrainConfig(method="tap", limit_train=64, limit_test=32, device="cpu", quiet=True)
    by_metric = experiments.sweep(config, [1e-3, 1e-2, 0.1], select="metric")
    assert by_metric["best_lam"] == 0.1 and by_metric["degenerate"] is False
    assert by_metric["selection_rule"] == "lowest permuted validation mae"
    by_loss = experiments.sweep(config, [1e-3, 1e-2, 0.1])
    assert (by_loss["best_lam"], by_loss["degenerate"], by_loss["best_non_degenerate_lam"]) == (1e-2, True, 1e-3)
    assert by_loss["constant_baseline"]["predictor"] == "median class"


def test_the_cli_prints_and_writes_the_degenerate_choice(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(experiments, "run", _stub_run(SPEC))
    out = tmp_path / "sweep.json"
    assert main(["sweep", *TINY, "--lambdas", ",".join(map(str, SPEC)), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "selected lambda 0.01 (lowest permuted validation loss)" in text
    assert "DEGENERATE" in text and "best non-degenerate lambda: 0.001" in text
    row = next(line for line in text.splitlines() if line.startswith("0.01 "))
    assert row.endswith("selected, degenerate")
    record = json.loads(out.read_text())
    assert record["degenerate"] is True and record["best_non_degenerate_lam"] == 1e-3
    for flag in (["--grid", "half", "--lambdas", "1e-3"], ["--select", "auc"]):
        with pytest.raises(SystemExit):
            main(["sweep", *TINY, *flag])
    err = capsys.readouterr().err
    assert "argument --lambdas: not allowed with argument --grid" in err and "argument --select" in err


def test_a_real_sweep_keeps_timings_penalties_and_prints_metrics(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert main(["sweep", *TINY, "--lambdas", "1e-3,1", "--select", "metric", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["selection_rule"] == "highest permuted validation accuracy"
    best = max(record["runs"], key=lambda r: r["validation"]["permuted"]["accuracy"])
    assert record["best_lam"] == best["lam"]
    header = next(line for line in text.splitlines() if line.startswith("lambda"))
    assert "val permuted" in header and "test clean" in header and "drop (contaminated - permuted)" in header
    for run in record["runs"]:
        assert run["timing"]["train_s"] > 0 and len(run["timing"]["epoch_s"]) == 1
        assert len(run["penalty_per_epoch"]) == 1 and run["penalty_per_epoch"][0] > 0  # decoys are masked
        row = next(line for line in text.splitlines() if line.startswith(f"{run['lam']:g} "))
        numbers = [float(x) for x in row.split()[1:8]]  # the validation sets are contaminated and permuted
        assert numbers == pytest.approx([run["val_permuted_loss"], run["validation"]["contaminated"]["accuracy"],
                                         run["validation"]["permuted"]["accuracy"],
                                         *(run["metrics"][v]["accuracy"] for v in ("contaminated", "permuted", "clean")),
                                         run["shortcut_drop"]], abs=5e-4)


def test_tables_name_base_and_say_the_drops_direction():
    assert drop_header("accuracy") == "drop (contaminated - permuted)"
    assert drop_header("mae") == "drop (permuted - contaminated)"
    assert [model_name({"clean_train": c, "method": m}) for c, m in ((True, "none"), (False, "none"), (False, "rrr"))] \
        == ["Base", "No XS", "RRR"]
    record = {"metrics": {"contaminated": {"mae": 0.4}, "permuted": {"mae": 1.0}, "clean": {"mae": 1.25}},
              "shortcut_drop": 0.6}
    header, row = format_table([("No XS", record)], "mae").splitlines()
    assert header.split() == ["model", "contaminated", "permuted", "clean", "drop", "(permuted", "-", "contaminated)"]
    assert row.split() == ["No", "XS", "0.400", "1.000", "1.250", "0.600"]
