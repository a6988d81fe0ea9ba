"""Tests for KV-cached sampling and teacher scoring (flminillm.generation)."""

from __future__ import annotations

import pytest
import torch

from flminillm.config import ModelSpec
from flminillm.generation import (
    build_support,
    response_logits,
    sample,
    sample_batched,
    score,
)

VOCAB, PAD, NO_EOS = 64, 0, -5
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # different lengths
MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model(family: str):
    from flminillm.models import build_model

    spec = ModelSpec(family=family, hidden_size=32, num_layers=2, num_heads=2, max_positions=64)
    model = build_model(spec, VOCAB, PAD, 1, seed=0)
    # larger weights than the default init: peaked, context-dependent predictions, so that a
    # wrong position, mask or cache changes the argmax
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return _tiny_model(request.param)


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def _naive_greedy(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Full forward pass over the unpadded sequence at every step, no cache."""
    seq, out = list(prompt), []
    for _ in range(steps):
        tok = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok == eos:
            break
    return out


def _eos_for(rollout) -> int:
    """A token that first appears at position >= 1 of row 0: using it as EOS stops row 0 early."""
    row = rollout.response_ids[0].tolist()
    for j in range(1, len(row) - 1):
        if row[j] not in row[:j]:
            return row[j]
    raise AssertionError(f"no usable EOS in {row}")


def test_greedy_matches_naive_loop_with_left_padding(model):
    ids, mask = _left_pad(PROMPTS)
    r = sample(model, ids, mask, max_new_tokens=MAX_NEW, eos_id=NO_EOS, pad_id=PAD, greedy=True)
    assert r.response_ids.shape == (3, MAX_NEW)
    assert r.response_mask.eq(1).all()
    naive = [_naive_greedy(model, p, MAX_NEW, NO_EOS) for p in PROMPTS]
    assert r.response_ids.tolist() == naive
    # non-trivial: the rows differ, so the output depends on the (padded) context
    assert len({tuple(x) for x in naive}) == 3


def test_greedy_with_eos_stops_rows(model):
    ids, mask = _left_pad(PROMPTS)
    free = sample(model, ids, mask, max_new_tokens=MAX_NEW, eos_id=NO_EOS, pad_id=PAD, greedy=True)
    eos = _eos_for(free)
    r = sample(model, ids, mask, max_new_tokens=MAX_NEW, eos_id=eos, pad_id=PAD, greedy=True)
    lengths = []
    for i, p in enumerate(PROMPTS):
        expected = _naive_greedy(model, p, MAX_NEW, eos)
        n = len(expected)
        row = r.response_ids[i].tolist()
        m = r.response_mask[i].tolist()
        assert row[:n] == expected
        assert m[:n] == [1] * n  # 1 up to and including EOS
        assert all(x == 0 for x in m[n:])
        assert all(x == PAD for x in row[n:])
        assert r.logp[i, n:].eq(0).all()
        lengths.append(n)
    # row 0 was made to stop early, at the first occurrence of the EOS token
    assert lengths[0] == free.response_ids[0].tolist().index(eos) + 1 < MAX_NEW
    assert r.response_ids[0, lengths[0] - 1] == eos
    assert r.response_ids.shape[1] == max(lengths)


def _sampled_with_eos(model):
    """A seeded sampled rollout where at least one row stops early at EOS."""
    ids, mask = _left_pad(PROMPTS)
    kw = dict(max_new_tokens=MAX_NEW, pad_id=PAD, top_k=4)
    free = sample(model, ids, mask, eos_id=NO_EOS, generator=torch.Generator().manual_seed(5), **kw)
    eos = _eos_for(free)
    r = sample(model, ids, mask, eos_id=eos, generator=torch.Generator().manual_seed(5), **kw)
    assert (r.response_mask == 0).any()
    return r


def test_sample_logp_and_support_match_teacher_forcing(model):
    r = _sampled_with_eos(model)
    valid = r.response_mask.bool()
    with torch.no_grad():
        logits = response_logits(
            model, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask
        )
    logp = torch.log_softmax(logits.float(), -1)
    tok = logp.gather(-1, r.response_ids[..., None])[..., 0]
    assert torch.allclose(tok[valid], r.logp[valid], atol=1e-4)
    sup = logp.gather(-1, r.support_ids)
    assert torch.allclose(sup[valid], r.support_logp[valid], atol=1e-4)
    # support: sampled token first, then k = 4 tokens distinct from it and from each other
    assert r.support_ids.shape[-1] == 5
    assert torch.equal(r.support_ids[..., 0], r.response_ids)
    assert (r.support_ids[..., 1:] != r.support_ids[..., :1]).all()
    for row in r.support_ids[valid].tolist():
        assert len(set(row)) == len(row)
    # the other support columns are the sampler's most likely other tokens
    expected = torch.stack(
        [build_support(r.response_ids[:, t], logp[:, t], 4) for t in range(logp.shape[1])], 1
    )
    assert torch.equal(expected[valid], r.support_ids[valid])


def test_score_matches_teacher_forcing_and_zero_on_masked(model):
    r = _sampled_with_eos(model)
    valid = r.response_mask.bool()
    scores, prompt_logp = score(
        model, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.support_ids
    )
    assert scores.shape == r.support_ids.shape
    assert torch.allclose(scores[valid], r.support_logp[valid], atol=1e-4)
    assert scores[~valid].eq(0).all()
    # log p(x): sum over prompt tokens after the first, from the unpadded prompt
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0].float(), -1)
        expected = sum(float(lp[j - 1, p[j]]) for j in range(1, len(p)))
        assert float(prompt_logp[i]) == pytest.approx(expected, abs=1e-4)
    # mini-batches give the same result
    scores2, prompt_logp2 = score(
        model,
        r.prompt_ids,
        r.prompt_mask,
        r.response_ids,
        r.response_mask,
        r.support_ids,
        batch_size=2,
    )
    assert torch.allclose(scores2, scores, atol=1e-5)
    assert torch.allclose(prompt_logp2, prompt_logp, atol=1e-5)


def test_score_padding_invariance(model):
    short = PROMPTS[1]
    response = torch.tensor([[20, 21, 22, 23]])
    rmask = torch.ones_like(response)
    support = torch.tensor([[[20, 1, 2], [21, 3, 4], [22, 5, 6], [23, 7, 8]]])
    ids1, mask1 = _left_pad([short])
    alone, lp_alone = score(model, ids1, mask1, response, rmask, support)
    ids2, mask2 = _left_pad([PROMPTS[0], short])
    assert mask2[1].sum() < mask2.shape[1]  # the short prompt really is padded
    both, lp_both = score(
        model, ids2, mask2, response.repeat(2, 1), rmask.repeat(2, 1), support.repeat(2, 1, 1)
    )
    assert torch.allclose(both[1], alone[0], atol=1e-4)
    assert float(lp_both[1]) == pytest.approx(float(lp_alone[0]), abs=1e-4)
    assert not torch.allclose(both[0], both[1], atol=1e-2)  # the context matters


def test_seeded_sampling_is_reproducible(model):
    ids, mask = _left_pad(PROMPTS)
    kw = dict(max_new_tokens=MAX_NEW, eos_id=NO_EOS, pad_id=PAD)
    a = sample(model, ids, mask, generator=torch.Generator().manual_seed(42), **kw)
    b = sample(model, ids, mask, generator=torch.Generator().manual_seed(42), **kw)
    c = sample(model, ids, mask, generator=torch.Generator().manual_seed(43), **kw)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.logp, b.logp)
    assert torch.equal(a.support_ids, b.support_ids)
    assert not torch.equal(a.response_ids, c.response_ids)
    # sampling builds no autograd graph
    assert not a.logp.requires_grad and not a.support_logp.requires_grad


def test_sample_batched_of_no_prompts_is_empty(model):
    ids, mask = _left_pad(PROMPTS)
    r = sample_batched(
        model, ids[:0], mask[:0], batch_size=2, max_new_tokens=MAX_NEW, eos_id=NO_EOS,
        pad_id=PAD, top_k=3,
    )  # fmt: skip
    assert r.response_ids.shape == (0, 1) and r.support_ids.shape == (0, 1, 4)


def test_sample_batched_matches_one_batch(model):
    ids, mask = _left_pad(PROMPTS)
    free = sample(model, ids, mask, max_new_tokens=MAX_NEW, eos_id=NO_EOS, pad_id=PAD, greedy=True)
    kw = dict(max_new_tokens=MAX_NEW, eos_id=_eos_for(free), pad_id=PAD, greedy=True, top_k=3)
    whole = sample(model, ids, mask, **kw)
    parts = sample_batched(model, ids, mask, batch_size=2, **kw)
    width = whole.response_ids.shape[1]
    assert parts.response_ids.shape[1] == width
    assert torch.equal(parts.prompt_ids, whole.prompt_ids)
    assert torch.equal(parts.prompt_mask, whole.prompt_mask)
    assert torch.equal(parts.response_mask, whole.response_mask)
    valid = whole.response_mask.bool()
    assert torch.equal(parts.response_ids[valid], whole.response_ids[valid])
    assert torch.equal(parts.support_ids[..., 0], parts.response_ids)
    assert torch.allclose(parts.logp, whole.logp, atol=1e-4)
    assert torch.allclose(parts.support_logp[valid], whole.support_logp[valid], atol=1e-4)


def test_sampling_temperature_draws_but_reports_the_models_own_logprobs():
    """A teacher's log-probs on its own answers and its scores of the student's rollouts are
    the same quantity: sampled at a temperature, reported at 1."""
    import torch

    from flminillm.config import ModelSpec
    from flminillm.generation import sample, score
    from flminillm.models import build_model

    spec = ModelSpec(family="llama", hidden_size=32, num_layers=1, num_heads=2, max_positions=64)
    model = build_model(spec, 40, 0, 1, seed=0)
    ids = torch.randint(2, 40, (4, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    r = sample(model, ids, mask, max_new_tokens=4, eos_id=1, pad_id=0, top_k=3,
               temperature=2.0, generator=torch.Generator().manual_seed(1))  # fmt: skip
    scores, _ = score(model, ids, mask, r.response_ids, r.response_mask, r.support_ids)
    m = r.response_mask.bool()
    assert torch.allclose(r.support_logp[m], scores[m], atol=1e-5)
