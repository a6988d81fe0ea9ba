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
