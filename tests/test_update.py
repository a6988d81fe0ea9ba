"""The one optimisation step (flminillm.update): behaviour log-probs, a step, the epochs."""

from __future__ import annotations

import pytest
import torch

from flminillm.bench.harness import synthetic_distill_batch, tiny_model
from flminillm.config import DistillConfig
from flminillm.engine import make_engine
from flminillm.training import lr_schedule
from flminillm.update import (
    as_floats,
    behaviour_logprobs,
    distill_epochs,
    distill_lr,
    n_updates,
    update_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_behaviour_logprobs_micro_batched_equal_one_pass():
    model = tiny_model("llama", 32, 1, 2, vocab=64)
    batch = synthetic_distill_batch(20, 6, 5, 3, vocab=64)
    whole = behaviour_logprobs(model, batch)
    assert whole.shape == batch["response_ids"].shape
    assert torch.equal(behaviour_logprobs(model, batch, micro_batch=6), whole)
    assert (whole[batch["response_mask"] == 0] == 0).all() and (whole <= 0).all()
    assert not model.training  # the behaviour policy is the model in eval mode


def test_update_step_moves_the_student_and_reports_tensors():
    model = tiny_model("gpt2", 32, 1, 2, vocab=64)
    batch = synthetic_distill_batch(8, 6, 5, 3, vocab=64)
    batch["from_teacher"][:3] = True
    behaviour = behaviour_logprobs(model, batch)
    before = [p.detach().clone() for p in model.parameters()]
    engine = make_engine(model, 1e-2, 0.0, 1.0)
    model.train()
    stats = update_step(engine, batch, behaviour, DistillConfig(alpha=0.5))
    assert {"loss", "reverse_kl", "loss_long", "loss_single", "seqkd_ce"} <= set(stats)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    no_seqkd = update_step(engine, batch, behaviour, DistillConfig(alpha=0.5), seqkd=False)
    assert "seqkd_ce" not in no_seqkd
    fwd = update_step(engine, batch, behaviour, DistillConfig(method="forward_kl"))
    assert "forward_kl" in fwd and "reverse_kl" not in fwd


def test_distill_epochs_counts_updates_and_averages():
    model = tiny_model("qwen2", 32, 1, 2, vocab=64)
    batch = synthetic_distill_batch(10, 6, 5, 3, vocab=64)
    behaviour = behaviour_logprobs(model, batch)
    engine = make_engine(model, 1e-3, 0.0, 1.0)
    d = DistillConfig(epochs=3, batch_size=4)
    stats = distill_epochs(engine, batch, behaviour, d, order_seed=0, seqkd=True)
    floats = as_floats(stats)
    assert floats["updates"] == 3 * 3  # ceil(10 / 4) micro-batches per epoch
    assert floats["reverse_kl_first"] == pytest.approx(float(stats["reverse_kl_first"]))
    assert set(floats) == set(stats) and all(isinstance(v, float) for v in floats.values())
    assert as_floats({}) == {}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_cosine_schedule_ends_the_distill_step_at_a_tenth_of_lr(accumulation):
    model = tiny_model("llama", 32, 1, 2, vocab=64)
    batch = synthetic_distill_batch(10, 6, 5, 3, vocab=64)
    behaviour = behaviour_logprobs(model, batch)
    d = DistillConfig(epochs=3, batch_size=4, lr=1e-2, lr_schedule="cosine")
    assert n_updates(10, d) == 9 and n_updates(10, d, world=2) == 6
    assert distill_lr(d.model_copy(update={"lr_schedule": "constant"}), 10) is None
    schedule = distill_lr(d, 10, accumulation=accumulation)
    engine = make_engine(model, d.lr, 0.0, 1.0, lr_lambda=schedule)
    engine.gradient_accumulation_steps = accumulation
    seen = []
    step = engine.step
    engine.step = lambda: (seen.append(engine.optimizer.param_groups[0]["lr"]), step())[1]
    distill_epochs(engine, batch, behaviour, d, order_seed=0, seqkd=True)
    lrs = seen[accumulation - 1 :: accumulation]  # the lr each optimizer step used
    total = 9 // accumulation
    assert lrs == pytest.approx([1e-2 * lr_schedule(s, total - 1, 0) for s in range(total)])
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
