"""Failures on purpose and failures survived: fault injection (FLMINILLM_FAULTS), retries
of transient errors, and clients dropping out of a round."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flminillm.store import Store

FAULTS_ENV = "FLMINILLM_FAULTS"
RETRIES_ENV = "FLMINILLM_STEP_RETRIES"
T = TypeVar("T")


class InjectedFault(RuntimeError):
    """A failure injected on purpose (FLMINILLM_FAULTS), to rehearse recovery."""


class TransientError(RuntimeError):
    """A failure worth retrying (I/O, network, an injected transient fault)."""


def parse_faults(spec: str) -> list[dict[str, Any]]:
    """`step:party:round[:times]`, comma-separated; `*` matches any party or round.
    times = how many executions fail (then the step succeeds: a transient fault);
    without it every execution fails."""
    faults = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"{FAULTS_ENV}: {item!r} is not step:party:round[:times]")
        faults.append(
            {
                "step": parts[0],
                "party": parts[1],
                "round": parts[2],
                "times": int(parts[3]) if len(parts) == 4 else None,
            }
        )
    return faults


def faults_for(step: str, party: str | None, round_index: int) -> list[dict[str, Any]]:
    """The faults FLMINILLM_FAULTS names for this execution of `step`."""
    return [
        f
        for f in parse_faults(os.environ.get(FAULTS_ENV, ""))
        if f["step"] == step
        and f["party"] in ("*", party)
        and f["round"] in ("*", str(round_index))
    ]


def maybe_inject_fault(store: Store, fed: str, step: str, party: str, round_index: int) -> None:
    """Fail this execution if FLMINILLM_FAULTS names it (for tests and recovery drills)."""
    for f in faults_for(step, party, round_index):
        if f["times"] is None:
            raise InjectedFault(f"injected fault in {step} of {party}, round {round_index}")
        name = f"{fed}/faults/{step}.{party}.{round_index}.json"
        seen = (store.list_records(name) or [{"count": 0}])[0]["count"]
        if seen < f["times"]:
            store.put_record(name, {"count": seen + 1})
            raise TransientError(
                f"injected transient fault {seen + 1}/{f['times']} in {step} of {party}"
            )


def retrying(fn: Callable[[], T], label: str, attempts: int | None = None,
             backoff: float = 0.5) -> T:  # fmt: skip
    """Call fn(); retry transient errors with exponential backoff."""
    attempts = attempts or int(os.environ.get(RETRIES_ENV, "3"))
    for attempt in range(1, attempts):
        try:
            return fn()
        except (TransientError, ConnectionError, TimeoutError) as err:
            delay = backoff * 2 ** (attempt - 1)
            print(f"{label}: attempt {attempt}/{attempts} failed ({err}); retrying in {delay:.1f}s")
            time.sleep(delay)
    return fn()  # the last attempt: its error is the step's


def dropped_out(client: str, reason: str) -> dict[str, str]:
    """The output of a client's step when the client has dropped out of the round."""
    return {"party": client, "dropped": client, "reason": reason}


def client_step(
    fn: Callable[[], dict], label: str, client: str, round_index: int, sampled: int,
    min_clients: int,
) -> dict:  # fmt: skip
    """Run a client-side step with retries; if it still fails and the round can spare the
    client (`sampled` - 1 >= `min_clients`), the client drops out of the round."""
    try:
        return retrying(fn, label)
    except Exception as err:
        if sampled - 1 < min_clients:
            raise
        reason = f"{label}: {type(err).__name__}: {err}"
        print(f"client {client} drops out of round {round_index}: {reason}")
        return dropped_out(client, reason)
