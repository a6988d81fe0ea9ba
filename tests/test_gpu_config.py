"""The GPU-sized config (configs/cluster/gpu-large.yaml) can only run on GPUs; here its
shapes are checked on the meta device (no memory is allocated) and it compiles."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from flminillm.config import load_config
from flminillm.models import build_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "configs" / "cluster" / "gpu-large.yaml"


def _params(cfg, party) -> int:
    with torch.device("meta"):
        model = build_model(party.model, cfg.tokenizer.vocab_size, 0, 1, 0)
    assert next(model.parameters()).device.type == "meta"
    return count_parameters(model)


def test_gpu_config_sizes():
    cfg = load_config(GPU)
    assert 350e6 <= _params(cfg, cfg.server) <= 1e9
    fams = {c.model.family for c in cfg.clients}
    assert fams == {"gpt2", "llama", "qwen2"}  # heterogeneous architectures
    for c in cfg.clients:
        assert 60e6 <= _params(cfg, c) <= 125e6, c.id
    assert cfg.engine.kind == "deepspeed" and cfg.engine.zero_stage == 2 and cfg.engine.bf16
    # prompts and answers fit every model's context
    for p in cfg.parties:
        assert p.model.max_positions >= 64 + cfg.generation.max_new_tokens


def test_gpu_config_compiles_with_gpus_on_the_model_steps(tmp_path):
    from flminillm.cli import main

    out = tmp_path / "gpu.yaml"
    assert main(["compile", "--config", str(GPU), "-o", str(out)]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    text = out.read_text()
    assert "nvidia.com/gpu" in text
    executors = docs[0]["deploymentSpec"]["executors"]
    gpu_steps = {
        name for name, ex in executors.items()
        if ex["container"].get("resources", {}).get("accelerator", {}).get("resourceCount")
        or ex["container"].get("resources", {}).get("accelerator", {}).get("count")
    }  # fmt: skip
    for step in ("local-sft", "distill", "generate", "teach"):
        assert any(step in name for name in gpu_steps), (step, sorted(gpu_steps))
    assert not any("sample-clients" in name for name in gpu_steps)
