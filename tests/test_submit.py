"""`flminillm submit`: a contract test against a local fake of the KFP v2beta1 REST API.

The fake implements what `kfp.Client` (kfp 2.17.3) calls to create a run from a package:
GET /apis/v2beta1/healthz, GET and POST /apis/v2beta1/experiments, POST and GET
/apis/v2beta1/runs. It records every request, so the tests check what a real Kubeflow
Pipelines server would receive. A live cluster run is documented (docs/cluster.md), not
tested here."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from flminillm.cli import main
from flminillm.config import ClusterConfig

API = "/apis/v2beta1"


class FakeKFP:
    """State and request log of the fake server."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}

    def handle(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict]:
        self.requests.append({"method": method, "path": path, "query": query, "body": body})
        if method == "GET" and path == f"{API}/healthz":
            return 200, {"multi_user": False}
        if method == "GET" and path == f"{API}/experiments":
            wanted = None
            if "filter" in query:
                predicates = json.loads(query["filter"][0])["predicates"]
                wanted = next(p["stringValue"] for p in predicates if p["key"] == "display_name")
            found = [e for e in self.experiments.values() if wanted in (None, e["display_name"])]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if method == "POST" and path == f"{API}/experiments":
            exp = {"experiment_id": str(uuid.uuid4()), "display_name": body["display_name"]}
            if body.get("namespace"):
                exp["namespace"] = body["namespace"]
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if method == "POST" and path == f"{API}/runs":
            run = dict(body, run_id=str(uuid.uuid4()), state="PENDING")
            self.runs[run["run_id"]] = run
            return 200, run
        if method == "GET" and path.startswith(f"{API}/runs/"):
            run = self.runs.get(path.rsplit("/", 1)[-1])
            return (200, run) if run else (404, {"error": "run not found", "code": 5})
        return 404, {"error": f"not implemented by the fake: {method} {path}", "code": 12}

    def calls(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]

    def created_runs(self) -> list[dict]:
        return [
            r["body"] for r in self.requests if (r["method"], r["path"]) == ("POST", f"{API}/runs")
        ]


@pytest.fixture
def kfp_server(monkeypatch, tmp_path):
    """A fake KFP API on 127.0.0.1 (random port): yields (host URL, FakeKFP)."""
    import kfp

    # no user context (~/.config/kfp/context.json) and no KFP environment leaks in
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for var in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT",
                "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME", "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    fake = FakeKFP()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, payload = fake.handle(method, url.path, parse_qs(url.query), body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, *args) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def write_config(cfg, path: Path, **cluster) -> Path:
    cfg = cfg.model_copy(update={"cluster": ClusterConfig(**cluster)})
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def task_caching(spec: dict) -> dict[str, bool]:
    """enableCache of every container task (root DAG and sub-DAGs), keyed by function."""
    comps = spec["components"]
    executors = spec["deploymentSpec"]["executors"]
    out = {}
    dags = [spec["root"]["dag"]] + [c["dag"] for c in comps.values() if "dag" in c]
    for dag in dags:
        for name, task in dag["tasks"].items():
            comp = comps[task["componentRef"]["name"]]
            if "executorLabel" in comp:
                args = executors[comp["executorLabel"]]["container"]["args"]
                fn = args[args.index("--function_to_execute") + 1]
                out[f"{fn}/{name}"] = task.get("cachingOptions", {}).get("enableCache", False)
    return out


def test_submit_federation_creates_experiment_and_run(kfp_server, tiny_config, tmp_path, capsys):
    host, fake = kfp_server
    config = write_config(
        tiny_config, tmp_path / "exp.yaml", experiment="fl-test", service_account="fl-sa"
    )
    rc = main(["submit", "--host", host, "--config", str(config), "--run-name", "first"])
    out = capsys.readouterr().out
    assert rc == 0, out
    calls = fake.calls()
    assert ("GET", f"{API}/healthz") in calls
    assert calls.index(("GET", f"{API}/experiments")) < calls.index(("POST", f"{API}/experiments"))
    # the experiment of the config was looked up by name, then created
    lookup = next(r for r in fake.requests if r["path"] == f"{API}/experiments")
    assert "fl-test" in lookup["query"]["filter"][0]
    (exp,) = fake.experiments.values()
    assert exp["display_name"] == "fl-test"
    # one run, in that experiment, carrying our compiled federation pipeline
    (run,) = fake.created_runs()
    assert run["display_name"] == "first"
    assert run["experiment_id"] == exp["experiment_id"]
    assert run["service_account"] == "fl-sa"
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    assert spec["pipelineInfo"]["name"] == "fl-minillm-federation"
    assert spec["defaultPipelineRoot"] == ClusterConfig().pipeline_root
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(e["secretAsEnv"][0]["secretName"] == "flminillm-s3" for e in executors.values())
    params = run["runtime_config"]["parameters"]
    assert json.loads(params["experiment_json"])["name"] == "tiny"
    assert params["run_label"] == "first"
    assert json.loads(params["run_tags"])["kfp.experiment"] == "fl-test"
    # caching on by default, except the MLflow steps: track logs every run, close-run (the
    # exit handler) reads how this very run ended
    caching = task_caching(spec)
    logs = ("track/", "close_run/")
    assert caching and all(on is (not key.startswith(logs)) for key, on in caching.items())
    assert "close_run/close-run" in caching
    # the printed URL is the run's page
    (rid,) = fake.runs  # the id the server gave the run
    assert f"{host}/#/runs/details/{rid}" in out
    # the federation's MLflow run is open already, and every task knows it, so that each
    # step logs itself under it when it finishes on the cluster
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tiny_config.tracking.uri)
    exp_id = client.get_experiment_by_name(tiny_config.tracking.experiment).experiment_id
    (mlrun,) = client.search_runs([exp_id], "tags.`flminillm.kind` = 'federation'")
    assert mlrun.info.status == "RUNNING" and mlrun.data.tags["kfp.run_id"] == rid
    assert "flminillm.pid" not in mlrun.data.tags  # no local process owns it
    task_env = [
        {e["name"]: e["value"] for e in ex["container"].get("env", [])}
        for ex in spec["deploymentSpec"]["executors"].values()
    ]
    assert task_env and all(e["FLMINILLM_MLFLOW_RUN"] == mlrun.info.run_id for e in task_env)

    # a second submission reuses the experiment
    n_experiments = len(fake.experiments)
    assert main(["submit", "--host", host, "--config", str(config), "--no-cache"]) == 0
    assert len(fake.experiments) == n_experiments
    run2 = fake.created_runs()[-1]
    assert run2["experiment_id"] == exp["experiment_id"]
    assert run2["display_name"].startswith("tiny-")
    # --no-cache: every task re-runs
    assert not any(task_caching(run2["pipeline_spec"]["pipeline_spec"]).values())


def test_submit_one_round_from_a_manifest_file(kfp_server, tiny_config, tmp_path, capsys):
    host, fake = kfp_server
    cfg = tiny_config.model_copy(update={"rounds": 3})
    config = write_config(cfg, tmp_path / "exp.yaml")
    manifest = {"kind": "round_manifest", "round": 2, "models": {"server": "ab" * 32}}
    manifest["manifest"] = "cd" * 32
    manifest["federation"] = cfg.federation_id()
    path = tmp_path / "round_manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    argv = ["submit", "--host", host, "--config", str(config), "--from-manifest", str(path)]
    assert main([*argv, "--round", "3"]) == 0
    (run,) = fake.created_runs()
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "fl-minillm-round"
    params = run["runtime_config"]["parameters"]
    assert json.loads(params["state_json"]) == manifest
    assert params["state_json"] == json.dumps(manifest)  # as the evaluate step returns it
    assert params["round_index"] == 3
    assert json.loads(params["experiment_json"])["name"] == "tiny"
    assert run["display_name"].startswith("tiny-round-3-")
    rid = next(iter(fake.runs))
    assert f"{host}/#/runs/details/{rid}" in capsys.readouterr().out

    # a manifest after round 2 starts round 3, not another
    assert main([*argv, "--round", "5"]) == 2
    assert "starts round 3" in capsys.readouterr().err
    # the last round's manifest is the federation's end (its server averaged over its last
    # rounds): no round 4 from it; nor a round from another federation's manifest
    for changes, error in (
        ({"round": 3}, "the federation has 3 rounds (config `rounds`)"),
        ({"federation": "tiny-000000000000"}, "is of federation tiny-000000000000"),
    ):
        path.write_text(json.dumps({**manifest, **changes}))
        assert main(argv) == 2
        assert error in capsys.readouterr().err
    assert len(fake.created_runs()) == 1


def test_submit_one_round_from_the_store(kfp_server, tiny_config, tmp_path, capsys):
    from flminillm.store import open_store

    host, fake = kfp_server
    config = write_config(tiny_config, tmp_path / "exp.yaml")
    manifest = {"kind": "round_manifest", "round": 0, "models": {}}
    digest = open_store(tiny_config.store.uri).put_json(manifest)
    argv = ["submit", "--host", host, "--config", str(config)]
    assert main([*argv, "--from-manifest", f"sha256:{digest}"]) == 0
    (run,) = fake.created_runs()
    params = run["runtime_config"]["parameters"]
    # as the evaluate step returns it: with its own digest, which the next round records
    assert json.loads(params["state_json"]) == dict(manifest, manifest=digest)
    assert params["round_index"] == 1  # default: the round after the manifest's

    # a digest the store does not have, a manifest file without its digest
    assert main([*argv, "--from-manifest", "sha256:" + "0" * 64]) == 2
    assert "cannot read sha256:000" in capsys.readouterr().err
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(manifest))
    assert main([*argv, "--from-manifest", str(bare)]) == 2
    assert "lacks its digest" in capsys.readouterr().err

    # not a manifest, not a file
    assert main([*argv, "--from-manifest", str(tmp_path / "missing.json")]) == 2
    assert "neither a file nor sha256" in capsys.readouterr().err
    assert main([*argv, "--round", "2"]) == 2
    assert "--round needs --from-manifest" in capsys.readouterr().err
    assert len(fake.created_runs()) == 1
