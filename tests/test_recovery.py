"""Recovery of whole federations through the CLI, the local KFP runner and MLflow: a store
tampered with (a materialised model and a stored object), and a run killed with SIGKILL in
the middle of a round. Each ends with an uninterrupted run's final model digests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flminillm.cli import main
from flminillm.ledger import ledger
from flminillm.store import open_store
from tests.isolated import inprocess_states, isolated_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    """The final models of an uninterrupted run of the experiment, once for the module."""
    from flminillm.config import load_config

    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    cfg = isolated_config(tiny, tmp_path_factory.mktemp("reference"), "run")[0]
    return inprocess_states(cfg)[-1]["models"]


def _init_model(cfg, party: str) -> str:
    recs = ledger(open_store(cfg.store.uri), cfg.federation_id())[0]
    rec = next(r for r in recs if r["step"] == "init_model" and r["party"] == party)
    return rec["outputs"]["model"]["digest"]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_tampered_store_fails_the_run_until_verify_repairs_it(
    tiny_config, tmp_path, reference, monkeypatch, capsys
):
    cfg, config = isolated_config(tiny_config, tmp_path, "run")
    # a first run fails in round 1 (alice's fine-tuning), after the set-up was cached
    monkeypatch.setenv("FLMINILLM_FAULTS", "local_sft:alice:1")
    assert main(["run", "--config", str(config)]) == 1
    monkeypatch.delenv("FLMINILLM_FAULTS")
    store = open_store(cfg.store.uri)
    # tamper: a byte of alice's materialised initial model, and a byte of bob's stored one
    alice_copy = store.root / "materialized" / _init_model(cfg, "alice") / "model.safetensors"
    _flip(alice_copy)
    bob = store.scoped("bob")
    bob_tree = _init_model(cfg, "bob")
    blob = next(f["sha256"] for f in bob.get_json(bob_tree)["files"]
                if f["path"] == "model.safetensors")  # fmt: skip
    _flip(Path(bob.object_uri(blob).removeprefix("file://")))
    import shutil

    shutil.rmtree(store.root / "materialized" / bob_tree)  # so that it is read from the object
    capsys.readouterr()
    assert main(["run", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "IntegrityError" in out and "corrupt" in out
    assert "flminillm store verify --repair" in out
    assert str(alice_copy.parent) in out or blob in out
    # verify finds both; --repair drops them and the cached steps that made bob's model
    assert main(["store", "verify", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"corrupt object: parties/bob/objects/sha256/{blob[:2]}/{blob}" in out
    assert f"corrupt copy: {alice_copy.parent}" in out
    assert main(["store", "verify", "--config", str(config), "--repair"]) == 0
    assert "forgot" in capsys.readouterr().out
    assert main(["run", "--config", str(config)]) == 0
    final = json.loads((Path(cfg.output_dir) / "round_manifest.json").read_text())
    assert final["models"] == reference
    assert main(["store", "verify", "--config", str(config)]) == 0


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_a_killed_run_shows_in_mlflow_and_rerun_completes_it(
    tiny_config, tmp_path, reference, capsys
):
    from mlflow.tracking import MlflowClient

    cfg, config = isolated_config(tiny_config, tmp_path, "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flminillm.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    run_id, store, deadline = None, open_store(cfg.store.uri), time.time() + 300
    try:
        while time.time() < deadline:  # until round 1's server distill step has finished
            line = proc.stdout.readline()
            if line.startswith("MLflow run "):
                run_id = line.split()[2]
            if run_id and "distill" in line and "round 1" in line:
                break
        assert run_id, "the run never said its MLflow run id"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = [r for r in ledger(store, cfg.federation_id()).get(1, []) if r["status"] == "succeeded"]
    assert any(r["step"] == "distill" for r in done)

    # the finished steps are in MLflow already; opening the store marks the run KILLED
    assert main(["lineage", run_id, "--config", str(config), "--brief"]) == 0
    out = capsys.readouterr().out
    assert "KILLED" in out and "distill.server succeeded" in out
    client = MlflowClient(cfg.tracking.uri)
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED" and killed.info.end_time
    # rerun finishes it: what succeeded comes from the cache; the models are an
    # uninterrupted run's
    assert main(["rerun", run_id, "--config", str(config)]) == 0
    final = json.loads((Path(cfg.output_dir) / "round_manifest.json").read_text())
    assert final["models"] == reference
    out = capsys.readouterr().out
    assert out.count("results.json") == 1 and "cache hit" in out


def test_unknown_run_ids_get_one_line(tiny_config, tmp_path, capsys):
    cfg, config = isolated_config(tiny_config, tmp_path, "run")
    for command in ("lineage", "rerun"):
        assert main([command, "0" * 32, "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "0" * 32 in err[0]
    assert main(["store", "verify", "--store", str(tmp_path / "nowhere")]) == 2
    assert "no store at" in capsys.readouterr().err
