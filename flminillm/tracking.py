"""MLflow lineage, written as it happens: a parent run per federation, a child per round, a
child per step.

- `start_federation`: the federation run, created when the run starts (with its config, so
  that `flminillm rerun` works even on a run that was killed), RUNNING until it ends.
- `log_step`: each step, when it finishes (or fails), logs its own run under its round's
  run from its ledger record (start and end times from the record); the round run is
  created by the round's first step and closed by its `evaluate` step, with the round's
  scores and bytes. It is called by the invocation layer (flminillm.invoke) from a ledger
  listener in the step's own process, locally and on a cluster.
- `finish_federation`: the summary (results, the final manifest, data sets, the steps that
  came from the cache) and the final status; called by the `track` step at the end of a
  pipeline and by `flminillm run` when a run fails.
- `mark_dead_runs`: a federation run left RUNNING by a process that no longer exists (killed)
  is marked KILLED the next time the tracking store is opened by `flminillm`.

Tag keys are short (`in.model`, `out.model`: digests); every step run also has a
`lineage.json` artifact with its whole record (inputs and outputs with their URIs).
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from flminillm.config import Config
from flminillm.ledger import bytes_by_party, ledger, round_manifest
from flminillm.store import Store

FEDERATION_TAG = "flminillm.federation"
RUN_ENV = "FLMINILLM_MLFLOW_RUN"  # the federation's MLflow run, for the steps to log under


def tracking_uri(cfg: Config) -> str:
    """The tracking URI a step uses: on a cluster the one its pod gets from the MLflow secret
    (with its credentials), else the config's."""
    if os.environ.get("KFP_POD_NAME") and os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return cfg.tracking.uri


def client_for(uri: str):
    # an explicit client: mlflow.set_tracking_uri would also export MLFLOW_TRACKING_URI to
    # this process's environment and leak into later runs
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


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


def _ms(t: float) -> int:
    return int(t * 1000)


def _metric_batch(metrics: dict[str, float], step: int = 0, ts: int | None = None):
    from mlflow.entities import Metric

    ts = ts or _ms(time.time())
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


def _log_json(client, run_id: str, files: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, obj in files.items():
            (Path(tmp) / name).write_text(json.dumps(obj, indent=1))
        client.log_artifacts(run_id, tmp)


def _log_datasets(client, run_id: str, records: list[dict]) -> None:
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


# ----------------------------------------------------------------------------------------
# the federation run
# ----------------------------------------------------------------------------------------
def start_federation(
    cfg: Config, run_label: str = "", started: float | None = None,
    extra_tags: dict[str, str] | None = None, owner_pid: int | None = None,
) -> str:  # fmt: skip
    """Create the federation's run (RUNNING) with its config; returns its id. `owner_pid`:
    the local process that runs it (if it dies, the run is marked KILLED)."""
    client = client_for(tracking_uri(cfg))
    exp_id = _experiment_id(client, cfg)
    mark_dead_runs(client, exp_id)
    fed = cfg.federation_id()
    run = client.create_run(
        exp_id,
        run_name=f"{cfg.name}{'-' + run_label if run_label else ''}",
        start_time=_ms(started or time.time()),
        tags={
            FEDERATION_TAG: fed,
            "flminillm.kind": "federation",
            "flminillm.run_label": run_label,
            "flminillm.config_digest": cfg.digest(),
            **(
                {"flminillm.host": socket.gethostname(), "flminillm.pid": str(owner_pid)}
                if owner_pid
                else {}
            ),
            **(extra_tags or {}),
        },
    )
    rid = run.info.run_id
    params: dict[str, str] = {}
    _flatten("", cfg.experiment_dict(), params)
    _log(client, rid, params=params)
    _log_json(client, rid, {"config.json": json.loads(cfg.to_json())})
    return rid


def finish_federation(
    cfg: Config,
    store: Store,
    run_id: str,
    run_started: float,
    status: str = "FINISHED",
    error: str = "",
    logged_live: bool = True,
) -> None:
    """Add the summary to the federation run and close it with `status`: the rounds and
    steps not logged while they ran (those that came from the cache, or all of them when
    `logged_live` is false), results and the final round manifest, the data sets."""
    from flminillm.report import results_table

    client = client_for(tracking_uri(cfg))
    parent = client.get_run(run_id)
    exp_id = parent.info.experiment_id
    fed = cfg.federation_id()
    by_round = ledger(store, fed)
    if status != "FINISHED":
        # a failed run: only the rounds it reached (later records belong to older runs)
        reached = [
            r for r, recs in by_round.items() if any(x["started"] >= run_started for x in recs)
        ]
        by_round = {r: v for r, v in by_round.items() if r <= max(reached, default=0)}
    rounds = {}
    for run in sorted(_children(client, parent), key=lambda x: x.info.run_id, reverse=True):
        rounds[int(run.data.tags.get("flminillm.round", -1))] = run  # the smallest id wins
    manifests = {r: round_manifest(store, recs) for r, recs in by_round.items()}
    for r in sorted(by_round):
        records = sorted(by_round[r], key=lambda x: x["started"])
        missing = [x for x in records if not logged_live or x["started"] < run_started]
        rr = rounds.get(r) or _create_round(client, exp_id, run_id, fed, r, records[0]["started"])
        for rec in missing:
            _log_step_run(client, exp_id, rr.info.run_id, fed, r, rec, cached=logged_live)
        if rr.info.status == "RUNNING":  # not closed by its evaluate step while it ran
            _close_round(client, run_id, rr.info.run_id, r, records, manifests[r], status)
    done = [m for _, m in sorted(manifests.items()) if m is not None]
    files: dict[str, Any] = {}
    if done:
        files["results.json"] = results_table(cfg, done[0], done[-1])
        files["round_manifest.json"] = done[-1]
    if files:
        _log_json(client, run_id, files)
    if by_round.get(0):
        _log_datasets(client, run_id, by_round[0])
    if error:
        _log(client, run_id, tags={"flminillm.error": error[:4000]})
    client.set_terminated(run_id, status, end_time=_ms(time.time()))


def log_federation(
    cfg: Config, store: Store, run_label: str = "", run_started: float = 0.0,
    status: str = "FINISHED", error: str = "", extra_tags: dict[str, str] | None = None,
) -> str:  # fmt: skip
    """The whole tree at once, from the ledger, for a run that was not tracked while it ran
    (a cluster run submitted without a reachable tracking server); returns the run id."""
    rid = start_federation(cfg, run_label, run_started or None, extra_tags)
    finish_federation(cfg, store, rid, run_started, status, error, logged_live=False)
    return rid


def _children(client, run) -> list:
    return client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
        max_results=5000,
    )


def mark_dead_runs(client, exp_id: str) -> list[str]:
    """Mark KILLED the federation runs of this host left RUNNING by a process that is gone
    (and their open rounds); returns their ids."""
    host = socket.gethostname()
    runs = client.search_runs(
        [exp_id],
        filter_string="tags.`flminillm.kind` = 'federation' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    dead = []
    for run in runs:
        tags = run.data.tags
        pid = tags.get("flminillm.pid", "")
        if tags.get("flminillm.host") != host or not pid.isdigit() or _alive(int(pid)):
            continue
        ends = [run.info.start_time]
        for rnd in _children(client, run):
            steps = _children(client, rnd)
            ends += [s.info.end_time or 0 for s in steps] + [rnd.info.end_time or 0]
            if rnd.info.status == "RUNNING":
                client.set_terminated(rnd.info.run_id, "KILLED", end_time=max(
                    [rnd.info.start_time, *[s.info.end_time or 0 for s in steps]]))  # fmt: skip
        _log(client, run.info.run_id, tags={
            "flminillm.error": f"the process that ran it (pid {pid} on {host}) is gone: killed"})  # fmt: skip
        client.set_terminated(run.info.run_id, "KILLED", end_time=max(ends))
        dead.append(run.info.run_id)
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------
# rounds and steps
# ----------------------------------------------------------------------------------------
def _round_name(r: int) -> str:
    return f"round-{r}" if r else "round-0 (setup)"


def _create_round(client, exp_id: str, parent: str, fed: str, r: int, started: float):
    run = client.create_run(
        exp_id,
        run_name=_round_name(r),
        start_time=_ms(started),
        tags={
            "mlflow.parentRunId": parent,
            FEDERATION_TAG: fed,
            "flminillm.kind": "round",
            "flminillm.round": str(r),
        },
    )
    _log(client, run.info.run_id, params={"round": r})
    return run


def _find_round(client, exp_id: str, parent: str, r: int):
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`flminillm.round` = '{r}'",
        max_results=10,
    )
    return min(runs, key=lambda x: x.info.run_id) if runs else None


def _close_round(
    client, parent: str, round_id: str, r: int, records: list[dict], manifest: dict | None,
    status: str = "FINISHED",
) -> None:  # fmt: skip
    """The round's scores, bytes and models on its run (and on the federation run, as the
    history over rounds), then close it."""
    from flminillm.report import party_summary

    metrics: dict[str, float] = {}
    tags = {}
    if manifest is not None:
        for party, fams in manifest.get("eval", {}).items():
            for fam, m in fams.items():
                for k in ("exact_match", "rouge_l"):
                    metrics[f"{party}.{fam}.{k}"] = m[k]
        for party, summary in party_summary(manifest).items():
            for k, v in summary.items():
                metrics[f"{party}.{k}"] = v
        tags = {
            "flminillm.round_manifest": manifest.get("manifest", ""),
            "flminillm.dropped": json.dumps(manifest.get("dropped", {})),
        }
    for party, b in bytes_by_party(records).items():
        for k, v in b.items():
            metrics[f"{party}.bytes_{k}"] = v
    params = {"models": json.dumps(manifest["models"])} if manifest is not None else {}
    _log(client, round_id, metrics=metrics, params=params, tags=tags)
    _log(client, parent, metrics=metrics, step=max(r, 0))
    end = max((x["started"] + x.get("duration_s", 0) for x in records), default=time.time())
    # a round whose evaluate step wrote its manifest is done, whatever came after it
    client.set_terminated(round_id, "FINISHED" if manifest else status, end_time=_ms(end))


def _log_step_run(
    client, exp_id: str, round_id: str, fed: str, r: int, rec: dict, cached: bool
) -> None:
    tags = {
        "mlflow.parentRunId": round_id,
        FEDERATION_TAG: fed,
        "flminillm.kind": "step",
        "flminillm.step": rec["step"],
        "flminillm.party": rec["party"],
        "flminillm.status": rec.get("status", "unknown"),
        "flminillm.cache_hit": str(cached).lower(),
        "flminillm.host": rec.get("host", ""),
    }
    for direction, short in (("inputs", "in"), ("outputs", "out")):
        for name, ref in rec.get(direction, {}).items():
            tags[f"{short}.{name}"] = (
                f"sha256:{ref['digest']}" if isinstance(ref, dict) else json.dumps(ref)
            )
    if rec.get("error"):
        tags["flminillm.error"] = rec["error"]
    run = client.create_run(
        exp_id, run_name=f"{rec['step']}.{rec['party']}", start_time=_ms(rec["started"]), tags=tags
    )
    sid = run.info.run_id
    _log(
        client,
        sid,
        metrics={**rec.get("metrics", {}), "duration_s": rec.get("duration_s", 0.0)},
        params={"round": r, "step": rec["step"], "party": rec["party"], **rec.get("params", {})},
    )
    _log_json(client, sid, {"lineage.json": rec})
    status = "FINISHED" if rec.get("status") == "succeeded" else "FAILED"
    client.set_terminated(sid, status, end_time=_ms(rec["started"] + rec.get("duration_s", 0)))


def log_step(cfg: Config, store: Store, run_id: str, rec: dict) -> None:
    """Log one finished (or failed) step under the federation run `run_id`: under its round's
    run, created by the round's first step; the round's evaluate step closes the round."""
    from flminillm.ledger import round_records

    client = client_for(tracking_uri(cfg))
    parent = client.get_run(run_id)
    exp_id = parent.info.experiment_id
    fed, r = rec["federation"], int(rec["round"])
    rr = _find_round(client, exp_id, run_id, r)
    if rr is None:  # the round's first step: create its run (two steps that race to do so
        # agree on the run with the smallest id, and the other is deleted)
        mine = _create_round(client, exp_id, run_id, fed, r, rec["started"])
        rr = _find_round(client, exp_id, run_id, r)
        if rr.info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)
    _log_step_run(client, exp_id, rr.info.run_id, fed, r, rec, cached=False)
    if rec["step"] == "evaluate" and rec.get("status") == "succeeded":
        records = round_records(store, fed, r)
        _close_round(client, run_id, rr.info.run_id, r, records, round_manifest(store, records))
