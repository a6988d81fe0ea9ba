"""Several processes in one training step: local_sft under the DeepSpeed launcher with
2 ranks (gloo on CPU) takes the same optimizer steps as one process with 2-step gradient
accumulation, and rank 0 alone answers and writes the lineage record."""

from __future__ import annotations

import json

import torch

from flminillm import invoke, steps
from flminillm.artifacts import load_model, open_store_for
from flminillm.config import EngineConfig
from flminillm.launch import needs_launch
from flminillm.ranks import rank_world


def _weights(store, party, digest):
    return {k: v.clone() for k, v in load_model(store, party, digest).state_dict().items()}


def test_local_sft_on_two_ranks_matches_gradient_accumulation(tiny_config):
    cfg = tiny_config.model_copy(
        update={"local_sft": tiny_config.local_sft.model_copy(update={"steps": 3})}
    )
    prep = steps.prepare(cfg)
    pj = json.dumps(prep)
    state = {**prep, **steps.init_model(cfg, pj, "alice")}
    sj = json.dumps(state)

    def with_engine(engine: EngineConfig):
        return cfg.model_copy(update={"engine": engine})

    one = invoke.call(
        "local_sft",
        with_engine(EngineConfig(kind="deepspeed", zero_stage=2, gradient_accumulation_steps=2)),
        state_json=sj, round_index=1, client_id="alice",
    )  # fmt: skip
    two_cfg = with_engine(EngineConfig(kind="deepspeed", zero_stage=2, gpus_per_step=2))
    two = invoke.call("local_sft", two_cfg, state_json=sj, round_index=1, client_id="alice")
    store = open_store_for(cfg)
    a = _weights(store, "alice", one["models"]["alice"])
    b = _weights(store, "alice", two["models"]["alice"])
    start = _weights(store, "alice", state["models"]["alice"])
    assert a.keys() == b.keys()
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-3  # training changed the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # one lineage record for the launched step, written by rank 0, saying so
    fed = two_cfg.federation_id()
    recs = store.list_records(f"{fed}/round-0001/local_sft.alice.json")
    assert len(recs) == 1 and recs[0]["params"]["world_size"] == 2
    assert recs[0]["status"] == "succeeded"


def test_launch_only_for_deepspeed_with_several_gpus(monkeypatch):
    assert not needs_launch(EngineConfig())
    assert not needs_launch(EngineConfig(kind="deepspeed", zero_stage=2))
    assert needs_launch(EngineConfig(kind="deepspeed", zero_stage=2, gpus_per_step=2))
    monkeypatch.setenv("FLMINILLM_LAUNCHED", "1")  # inside a rank: never again
    assert not needs_launch(EngineConfig(kind="deepspeed", zero_stage=2, gpus_per_step=2))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_world() == (1, 2)


def test_only_training_steps_launch_and_zero3_is_refused():
    import pytest

    launchable = {s.settings_name for s in steps.STEPS.values() if s.launchable}
    assert launchable == {"local_sft", "distill"}
    with pytest.raises(ValueError, match="zero_stage 3 use gpus_per_step: 1"):
        EngineConfig(kind="deepspeed", zero_stage=3, gpus_per_step=2)


def test_distill_on_two_ranks_matches_gradient_accumulation(tiny_config):
    # 16 rollouts per round, micro-batch 8: two micro-batches per optimizer step either way
    cfg = tiny_config.model_copy(
        # min_claim 0: every teacher answer kept, so the batch splits evenly in two
        update={
            "distill": tiny_config.distill.model_copy(
                update={"epochs": 2, "batch_size": 8, "min_claim": 0.0}
            )
        }  # fmt: skip
    )
    prep = steps.prepare(cfg)
    pj = json.dumps(prep)
    models = {}
    for p in cfg.parties:
        models.update(steps.init_model(cfg, pj, p.id)["models"])
    sj = json.dumps({**prep, "models": models})
    rollouts = json.dumps(steps.generate(cfg, sj, 1, "server"))
    teachings = [json.dumps(steps.teach(cfg, sj, 1, c.id, "", rollouts)) for c in cfg.clients]

    def run(engine: EngineConfig) -> dict:
        c = cfg.model_copy(update={"engine": engine})
        return invoke.call(
            "distill", c, state_json=sj, round_index=1, student_id="server", models_json="",
            rollouts_json=rollouts, teachings=teachings,
        )  # fmt: skip

    one = run(EngineConfig(kind="deepspeed", zero_stage=2, gradient_accumulation_steps=2))
    two = run(EngineConfig(kind="deepspeed", zero_stage=2, gpus_per_step=2))
    store = open_store_for(cfg)
    a = _weights(store, "server", one["models"]["server"])
    b = _weights(store, "server", two["models"]["server"])
    start = _weights(store, "server", models["server"])
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert sorted(two["teachers"]) == sorted(c.id for c in cfg.clients)
