"""Tests for the losses: MiniLLM's reverse-KL policy gradient and the forward-KL baseline
(flminillm.distill)."""

from __future__ import annotations

import math

import pytest
import torch

from flminillm.config import DistillConfig
from flminillm.distill import (
    _support_mask,
    forward_kl_loss,
    future_returns,
    lm_loss,
    minillm_loss,
    mixed_importance_weights,
    support_kl,
)
from flminillm.generation import build_support
from tests.tensors import log_probs

pytestmark = pytest.mark.usefixtures("one_thread")


# -- support_kl -----------------------------------------------------------------------------


def test_support_kl_hand_value_with_renormalisation():
    # unnormalised weights on the support: q = [1, 3, 6] / 10, p = [2, 2, 4] / 8
    student = log_probs([1.0, 3.0, 6.0])
    teacher = log_probs([2.0, 2.0, 4.0])
    q = [0.1, 0.3, 0.6]
    p = [0.25, 0.25, 0.5]
    expected = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))
    got = support_kl(student, teacher)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected > 0.05  # the example is not trivially zero


def test_support_kl_zero_when_equal_and_shift_invariant():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g)
    assert torch.allclose(support_kl(s, s), torch.zeros(2, 3), atol=1e-6)
    # the same distribution up to a constant (e.g. log-probs of the full vocabulary)
    assert torch.allclose(support_kl(s, s - 7.3), torch.zeros(2, 3), atol=1e-5)
    t = torch.randn(2, 3, 5, generator=g)
    base = support_kl(s, t)
    assert (base > 1e-3).all()
    shift = torch.tensor([[-1.0], [2.5]])[:, :, None]  # different constant per sequence
    assert torch.allclose(support_kl(s, t + shift), base, atol=1e-5)
    assert torch.allclose(support_kl(s + 4.0, t), base, atol=1e-5)


def test_support_mask_excludes_duplicates_and_invalid():
    ids = torch.tensor([[[3, 5, 3, -1], [7, 2, 2, 9]]])
    mask = _support_mask(ids)
    assert mask.tolist() == [[[True, True, False, False], [True, True, False, True]]]


def test_support_mask_agrees_with_pairwise_comparison():
    """The sort-based mask equals the [S, S] comparison it replaced, on supports full of
    repeats and invalid entries."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 6, (4, 7, 9), generator=g)
    eq = ids[..., :, None] == ids[..., None, :]
    earlier = torch.ones(9, 9, dtype=torch.bool).tril(-1)
    expected = (ids >= 0) & ~(eq & earlier).any(-1)
    assert torch.equal(_support_mask(ids), expected)


def test_support_kl_ignores_masked_entries():
    ids = torch.tensor([[[3, 5, 3, -1]]])
    mask = _support_mask(ids)
    student = log_probs([1.0, 3.0, 50.0, 80.0])
    teacher = log_probs([2.0, 1.0, 0.001, 7.0])
    q = [0.25, 0.75]
    p = [2 / 3, 1 / 3]
    expected = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))
    got = support_kl(student, teacher, mask)
    assert got.item() == pytest.approx(expected, abs=1e-5)
    # changing the values at masked entries does not change anything
    student2 = student.clone()
    student2[..., 2:] = torch.tensor([-3.0, 9.0])
    assert support_kl(student2, teacher, mask).item() == pytest.approx(expected, abs=1e-5)
    # without the mask the result differs (the mask matters)
    assert abs(support_kl(student, teacher).item() - expected) > 0.1


# -- future_returns -------------------------------------------------------------------------

REWARDS = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
MASK = torch.tensor([[1, 1, 1, 0]])


@pytest.mark.parametrize(
    ("gamma", "length_norm", "expected"),
    [
        # R_0 = r1 + r2, R_1 = r2, R_2 = 0 (last valid), R_3 masked
        (1.0, False, [2.0 + 3.0, 3.0, 0.0, 0.0]),
        (1.0, True, [(2.0 + 3.0) / 2, 3.0 / 1, 0.0, 0.0]),
        (0.5, False, [2.0 + 0.5 * 3.0, 3.0, 0.0, 0.0]),
        # discounted mean: sum_k g^k r / sum_k g^k
        (0.5, True, [(2.0 + 0.5 * 3.0) / (1 + 0.5), 3.0, 0.0, 0.0]),
    ],
)
def test_future_returns_hand_values(gamma, length_norm, expected):
    got = future_returns(REWARDS, MASK, gamma=gamma, length_norm=length_norm)
    assert got.shape == (1, 4)
    assert got[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_future_returns_rows_are_independent():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = future_returns(rewards, mask, gamma=1.0, length_norm=False)
    assert got[0].tolist() == pytest.approx([9.0, 7.0, 4.0, 0.0])
    assert got[1].tolist() == pytest.approx([-1.0, 0.0, 0.0, 0.0])


# -- mixed_importance_weights ---------------------------------------------------------------


def test_mixed_importance_weights():
    q = torch.log(torch.tensor([[0.2, 0.9, 0.5]]))
    p = torch.log(torch.tensor([[0.6, 0.01, 0.5]]))
    assert torch.equal(mixed_importance_weights(q, p, 0.0, 3.0), torch.ones(1, 3))
    w = mixed_importance_weights(q, p, 0.5, 3.0)
    # 0.2 / (0.5 * 0.6 + 0.5 * 0.2) = 0.5; 0.9 / 0.455; 1
    assert w[0].tolist() == pytest.approx([0.5, 0.9 / 0.455, 1.0], rel=1e-5)
    w = mixed_importance_weights(q, p, 0.5, 1.5)
    assert w[0].tolist() == pytest.approx([0.5, 1.5, 1.0], rel=1e-5)
    w = mixed_importance_weights(q, p, 1.0, 3.0)  # pure teacher sampling: q / p
    assert w[0].tolist() == pytest.approx([0.2 / 0.6, 3.0, 1.0], rel=1e-5)


# -- minillm_loss ---------------------------------------------------------------------------


def _pg_setup(rewards: list[float], behaviour_shift: float = 0.0):
    """One sequence of 3 tokens over V=5; teacher log-prob of y_t = q(y_t) + r_t."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(1, 3, 5, generator=g) * 0.5).requires_grad_(True)
    y = torch.tensor([[1, 4, 2]])
    logq = torch.log_softmax(logits.detach(), -1)
    beh = logq.gather(-1, y[..., None])[..., 0] - behaviour_shift
    support = torch.tensor([[[1, 0, 3], [4, 2, 0], [2, 1, 3]]])
    teacher = torch.log(torch.full((1, 3, 3), 0.2))
    teacher[..., 0] = beh + torch.tensor([rewards])
    assert (teacher <= 0).all()
    return logits, y, beh, support, teacher


def test_minillm_long_term_gradient_sign_and_value():
    rewards = [1.0, -0.5, -1.0]
    logits, y, beh, support, teacher = _pg_setup(rewards)
    hp = DistillConfig(alpha=0.0, single_step=False, length_norm=True, gamma=1.0)
    mask = torch.ones(1, 3, dtype=torch.long)
    loss, stats = minillm_loss(logits, y, mask, beh, support, teacher, hp)
    assert float(stats["loss_single"]) == 0.0
    assert float(stats["clip_frac"]) == 0.0
    loss.backward()
    # returns without single-step decomposition: R_t = r_t + mean of later rewards
    returns = [1.0 + (-0.5 - 1.0) / 2, -0.5 + (-1.0), -1.0]
    assert returns[0] > 0 and returns[1] < 0 and returns[2] < 0
    # loss = -(1/3) sum_t rho_t R_t, d rho_t / d z_{t, y_t} = 1 - q(y_t) at rho = 1
    q = torch.softmax(logits.detach(), -1)
    for t, ret in enumerate(returns):
        tok = int(y[0, t])
        grad = float(logits.grad[0, t, tok])
        expected = -ret * (1 - float(q[0, t, tok])) / 3
        assert grad == pytest.approx(expected, rel=1e-4)
        # a gradient step raises log q of the token iff its return is positive
        assert (grad < 0) == (ret > 0)
    assert loss.item() == pytest.approx(-sum(returns) / 3, rel=1e-5)


def test_minillm_ppo_clip_blocks_gradient():
    rewards = [1.0, 0.5, 0.25]  # all returns positive
    hp = DistillConfig(alpha=0.0, single_step=False, clip_eps=0.2)
    mask = torch.ones(1, 3, dtype=torch.long)
    # rho = e^0.5 > 1 + eps with R > 0: the clipped branch is the minimum -> no gradient
    logits, y, beh, support, teacher = _pg_setup(rewards, behaviour_shift=0.5)
    loss, stats = minillm_loss(logits, y, mask, beh, support, teacher, hp)
    loss.backward()
    assert float(stats["clip_frac"]) == 1.0
    assert torch.count_nonzero(logits.grad) == 0
    # rho = e^-0.5 < 1 - eps with R > 0: the unclipped branch is the minimum -> gradient flows
    logits, y, beh, support, teacher = _pg_setup(rewards, behaviour_shift=-0.5)
    loss, _ = minillm_loss(logits, y, mask, beh, support, teacher, hp)
    loss.backward()
    for t in range(3):
        assert float(logits.grad[0, t, int(y[0, t])]) < -1e-4


def test_minillm_single_step_term_and_importance_weights():
    rewards = [0.3, -0.2, 0.1]
    logits, y, beh, support, teacher = _pg_setup(rewards)
    mask = torch.tensor([[1, 1, 0]])
    logq_sup = torch.log_softmax(logits.detach(), -1).gather(-1, support)
    kl = support_kl(logq_sup, teacher)  # the supports here hold no duplicates
    p_tok = teacher[..., 0]
    # teacher-mixed weights w = q / (a p + (1 - a) q) with a = 0.5
    w = torch.exp(beh) / (0.5 * torch.exp(p_tok) + 0.5 * torch.exp(beh))
    hp = DistillConfig(alpha=0.5, single_step=True, iw_clip=10.0)
    _, stats = minillm_loss(logits, y, mask, beh, support, teacher, hp)
    assert float(stats["loss_single"]) == pytest.approx(float((w * kl)[0, :2].sum() / 2), rel=1e-5)
    assert float(stats["iw_mean"]) == pytest.approx(float(w[0, :2].mean()), rel=1e-5)
    assert float(stats["reverse_kl"]) == pytest.approx(float(kl[0, :2].mean()), rel=1e-5)
    assert float(stats["reward"]) == pytest.approx((0.3 - 0.2) / 2, abs=1e-6)
    # teacher_mixed=False: unit weights whatever alpha is
    hp = DistillConfig(alpha=0.5, single_step=True, teacher_mixed=False)
    _, stats = minillm_loss(logits, y, mask, beh, support, teacher, hp)
    assert float(stats["iw_mean"]) == pytest.approx(1.0)
    assert float(stats["loss_single"]) == pytest.approx(float(kl[0, :2].mean()), rel=1e-5)


# -- lm_loss ---------------------------------------------------------------------------------


def test_lm_loss_matches_hand_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([[1, 4, 0], [3, 2, 2]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    terms = []
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                z = logits[b, t].tolist()
                lse = math.log(sum(math.exp(v) for v in z))
                terms.append(lse - z[int(labels[b, t])])
    expected = sum(terms) / len(terms)
    assert lm_loss(logits, labels, mask).item() == pytest.approx(expected, abs=1e-5)


# -- toy convergence ------------------------------------------------------------------------


def _reverse_kl(table: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    q = torch.log_softmax(table.detach(), -1)
    return float((q.exp() * (q - teacher_logp)).sum())


@pytest.mark.parametrize("single_step", [True, False])
@pytest.mark.parametrize("length", [1, 3])
def test_minillm_converges_to_teacher(single_step, length):
    """A free logit table (the student) fitted by reverse-KL policy gradient to a fixed
    per-position teacher distribution, with the teacher seen only on a top-k support."""
    torch.manual_seed(0)
    v, b, k = 6, 64, 2
    g = torch.Generator().manual_seed(7 + length)
    teacher = torch.log_softmax(torch.randn(length, v, generator=g) * 1.5, -1)  # [T, V]
    table = torch.nn.Parameter(torch.randn(length, v, generator=g))
    opt = torch.optim.Adam([table], lr=0.1)
    hp = DistillConfig(alpha=0.0, single_step=single_step)
    mask = torch.ones(b, length, dtype=torch.long)
    pos = torch.arange(length)[None, :, None]
    start = _reverse_kl(table, teacher)
    assert start > 0.5
    for _ in range(150):
        with torch.no_grad():
            logq = torch.log_softmax(table, -1)  # [T, V]
            y = torch.multinomial(logq.exp(), b, replacement=True, generator=g).T  # [B, T]
            behaviour = logq[torch.arange(length)[None, :], y]  # [B, T]
            support = torch.stack(
                [build_support(y[:, t], logq[t].expand(b, v), k) for t in range(length)], 1
            )  # [B, T, k+1]
            teacher_sup = teacher[pos, support]
        logits = table[None].expand(b, length, v)
        loss, stats = minillm_loss(logits, y, mask, behaviour, support, teacher_sup, hp)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = _reverse_kl(table, teacher)
    assert end < 0.1 * start, (start, end)
    assert math.isfinite(float(stats["reverse_kl"]))


def test_forward_kl_baseline_converges():
    torch.manual_seed(0)
    t_len, v, b, k = 3, 6, 64, 3
    g = torch.Generator().manual_seed(11)
    teacher = torch.log_softmax(torch.randn(t_len, v, generator=g) * 1.5, -1)
    table = torch.nn.Parameter(torch.randn(t_len, v, generator=g))
    opt = torch.optim.Adam([table], lr=0.1)
    mask = torch.ones(b, t_len, dtype=torch.long)
    pos = torch.arange(t_len)[None, :, None]

    def fkl() -> float:
        q = torch.log_softmax(table.detach(), -1)
        return float((teacher.exp() * (teacher - q)).sum())

    start = fkl()
    assert start > 0.5
    for _ in range(150):
        with torch.no_grad():
            y = torch.multinomial(teacher.exp(), b, replacement=True, generator=g).T
            support = torch.stack(
                [build_support(y[:, t], teacher[t].expand(b, v), k) for t in range(t_len)], 1
            )
            teacher_sup = teacher[pos, support]
        loss, stats = forward_kl_loss(table[None].expand(b, t_len, v), mask, support, teacher_sup)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fkl() < 0.1 * start
    assert float(stats["forward_kl"]) == pytest.approx(float(loss))


def test_tail_bucket_sees_mass_outside_the_support():
    """90% of the student's mass off the support: the renormalised support KL is ~0, the
    KL with a rest bucket is large; with the support = the whole vocabulary they agree with
    the full KL."""
    from flminillm.distill import tail_kl

    v = 50
    teacher = torch.full((v,), -12.0)
    teacher[:3] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    teacher = torch.log_softmax(teacher, -1)
    student = torch.full((v,), 0.0)
    student[:3] = torch.log(torch.tensor([0.5, 0.3, 0.2])) + 3.0
    student = torch.log_softmax(student, -1)
    on_support = student[:3].exp().sum()
    assert 0.05 < float(on_support) < 0.5  # most of the student's mass is off the support
    s = torch.arange(3)
    mask = torch.ones(1, 1, 3, dtype=torch.bool)
    renorm = support_kl(student[s][None, None], teacher[s][None, None], mask)
    tail = tail_kl(student[s][None, None], teacher[s][None, None], mask)
    assert float(renorm) < 1e-6 and float(tail) > 3.0
    full = (student.exp() * (student - teacher)).sum()
    every = torch.arange(v)
    all_mask = torch.ones(1, 1, v, dtype=torch.bool)
    assert float(tail_kl(student[every][None, None], teacher[every][None, None], all_mask)) == (
        pytest.approx(float(full), rel=1e-5)
    )
    # rest mass known exactly: KL(student || teacher) over {S, rest}
    rest_q, rest_p = student[3:].exp().sum(), teacher[3:].exp().sum()  # summed, not 1 - x
    by_hand = (student[:3].exp() * (student[:3] - teacher[:3])).sum() + rest_q * torch.log(
        rest_q / rest_p
    )
    assert float(tail) == pytest.approx(float(by_hand), rel=1e-4)


def _oracle_minillm(logits, y, mask, q_old, p_full, gamma, clip_eps):
    """MiniLLM's loss written from the paper's equations (Gu et al. 2024, Sec. 2.2), on
    the student's own samples, with the full vocabulary: the single-step term is the exact
    KL(q_theta(.|y_<t) || p(.|y_<t)), the long-term term the clipped policy gradient of the
    length-normalised discounted future reward."""
    logq = torch.log_softmax(logits, -1)
    r = (p_full.gather(-1, y[..., None])[..., 0] - q_old) * mask
    b, t = y.shape
    returns = torch.zeros(b, t, dtype=logits.dtype)
    for i in range(t):
        acc, norm = torch.zeros(b, dtype=logits.dtype), torch.zeros(b, dtype=logits.dtype)
        for j in range(i + 1, t):
            acc = acc + gamma ** (j - i - 1) * r[:, j]
            norm = norm + gamma ** (j - i - 1) * mask[:, j]
        returns[:, i] = acc / norm.clamp(min=1.0)
    ratio = torch.exp(logq.gather(-1, y[..., None])[..., 0] - q_old)
    pg = torch.minimum(ratio * returns, ratio.clamp(1 - clip_eps, 1 + clip_eps) * returns)
    long = -(pg * mask).sum() / mask.sum()
    single = ((logq.exp() * (logq - p_full)).sum(-1) * mask).sum() / mask.sum()
    return single + long


@pytest.mark.parametrize("tail", [False, True])
def test_federated_loss_with_the_whole_vocabulary_as_support_is_the_papers(tail):
    """With S = the whole vocabulary (the sampled token first, then every other one) the
    federated loss and the oracle have the same gradient, to 1e-5."""
    g = torch.Generator().manual_seed(3)
    b, t, v = 3, 5, 7
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[0, 3:] = 0
    p_full = torch.log_softmax(torch.randn(b, t, v, generator=g, dtype=torch.float64), -1)
    q_old = torch.log_softmax(logits + 0.1 * torch.randn(b, t, v, generator=g, dtype=torch.float64), -1).gather(-1, y[..., None])[..., 0]  # fmt: skip
    others = torch.arange(v).expand(b, t, v)
    order = (others == y[..., None]).long().argsort(dim=-1, descending=True, stable=True)
    support = others.gather(-1, order)  # y_t first, then the rest
    assert torch.equal(support[..., 0], y)
    hp = DistillConfig(teacher_mixed=False, tail_bucket=tail, gamma=0.95)
    ours = logits.clone().requires_grad_(True)
    loss, _ = minillm_loss(ours, y, mask, q_old, support, p_full.gather(-1, support), hp)
    loss.backward()
    ref = logits.clone().requires_grad_(True)
    _oracle_minillm(ref, y, mask, q_old, p_full, 0.95, hp.clip_eps).backward()
    assert float(loss) == pytest.approx(float(_oracle_minillm(logits, y, mask, q_old, p_full, 0.95, hp.clip_eps)), abs=1e-5)  # fmt: skip
    assert torch.allclose(ours.grad, ref.grad, atol=1e-5)


def test_prefix_importance_weights():
    from flminillm.distill import prefix_importance_weights

    q = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    p = torch.log(torch.tensor([[0.25, 0.5, 1.0], [0.25, 0.5, 1.0]]))
    mask = torch.ones(2, 3)
    w_prefix, w_token = prefix_importance_weights(q, p, mask, torch.tensor([False, True]), 3.0)
    assert w_prefix[0].tolist() == [1.0, 1.0, 1.0]  # the student's own row: on-policy
    assert w_token[0].tolist() == [1.0, 1.0, 1.0]
    # a teacher's row: prod_{t'<t} q/p = 1, 2, 2 (prefix); prod_{t'<=t} = 2, 2, 1 (token)
    assert w_prefix[1].tolist() == pytest.approx([1.0, 2.0, 2.0])
    assert w_token[1].tolist() == pytest.approx([2.0, 2.0, 1.0])
    # the prefix weight does not depend on y_t: changing the last token's p leaves it
    p2 = p.clone()
    p2[1, 2] = math.log(0.01)
    assert torch.equal(prefix_importance_weights(q, p2, mask, torch.tensor([False, True]), 3.0)[0], w_prefix)  # fmt: skip
    # clipped
    w, _ = prefix_importance_weights(q * 0, p * 4, mask, torch.tensor([True, True]), 3.0)
    assert float(w.max()) <= 3.0 + 1e-6


def test_whitened_returns_and_the_own_rows_kl_estimate():
    from flminillm.distill import whiten

    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert float((w * mask).sum()) == pytest.approx(0.0, abs=1e-5) and float(w[0, 3]) == 0.0
    assert float(((w**2) * mask).sum() / mask.sum()) == pytest.approx(1.0, rel=1e-4)
    # the logged sequence KL comes from the student's own rows only: a teacher row (where
    # log p > log q) would make it negative
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    ids = torch.zeros(2, 3, dtype=torch.long)
    sup = ids[..., None]
    q_old = torch.full((2, 3), -1.0)
    p = torch.tensor([[-2.0] * 3, [-0.1] * 3])[..., None]
    _, stats = minillm_loss(logits, ids, torch.ones(2, 3), q_old, sup, p, DistillConfig(),
                            torch.tensor([False, True]))  # fmt: skip
    assert float(stats["seq_reverse_kl"]) == pytest.approx(3.0)  # (-1 - -2) * 3 on row 0


def test_the_warm_up_schedule():
    d = DistillConfig(alpha=0.2, warmup_rounds=2, seqkd_rounds=1000)
    first, third = d.for_round(1), d.for_round(3)
    assert (first.alpha, first.seqkd_rounds >= 1) == (1.0, True)  # teachers' answers, SeqKD
    assert d.for_round(2).alpha == 1.0
    assert third.alpha == 0.2 and third.seqkd_rounds < 3  # on-policy, SeqKD off
    assert DistillConfig(alpha=0.5).for_round(7).alpha == 0.5  # no schedule: as given
