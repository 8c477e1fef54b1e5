"""benchmarks/dali_wheels.sh on small fake wheels, offline: split into parts and join back byte for byte, the
parts accumulating on the "device" one per call, missing or corrupt parts named, the LZMA repack installed by
pip, and prepare's dependency walk (device-provided packages, extras, markers, pins from requirements.lock)."""
import base64
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dali_wheels.sh"
PART = 6007  # bytes: no divisor of any wheel size, so parts cut through wheels and a wheel boundary


def make_wheel(folder, name, version, payload, requires=(), seed=0):
    """A valid pure-Python wheel of ``payload`` random (incompressible, stored) bytes; returns its path."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    files = {f"{dist}/__init__.py": f"SEED = {seed}\n".encode(),
             f"{dist}/blob.bin": random.Random(seed).randbytes(payload),
             f"{info}/METADATA": (meta + "".join(f"Requires-Dist: {r}\n" for r in requires) + "\nlong text\n").encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    digest = {n: base64.urlsafe_b64encode(hashlib.sha256(c).digest()).rstrip(b"=").decode() for n, c in files.items()}
    record = "".join(f"{n},sha256={digest[n]},{len(c)}\n" for n, c in files.items()) + f"{info}/RECORD,,\n"
    path = Path(folder) / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, c in files.items():
            z.writestr(n, c)
        z.writestr(f"{info}/RECORD", record)
    return path


def run(*args, cwd=None, env=None, check=True):
    env = {**os.environ, "PYTHON": sys.executable, "DALI_WHEELS_PART_BYTES": str(PART), **(env or {})}
    proc = subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def wheels(tmp_path):
    src = tmp_path / "wheels"
    src.mkdir()
    return [make_wheel(src, "pkg-a", "1.0", 20000, seed=1), make_wheel(src, "pkg-b", "2.1", 9000, seed=2)]


@pytest.fixture
def parts(tmp_path, wheels):
    dest = tmp_path / "parts"
    run("split", wheels[0].parent, dest)
    return dest


def test_split_parts_and_join_byte_identical(tmp_path, wheels, parts):
    total = sum(w.stat().st_size for w in wheels)
    bins = [parts / f"part{k}" / f"part{k}.bin" for k in range(1, -(-total // PART) + 1)]
    assert sorted(p.name for p in parts.glob("part*")) == sorted(b.parent.name for b in bins)
    assert [b.stat().st_size for b in bins] == [PART] * (len(bins) - 1) + [total - PART * (len(bins) - 1)]
    assert b"".join(b.read_bytes() for b in bins) == b"".join(w.read_bytes() for w in wheels)
    manifest = json.loads((parts / "part2" / "manifest.json").read_text())
    assert manifest == json.loads((parts / "part1" / "manifest.json").read_text())  # every part carries it all
    assert [w["name"] for w in manifest["wheels"]] == [w.name for w in wheels] and manifest["total_bytes"] == total
    out = tmp_path / "joined"
    run("join", parts, out)
    for w in wheels:
        assert (out / w.name).read_bytes() == w.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(w.name for w in wheels)


@pytest.mark.parametrize("damage,message", [
    ("remove", r"part2 missing"),
    ("flip", r"part2 corrupt \(.*sha256 differs"),
    ("truncate", r"part2 corrupt \(.*6006 bytes, expected 6007"),
])
def test_join_names_missing_or_corrupt_part(tmp_path, parts, damage, message):
    part = parts / "part2" / "part2.bin"
    if damage == "remove":
        shutil.rmtree(part.parent)
    else:
        data = bytearray(part.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        part.write_bytes(data if damage == "flip" else data[:-1])
    proc = run("join", parts, tmp_path / "joined", check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr


def test_join_refuses_parts_of_different_runs(tmp_path, wheels, parts):
    make_wheel(wheels[0].parent, "pkg-c", "0.1", 100, seed=3)
    other = tmp_path / "other"
    run("split", wheels[0].parent, other)
    shutil.rmtree(parts / "part1")
    shutil.copytree(other / "part1", parts / "part1")
    proc = run("join", parts, tmp_path / "joined", check=False)
    assert proc.returncode != 0 and "different `prepare` runs" in proc.stderr


def test_receive_accumulates_one_part_per_call_then_installs(tmp_path, wheels):
    """Each 'call' holds only its own part in .dali_wheels (even when earlier ones vanished there); receive
    stashes it and lists what is missing, in any order; assemble refuses while parts are missing; the joined
    LZMA-repacked wheels install with pip and import."""
    lzma = tmp_path / "lzma"
    run("repack", wheels[0].parent, lzma)
    for w in wheels:
        with zipfile.ZipFile(w) as plain, zipfile.ZipFile(lzma / w.name) as packed:
            assert [i.filename for i in plain.infolist()] == [i.filename for i in packed.infolist()]
            assert all(i.compress_type == zipfile.ZIP_LZMA for i in packed.infolist())
            assert all(plain.read(n) == packed.read(n) for n in plain.namelist())
    parts = tmp_path / "parts"
    run("split", lzma, parts)
    device = tmp_path / "device"
    stash = tmp_path / "stash"
    env = {"DALI_STASH": str(stash), "DALI_SITE": str(tmp_path / "unused")}
    names = sorted((p.name for p in parts.glob("part*")), key=lambda n: int(n[4:]))
    assert len(names) >= 4
    order = [names[1], names[0], *names[2:]]
    for k, name in enumerate(order, 1):
        shutil.rmtree(device, ignore_errors=True)
        shutil.copytree(parts / name, device / ".dali_wheels" / name)
        proc = run("receive", cwd=device, env=env)
        assert f"{name} arrived intact" in proc.stdout and f"{k} of {len(names)} parts here" in proc.stdout
        if k < len(order):
            assert f"still to carry (any order): {' '.join(n for n in names if n not in order[:k])}" in proc.stdout
            if k == 2:
                proc = run("assemble", cwd=device, env=env, check=False)
                assert proc.returncode == 3 and f"parts missing: {' '.join(names[2:])}" in proc.stderr
        else:
            assert "all parts here" in proc.stdout
    (device / ".dali_wheels" / order[-1] / f"{order[-1]}.bin").write_bytes(b"broken")  # stash keeps the good one
    assert "all parts here" in run("receive", cwd=device, env=env).stdout
    out = tmp_path / "joined"
    run("join", stash, out)
    assert all((out / w.name).read_bytes() == (lzma / w.name).read_bytes() for w in wheels)
    site = tmp_path / "site"
    run("install", out, site)
    probe = ("import pkg_a, pkg_b; "
             "print(pkg_a.SEED, pkg_b.SEED, len(open(pkg_a.__path__[0] + '/blob.bin', 'rb').read()))")
    got = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert got == ["1", "2", "20000"]


def test_receive_rejects_broken_carried_part(tmp_path, parts):
    device = tmp_path / "device"
    shutil.copytree(parts / "part3", device / ".dali_wheels" / "part3")
    (device / ".dali_wheels" / "part3" / "part3.bin").write_bytes(b"short")
    proc = run("receive", cwd=device, env={"DALI_STASH": str(tmp_path / "stash")}, check=False)
    assert proc.returncode == 2 and "part3 corrupt" in proc.stderr and "carry it again" in proc.stderr


def test_prepare_walks_dependencies_offline(tmp_path):
    """prepare in a fresh repository whose wheels are already downloaded: keeps the top package and what it
    needs that the device lacks (extras and markers evaluated for python 3.12 on Linux), drops a stale wheel,
    ignores .dali_wheels through .git/info/exclude and prints one device call per part."""
    repo = tmp_path / "repo"
    folder = repo / ".dali_wheels" / "wheels"
    folder.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "requirements.lock").write_text("nvidia-dali-cuda130==9.9\ndep_a==1.0\ndep-b==2.0\nnumpy==2.0\n")
    make_wheel(folder, "nvidia-dali-cuda130", "9.9", 15000, ["numpy", "six<=1.17,>=1.16", "dep-a[all]>=1"], seed=4)
    make_wheel(folder, "dep-a", "1.0", 3000, ["dep-b; extra == 'all'", "dep-c; extra == 'docs'",
                                              "dep-d; python_version < '3.10'", "pyyaml>=5"], seed=5)
    make_wheel(folder, "dep-b", "2.0", 500, seed=6)
    make_wheel(folder, "dep-b", "1.0", 500, seed=7)  # stale version: removed
    proc = run("prepare", cwd=repo)
    kept = sorted(p.name for p in folder.glob("*.whl"))
    assert kept == ["dep_a-1.0-py3-none-any.whl", "dep_b-2.0-py3-none-any.whl",
                    "nvidia_dali_cuda130-9.9-py3-none-any.whl"]
    assert "removing dep_b-1.0-py3-none-any.whl" in proc.stdout
    assert "/.dali_wheels/" in (repo / ".git" / "info" / "exclude").read_text().splitlines()
    assert sorted(p.name for p in (repo / ".dali_wheels" / "lzma").glob("*.whl")) == kept
    manifest = json.loads((repo / ".dali_wheels" / "part1" / "manifest.json").read_text())
    assert [w["name"] for w in manifest["wheels"]] == kept
    total = sum((repo / ".dali_wheels" / "lzma" / k).stat().st_size for k in kept)
    assert manifest["total_bytes"] == total
    n = -(-total // PART)
    calls = [line for line in proc.stdout.splitlines() if line.strip().startswith("call ")]
    assert len(calls) == n and f'carry [".dali_wheels/part{n}"]' in calls[-1] and " assemble " in calls[-1]
    assert all(" receive" in c for c in calls[:-1])
    # a dependency of the device's own packages is not walked; an unpinned one is refused by name
    (repo / "requirements.lock").write_text("nvidia-dali-cuda130==9.9\ndep-b==2.0\n")
    proc = run("prepare", cwd=repo, check=False)
    assert proc.returncode != 0 and "dep-a is needed on the device but not pinned" in proc.stderr
