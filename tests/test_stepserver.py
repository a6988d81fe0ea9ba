"""The warm step server of the local runner: same results as running the step directly,
the task's environment, working directory and output, and failures that reach the task."""

import json
import os

import pytest

from flminillm import steps
from flminillm.stepserver import ENV, RemoteStepError, step_server
from flminillm.tracking import ledger


def _cfg(tiny_config, tmp_path, name):
    return tiny_config.model_copy(
        update={"store": tiny_config.store.model_copy(update={"uri": str(tmp_path / name)})}
    )


def test_forwarded_steps_match_direct_calls(tiny_config, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("FLMINILLM_TORCH_THREADS", "1")
    direct_cfg = _cfg(tiny_config, tmp_path, "direct").to_json()
    warm_cfg = _cfg(tiny_config, tmp_path, "warm").to_json()
    direct = steps.prepare(direct_cfg)
    direct_init = steps.init_model(direct_cfg, json.dumps(direct), "alice")

    with step_server() as path:
        assert path and os.environ[ENV] == path
        warm = steps.prepare(warm_cfg)
        warm_init = steps.init_model(warm_cfg, json.dumps(warm), "alice")
    assert ENV not in os.environ  # restored after the run

    # content-addressed outputs: the same digests from a fork of the server as from here
    assert warm["tokenizer"] == direct["tokenizer"] and warm["data"] == direct["data"]
    assert warm_init["models"] == direct_init["models"]
    # the steps ran in other processes (forks of the server), which wrote to our stderr
    cfg = _cfg(tiny_config, tmp_path, "warm")
    recs = [r for rs in ledger(steps.open_store_for(cfg), steps.federation_id(cfg)).values()
            for r in rs]  # fmt: skip
    assert {r["step"] for r in recs} == {"prepare", "init_model"}
    assert all(r["pid"] != os.getpid() and r["status"] == "succeeded" for r in recs)
    assert "pretrain alice" in capfd.readouterr().err  # the child's progress bar


def test_task_environment_reaches_the_step_and_failures_reach_the_task(
    tiny_config, tmp_path, monkeypatch
):
    cfg = _cfg(tiny_config, tmp_path, "store").to_json()
    with step_server():
        # the environment is the calling task's, read at call time (here: a fault drill)
        monkeypatch.setenv(steps.FAULTS_ENV, "prepare:all:0")
        with pytest.raises(RemoteStepError, match="InjectedFault: injected fault in prepare"):
            steps.prepare(cfg)
        monkeypatch.delenv(steps.FAULTS_ENV)
        assert steps.prepare(cfg)["tokenizer"]  # the server still serves after a failure


def test_unreachable_server_runs_the_step_here(tiny_config, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(ENV, str(tmp_path / "missing.sock"))
    out = steps.prepare(_cfg(tiny_config, tmp_path, "store").to_json())
    assert out["tokenizer"]
    assert "unreachable" in capfd.readouterr().err


def test_disabled_server_sets_nothing(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with step_server(enabled=False) as path:
        assert path is None and ENV not in os.environ


@pytest.mark.slow  # two federations through kfp.local, one with a cold process per step
def test_federation_digests_do_not_depend_on_warm_steps(tiny_config, tmp_path):
    from pipelines.local import run_local

    finals = {}
    for warm in (True, False):
        root = tmp_path / f"warm-{warm}"
        cfg = tiny_config.model_copy(
            update={
                "store": tiny_config.store.model_copy(update={"uri": str(root / "store")}),
                "tracking": tiny_config.tracking.model_copy(update={"enabled": False}),
                "runner": tiny_config.runner.model_copy(
                    update={"pipeline_root": str(root / "kfp"), "warm_steps": warm}
                ),
            }
        )
        finals[warm] = run_local(cfg)
    assert finals[True]["models"] == finals[False]["models"]
    assert finals[True]["eval"] == finals[False]["eval"]
