#!/usr/bin/env bash
# Carry NVIDIA DALI (nvidia-dali-cuda130 and the packages it needs that the GPU machine lacks) to the GPU
# machine in parts of at most 60 MiB, one part per device call, and install it there.
#
# Why parts: the wheels are 256 MiB (202.5 repacked), but one device call sends at most 64 MiB (working tree +
# carried paths).
#
# Usage, from the repository root (the checkout the session was started in, since that is what travels):
#   bash benchmarks/dali_wheels.sh prepare      # HERE: download, repack, split into .dali_wheels/partK, plan
#   bash benchmarks/dali_wheels.sh plan         # HERE: print the device calls again
#   bash benchmarks/dali_wheels.sh receive      # THERE, calls 1..N-1 (carry [".dali_wheels/partK"])
#   bash benchmarks/dali_wheels.sh assemble && export PYTHONPATH=/tmp/site   # THERE, call N (carry partN)
# Steps on local files (no network; used by tests/test_dali_wheels.py):
#   split SRC_DIR DEST_DIR     wheels SRC_DIR/*.whl -> DEST_DIR/partK/{partK.bin,manifest.json}, K = 1..N
#   join DIR OUT_DIR           DIR/partK/partK.bin -> the wheels in OUT_DIR, each size and sha256 checked
#   repack SRC_DIR DEST_DIR    SRC_DIR/*.whl -> DEST_DIR/*.whl with LZMA-compressed members
#   install WHEEL_DIR SITE     pip install --no-index --no-deps --target SITE WHEEL_DIR/*.whl
# prepare downloads (pip download --no-deps, for cp312 manylinux x86_64) nvidia-dali-cuda130 and each package
# it needs (Requires-Dist, extras and markers followed) that the device image lacks, at the versions pinned in
# requirements.lock, into .dali_wheels/wheels; repacks them with LZMA into .dali_wheels/lzma (DALI_REPACK=0:
# no repack) and splits those. 2.4.0: 12 wheels, 256 MiB as downloaded (5 calls), 202.5 MiB repacked (4 calls).
# Environment: PYTHON (default python3), DALI_PART_MIB (default 60), DALI_SITE (default /tmp/site),
#   DALI_STASH (default /tmp/dali_parts), DALI_WHEELS_PART_BYTES (split: exact part size, for tests).
#
# How the parts accumulate there. Each call carries ONLY its own part folder, .dali_wheels/partK:
# - `carry` replaces the named paths there and removes there a named path that is missing here; it names
#   nothing else, so naming part2 leaves part1 alone. Never name a part this checkout lacks (that would
#   remove it there) nor the parent .dali_wheels (that would send every part, over the 64 MiB limit).
# - Ignored files left there by earlier calls are kept while the machine is warm, "except any that block a
#   copied path"; .dali_wheels/partJ blocks no copied path (the tree's files and partK are siblings of it).
# - Not relying on that alone, `receive` checks the part that came (size, sha256 against the manifest that
#   each part folder carries in full) and copies it to $DALI_STASH, outside the working tree, which lives
#   as long as the machine. It then lists the parts still missing: order does not matter, and after a
#   fresh start (the machine goes back after ~30 s idle and all is lost) the list says what to carry again.
# - `assemble` does `receive`, joins the stash into the wheels (every part and wheel checked, a missing or
#   corrupt part named), pip-installs them into $DALI_SITE and imports nvidia.dali with it on PYTHONPATH.
set -euo pipefail

PY="${PYTHON:-python3}"
ROOT=.dali_wheels                     # ignored via .git/info/exclude (prepare adds it): local, not committed
STASH="${DALI_STASH:-/tmp/dali_parts}"
SITE="${DALI_SITE:-/tmp/site}"
PART_MIB="${DALI_PART_MIB:-60}"
DALI=nvidia-dali-cuda130
SCRIPT="${BASH_SOURCE[0]}"

helper() {  # helper SUBCOMMAND ARGS...: the Python half of this script (stdlib only, but `deps` needs packaging)
    "$PY" - "$@" <<'EOF'
import hashlib, json, os, re, shutil, subprocess, sys, zipfile
from pathlib import Path

MANIFEST = "manifest.json"
# Python packages of the GPU machine's image (/work/.library/device/KINDS.md, read there 2026-11-17).
DEVICE_HAS = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
# The device's interpreter, for Requires-Dist markers.
DEVICE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
              "platform_machine": "x86_64", "os_name": "posix"}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]


def die(message, status=2):
    print(f"dali_wheels.sh: {message}", file=sys.stderr)
    sys.exit(status)


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _blocks(path):
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            yield block


def sha256(path):
    h = hashlib.sha256()
    for block in _blocks(path):
        h.update(block)
    return h.hexdigest()


def part_dirs(folder):
    """partK folders of ``folder``, by K."""
    found = [d for d in Path(folder).glob("part*") if d.is_dir() and re.fullmatch(r"part[1-9][0-9]*", d.name)]
    return sorted(found, key=lambda d: int(d.name[4:]))


def split(src, dest, part_bytes):
    """Concatenate src/*.whl (sorted by name) and cut the bytes into dest/partK/partK.bin of part_bytes
    (the last one shorter); each dest/partK also gets the whole manifest: wheels and parts with sizes and
    sha256. Earlier dest/partK folders are removed first."""
    wheels = sorted(Path(src).glob("*.whl"))
    if not wheels:
        die(f"split: SRC_DIR {src} holds no .whl files")
    if part_bytes < 1:
        die(f"split: the part size must be a positive number of bytes, got {part_bytes}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in part_dirs(dest):
        shutil.rmtree(old)
    parts, out = [], None
    for wheel in wheels:
        with open(wheel, "rb") as f:
            while block := f.read(1 << 20):
                while block:
                    if out is None or out.tell() == part_bytes:
                        if out:
                            out.close()
                        name = f"part{len(parts) + 1}"
                        (dest / name).mkdir()
                        parts.append(dest / name / f"{name}.bin")
                        out = open(parts[-1], "wb")
                    room = part_bytes - out.tell()
                    out.write(block[:room])
                    block = block[room:]
    out.close()
    manifest = {"format": 1, "part_bytes": part_bytes,
                "wheels": [{"name": w.name, "size": w.stat().st_size, "sha256": sha256(w)} for w in wheels],
                "parts": [{"name": p.parent.name, "size": p.stat().st_size, "sha256": sha256(p)} for p in parts]}
    manifest["total_bytes"] = sum(w["size"] for w in manifest["wheels"])
    text = json.dumps(manifest, indent=1) + "\n"
    for p in parts:
        (p.parent / MANIFEST).write_text(text)
    (dest / MANIFEST).write_text(text)
    print(f"split {len(wheels)} wheels, {manifest['total_bytes'] / 2**20:.1f} MiB, into {len(parts)} parts "
          f"of at most {part_bytes / 2**20:.1f} MiB under {dest}")
    return manifest


def read_manifest(folder):
    """The manifest that the part folders under ``folder`` carry (all copies must agree)."""
    texts = {}
    for d in part_dirs(folder):
        if (d / MANIFEST).is_file():
            texts.setdefault((d / MANIFEST).read_text(), []).append(d.name)
    if not texts:
        die(f"no part folder under {folder} holds a {MANIFEST}: no part has arrived (carry .dali_wheels/partK)")
    if len(texts) > 1:
        groups = "; ".join(", ".join(names) for names in texts.values())
        die(f"the parts under {folder} come from different `prepare` runs (manifests differ: {groups}); "
            f"prepare again and carry every part anew")
    return json.loads(next(iter(texts)))


def part_problem(folder, part):
    """None if folder/<name>/<name>.bin is the manifest's part, else what is wrong with it."""
    path = Path(folder) / part["name"] / f"{part['name']}.bin"
    if not path.is_file():
        return f"{part['name']} missing ({path})"
    if path.stat().st_size != part["size"]:
        return f"{part['name']} corrupt ({path}: {path.stat().st_size} bytes, expected {part['size']})"
    if sha256(path) != part["sha256"]:
        return f"{part['name']} corrupt ({path}: sha256 differs from the manifest's)"
    return None


def check_parts(folder, manifest, what):
    problems = [p for p in (part_problem(folder, part) for part in manifest["parts"]) if p]
    if problems:
        die(f"{what}: {len(problems)} of {len(manifest['parts'])} parts not usable under {folder}: "
            + "; ".join(problems))


def join(folder, out):
    """Rebuild the manifest's wheels in ``out`` from folder/partK/partK.bin; check every part and wheel."""
    manifest = read_manifest(folder)
    check_parts(folder, manifest, "join")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks = (block for p in manifest["parts"] for block in _blocks(Path(folder) / p["name"] / f"{p['name']}.bin"))
    buffer = b""
    for wheel in manifest["wheels"]:
        need = wheel["size"]
        with open(out / wheel["name"], "wb") as f:
            while need:
                buffer = buffer or next(blocks, b"") or die("join: the parts end before the manifest's wheels do")
                f.write(buffer[:need])
                taken = min(need, len(buffer))
                buffer, need = buffer[taken:], need - taken
        if sha256(out / wheel["name"]) != wheel["sha256"]:
            die(f"join: {wheel['name']} rebuilt with a sha256 that differs from the manifest's")
    if buffer or next(blocks, b""):
        die("join: the parts hold more bytes than the manifest's wheels")
    print(f"joined {len(manifest['parts'])} parts into {len(manifest['wheels'])} wheels in {out}: "
          + " ".join(w["name"] for w in manifest["wheels"]))


def receive(src, stash, require_all):
    """Copy every intact part folder of ``src`` not yet in ``stash`` there; report the parts still missing
    (exit status 3 if ``require_all``). A broken carried part: exit status 2."""
    src, stash = Path(src), Path(stash)
    if not part_dirs(src):
        die(f"receive: no part folder under {src}: name .dali_wheels/partK in the call's carry")
    manifest = read_manifest(src)
    stash.mkdir(parents=True, exist_ok=True)
    if part_dirs(stash) and (stash / MANIFEST).is_file() and json.loads((stash / MANIFEST).read_text()) != manifest:
        print(f"receive: the parts in {stash} come from another `prepare` run: discarding them")
        shutil.rmtree(stash)
        stash.mkdir()
    (stash / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    bad = []
    for part in manifest["parts"]:
        if not (src / part["name"]).is_dir() or part_problem(stash, part) is None:
            continue
        problem = part_problem(src, part)
        if problem:
            bad.append(problem)
            continue
        shutil.rmtree(stash / part["name"], ignore_errors=True)
        shutil.copytree(src / part["name"], stash / part["name"])
        print(f"receive: {part['name']} arrived intact ({part['size'] / 2**20:.1f} MiB), stashed in {stash}")
    if bad:
        die("receive: a carried part is broken, carry it again: " + "; ".join(bad))
    missing = [p["name"] for p in manifest["parts"] if part_problem(stash, p)]
    have = len(manifest["parts"]) - len(missing)
    print(f"receive: {have} of {len(manifest['parts'])} parts here"
          + (f"; still to carry (any order): {' '.join(missing)}" if missing else "; all parts here"))
    if missing and require_all:
        die(f"assemble: parts missing: {' '.join(missing)}; carry each (any order, one per call), then assemble",
            status=3)


def repack(src, dest):
    """Copy src/*.whl to dest with every member LZMA-compressed (same names, bytes, dates and modes, so RECORD
    still holds; pip reads wheels with zipfile, which reads LZMA): ~20 % smaller than deflate, one device call
    fewer. A wheel already repacked (newer than its source) is kept; other wheels in dest are removed."""
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(src.glob("*.whl"))
    for old in dest.glob("*.whl"):
        if not (src / old.name).is_file():
            old.unlink()
    for wheel in wheels:
        out = dest / wheel.name
        if out.is_file() and out.stat().st_mtime >= wheel.stat().st_mtime:
            continue
        print(f"repack: {wheel.name} ({wheel.stat().st_size / 2**20:.1f} MiB) with LZMA ...", flush=True)
        tmp = out.with_suffix(".tmp")
        with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as zout:
            for info in zin.infolist():
                copy = zipfile.ZipInfo(info.filename, info.date_time)
                copy.external_attr, copy.create_system = info.external_attr, info.create_system
                zout.writestr(copy, zin.read(info), compress_type=zipfile.ZIP_LZMA)
        tmp.replace(out)
        print(f"repack: {wheel.name}: {out.stat().st_size / 2**20:.1f} MiB")


def tree_bytes():
    """Bytes of what every device call sends besides `carry`: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True, text=True).stdout.split("\0")
    return sum(os.path.getsize(n) for n in names if n and os.path.isfile(n) and not os.path.islink(n))


def plan(root, script, site):
    manifest = read_manifest(root)
    parts = manifest["parts"]
    tree = tree_bytes()
    largest = max(p["size"] for p in parts)
    print(f"\n{len(manifest['wheels'])} wheels, {manifest['total_bytes'] / 2**20:.1f} MiB, in {len(parts)} parts; "
          f"working tree {tree / 2**20:.2f} MiB + largest part {largest / 2**20:.1f} MiB per call")
    for w in manifest["wheels"]:
        print(f"  {w['size'] / 2**20:8.2f} MiB  {w['name']}")
    if tree + largest > 64 * 2**20:
        print(f"WARNING: working tree + a part exceeds the 64 MiB a call may send: ignore or remove untracked "
              f"files, or prepare again with a smaller DALI_PART_MIB")
    print(f"\nDevice calls, one straight after the other (the machine goes back after ~30 s idle):")
    for k, part in enumerate(parts, 1):
        command = (f"bash {script} receive" if k < len(parts) else
                   f"bash {script} assemble && export PYTHONPATH={site} && <your GPU work, e.g. "
                   f"python3 -m pytest -q -m gpu tests/test_dali_feed.py>")
        print(f"  call {k}: carry [\"{root}/{part['name']}\"]  command: {command}")
    print(f"receive and assemble name the parts still missing there; if the machine went back meanwhile, carry "
          f"the missing ones again (any order, one per call) before assemble. Never carry the folder {root} itself.")


def requires(wheel, extras):
    """(name, specifier, extras) of the wheel's Requires-Dist for the device, given the extras asked for."""
    from packaging.requirements import Requirement
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        lines = z.read(meta).decode().split("\n\n")[0].splitlines()
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or any(req.marker.evaluate({**DEVICE_ENV, "extra": e}) for e in ("", *extras)):
                out.append((canonical(req.name), str(req.specifier), tuple(sorted(req.extras))))
    return out


def deps(lock, folder, top):
    """Download (--no-deps) ``top`` and every package it needs that the device lacks, at the versions pinned in
    ``lock``, into ``folder``; remove other wheels there. Prints what the device provides instead."""
    pins = {}
    for line in Path(lock).read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==([^\s;#]+).*", line)
        if m:
            pins[canonical(m[1])] = m[2]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    queue, extras, wanted, provided = [canonical(top)], {canonical(top): ()}, {}, []
    while queue:
        name = queue.pop(0)
        if name not in pins:
            die(f"prepare: {name} is needed on the device but not pinned in {lock}")
        found = [w for w in folder.glob("*.whl") if canonical(w.name.split("-")[0]) == name
                 and w.name.split("-")[1] == pins[name]]
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp",
                   *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(folder), f"{name}=={pins[name]}"]
            print(f"prepare: pip download {name}=={pins[name]}", flush=True)
            if subprocess.run(cmd).returncode:
                die(f"prepare: pip download of {name}=={pins[name]} failed")
            found = [w for w in folder.glob("*.whl") if canonical(w.name.split("-")[0]) == name
                     and w.name.split("-")[1] == pins[name]]
        if len(found) != 1:
            die(f"prepare: expected one wheel of {name}=={pins[name]} in {folder}, found {[w.name for w in found]}")
        wanted[name] = found[0]
        for dep, spec, dep_extras in requires(found[0], extras[name]):
            if dep in DEVICE_HAS:
                provided.append(f"{dep}{spec} (for {name})")
            elif dep not in extras:
                extras[dep] = dep_extras
                queue.append(dep)
            elif set(dep_extras) - set(extras[dep]):
                die(f"prepare: {dep} is asked for with more extras after it was resolved; extend the resolver")
    for w in folder.glob("*.whl"):
        if w not in wanted.values():
            print(f"prepare: removing {w.name} (not needed)")
            w.unlink()
    print(f"prepare: {len(wanted)} wheels to carry: {' '.join(sorted(wanted))}")
    print(f"prepare: the device provides (versions not checked here): {', '.join(sorted(set(provided)))}")


command, args = sys.argv[1], sys.argv[2:]
if command == "split":
    split(args[0], args[1], int(args[2]))
elif command == "join":
    join(args[0], args[1])
elif command == "receive":
    receive(args[0], args[1], args[2] == "all")
elif command == "repack":
    repack(args[0], args[1])
elif command == "plan":
    plan(args[0], args[1], args[2])
elif command == "deps":
    deps(args[0], args[1], args[2])
EOF
}

install() {  # install WHEEL_DIR SITE
    local wheels
    shopt -s nullglob
    wheels=("$1"/*.whl)
    ((${#wheels[@]})) || { echo "dali_wheels.sh: install: no .whl files in $1" >&2; exit 2; }
    "$PY" -c "import lzma" 2>/dev/null || { echo "dali_wheels.sh: install: $PY lacks the lzma module that" \
        "LZMA-repacked wheels need: run prepare here again with DALI_REPACK=0 (one device call more)" >&2; exit 2; }
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$2" "${wheels[@]}"
    echo "installed ${#wheels[@]} wheels into $2"
}

usage() {
    sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
prepare)
    [[ -f requirements.lock && -d .git ]] || {
        echo "dali_wheels.sh: run prepare from the repository root" >&2
        exit 2
    }
    grep -qxF "/$ROOT/" .git/info/exclude 2>/dev/null || echo "/$ROOT/" >> .git/info/exclude
    git check-ignore -q "$ROOT/part1" || { echo "dali_wheels.sh: $ROOT is not ignored by git" >&2; exit 2; }
    helper deps requirements.lock "$ROOT/wheels" "$DALI"
    wheels="$ROOT/wheels"
    if [[ "${DALI_REPACK:-1}" == 1 ]]; then
        helper repack "$ROOT/wheels" "$ROOT/lzma"
        wheels="$ROOT/lzma"
    fi
    helper split "$wheels" "$ROOT" "${DALI_WHEELS_PART_BYTES:-$((PART_MIB * 1048576))}"
    helper plan "$ROOT" "$SCRIPT" "$SITE"
    ;;
plan)
    helper plan "$ROOT" "$SCRIPT" "$SITE"
    ;;
split)
    [[ $# -eq 2 ]] || usage
    helper split "$1" "$2" "${DALI_WHEELS_PART_BYTES:-$((PART_MIB * 1048576))}"
    ;;
join)
    [[ $# -eq 2 ]] || usage
    helper join "$1" "$2"
    ;;
repack)
    [[ $# -eq 2 ]] || usage
    helper repack "$1" "$2"
    ;;
install)
    [[ $# -eq 2 ]] || usage
    install "$1" "$2"
    ;;
receive)
    helper receive "$ROOT" "$STASH" any
    ;;
assemble)
    start=$SECONDS
    helper receive "$ROOT" "$STASH" all
    joined="$(mktemp -d /tmp/dali_joined.XXXXXX)"
    trap 'rm -rf "$joined"' EXIT
    helper join "$STASH" "$joined"
    install "$joined" "$SITE"
    PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import nvidia, nvidia.dali as d
print('nvidia.dali', d.__version__, 'from', d.__file__, '| nvidia.__path__', list(nvidia.__path__))"
    echo "assemble: done in $((SECONDS - start)) s; now: export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
    ;;
*)
    usage
    ;;
esac
