"""Byte-level BPE tokenizer trained offline, shared by every party of a federation.

Federated distillation exchanges token-level distributions, so all models must share one
vocabulary; training it locally on the benchmark's little language keeps models tiny.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS: dict[str, str] = {"pad": "<|pad|>", "eos": "<|endoftext|>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (deterministic for the same input).

    Ids 0 and 1 are pad and eos; the full 256-byte alphabet is always present, so any string
    round-trips losslessly. Padding is on the left, as generation needs.
    """
    n_min = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_min:
        raise ValueError(
            f"vocab_size must be >= {n_min} (specials + byte alphabet), got {vocab_size}"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL_TOKENS["pad"], SPECIAL_TOKENS["eos"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((t for t in texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=SPECIAL_TOKENS["pad"],
        eos_token=SPECIAL_TOKENS["eos"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    if (tok.pad_token_id, tok.eos_token_id) != (0, 1):
        raise RuntimeError(f"special ids are {(tok.pad_token_id, tok.eos_token_id)}, not (0, 1)")
    return tok


def save_tokenizer(tok: PreTrainedTokenizerBase, directory: str | os.PathLike[str]) -> None:
    """Save ``tok`` to ``directory`` in Hugging Face format (reloadable by load_tokenizer)."""
    os.makedirs(directory, exist_ok=True)
    tok.save_pretrained(str(directory))


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or hub name (one code path for both).

    Guarantees a pad token (falls back to eos) and left padding.
    """
    from flminillm.models import resolve_model_path

    path = resolve_model_path(name_or_path)
    if path.endswith(".gguf"):
        from pathlib import Path

        tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    else:
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!s} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


class PromptStyle:
    """How a party writes a prompt and its answer: the benchmark's `Q: ... A:` format, or the
    tokenizer's chat template (a user turn, then the assistant's answer)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.tokenizer = tokenizer  # None: the Q/A format

    @property
    def chat(self) -> bool:
        return self.tokenizer is not None

    def prompt(self, text: str) -> str:
        if self.tokenizer is None:
            from flminillm.data import format_prompt

            return format_prompt(text)
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def target(self, answer: str) -> str:
        if self.tokenizer is None:
            from flminillm.data import format_target

            return format_target(answer)
        return answer


QA_STYLE = PromptStyle()


def prompt_style(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = True) -> PromptStyle:
    """The chat template when the tokenizer has one and the party wants it, else Q/A."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return PromptStyle(tokenizer)
    return QA_STYLE
