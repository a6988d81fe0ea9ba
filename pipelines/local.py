"""The embedded default: run the federation under kfp.local's SubprocessRunner."""

import builtins
import contextlib
import functools
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flminillm.config import Config

_ORIGINAL_PRINT = builtins.print


def _replace(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    """`owner.name = make(original)`, once per process: a replacement is marked, and a
    marked one is left as it is (every patch below goes through here)."""
    original = getattr(owner, name)
    if getattr(original, "_flminillm_patched", False):
        return
    new = make(original)
    new._flminillm_patched = True
    setattr(owner, name, new)


def patch_kfp_local_loop_inputs() -> None:
    """Work around a kfp.local 2.17.3 bug: inside a ParallelFor, every input that comes
    from an upstream task's output is replaced by the loop item (task_spec_utils,
    create_parameter_loop_iteration_task_spec). We restore those inputs, except the
    iterator's own items input. The compiled pipeline is unaffected; this only fixes
    the local orchestrator. tests/test_pipelines.py checks the behaviour."""
    from kfp.local.orchestrator import task_spec_utils

    def make(original):
        @functools.wraps(original)
        def patched(original_task_spec, loop_item, loop_task_name):
            spec = original(original_task_spec, loop_item, loop_task_name)
            items_param = None
            if original_task_spec.WhichOneof("iterator") == "parameter_iterator":
                items_param = original_task_spec.parameter_iterator.items.input_parameter
            for name, inp in original_task_spec.inputs.parameters.items():
                if inp.HasField("task_output_parameter") and name != items_param:
                    spec.inputs.parameters[name].CopyFrom(inp)
            return spec

        return patched

    _replace(task_spec_utils, "create_parameter_loop_iteration_task_spec", make)


def patch_kfp_local_indented_print() -> None:
    """Work around a kfp.local 2.17.3 bug: `logging_utils.indented_print` replaces
    builtins.print with a wrapper around whatever print is at that moment, for every task.
    Tasks that run in parallel threads restore each other's wrappers, so the chain of
    wrappers grows with every task: in a long run (or a test session) each line a task
    prints walks hundreds of wrappers, and a federation slows down as it goes. Indentation
    is cosmetic; we leave print alone (and undo a chain left by an earlier run)."""
    import builtins

    from kfp.local import logging_utils

    if getattr(logging_utils.indented_print, "_flminillm_patched", False):
        return

    @contextlib.contextmanager
    def indented_print(num_spaces: int = 4):
        yield

    _replace(logging_utils, "indented_print", lambda original: indented_print)
    builtins.print = _ORIGINAL_PRINT


def patch_kfp_local_logger_context() -> None:
    """Work around a kfp.local 2.17.3 bug: `logging_utils.local_logger_context`, entered by
    every task, saves the root logger's handlers, installs its own and restores the saved
    ones on exit. Tasks that run in parallel threads save each other's handlers, so the root
    logger can be left with a handler of a finished task (bound to the stdout of that
    moment), and an error a thread logs while another task runs goes wherever that task's
    handler points. Here kfp.local's own context is entered by the first task in and left
    by the last one out."""
    from kfp.local import logging_utils

    def make(original):
        lock, held = threading.Lock(), []  # held: [kfp.local's context, tasks inside it]

        @contextlib.contextmanager
        def local_logger_context():
            with lock:
                if not held:
                    context = original()
                    context.__enter__()
                    held[:] = [context, 0]
                held[1] += 1
            try:
                yield
            finally:
                with lock:
                    held[1] -= 1
                    if held[1] == 0:
                        context, held[:] = held[0], []
                        context.__exit__(None, None, None)

        return local_logger_context

    _replace(logging_utils, "local_logger_context", make)


def patch_kfp_local_task_output() -> None:
    """Work around a kfp.local 2.17.3 bug: the SubprocessRunner reads a task's output (its
    stdout and stderr, one pipe) as strict UTF-8 in the orchestrator's thread, so output it
    cannot decode raises there and fails the pipeline, not the task (in a ParallelFor, as
    "Inner task failed: 'for-loop-1-iteration-1'" and nothing else). Nothing of ours is
    known to print such bytes (stop 41's red CI had another cause); a library or a model's
    text might. The output is only a log; undecodable bytes become U+FFFD."""
    import subprocess

    from kfp.local import subprocess_task_handler

    def run_local_subprocess(full_command: list[str], env_vars: dict | None = None) -> int:
        env = {**os.environ, **env_vars} if env_vars else None
        with subprocess.Popen(
            full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            encoding="utf-8", errors="replace", bufsize=1, env=env,
        ) as process:  # fmt: skip
            if process.stdout:
                for line in iter(process.stdout.readline, ""):
                    print(line, end="")
                print("\n")
            return process.wait()

    _replace(subprocess_task_handler, "run_local_subprocess", lambda original: run_local_subprocess)


@dataclass(frozen=True)
class TaskError:
    """An exception raised inside kfp.local's orchestrator while it ran a task."""

    task: str
    error: str
    traceback: str


_TASK_ERRORS: list[TaskError] = []


def patch_kfp_local_task_errors() -> None:
    """Work around a kfp.local 2.17.3 gap: an exception raised while the orchestrator runs a
    task (not the task's own failure: kfp.local's code around it, or ours that observes it)
    inside a ParallelFor fails the pipeline with the iteration's name only ("Inner task
    failed: 'for-loop-1-iteration-1'"), the exception itself logged from a worker thread.
    Here the innermost task's exception is recorded, for `task_errors` to report."""
    from kfp.local.orchestrator import enhanced_dag_orchestrator as dag

    def make(original):
        @functools.wraps(original)
        def execute_task(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except Exception as e:
                if not getattr(e, "_flminillm_recorded", False):  # the innermost task only
                    name = kwargs.get("task_name", args[0] if args else "?")
                    _TASK_ERRORS.append(
                        TaskError(str(name), f"{type(e).__name__}: {e}", traceback.format_exc())
                    )
                    e._flminillm_recorded = True
                raise

        return execute_task

    _replace(dag, "execute_task", make)


@contextlib.contextmanager
def task_errors() -> Iterator[None]:
    """A pipeline that fails in the block with orchestrator exceptions (TaskError) recorded is
    re-raised with them in its message, their tracebacks printed to stdout (the run's log):
    kfp.local's own message names only the task around them."""
    patch_kfp_local_task_errors()
    start = len(_TASK_ERRORS)
    try:
        yield
    except Exception as err:
        seen = _TASK_ERRORS[start:]
        if not seen:
            raise
        for e in seen:
            print(f"kfp.local raised in task {e.task}:\n{e.traceback}")
        what = "; ".join(f"{e.task} raised {e.error}" for e in seen)
        raise RuntimeError(f"{err} ({what})") from err
    finally:
        del _TASK_ERRORS[start:]


@dataclass(frozen=True)
class TaskEvent:
    """A task of the local runner has finished: which step, with which arguments (round,
    party), how (SUCCESS or FAILURE), in how many seconds, and whether from the cache."""

    step: str
    arguments: dict[str, Any]
    status: str
    seconds: float
    cached: bool

    @property
    def party(self) -> str:
        a = self.arguments
        if "teacher_id" in a:  # who teaches whom
            student = json.loads(a.get("rollouts_json") or "{}").get("party", "?")
            return f"{a['teacher_id']}->{student}"
        for key in ("party_id", "client_id", "student_id"):
            if key in a:
                return str(a[key])
        return ""

    @property
    def round(self) -> int | None:
        r = self.arguments.get("round_index")
        return int(r) if r is not None else (0 if self.step in ("init_model", "prepare") else None)


_OBSERVERS: list[Callable[[TaskEvent], None]] = []
_CACHE_HIT = threading.local()


@contextlib.contextmanager
def observing_tasks(observer: Callable[[TaskEvent], None]) -> Iterator[None]:
    """Call `observer` with a TaskEvent whenever a task of the local runner finishes (from
    the thread that ran it) while the block runs."""
    patch_kfp_local_task_events()
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def _step_of(component_name: str) -> str:
    """comp-generate-2 -> generate (components are named after the recipes)."""
    name = component_name.removeprefix("comp-")
    base, _, suffix = name.rpartition("-")
    return (base if suffix.isdigit() and base else name).replace("-", "_")


def patch_kfp_local_task_events() -> None:
    """Wrap kfp.local's execution of one task (and its cache lookup) so that
    `observing_tasks` sees every finished task, cache hits included. Local runner only."""
    from kfp.local import cache as cache_module
    from kfp.local.orchestrator import task_executor
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    if getattr(task_executor.execute_single_task, "_flminillm_patched", False):
        return
    original = task_executor.execute_single_task
    original_get = cache_module.LocalCache.get

    @functools.wraps(original_get)
    def get(self, key):
        out = original_get(self, key)
        _CACHE_HIT.value = out is not None
        return out

    @functools.wraps(original)
    def execute(*args, **kwargs):
        _CACHE_HIT.value = False
        started = time.time()
        outputs, task_status = original(*args, **kwargs)
        if _OBSERVERS:
            spec = kwargs["task_spec"]
            arguments = OrchestratorUtils.make_task_arguments(
                task_inputs_spec=spec.inputs, io_store=kwargs["io_store"]
            )
            event = TaskEvent(
                step=_step_of(spec.component_ref.name), arguments=arguments,
                status=getattr(task_status, "name", str(task_status)),
                seconds=time.time() - started, cached=bool(getattr(_CACHE_HIT, "value", False)),
            )  # fmt: skip
            for observer in list(_OBSERVERS):
                try:  # progress and MLflow lines: never the task's failure
                    observer(event)
                except Exception as e:  # noqa: BLE001
                    print(f"warning: task observer {getattr(observer, '__name__', observer)} "
                          f"failed on {event.step}: {type(e).__name__}: {e}", file=sys.stderr)  # fmt: skip
        return outputs, task_status

    cache_module.LocalCache.get = get
    _replace(task_executor, "execute_single_task", lambda original: execute)


def cache_dir(pipeline_root: str | Path) -> Path:
    """Where the local runner's task cache lives."""
    return Path(pipeline_root) / ".kfp_cache"


def forget_cached(pipeline_root: str | Path, predicate: Callable[[dict], bool]) -> int:
    """Delete the task cache entries (their outputs, a dict) that `predicate` selects, so
    that those tasks run again; returns how many."""
    root = cache_dir(pipeline_root)
    n = 0
    for entry in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            outputs = json.loads(entry.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(outputs, dict) and predicate(outputs):
            entry.unlink(missing_ok=True)
            n += 1
    return n


def dropped_out(outputs: dict) -> bool:
    """A task whose output says that a client dropped out (a success to KFP)."""
    return any(isinstance(v, str) and '"dropped": "' in v for v in outputs.values())


def mentions_any(digests: Collection[str]) -> Callable[[dict], bool]:
    """A predicate: the outputs mention one of `digests`."""
    return lambda outputs: any(d in json.dumps(outputs) for d in digests)


def init_local(pipeline_root: str | Path, cache: bool) -> None:
    from kfp import local

    root = Path(pipeline_root)
    root.mkdir(parents=True, exist_ok=True)
    patch_kfp_local_loop_inputs()
    patch_kfp_local_indented_print()
    patch_kfp_local_logger_context()
    patch_kfp_local_task_errors()
    patch_kfp_local_task_output()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=cache,
        cache_root=str(cache_dir(root)),
    )


def run_local(
    cfg: Config,
    run_label: str = "",
    run_started: float | None = None,
    extra_tags: dict[str, str] | None = None,
) -> dict:
    """Run the whole federation pipeline in local subprocesses; return the final manifest.
    The tasks inherit this process's environment: the deployment (FLMINILLM_DEPLOYMENT) and
    their torch thread budget come with it."""
    from flminillm.invoke import THREADS_ENV, deployment_env, warm_steps
    from pipelines.federation import build_federation_pipeline

    init_local(cfg.runner.pipeline_root, cfg.runner.cache)
    par = cfg.runner.local_parallelism
    # share the cores between the tasks that run at once instead of oversubscribing them
    os.environ[THREADS_ENV] = str(max(1, (os.cpu_count() or 1) // par))
    pipeline = build_federation_pipeline(cfg, parallelism=par)
    # every task still runs in its own process; its step runs in a warm fork (stepserver.py)
    with deployment_env(cfg), warm_steps(cfg.runner.warm_steps), task_errors():
        task = pipeline(
            experiment_json=cfg.experiment_json(),
            run_label=run_label,
            run_started=run_started or time.time(),
            run_tags=json.dumps(extra_tags or {}),
        )
    return json.loads(task.output)
