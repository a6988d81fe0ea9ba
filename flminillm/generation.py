"""Batched sampling with a KV cache, and teacher scoring.

Shapes: N sequences, P prompt tokens (left-padded), T response tokens (right-padded),
S = k + 1 support tokens per position (column 0 is the sampled token, then the k most
likely *other* tokens of the sampling model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [N, P] int64, left-padded
    prompt_mask: torch.Tensor  # [N, P] int64 (1 = token)
    response_ids: torch.Tensor  # [N, T] int64, right-padded with pad_id
    response_mask: torch.Tensor  # [N, T] int64 (1 up to and including EOS)
    logp: torch.Tensor  # [N, T] float32: log-prob of the sampled token under the sampler
    support_ids: torch.Tensor  # [N, T, S] int64: sampled token + k others
    support_logp: torch.Tensor  # [N, T, S] float32: sampler's log-probs on the support


def encode_prompts(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (the last `max_len` tokens of each prompt are kept)."""
    pad = tokenizer.pad_token_id
    rows = [tokenizer.encode(t, add_special_tokens=False)[-max_len:] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask


def build_support(sampled: torch.Tensor, logp: torch.Tensor, k: int) -> torch.Tensor:
    """[B] sampled ids + [B, V] log-probs -> [B, k+1] ids: sampled first, then top-k others."""
    top = logp.topk(min(k + 1, logp.shape[-1]), dim=-1).indices  # [B, k+1]
    others = top.masked_fill(top == sampled[:, None], -1)
    # keep the first k entries that are not the sampled token
    order = (others < 0).long().argsort(dim=-1, stable=True)
    others = others.gather(-1, order)[:, :k]
    return torch.cat([sampled[:, None], others], dim=-1)


def _takes_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    top_k: int = 8,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample responses token by token with the KV cache; per-token log-probs and the
    top-k support come from the same forward pass that produced the token. Tokens are
    drawn at `temperature`; the log-probs reported are the model's own (temperature 1), so
    a teacher's answers and its scores of a student's rollouts are on one scale."""
    model.eval()
    n = prompt_ids.shape[0]
    mask = prompt_mask.clone()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    # the prefill needs the logits of the last position only (same values, less lm_head work)
    keep = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
    past = out.past_key_values
    next_logits = out.logits[:, -1, :].float()
    last_pos = pos[:, -1]
    done = torch.zeros(n, dtype=torch.bool, device=prompt_ids.device)
    ids, masks, logps, sup_ids, sup_logps = [], [], [], [], []
    for _ in range(max_new_tokens):
        # draw at `temperature`; report log-probs of the model itself (temperature 1), the
        # same quantity a teacher's scores and the student's behaviour log-probs are
        logp = torch.log_softmax(next_logits, dim=-1)  # [N, V]
        draw = logp if temperature == 1.0 else torch.log_softmax(next_logits / temperature, -1)
        if greedy:
            tok = logp.argmax(-1)
        else:
            tok = torch.multinomial(draw.exp(), 1, generator=generator).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        support = build_support(tok, logp, top_k)
        ids.append(tok)
        masks.append((~done).long())
        logps.append(logp.gather(-1, tok[:, None]).squeeze(-1) * (~done))
        sup_ids.append(support)
        sup_logps.append(logp.gather(-1, support))
        done = done | (tok == eos_id)
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=-1)
        last_pos = last_pos + 1
        out = model(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=last_pos[:, None],
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        next_logits = out.logits[:, -1, :].float()
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=torch.stack(ids, 1),
        response_mask=torch.stack(masks, 1),
        logp=torch.stack(logps, 1),
        support_ids=torch.stack(sup_ids, 1),
        support_logp=torch.stack(sup_logps, 1).float(),
    )


def response_logits(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits that predict each response token: [N, T, V] (one teacher-forced pass)."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    p = prompt_ids.shape[1]
    return logits[:, p - 1 : -1, :]


def _prompt_logp(
    logits: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> torch.Tensor:
    """log p(x) of left-padded prompts from full-sequence logits: [N, P, V] -> [N].

    The first prompt token has no context and is left out (the same for every model)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, prompt_ids[:, 1:, None])[..., 0]
    # a position counts when it and its predecessor are real tokens
    valid = prompt_mask[:, 1:] * prompt_mask[:, :-1]
    return (tok * valid).sum(-1)


@torch.no_grad()
def prompt_logprob(
    model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """log p(x) of each (left-padded) prompt under `model`: [N]."""
    model.eval()
    outs = []
    for i in range(0, prompt_ids.shape[0], batch_size):
        ids, mask = prompt_ids[i : i + batch_size], prompt_mask[i : i + batch_size]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        outs.append(_prompt_logp(logits, ids, mask))
    return torch.cat(outs) if outs else torch.zeros(0, device=prompt_ids.device)


@torch.no_grad()
def score(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    support_ids: torch.Tensor,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher scoring in one teacher-forced pass: log p(v | y_<t, x) for every support
    token v [N, T, S], and log p(x) of every prompt [N]."""
    model.eval()
    if prompt_ids.shape[0] == 0:
        z = torch.zeros(support_ids.shape, device=support_ids.device)
        return z, z.new_zeros(0)
    outs, prompts = [], []
    p = prompt_ids.shape[1]
    for i in range(0, prompt_ids.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        ids = torch.cat([prompt_ids[sl], response_ids[sl]], dim=1)
        mask = torch.cat([prompt_mask[sl], response_mask[sl]], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        logp = torch.log_softmax(logits[:, p - 1 : -1].float(), dim=-1)
        outs.append(logp.gather(-1, support_ids[sl]))
        prompts.append(_prompt_logp(logits[:, :p], prompt_ids[sl], prompt_mask[sl]))
    return torch.cat(outs, 0) * response_mask[..., None], torch.cat(prompts)


def empty_rollout(prompt_width: int, top_k: int) -> Rollout:
    """A rollout of no sequences (a student whose prompts all go to its teachers)."""
    z = torch.zeros
    return Rollout(
        prompt_ids=z(0, prompt_width, dtype=torch.long),
        prompt_mask=z(0, prompt_width, dtype=torch.long),
        response_ids=z(0, 1, dtype=torch.long),
        response_mask=z(0, 1, dtype=torch.long),
        logp=z(0, 1),
        support_ids=z(0, 1, top_k + 1, dtype=torch.long),
        support_logp=z(0, 1, top_k + 1),
    )


def sample_batched(model, prompt_ids, prompt_mask, batch_size: int, **kw) -> Rollout:
    """`sample` over mini-batches, right-padding responses to a common length."""
    if prompt_ids.shape[0] == 0:
        return empty_rollout(prompt_ids.shape[1], kw.get("top_k", 8))
    parts = [
        sample(model, prompt_ids[i : i + batch_size], prompt_mask[i : i + batch_size], **kw)
        for i in range(0, prompt_ids.shape[0], batch_size)
    ]
    return concat_rollouts(parts, pad_id=kw["pad_id"])


def left_pad(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    """Pad dim 1 on the left to `width` (prompts are left-padded)."""
    return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)


def right_pad(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    """Pad dim 1 on the right to `width` (responses); a trailing dim 2 is left alone."""
    if x.dim() == 3:
        return torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1]), value=value)
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    width_p = max(r.prompt_ids.shape[1] for r in parts)
    width_t = max(r.response_ids.shape[1] for r in parts)

    return Rollout(
        prompt_ids=torch.cat([left_pad(r.prompt_ids, width_p, pad_id) for r in parts]),
        prompt_mask=torch.cat([left_pad(r.prompt_mask, width_p, 0) for r in parts]),
        response_ids=torch.cat([right_pad(r.response_ids, width_t, pad_id) for r in parts]),
        response_mask=torch.cat([right_pad(r.response_mask, width_t, 0) for r in parts]),
        logp=torch.cat([right_pad(r.logp, width_t, 0.0) for r in parts]),
        support_ids=torch.cat([right_pad(r.support_ids, width_t, pad_id) for r in parts]),
        support_logp=torch.cat([right_pad(r.support_logp, width_t, 0.0) for r in parts]),
    )


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    texts = []
    eos = tokenizer.eos_token_id
    for ids, m in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist(), strict=True):
        toks = [t for t, keep in zip(ids, m, strict=True) if keep and t != eos]
        texts.append(tokenizer.decode(toks))
    return texts
