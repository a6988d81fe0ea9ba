"""The round pipeline and the federation pipeline that chains R rounds.

sample_clients -> ParallelFor client: local_sft -> client teach  (server rollouts)
  server generate -----------------------------^        |
                      server distill (Collected) <-------+
  ParallelFor client: client generate -> server teach -> client distill
                      evaluate (Collected) -> round manifest
"""

from collections.abc import Callable

from kfp import dsl

from components import RoundComponents, build_components
from flminillm.config import ExperimentConfig

# Called on every task a pipeline creates, with the step's name (prepare, list_parties,
# init_model, sample_clients, local_sft, generate, teach, distill, evaluate, track), e.g. by
# pipelines.cluster to set resources, retries and secrets. None (the local runner): no change.
TaskHook = Callable[[dsl.PipelineTask, str], None]


def _hooked(hook: TaskHook | None, task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
    if hook is not None:
        hook(task, step)
    return task


def build_round_pipeline(
    cfg: ExperimentConfig,
    ops: RoundComponents | None = None,
    parallelism: int = 0,
    task_hook: TaskHook | None = None,
    pipeline_root: str | None = None,
):
    """A pipeline for one round: (config, round manifest, round index) -> next manifest.
    `parallelism` bounds the clients processed at once (0 = no bound); `task_hook` is
    called on every task with its step name; `pipeline_root` becomes the compiled
    pipeline's defaultPipelineRoot."""
    ops = ops or build_components()
    server = cfg.server.id

    @dsl.pipeline(
        name="fl-minillm-round",
        description="One FL-MiniLLM communication round.",
        pipeline_root=pipeline_root,
    )
    def fl_minillm_round(config_json: str, state_json: str, round_index: int) -> str:
        sampled = ops.sample_clients(config_json=config_json, round_index=round_index)
        sampled.set_display_name("sample_clients")
        _hooked(task_hook, sampled, "sample_clients")
        server_gen = ops.generate(
            config_json=config_json, state_json=state_json, round_index=round_index,
            party_id=server, models_json="",
        )  # fmt: skip
        server_gen.set_display_name("server_generate")
        _hooked(task_hook, server_gen, "generate")
        # 1. clients teach the server
        with dsl.ParallelFor(
            sampled.output, name="clients-teach", parallelism=parallelism
        ) as client:
            sft = ops.local_sft(
                config_json=config_json, state_json=state_json, round_index=round_index,
                client_id=client,
            )  # fmt: skip
            sft.set_display_name("local_sft")
            _hooked(task_hook, sft, "local_sft")
            client_teach = ops.teach(
                config_json=config_json, state_json=state_json, round_index=round_index,
                teacher_id=client, models_json=sft.output, rollouts_json=server_gen.output,
            )  # fmt: skip
            client_teach.set_display_name("client_teach")
            _hooked(task_hook, client_teach, "teach")
        server_distill = ops.distill(
            config_json=config_json, state_json=state_json, round_index=round_index,
            student_id=server, models_json="", rollouts_json=server_gen.output,
            teachings=dsl.Collected(client_teach.output),
        )  # fmt: skip
        server_distill.set_display_name("server_distill")
        _hooked(task_hook, server_distill, "distill")
        # 2. the server teaches the clients
        with dsl.ParallelFor(
            sampled.output, name="server-teaches", parallelism=parallelism
        ) as client:
            client_gen = ops.generate(
                config_json=config_json, state_json=state_json, round_index=round_index,
                party_id=client, models_json=server_distill.output,
            )  # fmt: skip
            client_gen.set_display_name("client_generate")
            _hooked(task_hook, client_gen, "generate")
            server_teach = ops.teach(
                config_json=config_json, state_json=state_json, round_index=round_index,
                teacher_id=server, models_json=server_distill.output,
                rollouts_json=client_gen.output,
            )  # fmt: skip
            server_teach.set_display_name("server_teach")
            _hooked(task_hook, server_teach, "teach")
            client_distill = ops.distill_one(
                config_json=config_json, state_json=state_json, round_index=round_index,
                student_id=client, models_json=server_distill.output,
                rollouts_json=client_gen.output, teaching=server_teach.output,
            )  # fmt: skip
            client_distill.set_display_name("client_distill")
            _hooked(task_hook, client_distill, "distill")
        evaluation = ops.evaluate(
            config_json=config_json, state_json=state_json, round_index=round_index,
            update=server_distill.output, updates=dsl.Collected(client_distill.output),
        )  # fmt: skip
        evaluation.set_display_name("evaluate")
        _hooked(task_hook, evaluation, "evaluate")
        return evaluation.output

    return fl_minillm_round


def build_federation_pipeline(
    cfg: ExperimentConfig,
    ops: RoundComponents | None = None,
    parallelism: int = 0,
    task_hook: TaskHook | None = None,
    pipeline_root: str | None = None,
):
    """prepare -> init models (pre-train) -> evaluate (round 0) -> R rounds -> track.
    `task_hook` and `pipeline_root`: as in build_round_pipeline."""
    ops = ops or build_components()
    round_pipeline = build_round_pipeline(cfg, ops, parallelism, task_hook)

    @dsl.pipeline(
        name="fl-minillm-federation",
        description="A whole FL-MiniLLM federation.",
        pipeline_root=pipeline_root,
    )
    def fl_minillm_federation(
        config_json: str = cfg.to_json(),
        run_label: str = "",
        run_started: float = 0.0,
        run_tags: str = "{}",
    ) -> str:
        prep = ops.prepare(config_json=config_json)
        _hooked(task_hook, prep, "prepare")
        # a runtime list: kfp.local resolves upstream outputs wrongly inside a ParallelFor
        # over a literal list (seen with kfp 2.17.3)
        parties = ops.list_parties(config_json=config_json)
        _hooked(task_hook, parties, "list_parties")
        with dsl.ParallelFor(parties.output, name="parties", parallelism=parallelism) as party:
            init = ops.init_model(config_json=config_json, state_json=prep.output, party_id=party)
            _hooked(task_hook, init, "init_model")
        state = ops.evaluate(
            config_json=config_json, state_json=prep.output, round_index=0, update="",
            updates=dsl.Collected(init.output),
        )  # fmt: skip
        state.set_display_name("evaluate-round-0")
        _hooked(task_hook, state, "evaluate")
        for r in range(1, cfg.rounds + 1):
            state = round_pipeline(config_json=config_json, state_json=state.output, round_index=r)
            state.set_display_name(f"round-{r}")
        tracked = ops.track(
            config_json=config_json, state_json=state.output, run_label=run_label,
            run_started=run_started, run_tags=run_tags,
        )  # fmt: skip
        _hooked(task_hook, tracked, "track")
        tracked.set_caching_options(False)  # logs to MLflow on every run
        return state.output

    return fl_minillm_federation
