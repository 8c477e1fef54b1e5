"""benchmarks/reproduce_mnist.py: results written after every (row, seed), resume from the JSON and the run
folders' checkpoints, and argument errors that name the flag (on a tiny generated MNIST, cnn2 on the CPU)."""
import json

import numpy as np
import pytest

import tap_fast.loop
from bench_scripts import load_script

reproduce = load_script("reproduce_mnist")


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    """A small random MNIST file (mnist.npz layout)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("mnist")
    np.savez(folder / "mnist.npz", x_train=rng.integers(0, 256, (120, 28, 28), dtype=np.uint8),
             y_train=np.arange(120, dtype=np.uint8) % 10, x_test=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
             y_test=np.arange(40, dtype=np.uint8) % 10)
    return folder


def tiny(mnist_dir, out_dir, *extra):
    return ["--data-dir", str(mnist_dir), "--out-dir", str(out_dir), "--rows", "base,tap", "--seeds", "0,1",
            "--epochs", "2", "--batch-size", "32", "--lr", "0.05", "--device", "cpu", "--quiet", *extra]


def test_interrupted_run_resumes_without_redoing_finished_pairs(mnist_dir, tmp_path, monkeypatch, capsys):
    """Killed in epoch 2 of the second (row, seed): the JSON keeps the first; --resume skips it and continues
    the second from its epoch-1 checkpoint (one more checkpoint in its folder, not two)."""
    real_save = tap_fast.loop.save_checkpoint
    saves = []

    def save(path, state):  # checkpoints of every run, in order; the first of Base seed 1 is the kill point
        real_save(path, state)
        saves.append((path.parent.relative_to(tmp_path / "runs").as_posix(), state["epoch"]))
        if saves[-1] == ("base/seed1", 1) and interrupt:
            raise KeyboardInterrupt

    monkeypatch.setattr(tap_fast.loop, "save_checkpoint", save)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(tiny(mnist_dir, tmp_path, "--run-dir", str(tmp_path / "runs")))
    assert saves == [("base/seed0", 1), ("base/seed0", 2), ("base/seed1", 1)]
    first = json.loads((tmp_path / "mnist_results.json").read_text())
    (row,) = first["results"]
    assert row["row"] == "Base" and [r["seed"] for r in row["runs"]] == [0]
    assert 0.0 <= row["runs"][0]["clean"] <= 1.0 and "1 of 2 seeds" in (tmp_path / "mnist_results.md").read_text()
    err = capsys.readouterr().err
    assert "[1/4] Base, seed 0: training" in err and "[2/4] Base, seed 1: training" in err

    saves.clear()
    interrupt = False
    assert reproduce.main(tiny(mnist_dir, tmp_path, "--run-dir", str(tmp_path / "runs"), "--resume")) == 0
    assert saves == [("base/seed1", 2), ("tap/seed0", 1), ("tap/seed0", 2), ("tap/seed1", 1), ("tap/seed1", 2)]
    assert "[1/4] Base, seed 0: in " in capsys.readouterr().err
    final = json.loads((tmp_path / "mnist_results.json").read_text())
    assert [r["row"] for r in final["results"]] == ["Base", "TAP"]
    assert final["results"][0]["runs"][0] == row["runs"][0]  # kept, not retrained
    assert [[r["seed"] for r in row["runs"]] for row in final["results"]] == [[0, 1], [0, 1]]
    assert final["results"][1]["lam"] > 0 and "of 2 seeds" not in (tmp_path / "mnist_results.md").read_text()


@pytest.mark.parametrize("other", [["--epochs", "5"], ["--rows", "base"], ["--seeds", "0"]])
def test_resume_refuses_other_settings(other, mnist_dir, tmp_path, capsys):
    """A resume with other settings, or another selection of rows or seeds (whose records the rewritten JSON
    would drop), exits 2 before training."""
    saved = reproduce.parse_args(tiny(mnist_dir, tmp_path))
    (tmp_path / "mnist_results.json").write_text(json.dumps(
        {"args": {k: getattr(saved, k) for k in reproduce.RUN_ARGS}, "results": []}))
    assert reproduce.finished_runs(None, reproduce.parse_args(tiny(mnist_dir, tmp_path, "--resume"))) == {}
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(tiny(mnist_dir, tmp_path, "--resume", *other))
    assert exit_info.value.code == 2
    assert "argument --resume: " in capsys.readouterr().err


@pytest.mark.parametrize("args,flag", [
    (["--seeds", "x"], "--seeds"), (["--seeds", "1,1"], "--seeds"), (["--rows", "base,tab"], "--rows"),
    (["--taus", "0.1,2"], "--taus"), (["--epochs", "0"], "--epochs"), (["--lr", "-1"], "--lr"),
    (["--batch-size", "x"], "--batch-size"), (["--limit-train", "0"], "--limit-train"),
    (["--norm", "l3"], "--norm"), (["--data-dir", "/nonexistent/mnist"], "--data-dir"),
    (["--data-dir", "{empty}"], "--data-dir"), ([], "--data-dir"),
])
def test_bad_arguments_exit_2_naming_the_flag(args, flag, mnist_dir, tmp_path, capsys):
    """Nothing is trained or written; a folder without MNIST, or no --data-dir at all, names --data-dir."""
    (tmp_path / "empty").mkdir()
    argv = (["--data-dir", str(mnist_dir)] if flag != "--data-dir" else []) + ["--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(argv + [a.format(empty=tmp_path / "empty") for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err or f"required: {flag}" in err
    assert not (tmp_path / "mnist_results.json").exists()


def test_distillation_rows_train_from_each_teacher_beside_table_18(mnist_dir, tmp_path):
    """Rows at/jt/kd expand to the 10% and 1% teachers with Table 18's numbers, and a KD row trains end to end."""
    expanded = reproduce.rows(["at", "kd"], [0.01])
    assert [(name, overrides) for name, overrides, _ in expanded] == [
        ("AT 10%", {"method": "at", "teacher_fraction": 0.1}), ("AT 1%", {"method": "at", "teacher_fraction": 0.01}),
        ("KD 10%", {"method": "kd", "teacher_fraction": 0.1}), ("KD 1%", {"method": "kd", "teacher_fraction": 0.01})]
    assert expanded[2][2] == ((0.984, 0.000), (0.968, 0.000), (0.970, 0.003))
    argv = tiny(mnist_dir, tmp_path / "out")
    argv[argv.index("--rows") + 1], argv[argv.index("--seeds") + 1] = "kd", "0"
    assert reproduce.main([*argv, "--epochs", "1"]) == 0
    results = json.loads((tmp_path / "out" / "mnist_results.json").read_text())["results"]
    assert [r["row"] for r in results] == ["KD 10%", "KD 1%"] and all(len(r["runs"]) == 1 for r in results)
    assert "Table 18" in (tmp_path / "out" / "mnist_results.md").read_text()
