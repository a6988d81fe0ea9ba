"""The whole S3 + MLflow-server path: a real `mlflow server` process (sqlite backend,
artifacts on a moto S3 server), a federation whose store is on that S3, all on 127.0.0.1."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from flminillm.cli import main
from tests.s3_server import FAKE_SECRET_KEY, free_port, s3_client


@pytest.fixture
def mlflow_server(s3_env, tmp_path):
    endpoint, bucket = s3_env
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
        "--artifacts-destination", f"s3://{bucket}/mlflow",
    ]  # fmt: skip
    log = open(tmp_path / "mlflow-server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError((tmp_path / "mlflow-server.log").read_text()[-3000:])
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start")
    yield url, proc
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _listening_addresses(pid: int) -> set[str]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    addrs = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        addrs |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    return addrs


def test_federation_on_s3_with_an_mlflow_server(
    tiny_config, s3_env, mlflow_server, tmp_path, capsys
):
    endpoint, bucket = s3_env
    url, proc = mlflow_server
    assert _listening_addresses(proc.pid) == {"127.0.0.1"}

    cfg = tiny_config.model_copy(
        update={
            "store": tiny_config.store.model_copy(
                update={"uri": f"s3://{bucket}/store", "endpoint_url": endpoint}
            ),
            "tracking": tiny_config.tracking.model_copy(update={"uri": url}),
        }
    )
    path = tmp_path / "s3.yaml"
    text = yaml.safe_dump(json.loads(cfg.to_json()))
    assert FAKE_SECRET_KEY not in text  # credentials come from the environment only
    path.write_text(text)
    assert main(["run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert FAKE_SECRET_KEY not in out

    # every party's objects live under its own prefix of the bucket
    s3 = s3_client(endpoint)
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="store/")
        for o in page.get("Contents", [])
    ]
    for scope in ("server", "alice", "bob", "public", "exchange"):
        assert any(k.startswith(f"store/parties/{scope}/objects/sha256/") for k in keys), scope
    assert any(k.startswith("store/records/") for k in keys)

    # MLflow on the server: the tree, the datasets, artifacts proxied to S3
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    feds = client.search_runs([exp.experiment_id], "tags.`flminillm.kind` = 'federation'")
    assert len(feds) == 1
    fed = feds[0]
    datasets = {d.dataset.name: d for d in fed.inputs.dataset_inputs}
    assert {"public_prompts", "data.alice.train", "data.bob.train"} <= set(datasets)
    assert datasets["data.alice.train"].dataset.source_type == "s3"
    artifacts = {a.path for a in client.list_artifacts(fed.info.run_id)}
    assert {"config.json", "results.json", "round_manifest.json"} <= artifacts
    mlflow_keys = s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("KeyCount", 0)
    assert mlflow_keys >= 3

    # a model digest leads back to the step, its inputs and the config that made it
    final = json.loads((tmp_path / "out" / "round_manifest.json").read_text())
    steps = client.search_runs(
        [exp.experiment_id], "tags.`flminillm.kind` = 'step'", max_results=500
    )
    maker = [
        s for s in steps if s.data.tags.get("out.model") == f"sha256:{final['models']['server']}"
    ]
    assert len(maker) == 1 and maker[0].info.run_name == "distill.server"
    assert maker[0].data.tags["in.teaching.alice"].startswith("sha256:")
    # the full URIs are in the step's lineage.json, proxied to S3 like every artifact
    record = json.loads(
        Path(
            client.download_artifacts(maker[0].info.run_id, "lineage.json", str(tmp_path))
        ).read_text()
    )
    assert record["outputs"]["model"]["uri"].startswith(f"s3://{bucket}/store/parties/server/")
    assert record["outputs"]["model"]["digest"] == final["models"]["server"]

    # lineage reads the same tree back
    assert main(["lineage", fed.info.run_id, "--tracking-uri", url]) == 0
    tree = capsys.readouterr().out
    assert "distill.server succeeded" in tree and final["models"]["server"][:16] in tree
