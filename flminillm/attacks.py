"""Faulty and malicious teachers, for the robustness benchmark (`flminillm bench quality`).

A client named in FLMINILLM_ADVERSARY (`party:mode[,party:mode]`, read from the environment
like FLMINILLM_FAULTS, so it never changes a step's cache key) corrupts every TeachingMessage
it sends. The corrupted message is still well formed (it passes validation on receipt), so
only the aggregation can limit the damage:

- ``random``: a broken teacher. Its token scores are random distributions over the support,
  its own answers' log-probs random, its prompt log-likelihood claims shuffled.
- ``adversarial``: a liar. Its token scores put the mass on the tokens it finds least likely,
  its own answers are random tokens, and it claims probability 1 for every prompt and every
  answer token, to win the mixture's posterior weight everywhere.
"""

from __future__ import annotations

import os

import torch

MODES = ("random", "adversarial")


def adversaries(spec: str | None = None) -> dict[str, str]:
    """{party: mode} from `party:mode[,party:mode]` (default: $FLMINILLM_ADVERSARY)."""
    spec = os.environ.get("FLMINILLM_ADVERSARY", "") if spec is None else spec
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        party, _, mode = item.partition(":")
        if mode not in MODES:
            raise ValueError(
                f"FLMINILLM_ADVERSARY entry {item!r}: mode must be one of {MODES} "
                "(e.g. FLMINILLM_ADVERSARY=carol:adversarial)"
            )
        out[party] = mode
    return out


def _random_logp(shape, g: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    return torch.log_softmax(torch.randn(*shape, generator=g) * scale, -1)


def corrupt_teaching(
    msg: dict[str, torch.Tensor], mode: str, vocab_size: int, seed: int
) -> dict[str, torch.Tensor]:
    """The message a faulty (`random`) or malicious (`adversarial`) teacher sends instead."""
    g = torch.Generator().manual_seed(seed)
    out = dict(msg)
    scores = msg["scores"].float()
    if mode == "random":
        out["scores"] = _random_logp(scores.shape, g)
        for name in ("prompt_logp", "own_prompt_logp"):
            t = msg[name]
            out[name] = t[torch.randperm(t.numel(), generator=g)].reshape(t.shape).contiguous()
        out["own_logp"] = _random_logp(msg["own_logp"].shape, g)
    elif mode == "adversarial":
        out["scores"] = torch.log_softmax(-scores * 10.0, -1)  # mass on the least likely token
        out["prompt_logp"] = torch.zeros_like(msg["prompt_logp"])
        out["own_prompt_logp"] = torch.zeros_like(msg["own_prompt_logp"])
        ids = torch.randint(4, vocab_size, msg["own_response_ids"].shape, generator=g)
        ids = ids.to(msg["own_response_ids"].dtype)
        sup = msg["own_support_ids"].clone()
        sup[..., 0] = ids
        out["own_response_ids"], out["own_support_ids"] = ids, sup
        logp = torch.full(msg["own_logp"].shape, -30.0)
        logp[..., 0] = 0.0  # "certain" of each garbage token
        out["own_logp"] = logp * msg["own_response_mask"][..., None].float()
    else:
        raise ValueError(f"unknown adversary mode {mode!r}; use one of {MODES}")
    return {k: v.contiguous() for k, v in out.items()}
