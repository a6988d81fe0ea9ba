"""The embedded default: run the federation under kfp.local's SubprocessRunner."""

import functools
import json
import os
import time
from pathlib import Path

from flminillm.config import ExperimentConfig


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


def init_local(pipeline_root: str | Path, cache: bool) -> None:
    from kfp import local

    root = Path(pipeline_root)
    root.mkdir(parents=True, exist_ok=True)
    patch_kfp_local_loop_inputs()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=cache,
        cache_root=str(root / ".kfp_cache"),
    )


def run_local(
    cfg: ExperimentConfig,
    run_label: str = "",
    run_started: float | None = None,
    extra_tags: dict[str, str] | None = None,
) -> dict:
    """Run the whole federation pipeline in local subprocesses; return the final manifest."""
    from flminillm.stepserver import step_server
    from pipelines.federation import build_federation_pipeline

    init_local(cfg.runner.pipeline_root, cfg.runner.cache)
    par = cfg.runner.local_parallelism
    # share the cores between the tasks that run at once instead of oversubscribing them
    threads = str(max(1, (os.cpu_count() or 1) // par))
    os.environ["FLMINILLM_TORCH_THREADS"] = threads
    pipeline = build_federation_pipeline(cfg, parallelism=par)
    # every task still runs in its own process; its step runs in a warm fork (stepserver.py)
    with step_server(cfg.runner.warm_steps):
        task = pipeline(
            config_json=cfg.to_json(),
            run_label=run_label,
            run_started=run_started or time.time(),
            run_tags=json.dumps(extra_tags or {}),
        )
    return json.loads(task.output)
