"""MLflow lineage: a parent run per federation, a child per round, a child per step.

Steps write their lineage records (inputs, outputs, digests, params, metrics, status,
duration) to the store's ledger while they run; `log_federation` turns the ledger and the
round manifests into the MLflow tree in one pass, so each step need not import mlflow.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from flminillm.config import Config
from flminillm.ledger import bytes_by_party, ledger, round_manifest
from flminillm.store import Store

FEDERATION_TAG = "flminillm.federation"


def _flatten(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, list) else str(obj)


def _experiment_id(client, cfg: Config) -> str:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location)


def round_chain(store: Store, final_state: dict) -> list[dict]:
    """Round manifests from round 0 (before any federated training) to the final one."""
    return [store.get_json(d) for d in final_state.get("history", [])] + [final_state]


def _metric_batch(metrics: dict[str, float], step: int = 0, ts: int | None = None):
    from mlflow.entities import Metric

    ts = ts or int(time.time() * 1000)
    return [
        Metric(k.replace("/", "."), float(v), ts, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    ]


def log_chunked(client, run_id: str, metrics=(), params=(), tags=()) -> None:
    """MLflow entities in batches under its limit of 1000 per call."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    for i in range(0, max(len(metrics), len(params), len(tags), 1), 900):
        client.log_batch(
            run_id, metrics=metrics[i : i + 900], params=params[i : i + 900],
            tags=tags[i : i + 900],
        )  # fmt: skip


def _log(client, run_id: str, metrics=None, params=None, tags=None, step: int = 0) -> None:
    from mlflow.entities import Param, RunTag

    log_chunked(
        client, run_id, _metric_batch(metrics or {}, step),
        [Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
        [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()],
    )  # fmt: skip


def _log_datasets(client, run_id: str, store: Store, records: list[dict]) -> None:
    """Data sets as MLflow dataset inputs: name, sha256 digest and store URI (no rows)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for rec in records:
        for name, ref in rec.get("outputs", {}).items():
            if not (name.startswith("data.") or name in ("public_prompts", "pretrain_corpus")):
                continue
            with warnings.catch_warnings():  # file:// URIs match two equivalent source types
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(ref["uri"])
            ds = MetaDataset(source=source, name=name, digest=ref["digest"][:36])
            context = (
                "train"
                if name.endswith(".train")
                else ("test" if name.endswith(".test") else "public")
            )
            inputs.append(
                DatasetInput(
                    ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]
                )
            )
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def log_federation(
    cfg: Config,
    store: Store,
    run_label: str = "",
    run_started: float = 0.0,
    status: str = "FINISHED",
    error: str = "",
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Write the federation > round > step tree to MLflow from the ledger; return the
    parent run id. Works for failed runs too: their rounds end at the failed step."""
    from mlflow.tracking import MlflowClient

    from flminillm.report import party_summary, results_table

    # an explicit client: mlflow.set_tracking_uri would also export MLFLOW_TRACKING_URI to
    # this process's environment and leak into later runs
    client = MlflowClient(cfg.tracking.uri)
    exp_id = _experiment_id(client, cfg)
    fed = cfg.federation_id()
    by_round = ledger(store, fed)
    if run_started and status != "FINISHED":
        # a failed run: only the rounds it reached (later records belong to older runs)
        reached = [
            r for r, recs in by_round.items() if any(x["started"] >= run_started for x in recs)
        ]
        by_round = {r: v for r, v in by_round.items() if r <= max(reached, default=0)}
    manifests = {r: round_manifest(store, recs) for r, recs in by_round.items()}
    done = [m for _, m in sorted(manifests.items()) if m is not None]
    results = results_table(cfg, done[0], done[-1]) if done else {"parties": {}}

    parent = client.create_run(
        exp_id,
        run_name=f"{cfg.name}{'-' + run_label if run_label else ''}",
        tags={
            FEDERATION_TAG: fed,
            "flminillm.kind": "federation",
            "flminillm.run_label": run_label,
            "flminillm.config_digest": cfg.digest(),
            **({"flminillm.error": error[:4000]} if error else {}),
            **(extra_tags or {}),
        },
    )
    pid = parent.info.run_id
    params: dict[str, str] = {}
    _flatten("", json.loads(cfg.to_json()), params)
    _log(client, pid, params=params)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(json.loads(cfg.to_json()), indent=1))
        (Path(tmp) / "results.json").write_text(json.dumps(results, indent=1))
        if done:
            (Path(tmp) / "round_manifest.json").write_text(json.dumps(done[-1], indent=1))
        client.log_artifacts(pid, tmp)
    _log_datasets(client, pid, store, by_round.get(0, []))

    for r in sorted(by_round):
        records, manifest = by_round[r], manifests[r]
        failed = [x for x in records if x.get("status") != "succeeded"]
        rr = client.create_run(
            exp_id,
            run_name=f"round-{r}" if r else "round-0 (setup)",
            tags={
                "mlflow.parentRunId": pid,
                FEDERATION_TAG: fed,
                "flminillm.kind": "round",
                "flminillm.round_manifest": (manifest or {}).get("manifest", ""),
                "flminillm.dropped": json.dumps((manifest or {}).get("dropped", {})),
            },
        )
        rid = rr.info.run_id
        round_metrics: dict[str, float] = {}
        if manifest is not None:
            for party, fams in manifest.get("eval", {}).items():
                for fam, m in fams.items():
                    for k in ("exact_match", "rouge_l"):
                        round_metrics[f"{party}.{fam}.{k}"] = m[k]
            for party, summary in party_summary(results, manifest).items():
                for k, v in summary.items():
                    round_metrics[f"{party}.{k}"] = v
        for party, b in bytes_by_party(records).items():
            for k, v in b.items():
                round_metrics[f"{party}.bytes_{k}"] = v
        params = {"round": r}
        if manifest is not None:
            params["models"] = json.dumps(manifest["models"])
        _log(client, rid, metrics=round_metrics, params=params)
        _log(client, pid, metrics=round_metrics, step=max(r, 0))
        for rec in sorted(records, key=lambda x: x["started"]):
            _log_step(client, exp_id, rid, fed, r, rec, run_started)
        client.set_terminated(rid, "FAILED" if failed or manifest is None else "FINISHED")
    client.set_terminated(pid, status)
    return pid


def _log_step(
    client, exp_id: str, parent: str, fed: str, r: int, rec: dict, run_started: float
) -> None:
    cached = bool(run_started) and rec["started"] < run_started
    tags = {
        "mlflow.parentRunId": parent,
        FEDERATION_TAG: fed,
        "flminillm.kind": "step",
        "flminillm.step": rec["step"],
        "flminillm.party": rec["party"],
        "flminillm.status": rec.get("status", "unknown"),
        "flminillm.cache_hit": str(cached).lower(),
        "flminillm.host": rec.get("host", ""),
    }
    for direction in ("inputs", "outputs"):
        for name, ref in rec.get(direction, {}).items():
            if isinstance(ref, dict):
                tags[f"{direction}.{name}.sha256"] = ref["digest"]
                tags[f"{direction}.{name}.uri"] = ref["uri"]
            else:
                tags[f"{direction}.{name}"] = json.dumps(ref)
    if rec.get("error"):
        tags["flminillm.error"] = rec["error"]
    sr = client.create_run(
        exp_id,
        run_name=f"{rec['step']}.{rec['party']}",
        start_time=int(rec["started"] * 1000),
        tags=tags,
    )
    _log(
        client,
        sr.info.run_id,
        metrics={**rec.get("metrics", {}), "duration_s": rec.get("duration_s", 0.0)},
        params={"round": r, "step": rec["step"], "party": rec["party"], **rec.get("params", {})},
    )
    status = "FINISHED" if rec.get("status") == "succeeded" else "FAILED"
    end = int((rec["started"] + rec.get("duration_s", 0)) * 1000)
    client.set_terminated(sr.info.run_id, status, end_time=end)
