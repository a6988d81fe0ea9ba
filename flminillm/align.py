"""Exact alignment of two tokenisations of the same text, for distillation across tokenizers.

A token's span is (start, end) in characters of the text: the text decoded from the tokens
before it and up to it. A token that ends inside a character (a byte-level BPE token holding
part of a multi-byte character) has no character boundary of its own: its span is empty
(start == end == the previous boundary) and its bytes count with the next token. Spans are
contiguous, from 0 to len(text).

`project_logprobs` moves one tokenisation's per-token log-probs onto the other's tokens:
the mass between two consecutive boundaries both tokenisations share goes to the last
token of the other that ends at the closing boundary, 0 to the rest. Nothing is lost or
counted twice, so the projected log-probs sum to the original ones and a sequence's
rewards sum to log p_T(y|x) - log q_S(y|x) exactly (tests/test_align.py, to 1e-5).
"""

from __future__ import annotations

import torch


def char_spans(tokenizer, text: str, token_ids: list[int] | None = None) -> list[tuple[int, int]]:
    """The character span of each token of `token_ids` (default: the tokenizer's own
    tokenisation of `text`, without special tokens), which must decode to `text`."""
    ids = (
        list(token_ids)
        if token_ids is not None
        else tokenizer.encode(text, add_special_tokens=False)
    )
    if tokenizer.decode(ids) != text:
        raise ValueError(
            f"tokens do not decode to the text ({tokenizer.decode(ids)[:40]!r} vs {text[:40]!r}); "
            "spans need a tokenizer that round-trips (byte-level BPE, SentencePiece with byte "
            "fallback) and the text without special tokens"
        )
    spans, end = [], 0
    for j in range(len(ids)):
        prefix = tokenizer.decode(ids[: j + 1])
        new_end = len(prefix) if text.startswith(prefix) and len(prefix) >= end else end
        spans.append((end, new_end))
        end = new_end
    if spans and end != len(text):
        raise ValueError(f"spans end at {end}, not at the text's end {len(text)}")
    return spans


def shared_boundaries(spans_a: list[tuple[int, int]], spans_b: list[tuple[int, int]]) -> list[int]:
    """Character positions where both tokenisations have a token end (the text's end too)."""
    return sorted({e for _, e in spans_a} & {e for _, e in spans_b})


def project_logprobs(
    logp: torch.Tensor, spans_from: list[tuple[int, int]], spans_to: list[tuple[int, int]]
) -> torch.Tensor:
    """Per-token log-probs of one tokenisation [T_from] onto the other's tokens [T_to]."""
    if logp.shape[0] != len(spans_from):
        raise ValueError(f"{logp.shape[0]} log-probs for {len(spans_from)} spans")
    out = torch.zeros(len(spans_to), dtype=logp.dtype)
    if not spans_to:
        if spans_from and bool((logp != 0).any()):
            raise ValueError("log-probs of a non-empty text cannot go onto no tokens")
        return out
    shared = shared_boundaries(spans_from, spans_to)
    last_to = {}  # boundary -> the last target token ending there
    for i, (_, e) in enumerate(spans_to):
        last_to[e] = i
    j = 0
    for b in shared:
        mass = logp.new_zeros(())
        while j < len(spans_from) and spans_from[j][1] <= b:
            mass = mass + logp[j]
            j += 1
        out[last_to[b]] += mass
    if j != len(spans_from):
        raise ValueError("spans do not cover the same text: tokens end after the last shared "
                         "boundary")  # fmt: skip
    return out


def validate_text_message(text: str, spans: list[tuple[int, int]], max_chars: int) -> None:
    """What a receiver checks of a text and its token spans: bounded, inside the text,
    starting at 0, contiguous and monotone, ending at the text's end."""
    if len(text) > max_chars:
        raise ValueError(f"text: {len(text)} characters, more than the limit {max_chars}")
    if not spans:
        if text:
            raise ValueError("spans: a non-empty text needs token spans")
        return
    prev = 0
    for i, (s, e) in enumerate(spans):
        if s != prev:
            raise ValueError(f"spans[{i}]: starts at {s}, not at the previous end {prev} "
                             "(spans must be contiguous and in order)")  # fmt: skip
        if not (s <= e <= len(text)):
            raise ValueError(f"spans[{i}]: ({s}, {e}) is not inside the text of {len(text)} "
                             "characters or ends before it starts")  # fmt: skip
        prev = e
    if prev != len(text):
        raise ValueError(f"spans: end at {prev}, not at the text's end {len(text)}")
