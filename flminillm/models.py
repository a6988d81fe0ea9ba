"""Build causal LMs from config or load them by local path / hub name; save as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from flminillm.config import ModelSpec


def build_model(spec: ModelSpec, vocab_size: int, pad_id: int, eos_id: int, seed: int):
    """A freshly initialised causal LM of `spec.family` (GPT-2, Llama or Qwen2)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id
    )
    if spec.family == "gpt2":
        cfg = GPT2Config(
            n_embd=spec.hidden_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_inner=spec.intermediate_size,
            n_positions=spec.max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        inter = spec.intermediate_size or int(round(spec.hidden_size * 8 / 3 / 16)) * 16
        kwargs = dict(
            hidden_size=spec.hidden_size,
            intermediate_size=inter,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=True,
            **common,
        )
        if spec.family == "llama":
            model = LlamaForCausalLM(LlamaConfig(**kwargs))
        else:
            model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    model.generation_config.pad_token_id = pad_id
    return model


def load_model(name_or_path: str | Path):
    """Load a causal LM from a local directory or a hub name (one code path), safetensors only."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), use_safetensors=True)
    return model


def save_model(model, directory: str | Path) -> Path:
    """Save weights as safetensors plus config.json (never pickle)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(directory, safe_serialization=True)
    for pickled in list(directory.glob("*.bin")):
        pickled.unlink()
    return directory


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
