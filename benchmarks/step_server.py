"""One Python process for the python steps of benchmarks/gpu_check.sh: it imports torch, triton, pytest and
tap_fast once (5-8 s a step otherwise) and forks a child per step, so that each step still has its own
process (CUDA context, memory, exit status) while `timeout` around the client still ends it.

    python benchmarks/step_server.py serve SOCKET           # preload, then run one step at a time
    python benchmarks/step_server.py run SOCKET -- ARGS...  # as `python ARGS...`, in a child of the server

The client sends its argv, working directory and environment, with its stdin, stdout and stderr, over a
Unix socket; the server forks a child that runs ARGS as python's command line would (a script path,
``-m MODULE`` or ``-c CODE``) and answers with its exit status, which the client exits with. When the client
ends first (killed by `timeout`), the server kills the child's process group. The server imports nothing
that initialises CUDA (``PYTORCH_NVML_BASED_CUDA_CHECK=1``) and serves only after a forked probe child has
used the GPU; where no server answers (it failed to start or refused, or SOCKET.done says it ended), the
client runs ``python ARGS...`` itself.
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import time
import traceback
import warnings

PRELOAD = ("numpy", "torch", "torchvision", "triton", "triton.language", "torch._dynamo", "pytest",
           "tap_fast.experiments", "kernels.tap_op")
CONNECT_WAIT_S = 60  # how long a client waits for a starting server before it runs the step itself


def _run_as_main(argv: list[str]) -> int:
    """Run ``python argv...`` in this process; its exit status."""
    try:
        if argv[0] == "-c":
            sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        elif argv[0] == "-m":
            sys.argv, sys.path[0] = argv[1:], os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: take the client's stdio, directory and environment, run, exit."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    rc = _run_as_main(request["argv"])
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    size = int.from_bytes(data[:8], "big")
    while len(data) < 8 + size:
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ConnectionError("client left mid-request")
        data += chunk
    return json.loads(data[8:8 + size]), fds


def _serve_one(conn: socket.socket, listener: socket.socket) -> None:
    request, fds = _receive(conn)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        listener.close()
        conn.close()
        _child(request, fds)
    for fd in fds:  # else the step's output pipe stays open (and `tee` waits) after the child ends
        os.close(fd)
    try:
        os.setpgid(pid, pid)
    except OSError:  # the child got there first (or has exited)
        pass
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            conn.sendall(str(rc if rc >= 0 else 128 - rc).encode())
            break
        readable, _, _ = select.select([conn], [], [], 0.1)
        if readable and not conn.recv(1):  # the client is gone: `timeout` ended the step
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
    try:  # whatever the step started (compile workers, pytest-xdist workers) ends with it
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _probe_cuda() -> bool:
    """Whether a child forked now can use the GPU (True without one: nothing to poison)."""
    import torch

    if not torch.cuda.is_available():
        return True
    pid = os.fork()
    if pid == 0:
        try:
            torch.ones(1, device="cuda").add_(1).item()
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def serve(path: str) -> int:
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # torch.cuda.is_available() without initialising CUDA
    # numpy's BLAS starts its idle thread pool at import (Python >= 3.12 warns at each fork); it holds no Python
    # lock and re-creates itself in the child, as in DataLoader's forked workers.
    warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # gpu_check.sh's exit trap: write SOCKET.done
    try:
        start = time.perf_counter()
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except Exception as e:  # the step that needs it reports it
                print(f"step_server: preloading {name} failed: {e}", file=sys.stderr)
        import torch

        if torch.cuda.is_initialized() or not _probe_cuda():
            print("step_server: CUDA is unusable in forked children; steps run in their own processes",
                  file=sys.stderr)
            return 1
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4)
        print(f"step_server: ready after {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    _serve_one(conn, listener)
                except (ConnectionError, OSError) as e:
                    print(f"step_server: {e}", file=sys.stderr)
    finally:
        open(path + ".done", "w").close()


def _run_directly(argv: list[str]):
    os.execv(sys.executable, [sys.executable, *argv])


def run(path: str, argv: list[str]) -> int:
    """The client: ``python argv...`` through the server, or by itself where no server answers."""
    if not argv or not (argv[0] in ("-c", "-m") or argv[0].endswith(".py")):
        _run_directly(argv)
    deadline = time.monotonic() + CONNECT_WAIT_S
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            conn.connect(path)
            break
        except ConnectionRefusedError:  # the server is gone
            _run_directly(argv)
        except FileNotFoundError:  # not up yet
            if os.path.exists(path + ".done") or time.monotonic() > deadline:
                _run_directly(argv)
            time.sleep(0.1)
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    message = len(payload).to_bytes(8, "big") + payload
    sent = socket.send_fds(conn, [message], [0, 1, 2])
    conn.sendall(message[sent:])
    reply = conn.recv(16)
    if not reply:
        print("step_server: the server ended during the step", file=sys.stderr)
        return 1
    return int(reply)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        return serve(argv[1])
    if len(argv) >= 3 and argv[0] == "run" and argv[2] == "--":
        return run(argv[1], argv[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
