"""Warm step workers for the local runner.

Under kfp.local every task is a fresh Python process, and importing torch, transformers and
the three model classes costs it 2-4 s of CPU before the step does anything: most of a tiny
step, and most of the gap between a round under the local runner and the same steps called
in one process (docs/performance.md). The local runner therefore starts one *step server*
per run: a single-threaded process that imports those modules once, then forks a child for
every step call it receives. Each KFP task is still its own process, started by kfp.local
with its own inputs, outputs, logs and exit status; its step function (wrapped by
`forwarded` in flminillm.steps) sends the call over a Unix socket, with the task's
environment, working directory and stdout/stderr file descriptors, and the forked child runs
the step with them and sends back the result or the error. The results are those of a task
that ran the step itself (tests/test_stepserver.py checks digests against direct calls).

On a cluster nothing changes: no server runs, FLMINILLM_STEP_SERVER is unset, and every step
runs in its task's own process. `runner.warm_steps: false` turns the server off locally.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

ENV = "FLMINILLM_STEP_SERVER"
_HEADER = struct.Struct("!Q")
_READY = "flminillm step server ready"


class RemoteStepError(RuntimeError):
    """A step that failed in the step server's child: the child's error and traceback."""


def _preload() -> None:
    """What every step imports: done once here, inherited by every forked child."""
    import importlib

    for name in (
        "torch",
        "transformers",
        "transformers.models.auto.tokenization_auto",
        "transformers.tokenization_utils_tokenizers",
        "transformers.integrations.accelerate",  # imports deepspeed, which imports mlflow
        "deepspeed",
        "mlflow",
        "flminillm.data",
        "flminillm.distill",
        "flminillm.distill_step",
        "flminillm.engine",
        "flminillm.evaluation",
        "flminillm.generation",
        "flminillm.models",
        "flminillm.steps",
        "flminillm.store",
        "flminillm.tokenizer",
        "flminillm.training",
    ):
        importlib.import_module(name)
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM  # noqa: F401


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError(f"step server connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _send(conn: socket.socket, payload: dict, fds: list[int] | None = None) -> None:
    body = json.dumps(payload).encode()
    header = _HEADER.pack(len(body))
    if fds:
        socket.send_fds(conn, [header], fds)
    else:
        conn.sendall(header)
    conn.sendall(body)


def _recv(conn: socket.socket, want_fds: int = 0) -> tuple[dict, list[int]]:
    fds: list[int] = []
    if want_fds:
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, want_fds)
        if len(header) < _HEADER.size:
            header += _recv_exact(conn, _HEADER.size - len(header))
    else:
        header = _recv_exact(conn, _HEADER.size)
    (n,) = _HEADER.unpack(header)
    return json.loads(_recv_exact(conn, n)), fds


# ----------------------------------------------------------------------------------------
# the server
# ----------------------------------------------------------------------------------------
def _run_call(conn: socket.socket) -> None:
    """In the forked child: take the task's environment and output, run the step, reply."""
    request, fds = _recv(conn, want_fds=2)
    env = dict(request["env"])
    env.pop(ENV, None)  # the child runs the step itself
    os.environ.clear()
    os.environ.update(env)
    os.chdir(request["cwd"])
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, target in zip(fds, (1, 2), strict=True):
        os.dup2(fd, target)
        os.close(fd)
    from flminillm import steps

    fn = getattr(steps, request["fn"])
    fn = getattr(fn, "__wrapped__", fn)
    try:
        reply = {"ok": True, "result": fn(*request["args"], **request["kwargs"])}
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the task
        traceback.print_exc()
        reply = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
    sys.stdout.flush()
    sys.stderr.flush()
    _send(conn, reply)


def serve(path: str, parent: int | None = None) -> None:
    """Listen on the Unix socket `path`; fork a child per call. Exits when `parent` dies."""
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    sock.settimeout(1.0)
    print(_READY, flush=True)
    while True:
        if parent is not None and os.getppid() != parent:
            return  # the run that started us is gone
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # steps may wait on subprocesses
                _run_call(conn)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        conn.close()


@contextlib.contextmanager
def step_server(enabled: bool = True) -> Iterator[str | None]:
    """Start a step server for the duration of a local run and point FLMINILLM_STEP_SERVER
    at it (restored afterwards); yields its socket path, or None when disabled."""
    if not enabled or os.environ.get(ENV):
        yield os.environ.get(ENV) if enabled else None
        return
    tmp = tempfile.mkdtemp(prefix="flminillm-steps-")
    path = str(Path(tmp) / "steps.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flminillm.stepserver", path, str(os.getpid())],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = "-"
        while line and _READY not in line:  # libraries may print first; "" if it died
            line = proc.stdout.readline() if proc.stdout else ""
            if line and _READY not in line:
                sys.stderr.write(line)
        if not line:
            raise RuntimeError(
                f"the step server did not start (exit code {proc.poll()}); set "
                "runner.warm_steps: false to run every step in its own task process"
            )
        os.environ[ENV] = path
        yield path
    finally:
        os.environ.pop(ENV, None)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


# ----------------------------------------------------------------------------------------
# the task side
# ----------------------------------------------------------------------------------------
def call(path: str, fn: str, args: tuple, kwargs: dict) -> object:
    """Run steps.<fn>(*args, **kwargs) in a child of the step server at `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        request = {
            "fn": fn,
            "args": list(args),
            "kwargs": kwargs,
            "env": dict(os.environ),
            "cwd": os.getcwd(),
        }
        _send(conn, request, fds=[1, 2])  # the task's own stdout and stderr
        try:
            reply, _ = _recv(conn)
        except ConnectionError as e:
            raise RemoteStepError(f"{fn}: the step server's child died ({e})") from None
    if not reply["ok"]:
        raise RemoteStepError(f"{fn} failed in the step server: {reply['error']}")
    return reply["result"]


def forwarded(fn: Callable) -> Callable:
    """Decorate a step: with FLMINILLM_STEP_SERVER set, run it in a warm forked child."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        path = os.environ.get(ENV)
        if not path:
            return fn(*args, **kwargs)
        try:
            return call(path, fn.__name__, args, kwargs)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            print(f"step server at {path} unreachable ({e}); running {fn.__name__} here",
                  file=sys.stderr)  # fmt: skip
            return fn(*args, **kwargs)

    return wrapper


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
