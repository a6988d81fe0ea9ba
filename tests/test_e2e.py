"""End to end: a tiny federation through the CLI, the local KFP runner and MLflow."""

import json

import yaml

from flminillm.cli import main


def _write_config(cfg, path):
    path.write_text(yaml.safe_dump(json.loads(cfg.to_json())))
    return path


def test_tiny_federation_end_to_end(tiny_config, tmp_path, capsys):
    config = _write_config(tiny_config, tmp_path / "tiny.yaml")
    assert main(["run", "--config", str(config), "--label", "first"]) == 0
    out = capsys.readouterr().out
    results_path = tmp_path / "out" / "results.json"
    assert str(results_path) in out

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
    for digest in manifest["models"].values():
        assert (store.get_dir(digest) / "model.safetensors").is_file()
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
    out_digest = distill_server.data.tags["outputs.model.sha256"]
    assert out_digest == manifest["models"]["server"]
    assert "reverse_kl" in distill_server.data.metrics
    final_round = next(r for r in rounds if r.info.run_name == f"round-{tiny_config.rounds}")
    assert "server.country_code.exact_match" not in final_round.data.metrics  # not in tiny
    assert "server.successor.exact_match" in final_round.data.metrics
    assert final_round.data.metrics["server.bytes_received"] > 0

    # a second run of the same config: every step but the MLflow logging comes from cache,
    # and the results are identical
    assert main(["run", "--config", str(config), "--label", "second"]) == 0
    again = json.loads((tmp_path / "out" / "round_manifest.json").read_text())
    assert again["manifest"] == manifest["manifest"]
    runs = client.search_runs(
        [exp.experiment_id], filter_string="tags.`flminillm.kind` = 'step'", max_results=500
    )
    second = [r for r in runs if r.data.tags["mlflow.parentRunId"] not in round_ids]
    assert second and all(r.data.tags["flminillm.cache_hit"] == "true" for r in second)
