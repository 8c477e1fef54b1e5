"""benchmarks/reproduce_mnist.py: results written after every (row, seed), resume from the JSON and the run
folders' checkpoints, and argument errors that name the flag (on a tiny generated MNIST, cnn2 on the CPU)."""
import json
import shutil

import numpy as np
import torch
import pytest

import tap_fast.loop
from tap_fast.config import sweep_lambdas
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
    real_save = tap_fast.loop.write_saved
    saves = []

    def save(path, state):  # checkpoints of every run, in order; the first of Base seed 1 is the kill point
        real_save(path, state)
        saves.append((path.parent.relative_to(tmp_path / "runs").as_posix(), state["epoch"]))
        if saves[-1] == ("base/seed1", 1) and interrupt:
            raise KeyboardInterrupt

    monkeypatch.setattr(tap_fast.loop, "write_saved", save)
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
    """A resume with other settings, or a selection of rows or seeds without some saved ones (whose records the
    rewritten JSON would drop), exits 2 before training."""
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
    (["--data-dir", "{empty}"], "--data-dir"), ([], "--data-dir"), (["--dataset", "x"], "--dataset"),
    (["--rbr-limit-train", "8", "--batch-size", "32"], "--rbr-limit-train"), (["--rbr-limit-train", "0"], "--rbr-limit-train"),
    (["--sweep-epochs", "0"], "--sweep-epochs"), (["--sweep", "tap,none"], "--sweep"), (["--sweep", ""], "--sweep"),
    (["--lam", "tap"], "--lam"), (["--lam", "tap=-1"], "--lam"), (["--lam", "tap=nan"], "--lam"),
    (["--lam", "none=1"], "--lam"), (["--lam", "tap=1,tap=2"], "--lam"), (["--lam", ","], "--lam"),
    (["--lam", "rbr=1", "--sweep", "rbr"], "--lam"), (["--tag-style", "big"], "--tag-style"),
    (["--rows", "base", "--lam", "rrr=1"], "--lam"), (["--rows", "tap", "--sweep", "kd"], "--sweep"),
    (["--rows", "base,base"], "--rows"), (["--taus", "0.01,0.010"], "--taus"),
    (["--teachers", "5%"], "--teachers"), (["--teachers", "1%,1%"], "--teachers"),
    (["--rows", "base,at", "--teachers", "random"], "--teachers"),
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


MAPS = ("input_gradient", "pool1", "pool2")  # Appendix D's maps of cnn2: input gradients and its two tapped layers
MEASURES = ("recall", "precision")


def appendix_d_table(markdown):
    """The lines of the markdown's Appendix D table after its header and separator, as lists of cells; and the
    header's cells."""
    lines = [line for line in markdown.split("Appendix D (eq. 17)", 1)[1].splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert set(cells[1]) == {"---"}
    return cells[0], cells[2:]


def test_every_run_records_appendix_d_overlap_and_rows_average_it(mnist_dir, tmp_path):
    """Each run's JSON record holds eq. 17's recall / precision per map from `tap-fast explain` on its final
    checkpoint, with overlap.json (the same values) and maps.png in its appendix_d/ folder; a row's overlap is
    the mean over its seeds, and the markdown's Appendix D table has one line per row."""
    assert reproduce.main(tiny(mnist_dir, tmp_path, "--epochs", "1")) == 0
    results = json.loads((tmp_path / "mnist_results.json").read_text())["results"]
    assert [r["row"] for r in results] == ["Base", "TAP"]
    for row in results:
        assert [run["seed"] for run in row["runs"]] == [0, 1]
        for run in row["runs"]:
            assert sorted(run["overlap"]) == sorted(MAPS)
            assert all(0.0 <= run["overlap"][m][k] <= 1.0 for m in MAPS for k in MEASURES), run["overlap"]
            folder = tmp_path / "runs" / reproduce.slug(row["row"]) / f"seed{run['seed']}" / "appendix_d"
            assert (folder / "maps.png").read_bytes().startswith(b"\x89PNG")
            written = json.loads((folder / "overlap.json").read_text())
            assert written["overlap"]["maps"] == run["overlap"] and written["epoch"] == 1
        first, second = (run["overlap"] for run in row["runs"])
        assert first != second  # other seeds, other models: the mean below is not a copy of one of them
        assert row["overlap"] == {m: {k: pytest.approx((first[m][k] + second[m][k]) / 2) for k in MEASURES}
                                  for m in MAPS}
    header, lines = appendix_d_table((tmp_path / "mnist_results.md").read_text())
    assert header == ["row", *MAPS]
    assert lines == [[row["row"], *(f"{row['overlap'][m]['recall']:.3f} / {row['overlap'][m]['precision']:.3f}"
                                    for m in MAPS)] for row in results]


def test_resume_backfills_a_missing_overlap_from_the_checkpoint(mnist_dir, tmp_path, monkeypatch):
    """A finished record without `overlap` (written before overlaps were recorded) gets it on --resume from its
    final checkpoint, without training: the same values as the run recorded, and appendix_d/ written again."""
    argv = tiny(mnist_dir, tmp_path, "--rows", "tap", "--seeds", "0", "--epochs", "1")
    assert reproduce.main(argv) == 0
    path, run_dir = tmp_path / "mnist_results.json", tmp_path / "runs" / "tap" / "seed0"
    saved = json.loads(path.read_text())
    (run,) = saved["results"][0]["runs"]
    original = run.pop("overlap")
    saved["results"][0]["overlap"] = {}
    path.write_text(json.dumps(saved))
    shutil.rmtree(run_dir / "appendix_d")
    checkpoint_mtime = (run_dir / "checkpoint.pt").stat().st_mtime_ns

    def no_training(path, state):
        raise AssertionError(f"retrained: a checkpoint saved to {path}")

    monkeypatch.setattr(tap_fast.loop, "write_saved", no_training)
    assert reproduce.main([*argv, "--resume"]) == 0
    (row,) = json.loads(path.read_text())["results"]
    assert row["runs"] == [{**run, "overlap": original}] and row["overlap"] == original
    assert (run_dir / "checkpoint.pt").stat().st_mtime_ns == checkpoint_mtime
    assert json.loads((run_dir / "appendix_d" / "overlap.json").read_text())["overlap"]["maps"] == original
    assert (run_dir / "appendix_d" / "maps.png").is_file()
    assert [line[0] for line in appendix_d_table((tmp_path / "mnist_results.md").read_text())[1]] == ["TAP"]


NEW_RUN_ARGS = ("dataset", "rbr_limit_train", "sweep_epochs")  # RUN_ARGS added after the first JSONs were written


def write_older_json(mnist_dir, out_dir):
    """mnist_results.json as a version before --dataset, --rbr-limit-train and --sweep-epochs wrote it (a tiny
    run's other RUN_ARGS) with one finished record; returns that record."""
    saved = reproduce.parse_args(tiny(mnist_dir, out_dir))
    run = {"seed": 0, "contaminated": 0.5, "permuted": 0.4, "clean": 0.3, "lam": 0.0, "time_s": 1.0}
    (out_dir / "mnist_results.json").write_text(json.dumps(
        {"args": {k: getattr(saved, k) for k in reproduce.RUN_ARGS if k not in NEW_RUN_ARGS},
         "results": [{"row": "Base", "runs": [run]}]}))
    return run


def test_resume_reads_an_older_json_with_the_new_arguments_at_their_defaults(mnist_dir, tmp_path):
    run = write_older_json(mnist_dir, tmp_path)
    assert reproduce.parse_args(tiny(mnist_dir, tmp_path, "--resume")).finished == {("Base", 0): run}


@pytest.mark.parametrize("other,differ", [(["--rbr-limit-train", "64"], "rbr_limit_train None != 64"),
                                          (["--sweep-epochs", "1"], "sweep_epochs None != 1")])
def test_resume_refuses_an_older_json_when_a_new_argument_is_set(other, differ, mnist_dir, tmp_path, capsys):
    write_older_json(mnist_dir, tmp_path)
    before = (tmp_path / "mnist_results.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(tiny(mnist_dir, tmp_path, "--resume", *other))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --resume: " in err and differ in err
    assert (tmp_path / "mnist_results.json").read_text() == before and not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def pneumoniamnist_dir(tmp_path_factory):
    """A small random PneumoniaMNIST file (the MedMNIST layout), both classes in every split."""
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("pneumoniamnist")
    sizes = {"train": 32, "val": 16, "test": 16}  # one batch: the sweep trains 10 lambdas
    np.savez(folder / "pneumoniamnist.npz",
             **{f"{s}_images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in sizes.items()},
             **{f"{s}_labels": (np.arange(n, dtype=np.uint8) % 2).reshape(n, 1) for s, n in sizes.items()})
    return folder


def test_pneumoniamnist_row_takes_the_swept_lambda_and_reuses_the_sweep(pneumoniamnist_dir, tmp_path, monkeypatch):
    """TAP has no default lambda for cnn2 on PneumoniaMNIST: section 5.3's sweep (decade grid, --sweep-epochs)
    picks it, kept in sweeps/tap-gt/; the row trains with it (class-weighted), the table marks it with *, and a
    resumed run reads the sweep instead of running it again."""
    argv = ["--dataset", "pneumoniamnist", "--data-dir", str(pneumoniamnist_dir), "--out-dir", str(tmp_path),
            "--rows", "tap", "--seeds", "0", "--epochs", "1", "--sweep-epochs", "1", "--batch-size", "32",
            "--lr", "0.05", "--device", "cpu", "--quiet"]
    assert reproduce.main(argv) == 0
    assert not (tmp_path / "mnist_results.json").exists()
    results_json, results_md = tmp_path / "pneumoniamnist_results.json", tmp_path / "pneumoniamnist_results.md"
    sweep_path = tmp_path / "sweeps" / "tap-gt" / "sweep.json"
    record = json.loads(sweep_path.read_text())
    assert [r["lam"] for r in record["runs"]] == sweep_lambdas("tap", "decade")
    assert record["config"]["class_weights"] == "balanced" and record["config"]["epochs"] == 1
    fallback = record["best_non_degenerate_lam"]
    chosen = fallback if record["degenerate"] and fallback is not None else record["best_lam"]
    swept = {"lam": chosen, "degenerate": bool(record["degenerate"]) and fallback is None, "sweep": str(sweep_path)}
    (row,) = json.loads(results_json.read_text())["results"]
    assert row["lam"] == chosen and row["runs"][0]["lam"] == chosen and row["sweep"] == swept
    assert row["paper"] is None and 0.0 <= row["runs"][0]["clean"] <= 1.0
    meta = tap_fast.loop.load_checkpoint(tmp_path / "runs" / "tap" / "seed0" / "checkpoint.pt")["meta"]
    assert (meta["dataset"], meta["class_weights"], meta["lam"]) == ("pneumoniamnist", "balanced", chosen)

    def table_line(markdown):  # the row's line in the metric table (the first)
        (line,) = [line for line in markdown.split("Appendix D")[0].splitlines() if line.startswith("| TAP")]
        return line

    markdown = results_md.read_text()
    assert "pneumonia F1" in markdown and "The paper did not run this data set." in markdown
    line = table_line(markdown)
    assert line.startswith(f"| TAP{' (every swept lambda degenerate)' * swept['degenerate']} | {chosen:g}* | ")
    assert line.count(" - |") == 3  # no paper values

    def no_sweep(*args, **kwargs):
        raise AssertionError("swept again on --resume")

    monkeypatch.setattr(reproduce, "sweep", no_sweep)
    assert reproduce.main([*argv, "--resume"]) == 0  # every run finished: nothing trains, the row keeps its mark
    saved = json.loads(results_json.read_text())
    assert saved["results"] == [row] and table_line(results_md.read_text()) == line  # sweep, lambda, * kept
    saved["results"] = []  # the run unrecorded: its lambda is needed again, from the kept sweep; it continues
    results_json.write_text(json.dumps(saved))  # from its final checkpoint, so its numbers are the same
    assert reproduce.main([*argv, "--resume"]) == 0
    (again,) = json.loads(results_json.read_text())["results"]
    assert again["lam"] == chosen and again["sweep"] == swept

    def untimed(record):
        return {k: v for k, v in record.items() if k != "time_s"}

    assert [untimed(r) for r in again["runs"]] == [untimed(r) for r in row["runs"]]
    assert table_line(results_md.read_text()).rsplit("|", 2)[0] == line.rsplit("|", 2)[0]  # all but time/run


def test_rbr_limit_train_subsets_the_rbr_rows_only(mnist_dir, tmp_path, capsys):
    """--rbr-limit-train below one batch is an argument error; otherwise the RBR row trains on that stratified
    subset of the training split (MNIST: the 120 images less the 12 held out for validation) and the others on
    all of it."""
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(tiny(mnist_dir, tmp_path, "--rbr-limit-train", "8"))
    assert exit_info.value.code == 2 and "argument --rbr-limit-train: " in capsys.readouterr().err
    assert not (tmp_path / "mnist_results.json").exists()
    argv = tiny(mnist_dir, tmp_path, "--rows", "base,rbr", "--seeds", "0", "--epochs", "1", "--rbr-limit-train", "64")
    assert reproduce.main(argv) == 0
    results = json.loads((tmp_path / "mnist_results.json").read_text())["results"]
    assert [(r["row"], r["runs"][0]["train_size"]) for r in results] == [("Base", 120 - 12), ("RBR", 64)]
    assert results[1]["lam"] == 1e4 and results[1]["sweep"] is None and not (tmp_path / "sweeps").exists()
    meta = tap_fast.loop.load_checkpoint(tmp_path / "runs" / "rbr" / "seed0" / "checkpoint.pt")["meta"]
    assert meta["limit_train"] == 64
    assert "RBR limit_train 64" in (tmp_path / "mnist_results.md").read_text()


def test_sweep_chooses_a_lambda_where_a_default_exists(mnist_dir, tmp_path, monkeypatch):
    """--sweep rbr: RBR's lambda is section 5.3's choice on its subset, not Appendix C's 1e4 (which diverges
    with the intended RBR formula on MNIST at the paper's lr); the sweep ran on the RBR subset."""
    swept = []
    real_sweep = reproduce.sweep

    def sweep(config, *args, **kwargs):
        swept.append(config)
        return real_sweep(config, [1.0, 10.0])  # two lambdas keep the test short
    monkeypatch.setattr(reproduce, "sweep", sweep)
    argv = tiny(mnist_dir, tmp_path, "--rows", "rbr", "--seeds", "0", "--epochs", "1", "--rbr-limit-train", "64",
                "--sweep", "rbr", "--sweep-epochs", "1")
    assert reproduce.main(argv) == 0
    assert [(c.method, c.limit_train, c.epochs) for c in swept] == [("rbr", 64, 1)]
    (row,) = json.loads((tmp_path / "mnist_results.json").read_text())["results"]
    record = json.loads((tmp_path / "sweeps" / "rbr-gt" / "sweep.json").read_text())
    assert row["lam"] == row["sweep"]["lam"] in (1.0, 10.0) and row["lam"] in (record["best_lam"],
                                                                               record["best_non_degenerate_lam"])
    markdown = (tmp_path / "mnist_results.md").read_text()
    assert f"| {row['lam']:g}*" in markdown
    assert "Lambda marked * was chosen by section 5.3's sweep (1 epochs" in markdown


def test_rows_sharing_a_sweep_run_it_once_without_resume(mnist_dir, tmp_path, monkeypatch):
    """KD 10% and KD 1% share the kd-teacher sweep: a fresh run (no --resume) sweeps once and both rows take its
    lambda; a second fresh run into the same folder stops with one line naming the sweep, not a traceback."""
    swept = []
    real_sweep = reproduce.sweep

    def sweep(config, *args, **kwargs):
        swept.append(config.teacher_fraction)
        return real_sweep(config, [1e-3])
    monkeypatch.setattr(reproduce, "sweep", sweep)
    argv = tiny(mnist_dir, tmp_path, "--rows", "kd", "--seeds", "0", "--epochs", "1", "--sweep", "kd",
                "--sweep-epochs", "1")
    assert reproduce.main(argv) == 0
    assert swept == [0.1]
    results = json.loads((tmp_path / "mnist_results.json").read_text())["results"]
    assert [(r["row"], r["lam"]) for r in results] == [("KD 10%", 1e-3), ("KD 1%", 1e-3)]
    with pytest.raises(SystemExit, match=r"the kd sweep for .*kd-teacher: .*--resume"):
        reproduce.main(argv)


def test_lam_fixes_a_methods_lambda_in_place_of_default_and_sweep(pneumoniamnist_dir, tmp_path, monkeypatch):
    """--lam tap=0.003: the PneumoniaMNIST TAP row, which would be swept, trains at 0.003 (no sweep, no *), and
    the checkpoint says so; a resume with another --lam is refused, naming the setting."""
    def no_sweep(*args, **kwargs):
        raise AssertionError("swept although --lam fixes the lambda")

    monkeypatch.setattr(reproduce, "sweep", no_sweep)
    argv = ["--dataset", "pneumoniamnist", "--data-dir", str(pneumoniamnist_dir), "--out-dir", str(tmp_path),
            "--rows", "tap", "--seeds", "0", "--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--device", "cpu",
            "--quiet", "--lam", "tap=0.003"]
    assert reproduce.main(argv) == 0
    (row,) = json.loads((tmp_path / "pneumoniamnist_results.json").read_text())["results"]
    assert row["lam"] == 0.003 and row["sweep"] is None and not (tmp_path / "sweeps").exists()
    assert tap_fast.loop.load_checkpoint(tmp_path / "runs" / "tap" / "seed0" / "checkpoint.pt")["meta"]["lam"] == 0.003
    markdown = (tmp_path / "pneumoniamnist_results.md").read_text()
    assert "| TAP | 0.003 | " in markdown and "Lambdas fixed by --lam: tap 0.003." in markdown
    assert "marked *" not in markdown
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main([*argv[:-1], "tap=0.01", "--resume"])
    assert exit_info.value.code == 2


def test_tag_style_reaches_every_run(pneumoniamnist_dir, tmp_path):
    """--tag-style shrunk: the run is trained on the shrunk tags (its checkpoint's meta), and the setting is one a
    resume must keep."""
    argv = ["--dataset", "pneumoniamnist", "--data-dir", str(pneumoniamnist_dir), "--out-dir", str(tmp_path),
            "--rows", "noxs", "--seeds", "0", "--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--device", "cpu",
            "--quiet", "--tag-style", "shrunk"]
    assert reproduce.main(argv) == 0
    meta = tap_fast.loop.load_checkpoint(tmp_path / "runs" / "no-xs" / "seed0" / "checkpoint.pt")["meta"]
    assert meta["tag_style"] == "shrunk"
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main([*argv[:-2], "--resume"])
    assert exit_info.value.code == 2


def test_resume_may_add_a_seed_and_a_row(mnist_dir, tmp_path, monkeypatch, capsys):
    """Base and No XS seed 0 finished; a resume with --seeds 0,1 and --rows base,noxs,tap trains seed 1 of each
    and TAP seed 0, keeping the finished records as they were; every JSON written on the way holds every record
    so far (a kill in between loses none: No XS seed 0 is in the one written after Base seed 1)."""
    argv = tiny(mnist_dir, tmp_path, "--rows", "base,noxs", "--seeds", "0", "--epochs", "1")
    assert reproduce.main(argv) == 0
    first = json.loads((tmp_path / "mnist_results.json").read_text())["results"]
    written, real_write = [], reproduce.write

    def write(results, args):
        written.append([(r["row"], [run["seed"] for run in r["runs"]]) for r in results])
        return real_write(results, args)

    monkeypatch.setattr(reproduce, "write", write)
    more = tiny(mnist_dir, tmp_path, "--rows", "base,noxs,tap", "--seeds", "0,1", "--epochs", "1", "--resume")
    assert reproduce.main(more) == 0
    err = capsys.readouterr().err
    assert "Base, seed 0: in " in err and "Base, seed 1: training" in err and "TAP, seed 0: training" in err
    assert written[0] == [("Base", [0, 1]), ("No XS", [0])]
    assert written[1] == [("Base", [0, 1]), ("No XS", [0, 1])]
    assert written[-1] == [("Base", [0, 1]), ("No XS", [0, 1]), ("TAP", [0, 1])]
    final = json.loads((tmp_path / "mnist_results.json").read_text())
    assert [r["runs"][0] for r in final["results"][:2]] == [r["runs"][0] for r in first]
    assert final["args"]["seeds"] == [0, 1] and final["results"][2]["lam"] == 0.01


def test_resume_may_drop_a_tau_only_where_no_saved_row_used_it(mnist_dir, tmp_path, capsys):
    """Only the teacher rows depend on --taus: without them in the saved rows, another --taus resumes; with
    them, dropping a saved tau is refused."""
    for saved_rows, allowed in (("base,tap", True), ("base,teacher", False)):
        saved = reproduce.parse_args(tiny(mnist_dir, tmp_path, "--rows", saved_rows))
        (tmp_path / "mnist_results.json").write_text(json.dumps(
            {"args": {k: getattr(saved, k) for k in reproduce.RUN_ARGS}, "results": []}))
        resumed = tiny(mnist_dir, tmp_path, "--rows", saved_rows, "--taus", "0.05", "--resume")
        if allowed:
            assert reproduce.parse_args(resumed).finished == {}
        else:
            with pytest.raises(SystemExit):
                reproduce.parse_args(resumed)
            assert "taus [0.01, 0.05, 0.1] not all in [0.05]" in capsys.readouterr().err


def test_teachers_select_the_teacher_and_distillation_rows(mnist_dir, tmp_path, capsys):
    """--teachers keeps the rows of the named teachers (in TEACHERS' order, whatever order they are given), the
    distillation rows only their 10% / 1% ones; a resume may add a teacher to saved teacher rows, not drop one."""
    picked = reproduce.teacher_list("random,1%")
    assert picked == ["1%", "random"]
    assert [name for name, _, _ in reproduce.rows(["base", "teacher", "at"], [0.01, 0.1], teachers=picked)] == [
        "Base", "TAP 1% tau=0.01", "TAP random tau=0.01", "TAP 1% tau=0.1", "TAP random tau=0.1", "AT 1%"]
    (_, overrides, paper), = reproduce.rows(["jt"], [0.01], teachers=["1%"])
    assert overrides == {"method": "jt", "teacher_fraction": 0.01} and paper == reproduce.PAPER_TABLE18["jt", 0.01]
    saved = reproduce.parse_args(tiny(mnist_dir, tmp_path, "--rows", "teacher,kd", "--teachers", "1%"))
    (tmp_path / "mnist_results.json").write_text(json.dumps(
        {"args": {k: getattr(saved, k) for k in reproduce.RUN_ARGS}, "results": []}))
    grown = reproduce.parse_args(tiny(mnist_dir, tmp_path, "--rows", "teacher,kd", "--teachers", "10%,1%",
                                      "--resume"))
    assert grown.finished == {} and grown.teachers == ["10%", "1%"]
    with pytest.raises(SystemExit):
        reproduce.parse_args(tiny(mnist_dir, tmp_path, "--rows", "teacher,kd", "--teachers", "10%", "--resume"))
    assert "teachers ['1%'] not all in ['10%']" in capsys.readouterr().err


def test_teacher_epochs_and_lr_reach_the_teacher_rows(mnist_dir, tmp_path):
    """--teacher-epochs 2 --teacher-lr 0.02: the teacher row's teacher trains 2 epochs (its annotations' record)
    at lr 0.02 (the run's config); the table header names both."""
    argv = tiny(mnist_dir, tmp_path, "--rows", "teacher", "--taus", "0.1", "--seeds", "0", "--epochs", "1",
                "--teacher-epochs", "2", "--teacher-lr", "0.02")
    assert reproduce.main(argv) == 0
    run_dir = tmp_path / "runs" / "tap-10-tau-0.1" / "seed0"
    meta = tap_fast.loop.load_checkpoint(run_dir / "checkpoint.pt")["meta"]
    assert (meta["teacher_epochs"], meta["teacher_lr"]) == (2, 0.02)
    info = json.loads(torch.load(run_dir / "annotations.pt", weights_only=True)["info"])
    assert info["teacher"]["epochs"] == 2
    assert ", teacher_epochs 2, teacher_lr 0.02." in (tmp_path / "mnist_results.md").read_text()
