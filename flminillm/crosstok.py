"""Messages between parties that do not share a tokenizer: text and character offsets.

The student's RolloutMessage gains its prompts and responses as UTF-8 text (`text_*`).
A teacher with another tokenizer formats each prompt its own way, tokenises the response
with its own tokenizer, scores its own tokens and returns their log-probs with their
character spans (`x_*`); it answers the teacher-share prompts as text with spans too. The
student projects every teacher log-prob onto its own tokens at the character boundaries
both tokenisations share (`flminillm.align`), so that the rewards of a sequence sum to
log p_T(y|x) - log q_S(y|x) exactly, and turns the message into the TeachingMessage of a
same-tokenizer teacher with a support of one token (the sampled one). EOS is its own
zero-width last token on both sides. docs/algorithm.md, "Across tokenizers"; fields in
docs/messages.md.
"""

from __future__ import annotations

import torch

from flminillm.align import char_spans, project_logprobs, validate_text_message
from flminillm.messages import MAX_TEXT_BYTES, pack_texts, unpack_texts


def _pad_rows(rows: list[list], width: int, value, dtype) -> torch.Tensor:
    out = torch.full((len(rows), max(width, 1)), value, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def _spans_tensor(spans: list[list[tuple[int, int]]], width: int) -> torch.Tensor:
    out = torch.full((len(spans), max(width, 1), 2), -1, dtype=torch.int32)
    for i, row in enumerate(spans):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return out


def response_texts(tok, ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[str], list[bool]]:
    """Each response's text (its tokens before EOS) and whether it ended with EOS."""
    eos = tok.eos_token_id
    texts, done = [], []
    for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
        toks = [t for t, k in zip(row, m, strict=True) if k]
        finished = bool(toks) and toks[-1] == eos
        texts.append(tok.decode(toks[:-1] if finished else toks))
        done.append(finished)
    return texts, done


# --- the student's side: text in the RolloutMessage --------------------------------------------


def rollout_text_fields(
    tok, own_prompts: list[str], ids: torch.Tensor, mask: torch.Tensor, ask_prompts: list[str]
) -> dict[str, torch.Tensor]:
    """The text form of a RolloutMessage: raw prompts (each party formats them its own
    way), the responses' text and whether they ended, and the teacher-share prompts."""
    texts, done = response_texts(tok, ids, mask)
    p, po = pack_texts(own_prompts)
    r, ro = pack_texts(texts)
    a, ao = pack_texts(ask_prompts)
    return {
        "text_prompts": p, "text_prompt_offsets": po,
        "text_responses": r, "text_response_offsets": ro,
        "text_done": torch.tensor(done, dtype=torch.uint8),
        "text_ask": a, "text_ask_offsets": ao,
    }  # fmt: skip


# --- the teacher's side ---------------------------------------------------------------------


def teach_across(
    model, tok, style, msg: dict, *, max_prompt: int, batch_size: int, sample_kw: dict
) -> dict[str, torch.Tensor]:
    """A teacher with another tokenizer than the student's: scores of its own tokens of each
    response (with spans), and its answers to the teacher-share prompts as text."""
    from flminillm.generation import encode_prompts, prompt_logprob, sample_batched, score

    device = next(model.parameters()).device
    prompts = unpack_texts(msg["text_prompts"], msg["text_prompt_offsets"], "text_prompts")
    responses = unpack_texts(msg["text_responses"], msg["text_response_offsets"], "text_responses")
    done = msg["text_done"].bool().tolist()
    if len(prompts) != len(responses) or len(done) != len(responses):
        raise ValueError("text_prompts, text_responses and text_done must have one entry per "
                         f"rollout; got {len(prompts)}, {len(responses)}, {len(done)}")  # fmt: skip
    eos = tok.eos_token_id
    rows, spans = [], []
    for text, finished in zip(responses, done, strict=True):
        ids = tok.encode(text, add_special_tokens=False)
        sp = char_spans(tok, text, ids)
        rows.append(ids + ([eos] if finished else []))
        spans.append(sp + ([(len(text), len(text))] if finished else []))
    width = max((len(r) for r in rows), default=1)
    n = len(rows)
    if n:
        pids, pmask = encode_prompts(tok, [style.prompt(p) for p in prompts], max_prompt)
        rids = _pad_rows(rows, width, tok.pad_token_id, torch.long)
        rmask = _pad_rows([[1] * len(r) for r in rows], width, 0, torch.long)
        s, plogp = score(
            model, pids.to(device), pmask.to(device), rids.to(device), rmask.to(device),
            rids[..., None].to(device), batch_size=batch_size,
        )  # fmt: skip
        scores, plogp = s[..., 0].float().cpu() * rmask, plogp.float().cpu()
    else:
        scores, plogp, rmask = (
            torch.zeros(0, 1),
            torch.zeros(0),
            torch.zeros(0, 1, dtype=torch.long),
        )
    out = {
        "x_scores": scores.contiguous(),
        "x_score_mask": rmask.to(torch.uint8),
        "x_score_spans": _spans_tensor(spans, width),
        "prompt_logp": plogp.contiguous(),
    }
    ask = unpack_texts(msg["text_ask"], msg["text_ask_offsets"], "text_ask")
    texts, a_spans, a_logp, a_done, own_plogp = [], [], [], [], torch.zeros(0)
    if ask:
        aids, amask = encode_prompts(tok, [style.prompt(p) for p in ask], max_prompt)
        own = sample_batched(model, aids.to(device), amask.to(device), batch_size, **sample_kw)
        own_plogp = prompt_logprob(model, aids.to(device), amask.to(device), batch_size).cpu()
        ids, m, lp = own.response_ids.cpu(), own.response_mask.cpu(), own.logp.float().cpu()
        texts, a_done = response_texts(tok, ids, m)
        for i, text in enumerate(texts):
            n_tok = int(m[i].sum()) - int(a_done[i])
            sp = char_spans(tok, text, ids[i, :n_tok].tolist())
            a_spans.append(sp + ([(len(text), len(text))] if a_done[i] else []))
            a_logp.append(lp[i, : n_tok + int(a_done[i])].tolist())
    t, to = pack_texts(texts)
    wa = max((len(r) for r in a_logp), default=1)
    out.update({
        "x_own_text": t, "x_own_offsets": to,
        "x_own_logp": _pad_rows(a_logp, wa, 0.0, torch.float32),
        "x_own_mask": _pad_rows([[1] * len(r) for r in a_logp], wa, 0, torch.uint8),
        "x_own_spans": _spans_tensor(a_spans, wa),
        "x_own_done": torch.tensor(a_done, dtype=torch.uint8),
        "own_prompt_logp": own_plogp.float().contiguous(),
    })  # fmt: skip
    return out


# --- the student's side: back into its own tokens ---------------------------------------------


def _row_spans(spans: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, int]]:
    n = int(mask.sum())
    return [tuple(x) for x in spans[:n].tolist()]


def _project_row(
    t_logp: list[float], t_spans: list[tuple[int, int]], s_spans: list[tuple[int, int]],
    text: str, finished: bool,
) -> list[float]:  # fmt: skip
    """Teacher log-probs onto the student's tokens; EOS (zero-width, last) onto EOS."""
    body_t = len(t_spans) - int(finished)
    body_s = len(s_spans) - int(finished)
    validate_text_message(text, t_spans[:body_t], MAX_TEXT_BYTES)
    projected = project_logprobs(
        torch.tensor(t_logp[:body_t], dtype=torch.float64), t_spans[:body_t], s_spans[:body_s]
    ).tolist()
    if finished:
        projected.append(t_logp[body_t])
    return projected


def to_student_space(x: dict, rollouts: dict, tok) -> dict[str, torch.Tensor]:
    """A cross-tokenizer teacher's message as a same-tokenizer TeachingMessage of the
    student: per student token the projected teacher log-prob (support: the token alone)."""
    texts, done = response_texts(tok, rollouts["response_ids"], rollouts["response_mask"])
    n, t = rollouts["response_ids"].shape
    s = rollouts["support_ids"].shape[-1]
    if x["x_scores"].shape[0] != n:
        raise ValueError(f"x_scores: {x['x_scores'].shape[0]} rows for {n} rollouts")
    scores = torch.full((n, t, s), -1e4)
    for i in range(n):
        ids = [v for v, k in zip(rollouts["response_ids"][i].tolist(),
                                 rollouts["response_mask"][i].tolist(), strict=True) if k]  # fmt: skip
        s_spans = char_spans(tok, texts[i], ids[: len(ids) - int(done[i])])
        s_spans += [(len(texts[i]), len(texts[i]))] if done[i] else []
        t_spans = _row_spans(x["x_score_spans"][i], x["x_score_mask"][i])
        t_logp = x["x_scores"][i, : len(t_spans)].tolist()
        row = _project_row(t_logp, t_spans, s_spans, texts[i], done[i])
        scores[i, : len(row), 0] = torch.tensor(row)
    scores = (scores * rollouts["response_mask"][..., None]).float()
    out = {"scores": scores, "prompt_logp": x["prompt_logp"].float(),
           "own_prompt_logp": x["own_prompt_logp"].float()}  # fmt: skip
    answers = unpack_texts(x["x_own_text"], x["x_own_offsets"], "x_own_text")
    rows, logps = [], []
    for i, text in enumerate(answers):
        finished = bool(x["x_own_done"][i])
        ids = tok.encode(text, add_special_tokens=False)
        s_spans = char_spans(tok, text, ids) + ([(len(text), len(text))] if finished else [])
        t_spans = _row_spans(x["x_own_spans"][i], x["x_own_mask"][i])
        row = _project_row(x["x_own_logp"][i, : len(t_spans)].tolist(), t_spans, s_spans,
                           text, finished)  # fmt: skip
        rows.append(ids + ([tok.eos_token_id] if finished else []))
        logps.append(row)
    w = max((len(r) for r in rows), default=1)
    ids = _pad_rows(rows, w, tok.pad_token_id, torch.long)
    mask = _pad_rows([[1] * len(r) for r in rows], w, 0, torch.long)
    out.update({
        "own_response_ids": ids.int(), "own_response_mask": mask.to(torch.uint8),
        "own_support_ids": ids[..., None].int(),
        "own_logp": _pad_rows(logps, w, 0.0, torch.float32)[..., None] * mask[..., None],
    })  # fmt: skip
    return out
