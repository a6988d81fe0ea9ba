"""Warm step workers for the local runner.

Under kfp.local every task is a fresh Python process, and importing torch, transformers and
the three model classes costs it 2-4 s of CPU before the step does anything: most of a tiny
step, and most of the gap between a round under the local runner and the same steps called
in one process (docs/performance.md). The local runner therefore starts one *step server*
per run: a single-threaded process that imports those modules once, then forks a child for
every step call it receives. Each KFP task is still its own process, started by kfp.local
with its own inputs, outputs, logs and exit status; its component (flminillm.invoke.call)
sends the call over a Unix socket, with the task's
environment, working directory and stdout/stderr file descriptors, and the forked child runs
the step with them and sends back the result or the error. The results are those of a task
that ran the step itself (tests/test_stepserver.py checks digests against direct calls).

This module is only the server and its client: what a call means (which recipe, which
config) is the handler's business, given by the invocation layer (flminillm.invoke, whose
`python -m flminillm.invoke serve` is the server process). On a cluster nothing changes: no
server runs, FLMINILLM_STEP_SERVER is unset, and every step runs in its task's own process.
`runner.warm_steps: false` turns the server off locally.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ENV = "FLMINILLM_STEP_SERVER"
_HEADER = struct.Struct("!Q")
_READY = "flminillm step server ready"


class RemoteStepError(RuntimeError):
    """A step that failed in the step server's child: the child's error and traceback."""


def _preload(modules: Sequence[str]) -> None:
    """What every call imports: done once here, inherited by every forked child."""
    import importlib

    for name in modules:
        importlib.import_module(name)


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
def _run_call(conn: socket.socket, handler: Callable[[dict], Any]) -> None:
    """In the forked child: take the task's environment and output, run the call, reply."""
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
    # the task's stdout and stderr are one pipe: stdout a line at a time, as stderr is, so
    # that the task's log reads in the order the step wrote it
    sys.stdout.reconfigure(line_buffering=True)
    try:
        reply = {"ok": True, "result": handler(request["payload"])}
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


def serve(
    path: str, parent: int | None, handler: Callable[[dict], Any], preload: Sequence[str] = ()
) -> None:
    """Listen on the Unix socket `path`; fork a child per call, which runs
    `handler(payload)`. Imports `preload` first. Exits when `parent` dies."""
    _preload(preload)
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
                _run_call(conn, handler)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        conn.close()


@contextlib.contextmanager
def step_server(enabled: bool = True, module: str = "flminillm.invoke") -> Iterator[str | None]:
    """Start a step server (`python -m <module> serve PATH PARENT`) for the duration of a
    local run and point FLMINILLM_STEP_SERVER at it (restored afterwards); yields its socket
    path, or None when disabled."""
    if not enabled or os.environ.get(ENV):
        yield os.environ.get(ENV) if enabled else None
        return
    tmp = tempfile.mkdtemp(prefix="flminillm-steps-")
    path = str(Path(tmp) / "steps.sock")
    try:  # the server's own messages (import warnings) go where this process's stderr goes
        stderr = sys.stderr if sys.stderr.fileno() >= 0 else None
    except (AttributeError, OSError, ValueError):
        stderr = None
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "serve", path, str(os.getpid())],
        stdout=subprocess.PIPE,
        stderr=stderr,
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
def call(path: str, payload: dict) -> Any:
    """Run the server's handler on `payload` in a fork of the step server at `path`, with
    this process's environment, working directory, stdout and stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        request = {"payload": payload, "env": dict(os.environ), "cwd": os.getcwd()}
        _send(conn, request, fds=[1, 2])  # the task's own stdout and stderr
        try:
            reply, _ = _recv(conn)
        except ConnectionError as e:
            raise RemoteStepError(f"{_what(payload)}: the step server's child died ({e})") from None
    if not reply["ok"]:
        raise RemoteStepError(f"{_what(payload)} failed in the step server: {reply['error']}")
    return reply["result"]


def _what(payload: dict) -> str:
    return str(payload.get("step", "call"))
