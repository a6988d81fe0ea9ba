"""The training engine: plain torch is the historical loop; DeepSpeed (CPU, gloo) agrees."""

import copy

import pytest
import torch

from flminillm.config import ConfigError, EngineConfig, ModelSpec, parse_config
from flminillm.engine import deepspeed_config, make_engine
from flminillm.models import build_model
from flminillm.training import causal_lm_loss, collate


def _tiny():
    spec = ModelSpec(family="gpt2", hidden_size=32, num_layers=2, num_heads=4, max_positions=64)
    return build_model(spec, vocab_size=256, pad_id=0, eos_id=1, seed=0)


def _batch():
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(3, 200, (int(n),), generator=g).tolist(), 2) for n in range(6, 14)]
    return collate(rows, pad_id=0)


def _losses(engine, batch, steps=4):
    out = []
    for _ in range(steps):
        loss = causal_lm_loss(engine.model, batch)
        engine.backward(loss)
        engine.step()
        out.append(float(loss.detach()))
    return out


def test_torch_engine_is_the_plain_adamw_loop():
    """Bit-identical to the loop train_lm and run_distill used before the engine."""
    batch = _batch()
    a, b = _tiny(), _tiny()
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.01, betas=(0.9, 0.95))
    for _ in range(3):
        loss = causal_lm_loss(a, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5)
        opt.step()
    _losses(make_engine(b, 1e-2, 0.01, 0.5, EngineConfig()), batch, steps=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_gradient_accumulation_steps_only_at_boundary():
    batch = _batch()
    m = _tiny()
    before = [p.detach().clone() for p in m.parameters()]
    eng = make_engine(m, 1e-2, 0.0, 1.0, EngineConfig(gradient_accumulation_steps=2))
    eng.backward(causal_lm_loss(eng.model, batch))
    eng.step()
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters(), strict=True))
    eng.backward(causal_lm_loss(eng.model, batch))
    eng.step()
    assert not all(torch.equal(p, q) for p, q in zip(before, m.parameters(), strict=True))


def test_engine_is_part_of_the_experiment():
    data = {"server": {"id": "server"}, "clients": [{"id": "alice"}]}
    cfg = parse_config(data)
    ds = parse_config({**data, "engine": {"kind": "deepspeed", "zero_stage": 2}})
    assert ds.digest() != cfg.digest() and '"zero_stage":2' in ds.experiment_json()
    assert parse_config(__import__("json").loads(ds.to_json())) == ds
    with pytest.raises(ConfigError, match="gpus_per_step"):
        parse_config({**data, "engine": {"gpus_per_step": 2}})
    with pytest.raises(ConfigError, match="zero_stage"):
        parse_config({**data, "engine": {"kind": "deepspeed", "zero_stage": 4}})


def test_deepspeed_config_dict():
    c = deepspeed_config(EngineConfig(kind="deepspeed", zero_stage=3), 0.5, on_gpu=False)
    assert c["zero_optimization"]["stage"] == 3 and c["gradient_clipping"] == 0.5
    assert c["bf16"]["enabled"] is False
    assert deepspeed_config(EngineConfig(kind="deepspeed"), 1.0, on_gpu=True)["bf16"]["enabled"]
    assert not deepspeed_config(EngineConfig(bf16=False), 1.0, on_gpu=True)["bf16"]["enabled"]


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_matches_torch_on_cpu(stage, tmp_path):
    batch = _batch()
    base = _tiny()
    plain = _losses(make_engine(copy.deepcopy(base), 1e-2, 0.0, 1.0, EngineConfig()), batch)
    ds_engine = make_engine(
        copy.deepcopy(base), 1e-2, 0.0, 1.0, EngineConfig(kind="deepspeed", zero_stage=stage)
    )
    ds = _losses(ds_engine, batch)
    assert ds[0] == pytest.approx(plain[0], abs=1e-6)
    assert plain[-1] < plain[0] and ds[-1] < ds[0]
    assert ds == pytest.approx(plain, abs=1e-4)
    out = ds_engine.save(tmp_path / "m")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))


def test_bench_message_bytes_match_message_layouts():
    """The bench's bytes per message equal flminillm.messages' nbytes at the same shapes."""
    from flminillm.bench.micro import message_bytes
    from flminillm.messages import ROLLOUT_FIELDS, TEACHING_FIELDS, nbytes

    cfg = parse_config({"server": {"id": "server"}, "clients": [{"id": "alice"}]})
    g, pos = cfg.generation, 128
    m = round(cfg.distill.alpha * g.prompts_per_round)
    n, p, t, s = g.prompts_per_round - m, pos - g.max_new_tokens, g.max_new_tokens, g.top_k + 1
    shapes = {
        "prompt_ids": (n, p), "prompt_mask": (n, p), "response_ids": (n, t),
        "response_mask": (n, t), "support_ids": (n, t, s), "ask_prompt_ids": (m, p),
        "ask_prompt_mask": (m, p), "scores": (n, t, s), "prompt_logp": (n,),
        "own_prompt_logp": (m,), "own_response_ids": (m, t), "own_response_mask": (m, t),
        "own_support_ids": (m, t, s), "own_logp": (m, t, s),
    }  # fmt: skip
    rollout = {k: torch.zeros(shapes[k], dtype=d) for k, (d, _) in ROLLOUT_FIELDS.items()}
    teaching = {k: torch.zeros(shapes[k], dtype=d) for k, (d, _) in TEACHING_FIELDS.items()}
    assert message_bytes(cfg, pos) == (nbytes(rollout), nbytes(teaching))
