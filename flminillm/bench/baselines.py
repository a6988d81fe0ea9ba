"""The baselines of `flminillm bench quality`, peers of the in-process runner
(`flminillm.inprocess.run_federation`: same arguments, same per-round callback):

- local-only: clients fine-tune on their own data each round, nothing is exchanged; the
  server (public prompts only) keeps its pre-trained model;
- fedavg: every party gets the server's architecture; clients fine-tune from the global
  model, the server averages their weights (by data size) and sends the average back;
- pooled: each architecture fine-tuned on the union of all clients' data for as many
  steps as a client's local fine-tuning gets over all rounds (the upper bound).
"""

from __future__ import annotations

import json

from flminillm import invoke
from flminillm.artifacts import (
    load_examples,
    load_model,
    load_tokenizer,
    open_store_for,
    save_model,
    seed,
)
from flminillm.config import Config
from flminillm.inprocess import Memo, OnRound, clients_local_sft, setup


def fedavg_bytes(server: str, live: list[str], size: int) -> dict[str, dict[str, int]]:
    """FedAvg's bytes in one round: every live client sends its weights (`size` bytes) and
    gets the average back; the server does both with each of them."""
    out = {c: {"sent": size, "received": size} for c in live}
    out[server] = {"sent": size * len(live), "received": size * len(live)}
    return out


def _sft(cfg: Config, store, state: dict, party: str, examples, steps_: int, tag: str) -> str:
    from flminillm.training import encode_examples, train_lm

    tok = load_tokenizer(store, state["tokenizer"])
    model = load_model(store, party, state["models"][party])
    s = cfg.local_sft
    rows = encode_examples(tok, examples, cfg.party(party).model.max_positions, s.prompt_loss)
    train_lm(
        model, rows, steps=steps_, batch_size=s.batch_size, lr=s.lr, pad_id=tok.pad_token_id,
        seed=seed(cfg, tag, party), warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm, engine=cfg.engine,
    )  # fmt: skip
    return save_model(store, party, model)


def run_local_only(cfg: Config, memo: Memo, on_round: OnRound) -> list[dict]:
    states = [setup(cfg, memo)]
    on_round(0, states[0], {})
    for r in range(1, cfg.rounds + 1):
        outs = clients_local_sft(cfg, states[-1], r, memo)
        states.append(invoke.call("evaluate", cfg, state_json=json.dumps(states[-1]),
                                  round_index=r, update="", updates=outs))  # fmt: skip
        on_round(r, states[-1], {})
    return states


def run_fedavg(cfg: Config, memo: Memo, on_round: OnRound) -> list[dict]:
    from flminillm.models import average_state_dicts, count_parameters

    store, server = open_store_for(cfg), cfg.server.id
    prep = memo.call("prepare", cfg)
    init = memo.call("init_model", cfg, state_json=json.dumps(prep), party_id=server)
    # one global model: the server's pre-trained one, copied to every client
    glob = load_model(store, server, init["models"][server])
    size = count_parameters(glob) * 4  # fp32 weights, each way
    models = {server: init["models"][server]}
    models.update({c.id: save_model(store, c.id, glob) for c in cfg.clients})
    state = invoke.call("evaluate", cfg, state_json=json.dumps(prep), round_index=0,
                        update=json.dumps({"models": models}), updates=[])  # fmt: skip
    states = [state]
    on_round(0, state, {})
    sizes = {
        c: len(store.scoped(c).get_json(d["train"])) for c, d in state["data"]["clients"].items()
    }
    for r in range(1, cfg.rounds + 1):
        sj = json.dumps(state)
        live = []
        for c in cfg.clients:
            out = memo.call("local_sft", cfg, state_json=sj, round_index=r, client_id=c.id)
            if not out.get("dropped"):
                live.append(out)
        glob.load_state_dict(average_state_dicts(  # one client's model in memory at a time
            (load_model(store, o["party"], o["models"][o["party"]]).state_dict() for o in live),
            [sizes[o["party"]] for o in live],
        ))  # fmt: skip
        models = {server: save_model(store, server, glob)}
        models.update({c.id: save_model(store, c.id, glob) for c in cfg.clients})
        state = invoke.call("evaluate", cfg, state_json=sj, round_index=r,
                            update=json.dumps({"models": models}), updates=[])  # fmt: skip
        states.append(state)
        on_round(r, state, fedavg_bytes(server, [o["party"] for o in live], size))
    return states


def run_pooled(cfg: Config, memo: Memo, on_round: OnRound) -> list[dict]:
    store = open_store_for(cfg)
    state = setup(cfg, memo)
    on_round(0, state, {})
    pooled = [
        e for c, d in state["data"]["clients"].items() for e in load_examples(store, c, d["train"])
    ]
    n_steps = cfg.local_sft.steps + (cfg.rounds - 1) * cfg.local_sft.later_round_steps
    models = {p.id: _sft(cfg, store, state, p.id, pooled, n_steps, "pooled") for p in cfg.parties}
    final = invoke.call("evaluate", cfg, state_json=json.dumps(state), round_index=cfg.rounds,
                        update=json.dumps({"models": models}), updates=[])  # fmt: skip
    on_round(cfg.rounds, final, {})
    return [state, final]


RUNNERS = {"local-only": run_local_only, "fedavg": run_fedavg, "pooled": run_pooled}
