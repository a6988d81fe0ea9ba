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
from pathlib import Path
from typing import Any

from flminillm.config import ExperimentConfig
from flminillm.store import Store

FEDERATION_TAG = "flminillm.federation"


def _flatten(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, list) else str(obj)


def _experiment_id(client, cfg: ExperimentConfig) -> str:
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


def bytes_by_party(records: list[dict]) -> dict[str, dict[str, float]]:
    """Bytes each party sent and received in a round, from the step records."""
    out: dict[str, dict[str, float]] = {}

    def add(party: str, key: str, value: float) -> None:
        out.setdefault(party, {"bytes_sent": 0.0, "bytes_received": 0.0})[key] += value

    for r in records:
        m = r.get("metrics", {})
        if r["step"] == "generate" and "bytes_sent" in m:
            add(r["party"], "bytes_sent", m["bytes_sent"])
        elif r["step"] == "teach" and "bytes_sent" in m:
            teacher, student = r["params"]["teacher"], r["params"]["student"]
            add(teacher, "bytes_sent", m["bytes_sent"])
            add(teacher, "bytes_received", m["bytes_received"])
            add(student, "bytes_received", m["bytes_sent"])
    return out


def _metric_batch(metrics: dict[str, float], step: int = 0, ts: int | None = None):
    from mlflow.entities import Metric

    ts = ts or int(time.time() * 1000)
    return [
        Metric(k.replace("/", "."), float(v), ts, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    ]


def _log(client, run_id: str, metrics=None, params=None, tags=None, step: int = 0) -> None:
    from mlflow.entities import Param, RunTag

    m = _metric_batch(metrics or {}, step)
    p = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    t = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
    for i in range(0, max(len(m), len(p), len(t), 1), 900):
        client.log_batch(run_id, metrics=m[i : i + 900], params=p[i : i + 900], tags=t[i : i + 900])


def log_federation(
    cfg: ExperimentConfig,
    store: Store,
    final_state: dict,
    pipeline_run: str = "",
    run_started: float = 0.0,
    results: dict | None = None,
) -> str:
    """Write the federation > round > step tree to MLflow; return the parent run id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flminillm.report import party_summary, results_table

    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = MlflowClient(cfg.tracking.uri)
    exp_id = _experiment_id(client, cfg)
    fed = final_state["federation"]
    chain = round_chain(store, final_state)
    results = results or results_table(cfg, chain[0], chain[-1])

    parent = client.create_run(
        exp_id,
        run_name=f"{cfg.name}{'-' + pipeline_run if pipeline_run else ''}",
        tags={
            FEDERATION_TAG: fed,
            "flminillm.kind": "federation",
            "flminillm.pipeline_run": pipeline_run,
        },
    )
    pid = parent.info.run_id
    params: dict[str, str] = {}
    _flatten("", json.loads(cfg.to_json()), params)
    _log(client, pid, params=params, tags={"flminillm.config_digest": cfg.digest()})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(json.loads(cfg.to_json()), indent=1))
        (Path(tmp) / "results.json").write_text(json.dumps(results, indent=1))
        (Path(tmp) / "round_manifest.json").write_text(json.dumps(final_state, indent=1))
        client.log_artifacts(pid, tmp)

    for manifest in chain:
        r = manifest["round"]
        records = [
            rec for rec in store.list_records(f"{fed}/round-{r:04d}/") if rec["federation"] == fed
        ]
        rr = client.create_run(
            exp_id,
            run_name=f"round-{r}" if r else "round-0 (setup)",
            tags={
                "mlflow.parentRunId": pid,
                FEDERATION_TAG: fed,
                "flminillm.kind": "round",
                "flminillm.round_manifest": manifest.get("manifest", ""),
            },
        )
        rid = rr.info.run_id
        round_metrics: dict[str, float] = {}
        for party, fams in manifest.get("eval", {}).items():
            for fam, m in fams.items():
                for k in ("exact_match", "rouge_l"):
                    round_metrics[f"{party}.{fam}.{k}"] = m[k]
        for party, summary in party_summary(results, manifest).items():
            for k, v in summary.items():
                round_metrics[f"{party}.{k}"] = v
        for party, b in bytes_by_party(records).items():
            for k, v in b.items():
                round_metrics[f"{party}.{k}"] = v
        _log(
            client,
            rid,
            metrics=round_metrics,
            params={"round": r, "models": json.dumps(manifest["models"])},
        )
        _log(client, pid, metrics=round_metrics, step=max(r, 0))
        for rec in sorted(records, key=lambda x: x["started"]):
            cached = bool(run_started) and rec["started"] < run_started
            tags = {
                "mlflow.parentRunId": rid,
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
                params={
                    "round": r,
                    "step": rec["step"],
                    "party": rec["party"],
                    **rec.get("params", {}),
                },
            )
            status = "FINISHED" if rec.get("status") == "succeeded" else "FAILED"
            client.set_terminated(
                sr.info.run_id,
                status,
                end_time=int((rec["started"] + rec.get("duration_s", 0)) * 1000),
            )
        client.set_terminated(rid, "FINISHED")
    client.set_terminated(pid, "FINISHED")
    return pid
