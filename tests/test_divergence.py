"""The KL-to-pooled metrics (flminillm/bench/divergence.py) against a direct computation:
one prefix at a time, through the models' plain forward pass."""

from __future__ import annotations

import pytest
import torch

from flminillm.bench.divergence import sequence_kl
from flminillm.config import ModelSpec
from flminillm.generation import sample_batched
from flminillm.models import build_model

V, EOS, PAD = 40, 1, 0


def _model(seed: int):
    spec = ModelSpec(family="llama", hidden_size=32, num_layers=1, num_heads=2, max_positions=64)
    return build_model(spec, V, PAD, EOS, seed=seed).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, V, (5, 4), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = PAD, 0  # a left-padded prompt
    return ids, mask


@torch.no_grad()
def _direct(q, p, ids, mask, resp, rmask) -> float:
    """sum over answer tokens of KL(q(.|x, y<t) || p(.|x, y<t)) / their count, one
    unpadded sequence at a time."""
    total, n = 0.0, 0
    for i in range(ids.shape[0]):
        prompt = ids[i][mask[i].bool()]
        for t in range(int(rmask[i].sum())):
            x = torch.cat([prompt, resp[i, :t]])[None]
            lq = torch.log_softmax(q(input_ids=x).logits[0, -1].float(), -1)
            lp = torch.log_softmax(p(input_ids=x).logits[0, -1].float(), -1)
            total += float((lq.exp() * (lq - lp)).sum())
            n += 1
    return total / n


def test_sequence_kl_is_the_exact_per_position_kl_along_the_answers():
    q, p = _model(0), _model(1)
    ids, mask = _prompts()
    kw = {"max_new_tokens": 6, "eos_id": EOS, "pad_id": PAD, "batch_size": 2}
    out = sequence_kl(q, p, ids, mask, samples=2, seed=7, **kw)
    greedy = sample_batched(q, ids, mask, 2, greedy=True, top_k=1, **{
        k: v for k, v in kw.items() if k != "batch_size"})  # fmt: skip
    want = _direct(q, p, ids, mask, greedy.response_ids, greedy.response_mask)
    assert out["greedy"] == pytest.approx(want, rel=1e-4)
    # the sampled estimate: the same quantity on temperature-1 answers, token-weighted
    parts = []
    for i in range(2):
        g = torch.Generator().manual_seed(7 + i)
        r = sample_batched(q, ids, mask, 2, greedy=False, generator=g, top_k=1,
                           **{k: v for k, v in kw.items() if k != "batch_size"})  # fmt: skip
        parts.append((_direct(q, p, ids, mask, r.response_ids, r.response_mask),
                      int(r.response_mask.sum())))  # fmt: skip
    want = sum(k * n for k, n in parts) / sum(n for _, n in parts)
    assert out["sampled"] == pytest.approx(want, rel=1e-4)
    assert out["greedy"] > 0 and out["sampled"] > 0
    # a model is at distance 0 from itself, in both estimates
    same = sequence_kl(q, q, ids, mask, samples=1, seed=7, **kw)
    assert same["greedy"] == pytest.approx(0.0, abs=1e-6)
    assert same["sampled"] == pytest.approx(0.0, abs=1e-6)
