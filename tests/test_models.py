"""Models built from config in three families, saved as safetensors, loaded by path."""

import json

import pytest
import torch

from flminillm.config import ModelSpec
from flminillm.models import build_model, count_parameters, load_model, save_model


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_build_save_load_roundtrip(family, tmp_path):
    spec = ModelSpec(family=family, hidden_size=32, num_layers=1, num_heads=2, max_positions=32)
    model = build_model(spec, vocab_size=300, pad_id=0, eos_id=1, seed=3)
    assert model.config.vocab_size == 300
    save_model(model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    loaded = load_model(tmp_path)
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_same_seed_same_weights_and_heterogeneous_sizes():
    a = build_model(
        ModelSpec(family="llama", hidden_size=64, num_layers=2, num_heads=4), 300, 0, 1, 7
    )
    b = build_model(
        ModelSpec(family="llama", hidden_size=64, num_layers=2, num_heads=4), 300, 0, 1, 7
    )
    c = build_model(
        ModelSpec(family="gpt2", hidden_size=32, num_layers=1, num_heads=2), 300, 0, 1, 7
    )
    for (n1, p1), (_, p2) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1
    assert count_parameters(a) > count_parameters(c)


def test_init_model_loads_name_or_path_through_the_same_code(tiny_config, tmp_path):
    """A party whose model is given by path is loaded, not built, and keeps its weights."""
    from flminillm import steps
    from flminillm.artifacts import PUBLIC
    from flminillm.store import open_store
    from flminillm.tokenizer import load_tokenizer

    cfg = tiny_config
    prep = steps.prepare(cfg)
    store = open_store(cfg.store.uri)
    tok = load_tokenizer(str(store.scoped(PUBLIC).get_dir(prep["tokenizer"])))
    spec = ModelSpec(family="gpt2", hidden_size=32, num_layers=1, num_heads=2, max_positions=64)
    saved = save_model(build_model(spec, len(tok), 0, 1, seed=11), tmp_path / "pretrained")
    clients = [
        c.model_copy(update={"model": ModelSpec(name_or_path=str(saved))}) if c.id == "bob" else c
        for c in cfg.clients
    ]
    cfg2 = cfg.model_copy(update={"clients": clients})
    out = steps.init_model(cfg2, json.dumps(prep), "bob")
    reloaded = load_model(store.scoped("bob").get_dir(out["models"]["bob"]))
    original = load_model(saved)
    for (n, p1), (_, p2) in zip(
        original.named_parameters(), reloaded.named_parameters(), strict=True
    ):
        assert torch.equal(p1, p2), n


def test_average_state_dicts_streams_and_matches_the_plain_weighted_sum():
    """FedAvg's and `distill.server_average`'s one average: a generator of state dicts (one
    in memory at a time) gives, bit for bit, the weighted sum of the fp32 tensors in order;
    integer buffers are the last one's; a count that does not match the weights is named."""
    import torch

    from flminillm.models import average_state_dicts

    g = torch.Generator().manual_seed(0)
    sds = [
        {"w": torch.randn(4, 3, generator=g).to(torch.bfloat16), "b": torch.randn(3, generator=g),
         "step": torch.tensor(i)}
        for i in range(3)
    ]  # fmt: skip
    weights = [40.0, 25.0, 35.0]
    got = average_state_dicts((sd for sd in sds), weights)
    for k in ("w", "b"):
        want = sum(w / 100.0 * sd[k].float() for sd, w in zip(sds, weights, strict=True))
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want)
    assert int(got["step"]) == 2
    with pytest.raises(ValueError, match="2 state dicts for 3 weights"):
        average_state_dicts(iter(sds[:2]), weights)
    with pytest.raises(ValueError, match="more state dicts"):
        average_state_dicts(iter(sds), weights[:2])
