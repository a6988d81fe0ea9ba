"""The round pipeline and the federation pipeline that chains R rounds, built from the
wiring in flminillm.rounds (the in-process runner is built from the same wiring): each
`Task` becomes a KFP task of its step's component, each `Loop` a ParallelFor, each `Gather`
a Collected. Wiring only; no computation.
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl

from components import RoundComponents, build_components
from flminillm.config import ExperimentConfig
from flminillm.rounds import (
    ITEM,
    ROUND_RESULT,
    ROUND_TASKS,
    SERVER,
    SETUP,
    SETUP_RESULT,
    Gather,
    Out,
    Param,
    Task,
    Wiring,
)
from flminillm.steps import STEPS

# Called on every task a pipeline creates, with the step's name, e.g. by pipelines.cluster
# to set resources, retries, secrets and the deployment. None (the local runner): no change.
TaskHook = Callable[[dsl.PipelineTask, str], None]


def add_tasks(
    wiring: Wiring,
    ops: RoundComponents,
    experiment_json: Any,
    params: dict[str, Any],
    server: str,
    parallelism: int = 0,
    task_hook: TaskHook | None = None,
) -> dict[str, dsl.PipelineTask]:
    """Create `wiring`'s tasks inside the pipeline being defined; returns them by name."""
    made: dict[str, dsl.PipelineTask] = {}

    def arg(value: Any, item: Any) -> Any:
        if isinstance(value, Param):
            return params[value.name]
        if isinstance(value, Out):
            return made[value.task].output
        if isinstance(value, Gather):
            return dsl.Collected(made[value.task].output)
        if value is ITEM:
            return item
        if value is SERVER:
            return server
        return value

    def add(task: Task, item: Any = None) -> None:
        kwargs = {k: arg(v, item) for k, v in task.args.items()}
        t = getattr(ops, task.step)(experiment_json=experiment_json, **kwargs)
        t.set_display_name(task.name)
        if task_hook is not None:
            task_hook(t, STEPS[task.step].settings_name)
        made[task.name] = t

    for entry in wiring:
        if isinstance(entry, Task):
            add(entry)
            continue
        over = made[entry.over].output
        with dsl.ParallelFor(over, name=entry.name, parallelism=parallelism) as item:
            for t in entry.body:
                add(t, item)
    return made


def build_round_pipeline(
    cfg: ExperimentConfig,
    ops: RoundComponents | None = None,
    parallelism: int = 0,
    task_hook: TaskHook | None = None,
    pipeline_root: str | None = None,
):
    """A pipeline for one round: (experiment, round manifest, round index) -> next manifest.
    `parallelism` bounds the clients processed at once (0 = no bound); `task_hook` is
    called on every task with its step name; `pipeline_root` becomes the compiled
    pipeline's defaultPipelineRoot."""
    ops = ops or build_components()

    @dsl.pipeline(
        name="fl-minillm-round",
        description="One FL-MiniLLM communication round.",
        pipeline_root=pipeline_root,
    )
    def fl_minillm_round(experiment_json: str, state_json: str, round_index: int) -> str:
        made = add_tasks(
            ROUND_TASKS, ops, experiment_json,
            {"state_json": state_json, "round_index": round_index}, cfg.server.id,
            parallelism, task_hook,
        )  # fmt: skip
        return made[ROUND_RESULT].output

    return fl_minillm_round


def build_federation_pipeline(
    cfg: ExperimentConfig,
    ops: RoundComponents | None = None,
    parallelism: int = 0,
    task_hook: TaskHook | None = None,
    pipeline_root: str | None = None,
    exit_op=None,
):
    """Set-up (prepare, init models, evaluate round 0) -> R rounds -> track.
    `task_hook` and `pipeline_root`: as in build_round_pipeline. `exit_op` (the cluster's,
    components/exit.py): a component run when the pipeline ends however it ends, which
    closes the federation's MLflow run when the pipeline failed (dsl.ExitHandler)."""
    ops = ops or build_components()
    round_pipeline = build_round_pipeline(cfg, ops, parallelism, task_hook)

    def federation(experiment_json, run_label, run_started, run_tags):
        made = add_tasks(SETUP, ops, experiment_json, {}, cfg.server.id, parallelism, task_hook)
        if cfg.data.source == "files":  # a file may change under the same URI: read it again
            made["prepare"].set_caching_options(False)  # (what follows stays cached if not)
        state = made[SETUP_RESULT]
        for r in range(1, cfg.rounds + 1):
            state = round_pipeline(
                experiment_json=experiment_json, state_json=state.output, round_index=r
            )
            state.set_display_name(f"round-{r}")
        tracked = ops.track(
            experiment_json=experiment_json, state_json=state.output, run_label=run_label,
            run_started=run_started, run_tags=run_tags,
        )  # fmt: skip
        tracked.set_display_name("track")
        if task_hook is not None:
            task_hook(tracked, "track")
        tracked.set_caching_options(False)  # logs to MLflow on every run
        return state.output

    pipeline = dsl.pipeline(
        name="fl-minillm-federation",
        description="A whole FL-MiniLLM federation.",
        pipeline_root=pipeline_root,
    )
    if exit_op is None:

        @pipeline
        def fl_minillm_federation(
            experiment_json: str = cfg.experiment_json(),
            run_label: str = "",
            run_started: float = 0.0,
            run_tags: str = "{}",
        ) -> str:
            return federation(experiment_json, run_label, run_started, run_tags)

        return fl_minillm_federation

    @pipeline
    def fl_minillm_federation_closed(
        experiment_json: str = cfg.experiment_json(),
        run_label: str = "",
        run_started: float = 0.0,
        run_tags: str = "{}",
    ):  # no output: KFP takes none from inside an exit handler (the store has the state)
        closing = exit_op(experiment_json=experiment_json, run_started=run_started)
        closing.set_display_name("close-run")
        if task_hook is not None:
            task_hook(closing, "track")  # the settings (and secrets) of the step that logs
        closing.set_caching_options(False)  # it reads how this very run ended
        with dsl.ExitHandler(closing, name="federation"):
            federation(experiment_json, run_label, run_started, run_tags)

    return fl_minillm_federation_closed
