"""The step ledger: one JSON record per step execution (inputs and outputs with digests,
params, metrics, status, timing), written to the store even when the step fails, and read
back for lineage, tracking and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from flminillm.faults import maybe_inject_fault
from flminillm.ranks import rank_world
from flminillm.store import Store

if TYPE_CHECKING:
    from flminillm.config import ExperimentConfig


# called with every record written, while `listening` (e.g. live MLflow tracking)
_LISTENERS: list[Callable[[dict[str, Any]], None]] = []


@contextlib.contextmanager
def listening(listener: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Call `listener(record)` after every step record written while the block runs."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


def record_name(fed: str, round_index: int, step: str, party: str) -> str:
    return f"{fed}/round-{round_index:04d}/{step}.{party}.json"


@contextlib.contextmanager
def step_record(
    cfg: ExperimentConfig, store: Store, round_index: int, step: str, party: str
) -> Iterator[dict[str, Any]]:
    """Collect a step's lineage (inputs, outputs, params, metrics) and write it to the
    store's ledger, also when the step fails, so that lineage shows what happened."""
    rec: dict[str, Any] = {
        "federation": cfg.federation_id(),
        "round": round_index,
        "step": step,
        "party": party,
        "inputs": {},
        "outputs": {},
        "params": {},
        "metrics": {},
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
    }
    try:
        maybe_inject_fault(store, rec["federation"], step, party, round_index)
        yield rec
        rec["status"] = "succeeded"
    except BaseException as err:
        rec["status"] = "failed"
        rec["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        rec["duration_s"] = round(time.time() - rec["started"], 3)
        rank, world = rank_world()
        if world > 1:
            rec["params"]["world_size"] = world
        if rank == 0:  # under the launcher, one record per step
            store.put_record(record_name(rec["federation"], round_index, step, party), rec)
            for listener in list(_LISTENERS):
                listener(rec)


def ledger(store: Store, fed: str, round_index: int | None = None) -> dict[int, list[dict]]:
    """The federation's step records, by round (of one round only, given `round_index`)."""
    rounds: dict[int, list[dict]] = {}
    prefix = f"{fed}/round-" if round_index is None else f"{fed}/round-{round_index:04d}/"
    for rec in store.list_records(prefix):
        if rec.get("federation") == fed and "step" in rec:
            rounds.setdefault(int(rec["round"]), []).append(rec)
    return rounds


def round_manifest(store: Store, records: list[dict]) -> dict | None:
    """The manifest an evaluate step wrote for its round, if it succeeded."""
    for rec in records:
        if rec["step"] == "evaluate" and rec.get("status") == "succeeded":
            digest = rec["outputs"]["round_manifest"]["digest"]
            return {**store.get_json(digest), "manifest": digest}
    return None


def bytes_by_party(records: list[dict]) -> dict[str, dict[str, int]]:
    """{party: {"sent", "received"}}: the bytes of a round's messages, from its records.

    Every teach step is one exchange: the student's rollouts go to the teacher (the
    server's rollouts to each of its teachers) and the teaching message comes back."""
    out: dict[str, dict[str, int]] = {}

    def add(party: str, key: str, value: float) -> None:
        out.setdefault(party, {"sent": 0, "received": 0})[key] += int(value)

    for r in records:
        m = r.get("metrics", {})
        if r["step"] == "teach" and r.get("status") == "succeeded" and "bytes_sent" in m:
            teacher, student = r["params"]["teacher"], r["params"]["student"]
            add(teacher, "sent", m["bytes_sent"])
            add(teacher, "received", m["bytes_received"])
            add(student, "sent", m["bytes_received"])
            add(student, "received", m["bytes_sent"])
    return out


def round_records(store: Store, fed: str, round_index: int) -> list[dict]:
    """The records of one round of the federation."""
    return [
        rec
        for rec in store.list_records(f"{fed}/round-{round_index:04d}/")
        if rec.get("federation") == fed and "step" in rec
    ]
