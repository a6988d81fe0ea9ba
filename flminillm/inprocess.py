"""A federation's steps called one after another in one Python process, wired exactly like
the round pipeline (pipelines/federation.py), for benchmarks that run many federations.

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
import os
from collections.abc import Callable
from typing import Any

from flminillm import steps
from flminillm.config import ExperimentConfig


def _slice(cfg: ExperimentConfig, step: str, party: str | None) -> dict[str, Any]:
    """The config sections `step` reads (for prepare, init_model, local_sft)."""
    data = cfg.model_dump(mode="json")
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
    """Results of the shareable steps, keyed by (step, config slice, arguments)."""

    SHAREABLE = ("prepare", "init_model", "local_sft")

    def __init__(self, entries: dict[str, Any] | None = None):
        self.entries: dict[str, Any] = dict(entries or {})
        self.hits = 0

    def key(self, cfg: ExperimentConfig, step: str, party: str | None, args: tuple) -> str:
        """args: the step's arguments after config_json; of the state only what it reads."""
        inputs: list[Any] = []
        if step == "init_model":
            state = json.loads(args[0])
            inputs = [state["tokenizer"], state["data"]["pretrain"], args[1]]
        elif step == "local_sft":
            state, r, c = json.loads(args[0]), args[1], args[2]
            train = state["data"]["clients"][c]["train"]
            inputs = [state["tokenizer"], state["models"][c], train, r, c]
        blob = json.dumps([step, _slice(cfg, step, party), inputs], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    @staticmethod
    def _faulted(step: str, party: str | None, round_index: int) -> bool:
        """FLMINILLM_FAULTS names this execution: it must run (and fail), not be shared."""
        return any(
            f["step"] == step
            and f["party"] in ("*", party)
            and f["round"] in ("*", str(round_index))
            for f in steps.parse_faults(os.environ.get(steps.FAULTS_ENV, ""))
        )

    def call(self, cfg: ExperimentConfig, step: str, party: str | None, fn: Callable, *args):
        round_index = args[2] if step == "local_sft" else 0
        if step not in self.SHAREABLE or self._faulted(step, party, round_index):
            return fn(*args)
        k = self.key(cfg, step, party, args[1:])  # args[0] is config_json
        if k in self.entries:
            self.hits += 1
            out = json.loads(json.dumps(self.entries[k]))
        else:
            out = fn(*args)
            if not (isinstance(out, dict) and out.get("dropped")):  # never share a drop-out
                self.entries[k] = json.loads(json.dumps(out))
        if step == "prepare":
            out["federation"] = steps.federation_id(cfg)
        return out


def setup(cfg: ExperimentConfig, memo: Memo | None = None) -> dict:
    """prepare -> init_model for every party -> evaluate (round 0): the round-0 manifest."""
    memo = memo or Memo()
    cj = cfg.to_json()
    prep = memo.call(cfg, "prepare", None, steps.prepare, cj)
    pj = json.dumps(prep)
    inits = [
        json.dumps(memo.call(cfg, "init_model", p.id, steps.init_model, cj, pj, p.id))
        for p in cfg.parties
    ]
    return steps.evaluate(cj, pj, 0, "", inits)


def without_bytes(state: dict) -> dict:
    """A round manifest without the runner's `bytes` (not part of what steps receive)."""
    return {k: v for k, v in state.items() if k != "bytes"}


def run_round(cfg: ExperimentConfig, state: dict, r: int, memo: Memo | None = None) -> dict:
    """One round, wired like the round pipeline; returns the evaluate step's manifest with
    `bytes` added: what each party sent and received in this round's messages."""
    memo = memo or Memo()
    state = without_bytes(state)
    cj, sj, server = cfg.to_json(), json.dumps(state), cfg.server.id
    clients = steps.sample_clients(cj, r)
    sg = steps.generate(cj, sj, r, server)
    sgj = json.dumps(sg)
    sft, taught = {}, []
    for c in clients:
        sft[c] = json.dumps(memo.call(cfg, "local_sft", c, steps.local_sft, cj, sj, r, c))
        taught.append(json.dumps(steps.teach(cj, sj, r, c, sft[c], sgj)))
    sd = json.dumps(steps.distill(cj, sj, r, server, "", sgj, taught))
    outs, gens, teaches = [], [], []
    for c in clients:
        cg = steps.generate(cj, sj, r, c, sd)
        st = steps.teach(cj, sj, r, server, sd, json.dumps(cg))
        gens.append(cg)
        teaches.append(st)
        outs.append(json.dumps(steps.distill(cj, sj, r, c, sd, json.dumps(cg), [json.dumps(st)])))
    new = steps.evaluate(cj, sj, r, sd, outs)
    new["bytes"] = round_bytes(server, sg, [json.loads(t) for t in taught], gens, teaches)
    return new


def round_bytes(
    server: str, server_gen: dict, client_teach: list[dict], gens: list[dict], teaches: list[dict]
) -> dict[str, dict[str, int]]:
    """{party: {"sent": bytes, "received": bytes}} for one round's messages. The server's
    rollouts go to every live client; each client returns a teaching message; each client
    sends its rollouts and gets the server's teaching back."""
    out = {server: {"sent": 0, "received": 0}}
    for t in client_teach:
        if t.get("dropped"):
            continue
        c = t["teacher"]
        out[c] = {"sent": t["bytes"], "received": server_gen["bytes"]}
        out[server]["sent"] += server_gen["bytes"]
        out[server]["received"] += t["bytes"]
    for g, t in zip(gens, teaches, strict=True):
        if g.get("dropped") or t.get("dropped"):
            continue
        c = g["party"]
        out.setdefault(c, {"sent": 0, "received": 0})
        out[c]["sent"] += g["bytes"]
        out[c]["received"] += t["bytes"]
        out[server]["received"] += g["bytes"]
        out[server]["sent"] += t["bytes"]
    return out


def run_federation(
    cfg: ExperimentConfig,
    memo: Memo | None = None,
    on_round: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """setup + cfg.rounds rounds; returns the manifests of rounds 0..R."""
    memo = memo or Memo()
    states = [setup(cfg, memo)]
    if on_round:
        on_round(0, states[0])
    for r in range(1, cfg.rounds + 1):
        states.append(run_round(cfg, states[-1], r, memo))
        if on_round:
            on_round(r, states[-1])
    return states
