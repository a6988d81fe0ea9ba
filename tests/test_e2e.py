"""End to end: a tiny federation through the CLI, the local KFP runner and MLflow."""

import json
import os

import yaml

from flminillm.cli import main


def _write_config(cfg, path):
    path.write_text(yaml.safe_dump(json.loads(cfg.to_json())))
    return path


def test_tiny_federation_end_to_end(tiny_config, tmp_path, capsys):
    import time

    config = _write_config(tiny_config, tmp_path / "tiny.yaml")
    started = time.time()
    assert main(["run", "--config", str(config), "--label", "first"]) == 0
    wall = time.time() - started
    out = capsys.readouterr().out
    results_path = tmp_path / "out" / "results.json"
    assert str(results_path) in out
    # a console a person can read: a line per task, the table; the rest in the log file
    lines = out.splitlines()
    assert len(lines) <= 60, "\n".join(lines)
    assert sum(1 for x in lines if x.startswith("[")) == 21  # one per task, tiny: 21 tasks
    assert "distill" in out and "alice->server" in out and "RuntimeWarning" not in out
    log = (tmp_path / "out" / "logs" / "first.log").read_text()
    assert "Executing task" in log

    # results.json: every party, held families, before/after per family
    results = json.loads(results_path.read_text())
    parties = results["parties"]
    assert set(parties) == {"server", "alice", "bob"}
    assert parties["server"]["held"] == []
    held = parties["alice"]["held"] + parties["bob"]["held"]
    assert sorted(held) == sorted(tiny_config.data.families)
    for r in parties.values():
        for when in ("before", "after"):
            assert set(r[when]) == set(tiny_config.data.families)
            for m in r[when].values():
                assert 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["rouge_l"] <= 1.0

    # the round manifest maps every party to a model that exists in the store, verified
    from flminillm.store import open_store

    manifest = json.loads((tmp_path / "out" / "round_manifest.json").read_text())
    store = open_store(tiny_config.store.uri)
    assert manifest["round"] == tiny_config.rounds
    for party, digest in manifest["models"].items():  # each party's model in its own scope
        assert (store.scoped(party).get_dir(digest) / "model.safetensors").is_file()
    assert len(manifest["history"]) == tiny_config.rounds  # round 0 .. R-1

    # MLflow: federation > round > step, with digests and metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tiny_config.tracking.uri)
    exp = client.get_experiment_by_name(tiny_config.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_kind = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get("flminillm.kind"), []).append(r)
    assert len(by_kind["federation"]) == 1
    fed = by_kind["federation"][0]
    # the federation run was open while the run went on: its duration is the wall time
    assert fed.info.status == "FINISHED"
    assert abs((fed.info.end_time - fed.info.start_time) / 1000 - wall) < 5
    rounds = by_kind["round"]
    assert len(rounds) == tiny_config.rounds + 1
    assert all(r.data.tags["mlflow.parentRunId"] == fed.info.run_id for r in rounds)
    round_ids = {r.info.run_id for r in rounds}
    steps = by_kind["step"]
    assert all(s.data.tags["mlflow.parentRunId"] in round_ids for s in steps)
    names = {s.info.run_name for s in steps}
    for expected in (
        "prepare.all",
        "init_model.server",
        "sample_clients.server",
        "local_sft.alice",
        "generate.server",
        "teach.alice-to-server",
        "distill.server",
        "generate.bob",
        "teach.server-to-bob",
        "distill.bob",
        "evaluate.all",
    ):
        assert expected in names, expected
    distill_server = next(s for s in steps if s.info.run_name == "distill.server")
    assert distill_server.data.tags["out.model"] == f"sha256:{manifest['models']['server']}"
    assert distill_server.data.tags["in.teaching.alice"].startswith("sha256:")
    assert "reverse_kl" in distill_server.data.metrics
    final_round = next(r for r in rounds if r.info.run_name == f"round-{tiny_config.rounds}")
    assert "server.country_code.exact_match" not in final_round.data.metrics  # not in tiny
    assert "server.successor.exact_match" in final_round.data.metrics
    assert final_round.data.metrics["server.bytes_received"] > 0

    # the run directory moved elsewhere (deployment paths are not part of the experiment):
    # the same federation id, every step but the MLflow logging from cache, the same models
    import shutil

    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved)
    for name in ("out", "store", "kfp", "mlflow.db"):
        (shutil.rmtree if (tmp_path / name).is_dir() else os.remove)(tmp_path / name)
    text = config.read_text().replace(str(tmp_path), str(moved))
    moved_config = moved / "tiny.yaml"
    moved_config.write_text(text)
    assert main(["run", "--config", str(moved_config), "--label", "second"]) == 0
    assert tiny_config.federation_id() in capsys.readouterr().out
    again = json.loads((moved / "out" / "round_manifest.json").read_text())
    assert again["manifest"] == manifest["manifest"]
    client = MlflowClient(f"sqlite:///{moved}/mlflow.db")
    runs = client.search_runs(
        [exp.experiment_id], filter_string="tags.`flminillm.kind` = 'step'", max_results=500
    )
    second = [r for r in runs if r.data.tags["mlflow.parentRunId"] not in round_ids]
    assert second and all(r.data.tags["flminillm.cache_hit"] == "true" for r in second)
    assert not (tmp_path / "store").exists()  # nothing read from the old place
