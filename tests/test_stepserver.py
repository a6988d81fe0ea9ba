"""The warm step server of the local runner: same results as running the step directly,
the task's environment, working directory and output, and failures that reach the task."""

import json
import os

import pytest

from flminillm import invoke
from flminillm.artifacts import open_store_for
from flminillm.faults import FAULTS_ENV
from flminillm.ledger import ledger
from flminillm.stepserver import ENV, RemoteStepError


def _cfg(tiny_config, tmp_path, name):
    return tiny_config.model_copy(
        update={"store": tiny_config.store.model_copy(update={"uri": str(tmp_path / name)})}
    )


def test_forwarded_steps_match_direct_calls(tiny_config, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(invoke.THREADS_ENV, "1")
    direct_cfg = _cfg(tiny_config, tmp_path, "direct")
    warm_cfg = _cfg(tiny_config, tmp_path, "warm")
    direct = invoke.call("prepare", direct_cfg)
    direct_init = invoke.call("init_model", direct_cfg, state_json=json.dumps(direct),
                              party_id="alice")  # fmt: skip

    with invoke.warm_steps() as path:
        assert path and os.environ[ENV] == path
        warm = invoke.call("prepare", warm_cfg)
        warm_init = invoke.call("init_model", warm_cfg, state_json=json.dumps(warm),
                                party_id="alice")  # fmt: skip
    assert ENV not in os.environ  # restored after the run

    # content-addressed outputs: the same digests from a fork of the server as from here
    assert warm["tokenizer"] == direct["tokenizer"] and warm["data"] == direct["data"]
    assert warm_init["models"] == direct_init["models"]
    # the steps ran in other processes (forks of the server), which wrote to our stderr
    recs = [r for rs in ledger(open_store_for(warm_cfg), warm_cfg.federation_id()).values()
            for r in rs]  # fmt: skip
    assert {r["step"] for r in recs} == {"prepare", "init_model"}
    assert all(r["pid"] != os.getpid() and r["status"] == "succeeded" for r in recs)
    assert "pretrain alice" in capfd.readouterr().err  # the child's progress bar


def test_task_environment_reaches_the_step_and_failures_reach_the_task(
    tiny_config, tmp_path, monkeypatch
):
    cfg = _cfg(tiny_config, tmp_path, "store")
    with invoke.warm_steps():
        # the environment is the calling task's, read at call time (here: a fault drill)
        monkeypatch.setenv(FAULTS_ENV, "prepare:all:0")
        with pytest.raises(RemoteStepError, match="InjectedFault: injected fault in prepare"):
            invoke.call("prepare", cfg)
        monkeypatch.delenv(FAULTS_ENV)
        assert invoke.call("prepare", cfg)["tokenizer"]  # the server still serves after a failure


def test_unreachable_server_runs_the_step_here(tiny_config, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(ENV, str(tmp_path / "missing.sock"))
    out = invoke.call("prepare", _cfg(tiny_config, tmp_path, "store"))
    assert out["tokenizer"]
    assert "unreachable" in capfd.readouterr().err


def test_disabled_server_sets_nothing(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with invoke.warm_steps(enabled=False) as path:
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
