"""The embedded default: run the federation under kfp.local's SubprocessRunner."""

import builtins
import contextlib
import functools
import json
import os
import time
from pathlib import Path

from flminillm.config import Config

_ORIGINAL_PRINT = builtins.print


def patch_kfp_local_loop_inputs() -> None:
    """Work around a kfp.local 2.17.3 bug: inside a ParallelFor, every input that comes
    from an upstream task's output is replaced by the loop item (task_spec_utils,
    create_parameter_loop_iteration_task_spec). We restore those inputs, except the
    iterator's own items input. The compiled pipeline is unaffected; this only fixes
    the local orchestrator. tests/test_pipelines.py checks the behaviour."""
    from kfp.local.orchestrator import task_spec_utils

    original = task_spec_utils.create_parameter_loop_iteration_task_spec
    if getattr(original, "_flminillm_patched", False):
        return

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

    patched._flminillm_patched = True
    task_spec_utils.create_parameter_loop_iteration_task_spec = patched


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

    indented_print._flminillm_patched = True
    logging_utils.indented_print = indented_print
    builtins.print = _ORIGINAL_PRINT


def init_local(pipeline_root: str | Path, cache: bool) -> None:
    from kfp import local

    root = Path(pipeline_root)
    root.mkdir(parents=True, exist_ok=True)
    patch_kfp_local_loop_inputs()
    patch_kfp_local_indented_print()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=cache,
        cache_root=str(root / ".kfp_cache"),
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
    with deployment_env(cfg), warm_steps(cfg.runner.warm_steps):
        task = pipeline(
            experiment_json=cfg.experiment_json(),
            run_label=run_label,
            run_started=run_started or time.time(),
            run_tags=json.dumps(extra_tags or {}),
        )
    return json.loads(task.output)
