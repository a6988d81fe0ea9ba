"""Exact alignment of two tokenisations of the same text, for distillation across tokenizers.

Spans. A token's span (start, end) is in characters of the text: `end` is the length of the
text decoded up to and including the token, when that decoding stops on a character
boundary. A token that stops *inside* a character (a byte-level token holding the first
bytes of é, 日 or 🙂, with or without whole characters before them) has no boundary of its
own: its span is empty at the last boundary before it (start == end) and all its bytes count
with the next token that does stop on a boundary. So spans are contiguous from 0 to
len(text), the ends of the non-empty spans are exactly the token boundaries that are also
character boundaries, and the tokens from one such boundary to the next (empty spans, then
one non-empty span) form a *group* that covers whole characters.

Projection. The boundaries both tokenisations have cut the text into segments; each segment
is a whole number of groups on either side. `project_logprobs` gives the sum of the
teacher's log-probs of a segment to the student's last token of that segment, 0 to the
others. Every teacher token lands in exactly one segment, so the projected log-probs sum to
the teacher's and a sequence's rewards sum to log p_T(y|x) - log q_S(y|x) exactly.

`support_overlap` and `bucket_logprobs` are the per-position counterpart: the tokens whose
strings both vocabularies contain, and a distribution restricted to them plus a tail bucket.
Shapes: Tt teacher tokens, Ts student tokens, V vocabulary, K shared support tokens.
docs/algorithm.md, "Across tokenizers".
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from collections.abc import Sequence

import torch

Span = tuple[int, int]
REPLACEMENT = "\ufffd"  # what decoders write for the bytes of an unfinished character


def _decode_all(tokenizer, seqs: list[list[int]]) -> list[str]:
    if not seqs:  # some batch_decode versions read [] as one empty sequence
        return []
    batch = getattr(tokenizer, "batch_decode", None)
    return list(batch(seqs)) if batch is not None else [tokenizer.decode(s) for s in seqs]


def char_spans(tokenizer, text: str, token_ids: Sequence[int] | None = None) -> list[Span]:
    """The character span of each token of `token_ids` [T] (default: the tokenizer's own
    tokenisation of `text`, no special tokens), by the rule of the module docstring.

    `tokenizer` needs `encode(text, add_special_tokens=False)` and `decode(ids)`; the ids must
    decode to `text`. Decoders are assumed to write U+FFFD for the bytes of an unfinished
    character (byte-level BPE and SentencePiece byte fallback do). Costs T prefix decodes.
    """
    ids = (
        list(token_ids)
        if token_ids is not None
        else tokenizer.encode(text, add_special_tokens=False)
    )
    decoded = tokenizer.decode(ids)
    if decoded != text:
        raise ValueError(
            f"token_ids: they decode to {decoded[:40]!r}, not to the text {text[:40]!r}; spans "
            "need ids that round-trip: a lossless tokenizer (byte-level BPE, SentencePiece with "
            "byte fallback, a character vocabulary holding every character) and no special tokens"
        )
    prefixes = _decode_all(tokenizer, [ids[: j + 1] for j in range(len(ids))])
    spans, end = [], 0
    for j, prefix in enumerate(prefixes):
        real = len(prefix) >= end and text.startswith(prefix)
        if real and prefix.endswith(REPLACEMENT) and j + 1 < len(ids):
            # The text itself holds U+FFFD here: the token ends on a boundary only if the
            # tokens after it decode to the rest (not if they finish a split character).
            real = tokenizer.decode(ids[j + 1 :]) == text[len(prefix) :]
        new_end = len(prefix) if real else end
        spans.append((end, new_end))
        end = new_end
    if end != len(text):  # unreachable for a decoder that writes U+FFFD; never pass it silently
        raise ValueError(f"token_ids: spans end at {end}, not at the text's end {len(text)}")
    return spans


def _pairs(spans) -> list[Span]:
    return [
        (int(s), int(e)) for s, e in (spans.tolist() if isinstance(spans, torch.Tensor) else spans)
    ]


def _groups(spans: Sequence[Span]) -> list[int]:
    """The boundary that closes each token's group: its end if its span is non-empty, else
    the end of the next non-empty span (the text's end for trailing zero-width tokens)."""
    close, nxt = [0] * len(spans), spans[-1][1] if spans else 0
    for j in range(len(spans) - 1, -1, -1):
        s, e = spans[j]
        if e > s:
            nxt = e
        close[j] = nxt
    return close


def shared_boundaries(spans_a: Sequence[Span], spans_b: Sequence[Span]) -> list[int]:
    """Sorted character positions where both tokenisations have a token boundary that is a
    character boundary: all in (0, len(text)], the text's end among them when the text is
    not empty. Spans: [T, 2] ints (list of pairs or tensor), as from `char_spans`."""
    spans_a, spans_b = _pairs(spans_a), _pairs(spans_b)
    end_a = spans_a[-1][1] if len(spans_a) else 0
    end_b = spans_b[-1][1] if len(spans_b) else 0
    if end_a != end_b:
        raise ValueError(f"spans: one tokenisation ends at {end_a}, the other at {end_b}; "
                         "they must describe the same text")  # fmt: skip
    return sorted({e for s, e in spans_a if e > s} & {e for s, e in spans_b if e > s})


def project_logprobs(
    teacher_logp: torch.Tensor, teacher_spans: Sequence[Span], student_spans: Sequence[Span]
) -> torch.Tensor:
    """The teacher's per-token log-probs [Tt] as log-probs of the student's tokens [Ts]: per
    segment between consecutive shared boundaries, the segment's sum on its last student
    token, 0 on the others. sum(out) == sum(teacher_logp) up to float addition order."""
    teacher_spans, student_spans = _pairs(teacher_spans), _pairs(student_spans)
    if teacher_logp.dim() != 1 or teacher_logp.shape[0] != len(teacher_spans):
        raise ValueError(f"teacher_logp: shape {tuple(teacher_logp.shape)} for "
                         f"{len(teacher_spans)} teacher spans; expected [Tt]")  # fmt: skip
    out = teacher_logp.new_zeros(len(student_spans))
    if not teacher_spans:
        return out
    if not student_spans:
        raise ValueError("student_spans: empty, but the teacher has tokens; both must "
                         "tokenise the same text")  # fmt: skip
    shared = shared_boundaries(teacher_spans, student_spans)
    if not shared:  # only zero-width tokens on an empty text: one segment, at the end
        shared = [student_spans[-1][1]]
    last = {}  # segment -> the student's last token in it
    for i, c in enumerate(_groups(student_spans)):
        last[bisect_left(shared, c)] = i
    # A teacher group closes at one of its own boundaries, so at or before a shared one.
    target = [last[bisect_left(shared, c)] for c in _groups(teacher_spans)]
    index = torch.tensor(target, dtype=torch.long, device=teacher_logp.device)
    return out.index_add(0, index, teacher_logp)


def validate_text_message(text: str | bytes, spans, max_chars: int) -> str:
    """What a receiver checks of a text and its token spans ([T, 2] ints, a list of pairs or
    a tensor) before aligning them: UTF-8 text of at most `max_chars` characters, spans
    inside it, in order, contiguous from 0 and ending at its end. Returns the text (str).

    Empty spans are allowed (a token that ends inside a character, or a zero-width token).
    """
    if isinstance(text, bytes | bytearray):
        if len(text) > 4 * max_chars:  # no UTF-8 character takes more than 4 bytes
            raise ValueError(f"text: {len(text)} bytes, more than the limit of {max_chars} "
                             "characters allows; send a shorter text")  # fmt: skip
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"text: not valid UTF-8 ({e.reason} at byte {e.start}); send the "
                             "text UTF-8 encoded") from None  # fmt: skip
    if not isinstance(text, str):
        raise ValueError(f"text: expected str or UTF-8 bytes, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ValueError(f"text: {len(text)} characters, more than the limit {max_chars}; "
                         "send a shorter text")  # fmt: skip
    spans = spans.tolist() if isinstance(spans, torch.Tensor) else list(spans)
    if text and not spans:
        raise ValueError("spans: empty, but a non-empty text needs one span per token")
    prev = 0
    for i, sp in enumerate(spans):
        try:
            s, e = (operator.index(x) for x in sp)
        except (TypeError, ValueError):
            raise ValueError(
                f"spans[{i}]: expected a pair of integers (start, end), got {sp!r}"
            ) from None
        if not (0 <= s <= len(text) and 0 <= e <= len(text)):
            raise ValueError(f"spans[{i}]: ({s}, {e}) is not inside the text of {len(text)} "
                             "characters; spans are character offsets into the text")  # fmt: skip
        if s != prev:
            where = (
                "overlaps the previous span" if s < prev else "leaves a gap after the previous span"
            )
            raise ValueError(f"spans[{i}]: starts at {s} and {where}, which ends at {prev}; "
                             "spans must be contiguous and in order, the first from 0")  # fmt: skip
        if e < s:
            raise ValueError(f"spans[{i}]: ({s}, {e}) ends before it starts; spans must be "
                             "monotone (end >= start)")  # fmt: skip
        prev = e
    if prev != len(text):
        raise ValueError(f"spans: end at {prev}, not at the text's end {len(text)}; the last "
                         "span must close the text")  # fmt: skip
    return text


# --- per-position terms: the support both vocabularies share --------------------------------


def token_strings(tokenizer) -> list[str | None]:
    """The string each id [V] stands for, None where there is none exactly: special tokens,
    and tokens that decode to nothing or to part of a character (U+FFFD).

    A token is decoded after an anchor ("a") so that decoders that drop a word-initial space
    at the start of a text (SentencePiece) keep it here.
    """
    anchor = tokenizer.encode("a", add_special_tokens=False)
    if tokenizer.decode(anchor) != "a":
        anchor = []
    special = set(getattr(tokenizer, "all_special_ids", []))
    n = len(tokenizer)
    decoded = _decode_all(tokenizer, [[*anchor, i] for i in range(n)])
    out: list[str | None] = []
    for i, d in enumerate(decoded):
        s = d[1:] if anchor else d
        ok = i not in special and (not anchor or d.startswith("a")) and bool(s)
        out.append(s if ok and REPLACEMENT not in s else None)
    return out


def support_overlap(student_tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The map from student ids to teacher ids of the tokens whose strings both vocabularies
    contain: (student_ids [K], teacher_ids [K]) long, by student id, one-to-one.

    The basis of the per-position terms across tokenizers: the support is restricted to these
    K tokens and the rest of each distribution's mass goes to a tail bucket
    (`bucket_logprobs`). Where a vocabulary has several ids for one string, its smallest id
    stands for the string and the others join the tail.
    """
    teacher: dict[str, int] = {}
    for i, s in enumerate(token_strings(teacher_tokenizer)):
        if s is not None:
            teacher.setdefault(s, i)
    pairs, seen = [], set()
    for i, s in enumerate(token_strings(student_tokenizer)):
        if s is not None and s in teacher and s not in seen:
            seen.add(s)
            pairs.append((i, teacher[s]))
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0].contiguous(), ids[:, 1].contiguous()


def bucket_logprobs(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probs over the whole vocabulary [..., V] as log-probs of the K shared tokens and one
    tail bucket for the rest [..., K + 1]; the buckets hold all the mass (logsumexp == 0).
    The tail is -inf when the K tokens hold everything."""
    shared = logp.index_select(-1, ids)
    rest = torch.ones(logp.shape[-1], dtype=torch.bool, device=logp.device)
    rest[ids] = False
    tail = logp[..., rest].logsumexp(-1, keepdim=True)
    return torch.cat([shared, tail], dim=-1)
