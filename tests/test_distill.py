"""Tests for the MiniLLM reverse-KL math and teacher aggregation (flminillm.distill)."""

from __future__ import annotations

import math

import pytest
import torch

from flminillm.distill import (
    MiniLLMHParams,
    _support_mask,
    aggregate_teachers,
    forward_kl_loss,
    future_returns,
    lm_loss,
    minillm_loss,
    mixed_importance_weights,
    support_kl,
)
from flminillm.generation import build_support


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contend on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logs(values: list[float]) -> torch.Tensor:
    return torch.tensor([[[math.log(v) for v in values]]], dtype=torch.float32)


# -- support_kl -----------------------------------------------------------------------------


def test_support_kl_hand_value_with_renormalisation():
    # unnormalised weights on the support: q = [1, 3, 6] / 10, p = [2, 2, 4] / 8
    student = _logs([1.0, 3.0, 6.0])
    teacher = _logs([2.0, 2.0, 4.0])
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


def test_support_kl_ignores_masked_entries():
    ids = torch.tensor([[[3, 5, 3, -1]]])
    mask = _support_mask(ids)
    student = _logs([1.0, 3.0, 50.0, 80.0])
    teacher = _logs([2.0, 1.0, 0.001, 7.0])
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
    hp = MiniLLMHParams(alpha=0.0, single_step=False, length_norm=True, gamma=1.0)
    mask = torch.ones(1, 3, dtype=torch.long)
    loss, stats = minillm_loss(logits, y, mask, beh, support, teacher, hp)
    assert stats["loss_single"] == 0.0
    assert stats["clip_frac"] == 0.0
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
    hp = MiniLLMHParams(alpha=0.0, single_step=False, clip_eps=0.2)
    mask = torch.ones(1, 3, dtype=torch.long)
    # rho = e^0.5 > 1 + eps with R > 0: the clipped branch is the minimum -> no gradient
    logits, y, beh, support, teacher = _pg_setup(rewards, behaviour_shift=0.5)
    loss, stats = minillm_loss(logits, y, mask, beh, support, teacher, hp)
    loss.backward()
    assert stats["clip_frac"] == 1.0
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
    hp = MiniLLMHParams(alpha=0.5, single_step=True, iw_clip=10.0)
    _, stats = minillm_loss(logits, y, mask, beh, support, teacher, hp)
    assert stats["loss_single"] == pytest.approx(float((w * kl)[0, :2].sum() / 2), rel=1e-5)
    assert stats["iw_mean"] == pytest.approx(float(w[0, :2].mean()), rel=1e-5)
    assert stats["reverse_kl"] == pytest.approx(float(kl[0, :2].mean()), rel=1e-5)
    assert stats["reward"] == pytest.approx((0.3 - 0.2) / 2, abs=1e-6)
    # teacher_mixed=False: unit weights whatever alpha is
    hp = MiniLLMHParams(alpha=0.5, single_step=True, teacher_mixed=False)
    _, stats = minillm_loss(logits, y, mask, beh, support, teacher, hp)
    assert stats["iw_mean"] == pytest.approx(1.0)
    assert stats["loss_single"] == pytest.approx(float(kl[0, :2].mean()), rel=1e-5)


# -- aggregate_teachers ---------------------------------------------------------------------


def test_aggregate_mixture_weights():
    p1 = [0.7, 0.2, 0.1]
    p2 = [0.1, 0.3, 0.6]
    stacked = torch.stack([_logs(p1), _logs(p2)])  # [M=2, B=1, T=1, S=3]
    got = aggregate_teachers(stacked, weights=torch.tensor([1.0, 3.0]), method="mixture")
    expected = [math.log(0.25 * a + 0.75 * b) for a, b in zip(p1, p2, strict=True)]
    assert got.shape == (1, 1, 3)
    assert got[0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    # per-position log weights (unnormalised) give the same mixture
    logw = torch.tensor([math.log(2.0), math.log(6.0)]).view(2, 1, 1)
    got2 = aggregate_teachers(stacked, method="mixture", log_weights=logw)
    assert got2[0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_aggregate_median_ignores_outlier():
    p1 = [0.5, 0.3, 0.2]
    p2 = [0.45, 0.35, 0.2]
    crazy = [1e-9, 1e-9, 1.0 - 2e-9]
    stacked = torch.stack([_logs(p1), _logs(crazy), _logs(p2)])
    got = aggregate_teachers(stacked, method="median").exp()[0, 0]
    lo = torch.minimum(torch.tensor(p1), torch.tensor(p2))
    hi = torch.maximum(torch.tensor(p1), torch.tensor(p2))
    assert (got >= lo - 1e-6).all() and (got <= hi + 1e-6).all()
    # the mixture, by contrast, is pulled towards the outlier
    mix = aggregate_teachers(stacked, method="mixture").exp()[0, 0]
    assert float(mix[2]) > 0.4


def test_aggregate_trimmed_mean_drops_extremes():
    vals = [[0.01, 0.9], [0.2, 0.5], [0.3, 0.4], [0.4, 0.3], [0.99, 0.001]]
    stacked = torch.stack([_logs(v) for v in vals])  # [5, 1, 1, 2]
    got = aggregate_teachers(stacked, method="trimmed_mean", trim=0.2).exp()[0, 0]
    # entry 0: drop 0.01 and 0.99 -> mean(0.2, 0.3, 0.4); entry 1: drop 0.9 and 0.001
    assert got.tolist() == pytest.approx([0.3, 0.4], abs=1e-6)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_teachers(stacked, method="mode")


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
    hp = MiniLLMHParams(alpha=0.0, single_step=single_step)
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
    assert math.isfinite(stats["reverse_kl"])


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
    assert stats["forward_kl"] == pytest.approx(float(loss))


def test_capped_mixture_bounds_a_lying_teacher():
    from flminillm.distill import cap_log_weights

    torch.manual_seed(0)
    b, t = 60, 4
    # three honest experts, each sure of its own third of the prompts ...
    honest = torch.full((3, b, t), -30.0)
    for i in range(3):
        honest[i, i * 20 : (i + 1) * 20] = -5.0
    mask = torch.ones(b, t)
    capped, delta = cap_log_weights(honest, mask, cap=0.5)
    assert torch.equal(capped, honest) and float(delta.abs().max()) == 0.0  # left alone
    # ... and a fourth that claims probability 1 for every prompt
    liar = torch.cat([honest, torch.zeros(1, b, t)])
    w = torch.softmax(liar, 0)
    assert float(w[3].mean()) > 0.99
    capped, delta = cap_log_weights(liar, mask, cap=0.5)
    w = torch.softmax(capped, 0)
    assert float(w[3].mean()) == pytest.approx(0.5, abs=1e-3)
    assert float(delta[3]) > 0 and float(delta[:3].abs().max()) == 0.0
    # the honest experts keep their domains among themselves
    for i in range(3):
        own = w[i, i * 20 : (i + 1) * 20]
        others = w[:3, i * 20 : (i + 1) * 20].sum(0)
        assert float((own / others).min()) > 0.99


def test_capped_answer_selection_bounds_a_liar_also_without_student_rollouts():
    """alpha = 1: the student has no rollouts to measure mixture weights on; the cap must
    still hold in the choice of teacher answers."""
    from flminillm.distill_step import cap_selection, select_teacher_rollouts

    a = 60
    honest = torch.full((3, a), -30.0)
    for i in range(3):
        honest[i, i * 20 : (i + 1) * 20] = -5.0 + 0.01 * torch.arange(20)
    assert torch.equal(cap_selection(honest, 0.5), honest)  # each holds 1/3: left alone
    joint = torch.cat([honest, torch.zeros(1, a)])  # a liar: sure of everything
    assert torch.equal(joint.argmax(0), torch.full((a,), 3))
    best = cap_selection(joint, 0.5).argmax(0)
    assert int((best == 3).sum()) <= 30
    # the liar keeps the prompts where the honest teachers are least sure; each honest
    # expert gets back the most certain part of its own domain
    for i in range(3):
        top = torch.arange(i * 20, (i + 1) * 20)[10:]  # its ten most certain prompts
        assert bool((best[top] == i).all())

    # through select_teacher_rollouts, with message-shaped inputs
    def teaching(logp_value: torch.Tensor) -> dict:
        t = 3
        return {
            "own_response_ids": torch.ones(a, t, dtype=torch.long),
            "own_response_mask": torch.ones(a, t, dtype=torch.long),
            "own_support_ids": torch.ones(a, t, 2, dtype=torch.long),
            "own_logp": (logp_value[:, None, None] / t).expand(a, t, 2).clone(),
            "own_prompt_logp": torch.zeros(a),
        }

    teachings = [teaching(joint[i]) for i in range(4)]
    prior = torch.full((4,), 0.25)
    uncapped = select_teacher_rollouts(teachings, prior)["teacher_index"]
    capped = select_teacher_rollouts(teachings, prior, cap=0.5)["teacher_index"]
    assert int((uncapped == 3).sum()) == a and int((capped == 3).sum()) <= 30
