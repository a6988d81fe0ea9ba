"""Tests for the offline byte-level BPE tokenizer (flminillm.tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from flminillm.data import (
    FAMILIES,
    build_benchmark,
    format_examples,
    format_prompt,
    partition_families,
    pretraining_corpus,
)
from flminillm.tokenizer import SPECIAL_TOKENS, load_tokenizer, save_tokenizer, train_tokenizer

VOCAB = 400


@pytest.fixture(scope="module")
def texts() -> list[str]:
    fbc = partition_families(list(FAMILIES), ["a", "b"], seed=0)
    b = build_benchmark(fbc, n_train=40, n_test=10, n_public_per_family=8, n_eval=10, seed=0)
    bench = [t for exs in b.client_train.values() for t in format_examples(exs)]
    bench += [t for exs in b.eval_sets.values() for t in format_examples(exs)]
    bench += [format_prompt(e.prompt) for e in b.public_prompts]
    return pretraining_corpus(300, seed=0) + bench


@pytest.fixture(scope="module")
def tok(texts: list[str]) -> PreTrainedTokenizerFast:
    return train_tokenizer(texts, vocab_size=VOCAB)


def test_special_tokens_and_padding_side(tok: PreTrainedTokenizerFast) -> None:
    assert SPECIAL_TOKENS == {"pad": "<|pad|>", "eos": "<|endoftext|>"}
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 1)
    assert tok.padding_side == "left"
    assert 256 + 2 < len(tok) <= VOCAB
    batch = tok(["hi", "a much longer text here"], padding=True)
    assert batch["input_ids"][0][0] == 0 and batch["input_ids"][0][-1] != 0
    assert batch["attention_mask"][0][0] == 0


def test_round_trip_lossless(tok: PreTrainedTokenizerFast, texts: list[str]) -> None:
    extra = ["  two  spaces\tand tab\n\nnewlines ", "ünïcödé 🙂 €", "Q: What?\nA:", ""]
    for s in texts + extra:
        ids = tok.encode(s)
        assert 0 not in ids and 1 not in ids  # no specials are added
        assert tok.decode(ids) == s


def test_merges_make_text_shorter(tok: PreTrainedTokenizerFast, texts: list[str]) -> None:
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    assert n_tokens < 0.6 * n_bytes


def test_training_is_deterministic(tok: PreTrainedTokenizerFast, texts: list[str]) -> None:
    again = train_tokenizer(texts, vocab_size=VOCAB)
    assert again.get_vocab() == tok.get_vocab()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    other = train_tokenizer(texts[::2], vocab_size=VOCAB)
    assert other.get_vocab() != tok.get_vocab()


def test_save_and_load(tok: PreTrainedTokenizerFast, texts: list[str], tmp_path: Path) -> None:
    save_tokenizer(tok, tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (0, 1, "left")
    for s in texts[:50]:
        assert loaded.encode(s) == tok.encode(s)
        assert loaded.decode(loaded.encode(s)) == s


def test_load_falls_back_to_eos_for_padding(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, eos_token=SPECIAL_TOKENS["eos"]
    )
    assert no_pad.pad_token is None
    save_tokenizer(no_pad, tmp_path / "nopad")
    loaded = load_tokenizer(tmp_path / "nopad")
    assert loaded.pad_token == SPECIAL_TOKENS["eos"] and loaded.pad_token_id == 1
    assert loaded.padding_side == "left"


def test_rejects_vocab_smaller_than_alphabet(texts: list[str]) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts[:10], vocab_size=100)
