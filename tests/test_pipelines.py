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


@dsl.component
def _half_a_character(p: str) -> str:
    import sys

    sys.stdout.flush()
    sys.stdout.buffer.write(b"a progress bar cut in two: \xe2\x96\n")  # half of U+2588
    sys.stdout.flush()
    return p


@dsl.pipeline
def _cut_output_pipeline() -> str:
    with dsl.ParallelFor(_items().output) as p:
        t = _half_a_character(p=p)
    return _join(xs=dsl.Collected(t.output)).output


def test_a_task_whose_output_is_not_utf8_still_runs(tmp_path):
    """kfp.local 2.17.3 decodes a task's output strictly in the orchestrator's thread: bytes
    that are not UTF-8 (a character cut in two where a step's stdout and stderr interleave
    on their pipe) failed the pipeline, in a ParallelFor with "Inner task failed:
    'for-loop-1-iteration-1'" alone. The output is a log: its bad bytes are replaced."""
    from pipelines.local import init_local

    init_local(tmp_path, cache=False)
    assert _cut_output_pipeline().output == "u,v"


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


def test_logging_during_a_run_never_closes_the_output_under_the_tasks(tmp_path):
    """`flminillm run` sends the process's output to the run's log while kfp.local's threads
    print their tasks' output, and its task observer logs each finished step to MLflow inside
    output_to again. That inner block used to put a second file on sys.stdout and close it
    under the other threads: a task's thread failed with "write to closed file" and the
    federation with it (CI at stop 41, "Inner task failed: 'for-loop-1-iteration-1'"). The
    same threads here: two print as kfp.local's task readers do, one enters and leaves the
    block as the observer does."""
    import sys
    import threading
    import time

    from flminillm.runs import output_to

    log = tmp_path / "logs" / "run.log"
    errors, done = [], []

    def task_reader() -> None:
        i = 0
        while not done:
            try:
                print(f"a task's line {i} {'x' * 100}\n", end="")
            except Exception as e:  # noqa: BLE001 - what the test looks for
                errors.append(repr(e))
                return
            i += 1

    def observer() -> None:
        for _ in range(3000):
            with output_to(log, verbose=False):
                time.sleep(0.0002)
        done.append(True)

    before = sys.stdout
    with output_to(log, verbose=False):
        outer = sys.stdout
        threads = [threading.Thread(target=task_reader) for _ in range(2)]
        threads.append(threading.Thread(target=observer))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sys.stdout is outer and not outer.closed
    assert sys.stdout is before
    assert errors == []
    assert "a task's line 0 " in log.read_text()
