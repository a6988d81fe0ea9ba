"""A federation's steps called one after another in one Python process, from the same
wiring as the pipelines (flminillm.rounds), for benchmarks that run many federations.

The KFP pipelines stay the way to run a federation (`flminillm run`, a cluster); this runner
skips the process start-up of every task (docs/performance.md measures that overhead) and
can share the steps that many variants of one experiment have in common: `Memo` keys
prepare, init_model and local_sft on the parts of the config those steps read, so a
benchmark pre-trains each model and runs round 1's local fine-tuning once per seed, not
once per method.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from flminillm import invoke
from flminillm.artifacts import open_store_for
from flminillm.config import Config
from flminillm.faults import faults_for
from flminillm.ledger import bytes_by_party, round_records
from flminillm.rounds import (
    ITEM,
    ROUND_RESULT,
    ROUND_TASKS,
    SERVER,
    SETUP,
    SETUP_RESULT,
    Gather,
    Out,
    Param,
    Task,
    Wiring,
    tasks,
)
from flminillm.steps import STEPS

# call(step, cfg, **kwargs) -> the recipe's output
Caller = Callable[..., Any]
# on_round(round, manifest, bytes by party {party: {"sent", "received"}})
OnRound = Callable[[int, dict, dict], None]


def run_wiring(
    wiring: Wiring, cfg: Config, params: dict[str, Any], call: Caller = invoke.call
) -> dict[str, Any]:
    """Run every task of `wiring` in order; returns each task's output (a loop's tasks: a
    list, one per item), passed between tasks as a pipeline passes them (JSON text)."""
    outs: dict[str, Any] = {}
    for entry in wiring:
        if isinstance(entry, Task):
            outs[entry.name] = run_task(entry, cfg, params, call, outs=outs)
            continue
        gathered: dict[str, list] = {t.name: [] for t in entry.body}
        for item in outs[entry.over]:
            local: dict[str, Any] = {}
            for t in entry.body:
                local[t.name] = run_task(t, cfg, params, call, item, outs, local)
                gathered[t.name].append(local[t.name])
        outs.update(gathered)
    return outs


def run_task(
    task: Task,
    cfg: Config,
    params: dict[str, Any],
    call: Caller = invoke.call,
    item: Any = None,
    outs: dict[str, Any] | None = None,
    local: dict[str, Any] | None = None,
) -> Any:
    """One task of a wiring, its arguments resolved as a pipeline resolves them (`outs`: the
    outputs of the tasks before it, a loop's gathered; `local`: those of the tasks before it
    in its loop's body, for this item); returns its output as JSON text."""
    outs, local = outs or {}, local or {}

    def arg(value: Any) -> Any:
        if isinstance(value, Param):
            return params[value.name]
        if isinstance(value, Out):
            return local[value.task] if value.task in local else outs[value.task]
        if isinstance(value, Gather):
            return list(outs[value.task])
        if value is ITEM:
            return item
        if value is SERVER:
            return cfg.server.id
        return value

    kwargs = {k: arg(v) for k, v in task.args.items()}
    return invoke.encode_output(STEPS[task.step], call(task.step, cfg, **kwargs))


def clients_local_sft(cfg: Config, state: dict, r: int, memo: Memo) -> list[str]:
    """Every client's local_sft of round r from the manifest `state`, called as the round
    wiring calls it (ROUND_TASKS' local_sft task), through memo: a baseline that fine-tunes
    only, and a benchmark's shared set-up, make the very calls (and memo keys) a round does."""
    task = next(t for t in tasks(ROUND_TASKS) if t.step == "local_sft")
    params = {"state_json": json.dumps(state), "round_index": r}
    return [run_task(task, cfg, params, memo.call, item=c.id) for c in cfg.clients]


def _slice(cfg: Config, step: str, party: str | None) -> dict[str, Any]:
    """The config sections `step` reads (for prepare, init_model, local_sft)."""
    data = cfg.experiment_dict()
    out: dict[str, Any] = {
        "seed": cfg.seed,
        "data": data["data"],
        "tokenizer": data["tokenizer"],
        "families_by_client": cfg.families_by_client(),
        "parties": [p.id for p in cfg.parties],
    }
    if step in ("init_model", "local_sft"):
        out["engine"] = data["engine"]
        out["model"] = cfg.party(party).model.model_dump(mode="json") if party else None
    if step == "init_model":
        out["pretrain"] = data["pretrain"]
    if step == "local_sft":
        out["local_sft"] = data["local_sft"]
    return out


class Memo:
    """Results of the shareable steps, keyed by (step, config slice, the inputs it reads)."""

    SHAREABLE = ("prepare", "init_model", "local_sft")

    def __init__(self, entries: dict[str, Any] | None = None):
        self.entries: dict[str, Any] = dict(entries or {})
        self.hits = 0

    @staticmethod
    def _party(step: str, kwargs: dict[str, Any]) -> str | None:
        return kwargs.get("party_id") or kwargs.get("client_id")

    def key(self, cfg: Config, step: str, kwargs: dict[str, Any]) -> str:
        party = self._party(step, kwargs)
        inputs: list[Any] = []
        if step == "init_model":
            state = json.loads(kwargs["state_json"])
            inputs = [state["tokenizer"], state["data"]["pretrain"], party]
        elif step == "local_sft":
            state = json.loads(kwargs["state_json"])
            train = state["data"]["clients"][party]["train"]
            inputs = [state["tokenizer"], state["models"][party], train, kwargs["round_index"],
                      party]  # fmt: skip
        blob = json.dumps([step, _slice(cfg, step, party), inputs], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def call(self, step: str, cfg: Config, **kwargs: Any) -> Any:
        """invoke.call, or the stored result of the same shareable step."""
        party = self._party(step, kwargs)
        # a step that FLMINILLM_FAULTS names must run (and fail), not be shared
        if step not in self.SHAREABLE or faults_for(step, party, kwargs.get("round_index", 0)):
            return invoke.call(step, cfg, **kwargs)
        k = self.key(cfg, step, kwargs)
        if k in self.entries:
            self.hits += 1
            out = json.loads(json.dumps(self.entries[k]))
        else:
            out = invoke.call(step, cfg, **kwargs)
            if not (isinstance(out, dict) and out.get("dropped")):  # never share a drop-out
                self.entries[k] = json.loads(json.dumps(out))
        if step == "prepare":
            out["federation"] = cfg.federation_id()
        return out


def setup(cfg: Config, memo: Memo | None = None) -> dict:
    """prepare -> init_model for every party -> evaluate (round 0): the round-0 manifest."""
    call = (memo or Memo()).call
    return json.loads(run_wiring(SETUP, cfg, {}, call)[SETUP_RESULT])


def run_round(cfg: Config, state: dict, r: int, memo: Memo | None = None) -> tuple[dict, dict]:
    """One round from the manifest `state`: (the evaluate step's manifest, the bytes each
    party sent and received in this round's messages)."""
    call = (memo or Memo()).call
    outs = run_wiring(ROUND_TASKS, cfg, {"state_json": json.dumps(state), "round_index": r}, call)
    records = round_records(open_store_for(cfg), cfg.federation_id(), r)
    return json.loads(outs[ROUND_RESULT]), bytes_by_party(records)


def run_federation(
    cfg: Config, memo: Memo | None = None, on_round: OnRound | None = None
) -> list[dict]:
    """setup + cfg.rounds rounds; returns the manifests of rounds 0..R."""
    memo = memo or Memo()
    states = [setup(cfg, memo)]
    if on_round:
        on_round(0, states[0], {})
    for r in range(1, cfg.rounds + 1):
        state, sent = run_round(cfg, states[-1], r, memo)
        states.append(state)
        if on_round:
            on_round(r, state, sent)
    return states
