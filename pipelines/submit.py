"""Submit a federation (or one round from a round manifest) to Kubeflow Pipelines.

Uses `kfp.Client` against the KFP v2beta1 REST API: it gets or creates the experiment
`cfg.cluster.experiment`, then creates a run from the compiled package (the pipeline spec
travels inside the run; nothing is uploaded as a named pipeline).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flminillm.config import Config
from pipelines.cluster import compile_pipeline

_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


@dataclass(frozen=True)
class Submitted:
    run_id: str
    url: str
    experiment_id: str
    mlflow_run: str | None = None


def run_url(host: str, run_id: str) -> str:
    return f"{host.rstrip('/')}/#/runs/details/{run_id}"


def read_manifest(source: str, cfg: Config) -> dict:
    """A round manifest from a JSON file, or from the artifact store when `source` is
    `sha256:<hex>` (the digest printed by `flminillm run` and logged to MLflow)."""
    m = _DIGEST.match(source.strip().lower())
    if m:
        from flminillm.artifacts import open_store_for

        st = open_store_for(cfg)
        try:
            manifest = st.get_json(m.group(1))
        except Exception as err:  # not found, corrupt, unreachable: say where we looked
            raise ValueError(
                f"--from-manifest: cannot read {source} from the store {cfg.store.uri}: {err}"
            ) from None
        if isinstance(manifest, dict):
            # the store holds a manifest without its own digest; steps read it from here
            manifest.setdefault("manifest", m.group(1))
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"--from-manifest: {source!r} is neither a file nor sha256:<64 hex digits>"
            )
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--from-manifest: {source} is not JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "round_manifest":
        raise ValueError(
            f"--from-manifest: {source} is not a round manifest (kind != round_manifest)"
        )
    if not manifest.get("manifest"):
        raise ValueError(
            f"--from-manifest: {source} lacks its digest ('manifest'); give the "
            "round_manifest.json that `flminillm run` wrote, or sha256:<digest>"
        )
    return manifest


def next_round(manifest: dict, round_index: int | None, cfg: Config) -> int:
    """The round to run from `manifest` (the output of round r runs round r + 1), of the
    federation `cfg` names: a manifest of another federation, or a round past the config's
    last, is refused (the last round's manifest holds the federation's final server, its
    weights averaged over its last rounds where distill.server_average > 1: not a state
    to train on from)."""
    fid = manifest.get("federation")
    if fid and fid != cfg.federation_id():
        raise ValueError(
            f"--from-manifest: the manifest is of federation {fid}, the config's is "
            f"{cfg.federation_id()}; give the config that federation ran with"
        )
    done = manifest.get("round")
    if round_index is None:
        if not isinstance(done, int):
            raise ValueError("--round: the manifest does not say its round; give --round N")
        round_index = done + 1
    if round_index < 1:
        raise ValueError(f"--round: must be >= 1 (got {round_index})")
    if isinstance(done, int) and round_index != done + 1:
        raise ValueError(
            f"--round {round_index}: the manifest is the state after round {done}, so it "
            f"starts round {done + 1}; for round {round_index} use the manifest of round "
            f"{round_index - 1}"
        )
    if round_index > cfg.rounds:
        raise ValueError(
            f"--round {round_index}: the federation has {cfg.rounds} rounds (config `rounds`), "
            f"and the manifest of round {cfg.rounds} is its end (its final server, not a "
            "round's state); to go further, run a federation with more rounds"
        )
    return round_index


def submit(
    cfg: Config,
    host: str,
    run_name: str | None = None,
    caching: bool = True,
    manifest: dict | None = None,
    round_index: int | None = None,
    client_factory: Callable[..., Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> Submitted:
    """Compile and submit. With `manifest`, submit the single-round pipeline that runs round
    `round_index` from that state; else the whole federation. `caching=False` re-runs every
    step (compiled with caching off, and the run's caching override off)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if client_factory is None:
        import kfp

        client_factory = kfp.Client
    cluster = cfg.cluster
    experiment_json = cfg.experiment_json()
    started = time.time()
    if manifest is not None:
        r = next_round(manifest, round_index, cfg)
        name = run_name or f"{cfg.name}-round-{r}-{time.strftime('%Y%m%d-%H%M%S')}"
        arguments: dict[str, Any] = {
            "experiment_json": experiment_json,
            # serialised as the evaluate step does: from the round_manifest.json that
            # `flminillm run` wrote, the same text, so cache keys match that run's
            "state_json": json.dumps(manifest),
            "round_index": r,
        }
    else:
        name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        arguments = {
            "experiment_json": experiment_json,
            "run_label": name,
            "run_started": started,
            # tags of the federation's MLflow run: where it ran
            "run_tags": json.dumps(
                {"flminillm.runner": "kubeflow", "kfp.experiment": cluster.experiment}
            ),
        }
    mlflow_run = None
    if manifest is None and cfg.tracking.enabled:
        mlflow_run = open_mlflow_run(cfg, name, started, json.loads(arguments["run_tags"]), log)
    with tempfile.TemporaryDirectory(prefix="flminillm-submit-") as tmp:
        package = compile_pipeline(
            cfg, Path(tmp) / "pipeline.yaml", round_only=manifest is not None, caching=caching,
            mlflow_run=mlflow_run,
        )  # fmt: skip
        client = client_factory(host=host, namespace=cluster.namespace or "kubeflow")
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments,
            run_name=name,
            experiment_name=cluster.experiment,
            namespace=cluster.namespace,
            # None keeps the compiled per-task settings (the MLflow step is never cached)
            enable_caching=None if caching else False,
            service_account=cluster.service_account or None,
        )
    run_id = result.run_id
    experiment_id = getattr(getattr(result, "run_info", None), "experiment_id", "") or ""
    url = run_url(host, run_id)
    log(f"submitted run {name!r} ({run_id}) to experiment {cluster.experiment!r}")
    if mlflow_run:
        from flminillm.tracking import client_for

        client_for(cfg.tracking.uri).set_tag(mlflow_run, "kfp.run_id", run_id)
    return Submitted(run_id=run_id, url=url, experiment_id=experiment_id, mlflow_run=mlflow_run)


def open_mlflow_run(
    cfg: Config, name: str, started: float, tags: dict[str, str], log: Callable[[str], None]
) -> str | None:
    """The federation's MLflow run, opened now so that every step logs itself under it as it
    finishes; None (the `track` step logs the whole tree at the end) when the tracking server
    cannot be reached from here."""
    from flminillm.tracking import start_federation

    try:
        run_id = start_federation(cfg, name, started, tags)
    except Exception as err:  # noqa: BLE001 - tracking must not stop a submission
        log(f"MLflow at {cfg.tracking.uri} is not reachable from here ({type(err).__name__}); "
            "the run's track step logs it when the run ends")  # fmt: skip
        return None
    log(f"MLflow run {run_id} at {cfg.tracking.uri}: steps appear as they finish")
    return run_id
