"""benchmarks/step_server.py runs gpu_check.sh's python steps as `python ARGS` would, in children of one
preloaded process: the three argv forms, exit statuses, the client's directory and environment, `timeout`
ending a step (its child is killed, the server serves on), and the client running a step itself where no
server answers."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "benchmarks" / "step_server.py"


@pytest.fixture(scope="module")
def sock(tmp_path_factory):
    path = tmp_path_factory.mktemp("server") / "s.sock"
    log = path.with_suffix(".log")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    with log.open("w") as f:
        server = subprocess.Popen([sys.executable, str(SERVER), "serve", str(path)], cwd=ROOT, env=env, stderr=f)
    for _ in range(600):
        if "ready" in log.read_text() or server.poll() is not None:
            break
        time.sleep(0.1)
    assert "step_server: ready" in log.read_text(), log.read_text()
    assert "failed" not in log.read_text()  # every module preloads
    yield path
    server.terminate()
    server.wait(timeout=10)
    assert Path(f"{path}.done").exists()


def _run(sock, *argv, timeout=None, **env):
    cmd = [sys.executable, str(SERVER), "run", str(sock), "--", *argv]
    if timeout is not None:
        cmd = ["timeout", str(timeout), *cmd]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **env})


def test_argv_forms_and_exit_status(sock, tmp_path):
    res = _run(sock, "-c", "import sys, torch; print(sys.argv, 'torch' in sys.modules); sys.exit(3)", "a", "b")
    assert (res.returncode, res.stdout) == (3, "['-c', 'a', 'b'] True\n")
    script = tmp_path / "script.py"
    script.write_text("import os, sys\nprint(__name__, sys.argv[1:], os.getcwd(), os.environ['MARK'])\n"
                      "sys.exit('failed: a message')\n")
    res = _run(sock, str(script), "--flag", MARK="set")
    assert res.returncode == 1 and res.stdout == f"__main__ ['--flag'] {ROOT} set\n"
    assert "failed: a message" in res.stderr
    res = _run(sock, "-m", "json.tool", "--help")
    assert res.returncode == 0 and "usage" in res.stdout
    res = _run(sock, "-c", "raise ValueError('boom')")
    assert res.returncode == 1 and "ValueError: boom" in res.stderr


def test_timeout_kills_the_step_and_the_server_serves_on(sock):
    res = _run(sock, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)", timeout=3)
    assert res.returncode == 124
    pid = int(res.stdout)
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the cut step's child still runs"
    assert _run(sock, "-c", "print('next')").stdout == "next\n"


def test_client_runs_the_step_itself_without_a_server(tmp_path):
    path = tmp_path / "none.sock"
    Path(f"{path}.done").touch()  # the server has ended
    start = time.monotonic()
    res = _run(path, "-c", "import sys; print('alone'); sys.exit(4)")
    assert (res.returncode, res.stdout) == (4, "alone\n") and time.monotonic() - start < 30
