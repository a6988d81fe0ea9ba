"""Device placement: nothing in the sampler, teacher scoring, the losses or the update creates
a tensor on a hard-coded device, so the same code runs on a GPU as on the CPU."""

import pytest
import torch

from flminillm.config import DistillConfig, EngineConfig, ModelSpec
from flminillm.devices import device_for, to_device, uses_bf16
from flminillm.distill import forward_kl_loss, future_returns, minillm_loss
from flminillm.engine import deepspeed_config, make_engine
from flminillm.generation import Rollout, prompt_logprob, sample_batched, score
from flminillm.models import build_model
from flminillm.update import behaviour_logprobs, distill_epochs, update_step


@pytest.fixture
def default_device_meta():
    """torch's default device set to `meta` while the model and its inputs stay on the CPU:
    a tensor made without naming a device lands on meta and any op mixing it with the
    CPU tensors fails. A real meta model cannot run: transformers reads mask values."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_sampling_scoring_and_an_update_create_nothing_on_a_default_device(family):
    spec = ModelSpec(family=family, hidden_size=32, num_layers=1, num_heads=2, max_positions=64)
    model = build_model(spec, 50, 0, 1, seed=0)
    g = torch.Generator().manual_seed(0)
    pids = torch.randint(2, 50, (3, 5), generator=g)
    pmask = torch.ones(3, 5, dtype=torch.long)
    pmask[0, :2] = 0  # left padding
    torch.set_default_device("meta")
    try:
        r = sample_batched(
            model, pids, pmask, 2, max_new_tokens=4, eos_id=1, pad_id=0, top_k=3, generator=g
        )
        scores, plogp = score(
            model, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.support_ids
        )
        assert torch.allclose(plogp, prompt_logprob(model, pids, pmask))
        batch = {
            "prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask,
            "response_ids": r.response_ids, "response_mask": r.response_mask,
            "support_ids": r.support_ids, "teacher_logp": scores,
            "from_teacher": torch.tensor([False, True, False], device="cpu"),
        }  # fmt: skip
        behaviour = behaviour_logprobs(model, batch, micro_batch=2)
        engine = make_engine(model, 1e-3, 0.0, 1.0)
        stats = update_step(engine, batch, behaviour, DistillConfig(alpha=0.5))
        epoch = distill_epochs(
            engine, batch, behaviour, DistillConfig(alpha=0.5, batch_size=2), order_seed=0,
            seqkd=True,
        )  # fmt: skip
    finally:
        torch.set_default_device(None)
    for t in [*stats.values(), *epoch.values(), scores, behaviour, r.logp]:
        assert t.device.type == "cpu" and bool(torch.isfinite(t).all())
    assert "seqkd_ce" in stats  # the teacher row was seen without reading the device


def test_the_losses_run_with_every_tensor_on_another_device():
    """The pure loss functions on `meta` tensors: every intermediate follows its inputs."""
    meta = torch.device("meta")
    b, t, s, v = 2, 4, 3, 11
    logits = torch.randn(b, t, v, device=meta, requires_grad=True)
    ids = torch.randint(0, v, (b, t, s), device=meta)
    mask = torch.ones(b, t, device=meta)
    logp = torch.randn(b, t, device=meta)
    teacher = torch.randn(b, t, s, device=meta)
    loss, stats = minillm_loss(logits, ids[..., 0], mask, logp, ids, teacher, DistillConfig())
    assert loss.device == meta and all(x.device == meta for x in stats.values())
    no_single = DistillConfig(single_step=False)
    loss, _ = minillm_loss(logits, ids[..., 0], mask, logp, ids, teacher, no_single)
    assert loss.device == meta
    fwd, _ = forward_kl_loss(logits, mask, ids, teacher)
    assert fwd.device == meta
    assert future_returns(logp, mask).device == meta


def test_device_from_config():
    assert device_for(EngineConfig(device="cpu")) == torch.device("cpu")
    assert device_for(None) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert device_for(EngineConfig(device="auto")) == torch.device("cpu")
        with pytest.raises(RuntimeError, match="engine.device: cuda"):
            device_for(EngineConfig(device="cuda"))
    assert uses_bf16(EngineConfig(), torch.device("cuda"))
    assert not uses_bf16(EngineConfig(), torch.device("cpu"))
    assert not uses_bf16(EngineConfig(bf16=False), torch.device("cuda"))


def test_to_device_moves_a_rollout_and_batches():
    r = Rollout(*(torch.zeros(1, 2) for _ in range(7)))
    moved = to_device(r, torch.device("meta"))
    assert isinstance(moved, Rollout) and moved.logp.device.type == "meta"
    both = to_device((torch.zeros(1), {"a": torch.ones(1), "n": 3}), torch.device("meta"))
    assert both[0].device.type == "meta" and both[1]["a"].device.type == "meta"
    assert both[1]["n"] == 3


def test_offload_and_checkpointing_settings():
    with pytest.raises(ValueError, match="offload: cpu needs kind: deepspeed"):
        EngineConfig(offload="cpu")
    z3 = EngineConfig(kind="deepspeed", zero_stage=3, offload="cpu")
    zero = deepspeed_config(z3, 1.0)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    z2 = deepspeed_config(EngineConfig(kind="deepspeed", zero_stage=2, offload="cpu"), 1.0)
    assert "offload_param" not in z2["zero_optimization"]

    # activation checkpointing: the same gradients, recomputed
    spec = ModelSpec(family="llama", hidden_size=32, num_layers=2, num_heads=2, max_positions=64)
    ids = torch.randint(2, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        model = build_model(spec, 50, 0, 1, seed=0)
        make_engine(model, 1e-3, 0.0, 1.0, EngineConfig(gradient_checkpointing=ckpt))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert model.is_gradient_checkpointing == ckpt
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
