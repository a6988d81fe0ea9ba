"""The KFP side: the local-runner patch, and compiled YAML that loads back."""

from typing import List

import yaml
from kfp import dsl


@dsl.component
def _hello() -> str:
    return "hello"


@dsl.component
def _items() -> List[str]:
    return ["u", "v"]


@dsl.component
def _pair(x: str, p: str) -> str:
    return f"[{x}|{p}]"


@dsl.component
def _join(xs: List[str]) -> str:
    return ",".join(xs)


@dsl.pipeline
def _loop_pipeline() -> str:
    h = _hello()
    items = _items()
    with dsl.ParallelFor(items.output) as p:
        t = _pair(x=h.output, p=p)
        t2 = _pair(x=t.output, p=h.output)
    return _join(xs=dsl.Collected(t2.output)).output


def test_local_runner_resolves_upstream_outputs_inside_parallel_for(tmp_path):
    """Without pipelines.local's patches, kfp.local 2.17.3 passes the loop item instead of
    `hello` to both tasks in the loop (the result would be [[u|u]|u],[[v|v]|v]), and wraps
    builtins.print once per task, a chain that parallel tasks leave behind and that slows
    every later print (a long federation, a test session) more and more."""
    import builtins

    from pipelines.local import init_local

    before = builtins.print
    init_local(tmp_path, cache=False)
    assert _loop_pipeline().output == "[[hello|u]|hello],[[hello|v]|hello]"
    assert builtins.print is before


def test_local_runner_reports_what_raised_inside_a_parallel_for(tmp_path, monkeypatch):
    """kfp.local 2.17.3 fails a pipeline whose orchestrator raises around one loop iteration's
    task with the iteration's name only ("Inner task failed: 'for-loop-2-iteration-1'"),
    the exception logged from a worker thread (in a federation: to the run's log file).
    `task_errors` puts the innermost task and its exception in the error; an observer of
    tasks (the progress lines, MLflow) that raises never fails a task; and parallel tasks
    leave the root logger's handlers as they found them."""
    import logging

    import pytest
    from kfp.local import task_dispatcher

    from pipelines.local import init_local, observing_tasks, task_errors

    init_local(tmp_path, cache=False)
    handlers = logging.getLogger().handlers[:]

    def broken_observer(event):
        raise ValueError("the progress line broke")

    with observing_tasks(broken_observer):
        assert _loop_pipeline().output == "[[hello|u]|hello],[[hello|v]|hello]"
    assert logging.getLogger().handlers == handlers

    original = task_dispatcher.run_single_task_implementation

    def flaky(**kwargs):
        if kwargs["arguments"].get("p") == "v":
            raise OSError("executor output vanished")
        return original(**kwargs)

    monkeypatch.setattr(task_dispatcher, "run_single_task_implementation", flaky)
    with pytest.raises(RuntimeError) as info, task_errors():
        _loop_pipeline()
    message = str(info.value)
    assert "iteration-1" in message  # kfp.local's own words, kept
    assert "raised OSError: executor output vanished" in message
    assert message.count("raised") == 1  # the innermost task, not each DAG around it
    assert logging.getLogger().handlers == handlers


def test_federation_compiles_and_loads_back(tiny_config, tmp_path):
    from kfp import compiler, components

    from pipelines.federation import build_federation_pipeline, build_round_pipeline

    path = tmp_path / "federation.yaml"
    compiler.Compiler().compile(build_federation_pipeline(tiny_config), package_path=str(path))
    spec = yaml.safe_load(path.read_text())
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "fl-minillm-federation"
    # one sub-DAG per round, chained through their outputs
    root_tasks = spec["root"]["dag"]["tasks"]
    rounds = [t for t in root_tasks if t.startswith("fl-minillm-round")]
    assert len(rounds) == tiny_config.rounds
    # the experiment travels as the pipeline's default parameter, so the YAML runs standalone
    default = spec["root"]["inputDefinitions"]["parameters"]["experiment_json"]["defaultValue"]
    assert '"name":"tiny"' in default
    # every executor runs a flminillm step in our image, with nothing pip-installed at run time
    executors = spec["deploymentSpec"]["executors"]
    assert executors
    for ex in executors.values():
        command = " ".join(ex["container"]["command"])
        assert "pip install" not in command
        assert "from flminillm.invoke import run_component" in command
    round_path = tmp_path / "round.yaml"
    compiler.Compiler().compile(build_round_pipeline(tiny_config), package_path=str(round_path))
    round_spec = yaml.safe_load(round_path.read_text())
    names = set(round_spec["components"])
    for step in ("sample-clients", "local-sft", "generate", "teach", "distill", "evaluate"):
        assert any(n.startswith(f"comp-{step}") for n in names), step


def test_kfp_round_and_in_process_round_give_the_same_models(tiny_config, tmp_path):
    """Both runners are built from flminillm.rounds: one round under kfp.local (every step a
    task process, warm step server) and the same round in one process agree on every model
    digest and every evaluation."""
    import json

    from flminillm.inprocess import run_round, setup
    from flminillm.invoke import deployment_env, warm_steps
    from pipelines.federation import build_round_pipeline
    from pipelines.local import init_local

    cfg = tiny_config.model_copy(
        update={"tracking": tiny_config.tracking.model_copy(update={"enabled": False})}
    )
    state = setup(cfg)
    direct, sent = run_round(cfg, state, 1)
    init_local(tmp_path / "kfp", cache=False)
    with deployment_env(cfg), warm_steps():
        task = build_round_pipeline(cfg, parallelism=2)(
            experiment_json=cfg.experiment_json(), state_json=json.dumps(state), round_index=1
        )
    under_kfp = json.loads(task.output)
    assert under_kfp["models"] == direct["models"]
    assert under_kfp["eval"] == direct["eval"]
    assert set(under_kfp["models"]) == {p.id for p in cfg.parties}
    assert sent["server"]["sent"] > 0 and sent["alice"]["received"] > 0
