"""Tests for combining teachers (flminillm.aggregate): mixture, median, trimmed mean, and the
capped defences against a lying teacher."""

from __future__ import annotations

import math

import pytest
import torch

from flminillm.aggregate import (
    LEFT_OUT,
    QUARANTINE_P,
    aggregate_teachers,
    assemble_batch,
    cap_log_weights,
    cap_selection,
    claim_floor,
    claim_quantiles,
    coherence,
    imputed_quantile,
    invariant_answers,
    lost_prompts,
    own_quantiles,
    quarantine,
    rank_in_play,
    replay_rows,
    select_teacher_rollouts,
    selection_claims,
    selection_stats,
    stale_part,
    unknown_domain,
)
from tests.tensors import log_probs

pytestmark = pytest.mark.usefixtures("one_thread")

# the peer contest and its bar off (the default; explicit so that these tests keep testing
# what came before them whatever the default): their hand-made supports are not what a
# model writes, so an expert would contest where no real one does
NO_CONTEST = {"contest_quantile": 1.0, "contest_bar": 0.0}


# -- aggregate_teachers ---------------------------------------------------------------------


def test_aggregate_mixture_weights():
    p1 = [0.7, 0.2, 0.1]
    p2 = [0.1, 0.3, 0.6]
    stacked = torch.stack([log_probs(p1), log_probs(p2)])  # [M=2, B=1, T=1, S=3]
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
    stacked = torch.stack([log_probs(p1), log_probs(crazy), log_probs(p2)])
    got = aggregate_teachers(stacked, method="median").exp()[0, 0]
    lo = torch.minimum(torch.tensor(p1), torch.tensor(p2))
    hi = torch.maximum(torch.tensor(p1), torch.tensor(p2))
    assert (got >= lo - 1e-6).all() and (got <= hi + 1e-6).all()
    # the mixture, by contrast, is pulled towards the outlier
    mix = aggregate_teachers(stacked, method="mixture").exp()[0, 0]
    assert float(mix[2]) > 0.4


def test_aggregate_trimmed_mean_drops_extremes():
    vals = [[0.01, 0.9], [0.2, 0.5], [0.3, 0.4], [0.4, 0.3], [0.99, 0.001]]
    stacked = torch.stack([log_probs(v) for v in vals])  # [5, 1, 1, 2]
    got = aggregate_teachers(stacked, method="trimmed_mean", trim=0.2).exp()[0, 0]
    # entry 0: drop 0.01 and 0.99 -> mean(0.2, 0.3, 0.4); entry 1: drop 0.9 and 0.001
    assert got.tolist() == pytest.approx([0.3, 0.4], abs=1e-6)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_teachers(stacked, method="mode")


def test_capped_mixture_bounds_a_lying_teacher():

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


def test_low_ties_rank_a_teacher_with_one_claim_for_everything_last():
    """distill.tie_rank 'low': tied claims take their lowest rank, so a teacher that claims
    one number for everything ranks every answer at 0 and wins no prompt another teacher
    answers (with 'mean' it ranks at 0.5 and wins where the other ranks below its median);
    untied claims rank as before."""
    from flminillm.aggregate import claim_quantiles

    honest = torch.tensor([[-3.0, -1.0, -2.0, -0.5, -4.0]])
    flat = torch.zeros(1, 5)
    both = torch.cat([honest, flat])
    assert torch.equal(claim_quantiles(honest, True), claim_quantiles(honest))
    assert claim_quantiles(flat).eq(0.5).all() and claim_quantiles(flat, True).eq(0).all()
    mean_wins = claim_quantiles(both).argmax(0)
    assert mean_wins.tolist() == [1, 0, 0, 0, 1]  # the flat liar wins below the median
    low_wins = claim_quantiles(both, True).argmax(0)
    assert low_wins.tolist() == [0, 0, 0, 0, 0]
    tied = torch.tensor([[-1.0, -1.0, -2.0]])  # copies with the same answer
    assert claim_quantiles(tied, True).tolist() == [[0.5, 0.5, 0.0]]


def test_claim_quantiles_keep_order_and_flatten_constant_claims():
    j = torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [-9.0, -1.0, -5.0, -7.0]])
    q = claim_quantiles(j)
    assert torch.allclose(q[0], torch.tensor([1.0, 0.0, 0.5, 0.5]))  # ties share their rank
    assert torch.equal(q[1], torch.full((4,), 0.5))  # "probability 1 everywhere" says nothing
    assert torch.equal(q[2].argsort(), j[2].argsort())  # order kept within a teacher
    assert torch.equal(claim_quantiles(torch.zeros(2, 1)), torch.full((2, 1), 0.5))


@pytest.mark.parametrize("liar", ["certain", "random", "focused"])
def test_rank_selection_keeps_each_expert_on_its_domain_whatever_a_liar_claims(liar):
    """Three honest experts (each surest on its third of the prompts, on different scales)
    and a liar. Joint selection hands the certain liar every prompt. Rank selection: a
    liar certain of everything wins nothing; one with random claims wins where its random
    quantile beats the expert's (here at most a quarter of a domain); one that focuses its
    claims on one domain (a backdoor) wins the less certain half of that domain and nothing
    elsewhere: no claim-based rule can tell it from that domain's expert."""
    a = 60
    g = torch.Generator().manual_seed(0)
    honest = torch.full((3, a), -40.0) + torch.rand(3, a, generator=g)
    for i, scale in enumerate((1.0, 3.0, 0.3)):  # teachers calibrated differently
        honest[i, i * 20 : (i + 1) * 20] = scale * (-5.0 + 0.05 * torch.arange(20))
    lie = {
        "certain": torch.zeros(1, a),
        "random": torch.randn(1, a, generator=g) * 10,
        "focused": torch.cat([torch.zeros(1, 20), torch.full((1, 40), -50.0)], 1),
    }[liar]
    joint = torch.cat([honest, lie])

    def teaching(v: torch.Tensor) -> dict:
        return {
            "own_response_ids": torch.ones(a, 1, dtype=torch.long),
            "own_response_mask": torch.ones(a, 1, dtype=torch.long),
            "own_support_ids": torch.ones(a, 1, 2, dtype=torch.long),
            "own_logp": v[:, None, None].expand(a, 1, 2).clone(),
            "own_prompt_logp": torch.zeros(a),
        }

    teachings = [teaching(joint[i]) for i in range(4)]
    prior = torch.full((4,), 0.25)
    by_joint = select_teacher_rollouts(teachings, prior)["teacher_index"]
    by_rank = select_teacher_rollouts(teachings, prior, rank=True)["teacher_index"]
    if liar == "certain":
        assert bool((by_joint == 3).all())
    for i in range(3):
        domain = by_rank[i * 20 : (i + 1) * 20]
        kept = int((domain == i).sum())
        assert int(((domain != i) & (domain != 3)).sum()) == 0  # no honest one's either
        if liar == "certain":
            assert kept == 20
        elif liar == "random":
            assert kept >= 15, (i, domain)
        else:  # focused on domain 0: its less certain half goes to the liar
            assert kept == (10 if i == 0 else 20)
            assert bool((domain[10:] == i).all())
    # a clean federation: rank selection picks as joint selection does
    clean = [teaching(honest[i]) for i in range(3)]
    p3 = torch.full((3,), 1 / 3)
    assert torch.equal(
        select_teacher_rollouts(clean, p3, rank=True)["teacher_index"],
        select_teacher_rollouts(clean, p3)["teacher_index"],
    )


def test_selection_stats_say_whose_answers_were_kept_and_who_claims_certainty():
    def teaching(seq_logp: list[float]) -> dict:
        n = len(seq_logp)
        logp = torch.zeros(n, 2, 3)
        logp[:, 0, 0] = torch.tensor(seq_logp)  # the whole claim on the first token
        return {"own_logp": logp, "own_response_mask": torch.ones(n, 2)}

    honest = teaching([-0.5, -3.0, -0.001, -2.0])  # sure of one answer in four
    liar = teaching([0.0, 0.0, 0.0, 0.0])  # probability 1 for everything
    index = torch.tensor([-1, -1, 0, 0, 0, 1])  # two student rollouts, then 3 vs 1 kept
    stats = selection_stats(index, [honest, liar], ["alice", "carol"])
    assert stats == {
        "rejected": 0.0, "selected.alice": 0.75, "certain.alice": 0.25,
        "selected.carol": 0.25, "certain.carol": 1.0,
    }  # fmt: skip
    # shares are of every teacher-share prompt, the rejected ones included
    stats = selection_stats(index, [honest, liar], ["alice", "carol"], n_rejected=4)
    assert (stats["rejected"], stats["selected.alice"], stats["selected.carol"]) == (
        0.5, 0.375, 0.125,
    )  # fmt: skip
    # no teacher-share prompts (alpha = 0): nothing kept, the claims still counted
    none = selection_stats(torch.full((3,), -1), [honest, liar], ["alice", "carol"])
    assert none == {"certain.alice": 0.25, "certain.carol": 1.0}


def _rollouts(n: int, a: int, t: int, s: int) -> dict[str, torch.Tensor]:
    """A RolloutMessage of n student rollouts (width t, support s) and a teacher-share
    prompts, prompt i of the teacher share holding the id i."""
    return {
        "prompt_ids": torch.ones(n, 4, dtype=torch.long),
        "prompt_mask": torch.ones(n, 4, dtype=torch.long),
        "response_ids": torch.ones(n, t, dtype=torch.long),
        "response_mask": torch.ones(n, t, dtype=torch.long),
        "support_ids": torch.arange(s).expand(n, t, s).clone(),
        "ask_prompt_ids": torch.arange(a)[:, None].expand(a, 4).clone(),
        "ask_prompt_mask": torch.ones(a, 4, dtype=torch.long),
    }


def test_min_claim_rejects_answers_no_teacher_present_knows():
    """A round whose expert dropped out: on its prompts the teachers present guess, with
    low claimed probabilities. With `min_claim` those prompts leave the batch (and are
    counted); the answers the teachers know stay, as they would without it."""
    from flminillm.config import DistillConfig

    n, a, t, s = 2, 4, 3, 2
    rollouts = _rollouts(n, a, t, s)

    def teaching(per_token: list[float]) -> dict:
        own = torch.log(torch.tensor(per_token))[:, None, None].expand(a, t, s).clone()
        return {
            "scores": torch.full((n, t, s), -1.0),
            "prompt_logp": torch.zeros(n),
            "own_response_ids": torch.ones(a, t, dtype=torch.long),
            "own_response_mask": torch.ones(a, t, dtype=torch.long),
            "own_support_ids": torch.arange(s).expand(a, t, s).clone(),
            "own_logp": own,
            "own_prompt_logp": torch.zeros(a),
        }

    # prompts 0, 1: alice's domain; 2: bob's; 3: the absent expert's (both guess)
    teachings = [teaching([0.9, 0.8, 0.1, 0.2]), teaching([0.1, 0.1, 0.7, 0.15])]
    w = torch.ones(2)
    full, full_info = assemble_batch(rollouts, teachings, w, DistillConfig(min_claim=0.0))
    floor, info = assemble_batch(rollouts, teachings, w, DistillConfig(min_claim=0.5))
    assert int(full_info["n_rejected"]) == 0 and full["response_ids"].shape[0] == n + a
    assert int(info["n_rejected"]) == 1 and floor["response_ids"].shape[0] == n + a - 1
    assert info["teacher_index"].tolist() == [-1, -1, 0, 0, 1]  # prompt 3 left out
    assert info["ask_choice"].tolist() == [0, 0, 1, -1]  # what a later round replays
    assert "teacher_index" not in floor  # the batch holds what training reads, nothing else
    assert floor["prompt_ids"][n:, 0].tolist() == [0, 1, 2]
    for key in ("teacher_logp", "support_ids", "response_mask", "from_teacher"):
        assert torch.equal(floor[key], full[key][: n + a - 1]), key
    with pytest.raises(ValueError, match="min_claim"):
        DistillConfig(min_claim=1.0)


def _prompts(family: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n prompts of a toy family: one left padding position, format ids 1, 2 shared by every
    family, the family's template (three ids from 40 + 3 * family) and one varying word
    from a pool every family shares (ids 10-29): what a task's prompts look like."""
    g = torch.Generator().manual_seed(seed)
    word = torch.randint(10, 30, (n, 1), generator=g)
    template = (40 + 3 * family + torch.arange(3)).expand(n, 3)
    pad = torch.zeros(n, 1, dtype=torch.long)
    ids = torch.cat([pad, torch.tensor([[1]]).expand(n, 1), template, word,
                     torch.tensor([[2]]).expand(n, 1)], 1)  # fmt: skip
    mask = torch.ones_like(ids)
    mask[:, 0] = 0
    return ids, mask


def test_imputed_quantile_stands_in_for_an_absent_teacher():
    """An absent teacher's quantile on a new prompt is the mean of its quantiles on the
    nearest prompts of the rounds it took part in: high on its own family, low elsewhere,
    whatever the round."""
    fam = torch.arange(3).repeat_interleave(5)
    new = [_prompts(f, 5, 100 + f) for f in range(3)]
    new_ids, new_mask = torch.cat([i for i, _ in new]), torch.cat([m for _, m in new])

    def past_round(levels: list[float], seed: int):
        parts = [_prompts(f, 8, seed + f) for f in range(3)]
        q = torch.tensor([lv for lv in levels for _ in range(8)])
        lost = torch.zeros(24, dtype=torch.bool)
        return torch.cat([i for i, _ in parts]), torch.cat([m for _, m in parts]), q, lost

    one = past_round([0.2, 0.3, 0.9], seed=0)
    got = imputed_quantile(new_ids, new_mask, [one])
    assert torch.allclose(got, torch.tensor([0.2, 0.3, 0.9])[fam])
    # the nearest of all its rounds: a second round's prompts of each family count as much
    two = past_round([0.4, 0.1, 0.7], seed=10)
    got = imputed_quantile(new_ids, new_mask, [one, two])
    assert bool(((got >= torch.tensor([0.2, 0.1, 0.7])[fam] - 1e-6)
                 & (got <= torch.tensor([0.4, 0.3, 0.9])[fam] + 1e-6)).all())  # fmt: skip
    assert bool((got[fam == 2] > got[fam != 2].max()).all())
    assert torch.equal(imputed_quantile(new_ids, new_mask, []), torch.zeros(15))
    # what it claimed high but another teacher won (family 1) is not its domain: it would
    # not win those prompts now either
    ids, mask, q, lost = past_round([0.2, 0.8, 0.9], seed=0)
    got = imputed_quantile(new_ids, new_mask, [(ids, mask, q, lost)])
    assert torch.allclose(got, torch.tensor([0.2, 0.8, 0.9])[fam])
    lost = torch.arange(24) // 8 == 1  # the past round's prompts of family 1
    got = imputed_quantile(new_ids, new_mask, [(ids, mask, q, lost)])
    assert torch.allclose(got, torch.tensor([0.2, 0.0, 0.9])[fam])
    with pytest.raises(ValueError, match="lost"):
        imputed_quantile(new_ids, new_mask, [(ids, mask, q, lost[:5])])


def test_a_teacher_loses_what_another_won_or_was_left_out_not_what_nobody_claimed():
    """`lost_prompts` of teacher 1 in a round whose choices were: its own (1), another
    teacher's (0, 2), nobody's for `min_claim` (-1), left out (`LEFT_OUT`: reserved for an
    absent teacher, ruled out, or barred)."""
    choice = torch.tensor([1, 0, 2, -1, LEFT_OUT, 1])
    assert lost_prompts(choice, 1).tolist() == [False, True, True, False, True, False]
    assert lost_prompts(choice, 0).tolist() == [True, False, True, False, True, True]


def _two_domains(n: int = 2, t: int = 3, s: int = 2):
    """Rollouts (n of the student's, 4 teacher-share prompts) and two teachers' messages:
    teacher 0 claims prompts 0, 1 (p 0.9, 0.8), teacher 1 prompts 2, 3 (0.7, 0.6)."""
    a = 4
    teachings = [
        {"scores": torch.full((n, t, s), -1.0), "prompt_logp": torch.zeros(n),
         "own_response_ids": torch.ones(a, t, dtype=torch.long),
         "own_response_mask": torch.ones(a, t, dtype=torch.long),
         "own_support_ids": torch.arange(s).expand(a, t, s).clone(),
         "own_logp": torch.log(torch.tensor(p))[:, None, None].expand(a, t, s).clone(),
         "own_prompt_logp": torch.zeros(a)}
        for p in ([0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.7, 0.6])
    ]  # fmt: skip
    return _rollouts(n, a, t, s), teachings


def test_a_prompt_an_absent_teacher_would_have_won_leaves_the_batch():
    """Under rank selection, a prompt whose kept answer's quantile an absent teacher's
    imputed quantile beats is left out and counted (`reserved`); the others stay. Joint
    selection has no quantiles: nothing is reserved there."""
    from flminillm.config import DistillConfig

    rollouts, teachings = _two_domains()
    d = DistillConfig(min_claim=0.0, selection="rank")
    # kept: teacher 0 on prompts 0, 1 (quantiles 1, 2/3), teacher 1 on 2, 3 (1, 2/3)
    rivals = torch.tensor([0.5, 0.9, 0.5, 0.9])
    batch, info = assemble_batch(rollouts, teachings, torch.ones(2), d, rivals=rivals)
    assert info["ask_choice"].tolist() == [0, LEFT_OUT, 1, LEFT_OUT]
    assert int(info["n_reserved"]) == 2 and int(info["n_rejected"]) == 0
    assert batch["response_ids"].shape[0] == 2 + 4 - 2  # 2 student rollouts, 4 prompts, 2 reserved
    stats = selection_stats(info["teacher_index"], teachings, ["alice", "bob"], 0, n_reserved=2)
    assert stats["reserved"] == pytest.approx(0.5) and stats["selected.bob"] == pytest.approx(0.25)
    joint = d.model_copy(update={"selection": "joint"})
    _, info = assemble_batch(rollouts, teachings, torch.ones(2), joint, rivals=rivals)
    assert int(info["n_reserved"]) == 0


def test_an_absent_client_with_no_past_gets_its_share_where_the_present_are_least_sure():
    """`unknown_domain`: round(share * A) of the still-free prompts, those whose rank winner
    ranks lowest among its own claims; in `assemble_batch` they are reserved (counted,
    `LEFT_OUT`) beside those an absent teacher with a past would win; not under joint
    selection."""
    from flminillm.config import DistillConfig

    q = torch.tensor([0.9, 0.2, 0.8, 0.3, 0.1, 0.7])
    free = torch.ones(6, dtype=torch.bool)
    assert unknown_domain(q, free, 1 / 3).tolist() == [False, True, False, False, True, False]
    free[4] = False  # already reserved for an absent teacher with a past: not counted twice
    assert unknown_domain(q, free, 1 / 3).tolist() == [False, True, False, True, False, False]
    assert not unknown_domain(q, free, 0.0).any()
    ties = torch.full((40,), 0.5)  # a quarantined winner's quantile is one value: the first
    assert unknown_domain(ties, torch.ones(40, dtype=torch.bool), 0.25).nonzero()[
        :, 0
    ].tolist() == list(range(10))
    assert int(unknown_domain(q, torch.zeros(6, dtype=torch.bool), 0.5).sum()) == 0

    rollouts, teachings = _two_domains()
    d = DistillConfig(min_claim=0.0, selection="rank")
    # kept: teacher 0 on prompts 0, 1 (quantiles 1, 2/3), teacher 1 on 2, 3 (1, 2/3)
    _, info = assemble_batch(rollouts, teachings, torch.ones(2), d, unknown_share=0.5)
    assert info["ask_choice"].tolist() == [0, LEFT_OUT, 1, LEFT_OUT]
    assert int(info["n_reserved"]) == 2
    joint = d.model_copy(update={"selection": "joint"})
    _, info = assemble_batch(rollouts, teachings, torch.ones(2), joint, unknown_share=0.5)
    assert int(info["n_reserved"]) == 0


def test_a_barred_teacher_counts_as_an_absent_client_where_configured():
    """distill.barred_as_absent: a teacher barred for the round adds its share of the
    clients (`barred_share`) to the prompts reserved where the winners are least sure. Under
    `barred_wins` 'next' its would-be wins go to the other teacher first, whose guesses
    there rank lowest among its own claims: those are the prompts held back."""
    from flminillm.config import DistillConfig

    rollouts, teachings = _two_domains()
    d = DistillConfig(min_claim=0.0, selection="rank", barred_wins="next")
    # teacher 1 barred: its prompts 2, 3 go to teacher 0 (its quantiles 1/4, 2/4 there)
    _, info = assemble_batch(rollouts, teachings, torch.ones(2), d, barred=[False, True])
    assert info["ask_choice"].tolist() == [0, 0, 0, 0] and int(info["n_reserved"]) == 0
    _, info = assemble_batch(rollouts, teachings, torch.ones(2), d, barred=[False, True],
                             barred_share=0.5)  # fmt: skip
    assert info["ask_choice"].tolist() == [0, 0, LEFT_OUT, LEFT_OUT]
    assert int(info["n_reserved"]) == 2
    # no teacher barred: nothing reserved, whatever the share
    _, info = assemble_batch(rollouts, teachings, torch.ones(2), d, barred_share=0.5)
    assert info["ask_choice"].tolist() == [0, 0, 1, 1] and int(info["n_reserved"]) == 0


def test_claim_floor_is_scale_free_and_a_liar_cannot_lower_it():
    """min_claim is absolute (p = 0.5 per token) where teachers are sure of what they know;
    where most claims are low (teachers barely trained, long answers with many wordings)
    at most `max_rejected` of the answers are rejected, the least sure ones."""
    g = torch.Generator().manual_seed(0)
    sure = torch.log(torch.rand(200, generator=g) * 0.5 + 0.5)  # p in [0.5, 1): keep all
    assert claim_floor(sure, 0.5, 0.5) == pytest.approx(math.log(0.5))
    assert int((sure < claim_floor(sure, 0.5, 0.5)).sum()) == 0
    unsure = torch.log(torch.rand(200, generator=g) * 0.01 + 1e-4)  # p < 0.011 everywhere
    floor = claim_floor(unsure, 0.5, 0.5)
    kept = unsure >= floor
    assert int((~kept).sum()) <= 100 and int(kept.sum()) >= 100
    assert float(unsure[kept].min()) >= float(unsure[~kept].max())  # the surer half stays
    assert int((unsure < claim_floor(unsure, 0.5, 1.0)).sum()) == 200  # absolute: none kept
    # a liar claiming p = 1 on a third of them raises the quantile, never lowers it
    lied = torch.cat([unsure, torch.zeros(100)])
    assert claim_floor(lied, 0.5, 0.5) >= floor


def test_stale_part_replays_a_share_of_what_the_teacher_won_before():
    a, t, s = 10, 3, 2
    old = {"ask_prompt_ids": torch.arange(a)[:, None].expand(a, 4).clone(),
           "ask_prompt_mask": torch.ones(a, 4, dtype=torch.long)}  # fmt: skip
    teaching = {
        "own_response_ids": torch.arange(a)[:, None].expand(a, t).clone(),
        "own_response_mask": torch.ones(a, t, dtype=torch.long),
        "own_support_ids": torch.zeros(a, t, s, dtype=torch.long),
        "own_logp": torch.full((a, t, s), -0.1),
    }
    choice = torch.tensor([1, 0, 1, 1, -1, 1, 2, 1, 0, 1])  # teacher 1 won 6 prompts
    (rows,) = replay_rows([(choice, 1)], 0.5, seed=3)
    part = stale_part(old, teaching, rows)
    assert rows.numel() == 3 and set(rows.tolist()) <= {0, 2, 3, 5, 7, 9}
    assert torch.equal(part["prompt_ids"][:, 0], rows)
    assert torch.equal(part["response_ids"][:, 0], rows)  # each answer with its own prompt
    assert bool(part["from_teacher"].all()) and bool((part["teacher_index"] == -2).all())
    assert replay_rows([(choice, 1)], 1.0, seed=3)[0].numel() == 6
    assert torch.equal(replay_rows([(choice, 1)], 0.5, seed=3)[0], rows)  # seeded
    # several rounds: the volume of its latest round (times the share), drawn from all of
    # them; here it won 6 prompts then 2 (as teacher 0)
    later = torch.tensor([0, -1, 1, 1, 0, 1, 1, 1, 1, 1])
    both = replay_rows([(choice, 1), (later, 0)], 1.0, seed=3)
    assert sum(r.numel() for r in both) == 2
    assert set(both[0].tolist()) <= {0, 2, 3, 5, 7, 9} and set(both[1].tolist()) <= {0, 4}
    drawn = [replay_rows([(choice, 1), (later, 0)], 1.0, seed=k) for k in range(40)]
    assert any(d[0].numel() for d in drawn) and any(d[1].numel() for d in drawn)
    # in a batch: after this round's rows, counted as stale
    empty = {k: v[:0] for k, v in old.items()}
    rollouts = {"prompt_ids": torch.ones(1, 4, dtype=torch.long),
                "prompt_mask": torch.ones(1, 4, dtype=torch.long),
                "response_ids": torch.ones(1, t, dtype=torch.long),
                "response_mask": torch.ones(1, t, dtype=torch.long),
                "support_ids": torch.zeros(1, t, s, dtype=torch.long), **empty}  # fmt: skip
    teacher = {"scores": torch.full((1, t, s), -1.0), "prompt_logp": torch.zeros(1),
               **{k: v[:0] for k, v in teaching.items()}, "own_prompt_logp": torch.zeros(0)}  # fmt: skip
    from flminillm.config import DistillConfig

    _, info = assemble_batch(rollouts, [teacher], torch.ones(1), DistillConfig(), extra=[part])
    assert info["teacher_index"].tolist() == [-1, -2, -2, -2]
    assert selection_stats(info["teacher_index"], [teacher], ["bob"])["stale_rows"] == 3.0


# -- a broken teacher: claims that contradict its own support ---------------------------------


def _honest_teaching(a: int = 6, t: int = 5, k: int = 8, vocab: int = 40, seed: int = 0):
    """A teacher's own answers as flminillm.generation.sample writes them: a sampled token,
    its top-k others, and the log-probs of one softmax on that support."""
    from flminillm.generation import build_support

    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(a * t, vocab, generator=g) * 3, -1)
    sampled = torch.multinomial(logp.exp(), 1, generator=g).squeeze(-1)
    sup = build_support(sampled, logp, k)
    mask = torch.ones(a, t, dtype=torch.long)
    mask[::2, -2:] = 0  # shorter answers: masked positions
    own = logp.gather(-1, sup).view(a, t, k + 1) * mask[..., None]
    return {
        "own_response_ids": sampled.view(a, t), "own_response_mask": mask,
        "own_support_ids": sup.view(a, t, k + 1), "own_logp": own,
        "own_prompt_logp": -torch.rand(a, generator=g) * 10,
    }  # fmt: skip


def _two_scoring_teachers(n: int, a: int, t: int, s: int, seed: int):
    """Rollouts (`_rollouts`) and two honest teachers' messages on them: their own answers
    (`_honest_teaching`), random prompt log-likelihoods and random scores of the student's
    n rollouts."""
    g = torch.Generator().manual_seed(seed)
    rollouts = _rollouts(n, a, t, s)
    teachings = [
        {**_honest_teaching(seed=i), "prompt_logp": -torch.rand(n, generator=g),
         "scores": torch.log_softmax(torch.randn(n, t, s, generator=g), -1)}
        for i in range(2)
    ]  # fmt: skip
    return rollouts, teachings


def test_coherence_catches_a_broken_teacher_not_an_honest_one():
    """An honest teacher's claims are in its support's order at every position; random
    scores (a broken model, flminillm.attacks 'random') almost nowhere. Liars keep the order
    (they are rank selection's and min_claim's to bound), so the check does not touch them."""
    from flminillm.attacks import corrupt_teaching

    for seed in range(3):
        assert coherence(_honest_teaching(seed=seed)) == 1.0
    honest = _honest_teaching()
    msg = {**honest, "scores": torch.zeros(2, 3, 9), "prompt_logp": torch.zeros(2)}
    broken = corrupt_teaching(msg, "random", vocab_size=40, seed=1)
    assert coherence(broken) < 0.05
    liar = corrupt_teaching(msg, "adversarial", vocab_size=40, seed=1)
    assert coherence(liar) == 1.0
    # nothing to check: a sampled-token support (another tokenizer), or no answers
    assert coherence({**honest, "own_logp": honest["own_logp"][..., :1]}) == 1.0
    assert coherence({**honest, "own_response_mask": torch.zeros(6, 5)}) == 1.0


def test_a_quarantined_teacher_counts_by_its_answers_alone():
    """A broken teacher's answers stay (as hard labels, with one constant claim: the middle
    of every prompt under rank selection); its scores leave the mixture that scores the
    student's rollouts, which the trusted teachers alone then score."""
    from flminillm.config import DistillConfig

    honest = _honest_teaching(seed=1)
    q = quarantine(honest, 0.5)
    mask = honest["own_response_mask"].bool()
    p = q["own_logp"][mask].exp()  # [positions, S]
    assert torch.allclose(p[:, 0], torch.tensor(QUARANTINE_P))  # most on the answer token
    others = p[:, 1:]  # the rest spread evenly over the others and the tail
    assert torch.allclose(others, others[:1].expand_as(others))
    assert torch.allclose(1 - p.sum(-1), others[:, 0], atol=1e-6)
    # the reverse KL to it stays finite and small once the student is sure of the answer
    from flminillm.distill import tail_kl

    sure = torch.log(torch.tensor([0.95, *[0.05 / 9] * 8]))[None].expand_as(p)
    kl = tail_kl(sure, q["own_logp"][mask], torch.ones_like(p, dtype=torch.bool))
    assert bool((kl < 0.2).all()) and bool((kl >= 0).all())
    assert torch.equal(q["own_response_ids"], honest["own_response_ids"])
    assert bool((claim_quantiles(torch.zeros(1, 6)) == 0.5).all())  # a constant claim

    n, a, t, s = 3, 6, 5, 9
    rollouts, teachings = _two_scoring_teachers(n, a, t, s, seed=2)
    d = DistillConfig()
    alone, _ = assemble_batch(rollouts, teachings[:1], torch.ones(1), d)
    teachings[1] = quarantine(teachings[1], 0.5)
    batch, info = assemble_batch(rollouts, teachings, torch.ones(2), d, trusted=[True, False])
    assert torch.allclose(batch["teacher_logp"][:n], alone["teacher_logp"][:n], atol=1e-5)
    mine = info["teacher_index"] == 1
    assert bool(mine.any())  # its answers still count where they rank first
    kept = batch["teacher_logp"][mine]
    on = batch["response_mask"][mine].bool()
    assert torch.allclose(kept[..., 0][on].exp(), torch.tensor(QUARANTINE_P))
    # its claim is one constant, not a sum over its answer's tokens: under rank selection it
    # is the middle of every prompt whatever the answer's length, so it wins exactly where the
    # honest teacher is less sure than its median (ties go to the first teacher)
    varied = {**teachings[1], "own_response_mask": (torch.arange(t)[None] < torch.tensor(
        [1, 5, 2, 4, 1, 3])[:, None]).to(torch.uint8)}  # fmt: skip
    h = teachings[0]
    mine = (h["own_logp"][..., 0] * h["own_response_mask"]).sum(-1)
    mine = claim_quantiles((mine + h["own_prompt_logp"] + math.log(0.5))[None])[0]
    for at in (0.5, 0.8):  # distill.quarantine_quantile: where it ranks on every prompt
        q = quarantine(varied, at)
        sel = select_teacher_rollouts([teachings[0], q], torch.ones(2) / 2, rank=True)
        assert torch.equal(sel["teacher_index"] == 1, mine < at)
    assert int((mine < 0.8).sum()) > int((mine < 0.5).sum())  # the two places differ here
    # nobody trusted to score: the student's rollouts leave the batch, the answers stay
    none, info = assemble_batch(rollouts, teachings, torch.ones(2), d, trusted=[False, False])
    assert int((info["teacher_index"] == -1).sum()) == 0
    assert none["response_ids"].shape[0] == int((info["ask_choice"] >= 0).sum())


def test_lineage_marks_a_quarantined_teacher():
    from flminillm.lineage import selection_line

    line = selection_line({"selected.alice": 0.6, "selected.carol": 0.4, "certain.carol": 0.0,
                           "coherent.alice": 1.0, "coherent.carol": 0.02})  # fmt: skip
    assert "carol 40% [red](quarantined: claims in order at 2%)" in line
    assert "alice 60%," in line  # a coherent teacher is not marked
    assert "reserved" not in line
    line = selection_line({"selected.alice": 0.7, "rejected": 0.1, "reserved": 0.2})
    assert line.endswith("reserved 20% (an absent teacher's domain)")


def test_the_replay_buffer_keeps_one_teaching_per_round_a_client_took_part_in():
    from flminillm.steps import stale_buffer

    old = {"alice": {"round": 1, "teaching": "a1"}}  # a manifest from before the buffer
    buf = stale_buffer(old, {"bob": {"round": 2, "teaching": "b2"}})
    assert buf == {
        "alice": [{"round": 1, "teaching": "a1"}],
        "bob": [{"round": 2, "teaching": "b2"}],
    }
    buf = stale_buffer(buf, {"alice": {"round": 3, "teaching": "a3"}})
    assert [e["round"] for e in buf["alice"]] == [1, 3]
    # a rerun of round 3 replaces its entry, it does not add a second one
    again = stale_buffer(buf, {"alice": {"round": 3, "teaching": "a3'"}})
    assert [e["teaching"] for e in again["alice"]] == ["a1", "a3'"]


# -- the input-invariance check (distill.invariance_share) --------------------------------


def _answers(rows: list[list[int]], t: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """[A, t] answer ids and mask from ragged rows (padding masked, its id arbitrary)."""
    ids = torch.full((len(rows), t), 77, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for p, r in enumerate(rows):
        ids[p, : len(r)], mask[p, : len(r)] = torch.tensor(r), 1
    return ids, mask


def test_invariance_flags_one_answer_to_prompts_an_informed_teacher_tells_apart():
    a = 16
    const = [[1, 2]] * a  # one answer to every prompt (padding differs: masked, same answer)
    distinct = [[10 + p] for p in range(a)]

    def flags(theirs, q, share=0.05, mine=0.9, sure=0.75) -> torch.Tensor:
        ids0, m0 = _answers(const)
        ids0[::2, 2] = 5  # the masked column differs from prompt to prompt: still one answer
        ids1, m1 = _answers(theirs)
        quantiles = torch.stack([torch.as_tensor(mine).expand(a), torch.as_tensor(q).expand(a)])
        return invariant_answers(
            torch.stack([ids0, ids1]), torch.stack([m0, m1]), quantiles.float(), share, sure
        )

    f = flags(distinct, q=0.9)
    assert f[0].all() and not f[1].any()  # the informed teacher varies: the constant one loses
    assert not flags(distinct, q=0.4).any()  # the other does not claim to know them: no verdict
    assert not flags(distinct, q=0.9, mine=0.5).any()  # nor where the author is unsure
    assert not flags(distinct, q=0.9, sure=0.95).any()  # both below the check's quantile
    assert not flags(distinct, q=0.75, mine=0.75).any()  # at the quantile: not above it
    assert not flags(distinct, q=0.9, share=0.0).any()  # off
    assert flags(distinct, q=0.9, share=0.99)[0].all()  # 16 prompts > 0.99 x 16: checked
    assert not flags(distinct, q=0.9, share=1.0).any()  # no group above the whole round
    half = [[1, 2]] * (a // 2) + distinct[: a // 2]
    assert not flags(half, q=0.9).any()  # the informed teacher agrees on half: a shared answer
    yes_no = [[2], [3]] * (a // 2)
    assert not flags(yes_no, q=0.9).any()  # two answers: a yes/no family, not a backdoor
    # judged on the part both are sure of, the whole group is flagged: 6 of 16 prompts
    # (> 0.05 x 16) where both rank high carry the verdict to the other 10
    part = torch.tensor([0.9] * 6 + [0.3] * 10)
    assert flags(distinct, q=part)[0].all()
    assert not flags(distinct, q=part, share=0.4).any()  # 6 <= 0.4 x 16: too few to judge


def test_an_honest_expert_whose_right_answer_is_its_guess_elsewhere_is_not_judged():
    """The 5-client false positive of stop 29, in small: dave, last_letter's expert, answers
    " e" on a fifth of his family (right) and on most prompts of the other families (a
    collapsed guess, ranked low). Carol, expert of a look-alike family, ranks dave's family
    high and answers it with many letters. Judged on the whole " e" group (the old rule),
    carol would rule out dave's right answers; judged where both are sure, the check has
    only dave's few right " e"s before it (under `share`) and leaves them."""
    a = 100
    fam = torch.arange(a) < 20  # dave's family: the first 20 prompts
    e = [5]
    dave = [e if (p < 20 and p % 5 == 0) or p >= 20 else [30 + p % 7] for p in range(a)]
    carol = [[40 + p % 13] for p in range(a)]
    q_dave = torch.where(fam, 0.95, 0.4)
    q_carol = torch.where(fam, 0.8, 0.5)
    ids0, m0 = _answers(dave)
    ids1, m1 = _answers(carol)
    ids, mask = torch.stack([ids0, ids1]), torch.stack([m0, m1])
    quantiles = torch.stack([q_dave, q_carol])
    assert not invariant_answers(ids, mask, quantiles, 0.05, 0.75).any()
    # the old rule (every prompt of the group judged, at any quantile) flags all of " e"
    assert invariant_answers(ids, mask, quantiles, 0.05, 0.0)[0, ::5].all()


def _teaching(answers: list[list[int]], claims: list[float], t: int = 3) -> dict:
    ids, mask = _answers(answers, t)
    logp = torch.zeros(len(answers), t, 2)
    logp[:, 0, 0] = torch.tensor(claims)  # the whole claim on the first token
    return {"own_response_ids": ids, "own_response_mask": mask, "own_logp": logp,
            "own_support_ids": torch.zeros(len(answers), t, 2, dtype=torch.long),
            "own_prompt_logp": torch.zeros(len(answers)),
            "scores": torch.zeros(0, t, 2), "prompt_logp": torch.zeros(0)}  # fmt: skip


def test_the_invariance_check_takes_a_family_back_from_a_backdoor():
    """Three families of 20 prompts (alice's, bob's, carol's). Carol is honest on her own
    family and answers alice's with one wrong answer, claiming p = 1: under rank selection
    her claims on it are her surest, so she wins it from alice, the family's expert. The
    check rules her answer out there (alice, who ranks those prompts high, tells them
    apart) and leaves her own family to her, a yes/no family included."""
    from flminillm.config import DistillConfig
    from flminillm.lineage import selection_line

    fam = [range(0, 20), range(20, 40), range(40, 60)]
    a = 60

    def teacher(expert: int, own: list[list[int]], seed: int) -> tuple[list, list]:
        g = torch.Generator().manual_seed(seed)
        answers = [[int(x) for x in torch.randint(100, 900, (2,), generator=g)] for _ in range(a)]
        claims = [-5.0] * a
        for k, p in enumerate(fam[expert]):  # surer of some of its family than of others
            answers[p], claims[p] = own[k], -0.1 - 0.01 * k
        return answers, claims

    alice = _teaching(*teacher(0, [[10 + k] for k in range(20)], 1))
    bob = _teaching(*teacher(1, [[40 + k] for k in range(20)], 2))
    carol_answers, carol_claims = teacher(2, [[2], [3]] * 10, 3)  # her family: yes/no
    for p in fam[0]:
        carol_answers[p], carol_claims[p] = [9, 9], 0.0  # the backdoor
    carol = _teaching(carol_answers, carol_claims)
    teachings = [alice, bob, carol]
    rollouts = _rollouts(0, a, 3, 2)
    # ties at their mean rank (tie_rank 'mean', the default before stop 38), so that the
    # backdoor's tied claims rank high: what this check is for is then visible
    off = DistillConfig(
        min_claim=0, invariance_share=0, joint_quantile=1, tie_rank="mean", **NO_CONTEST
    )
    plain, info0 = assemble_batch(rollouts, teachings, torch.ones(3), off)
    # the backdoor (all its claims on alice's family tied at its top) wins the half of it
    # where alice is least sure
    assert info0["ask_choice"][:20].tolist() == [0] * 10 + [2] * 10
    d = DistillConfig(min_claim=0, invariance_share=0.05, tie_rank="mean", **NO_CONTEST)
    batch, info = assemble_batch(rollouts, teachings, torch.ones(3), d)
    assert info["ask_choice"].tolist() == [0] * 20 + [1] * 20 + [2] * 20
    assert info["flagged"].tolist() == pytest.approx([0.0, 0.0, 1 / 3])
    assert int(info["n_invariant"]) == 0  # alice's answers were left: no prompt lost
    # tied claims at their lowest rank (tie_rank 'low', the default): carol's tied block
    # ranks below alice's family and wins none of it, so there is nothing to rule out
    low = assemble_batch(rollouts, teachings, torch.ones(3),
                         DistillConfig(min_claim=0, **NO_CONTEST))[1]  # fmt: skip
    assert low["ask_choice"].tolist() == [0] * 20 + [1] * 20 + [2] * 20
    assert low["flagged"].tolist() == [0.0, 0.0, 0.0]
    # joint selection reads the claims themselves (carol's p = 1 outbids everyone): the
    # check still takes alice's family back, by the quantiles it computes for itself
    joint = DistillConfig(min_claim=0, selection="joint", invariance_share=0.05)
    assert (
        assemble_batch(rollouts, teachings, torch.ones(3), joint)[1]["ask_choice"][:20].tolist()
        == [0] * 20
    )
    stats = selection_stats(
        info["teacher_index"], teachings, ["alice", "bob", "carol"],
        n_invariant=int(info["n_invariant"]), flagged=info["flagged"].tolist(),
    )  # fmt: skip
    assert stats["invariant.carol"] == pytest.approx(1 / 3) and stats["invariant.alice"] == 0
    assert "invariant" not in stats
    line = selection_line(stats)
    assert "carol 33% [red](ruled out 33%: one answer to many prompts)" in line
    assert "alice 33%," in line


def test_a_prompt_whose_every_answer_is_ruled_out_leaves_the_batch(monkeypatch):
    """Where the check rules out every teacher's answer to a prompt (the selection has no
    answer left to keep), the prompt leaves the batch and is counted apart from `min_claim`'s
    rejects, in the stats and in the lineage."""
    import flminillm.aggregate as agg
    from flminillm.config import DistillConfig
    from flminillm.lineage import selection_line

    a = 4

    def every_answer_to_prompt_0(ids, mask, quantiles, share, sure):
        flagged = torch.zeros(ids.shape[:2], dtype=torch.bool)
        flagged[:, 0] = True
        return flagged

    monkeypatch.setattr(agg, "invariant_answers", every_answer_to_prompt_0)
    teachings = [
        _teaching([[10 + p] for p in range(a)], [-0.1, -0.2, -3.0, -4.0]),
        _teaching([[20 + p] for p in range(a)], [-3.0, -4.0, -0.1, -0.2]),
    ]
    d = DistillConfig(min_claim=0, invariance_share=0.05)
    batch, info = assemble_batch(_rollouts(0, a, 3, 2), teachings, torch.ones(2), d)
    assert info["ask_choice"].tolist() == [LEFT_OUT, 0, 1, 1]
    assert int(info["n_invariant"]) == 1 and int(info["n_rejected"]) == 0
    assert batch["response_ids"].shape[0] == a - 1
    assert info["flagged"].tolist() == [0.25, 0.25]
    stats = selection_stats(
        info["teacher_index"], teachings, ["alice", "bob"],
        n_invariant=int(info["n_invariant"]), flagged=info["flagged"].tolist(),
    )  # fmt: skip
    assert stats["invariant"] == 0.25 and stats["selected.alice"] == 0.25
    assert "left out 25% (every answer ruled out)" in selection_line(stats)


# -- peer review by the student's own LM (distill.plausibility_margin) --------------------


def test_the_judge_bars_a_teacher_whose_likelier_answers_read_below_random_tokens():
    """A teacher is judged by the 90th percentile of the judge's per-token log-probs of its
    answers against log(1/V), a uniformly random token's: random-token answers score below
    it (E log q(y) = log 1/V - KL(U || q)) and are barred; an honest teacher whose guesses
    are mostly garbage but a tenth of whose answers are fluent is not; the yardstick reads
    no other teacher, so colluders are barred however many; an untrained judge (every score
    near log 1/V) bars nobody; margin 0 is off."""
    import math

    from flminillm.aggregate import implausible_teachers

    v = 1024
    uniform = -math.log(v)  # -6.93
    g = torch.Generator().manual_seed(0)
    honest = -3.0 + torch.randn(4, 200, generator=g)
    # a judge that knows the language: random tokens 2-3 nats per token below uniform
    liar = uniform - 3.0 + 0.3 * torch.randn(1, 200, generator=g)
    scores = torch.cat([honest[:2], liar])
    barred, score = implausible_teachers(scores, v, 1.0)
    assert barred.tolist() == [False, False, True]
    assert float(score[2]) < -2.0 and bool((score[:2] > 3.0).all())
    # mostly garbage (median 4 nats below uniform), a fluent tenth: kept
    garbage = torch.cat([uniform - 4.0 + torch.randn(1, 170, generator=g),
                         -2.0 + torch.randn(1, 30, generator=g)], 1)  # fmt: skip
    assert implausible_teachers(torch.cat([honest[:1], garbage]), v, 1.0)[0].tolist() == [
        False, False,
    ]  # fmt: skip
    # colluders: one honest teacher of four, three liars alike
    many = torch.cat([honest[:1], liar, liar + 0.1, liar - 0.1])
    assert implausible_teachers(many, v, 1.0)[0].tolist() == [False, True, True, True]
    assert implausible_teachers(liar, v, 1.0)[0].tolist() == [True]  # alone, too
    untrained = uniform + 0.1 * torch.randn(3, 200, generator=g)
    assert not bool(implausible_teachers(untrained, v, 1.0)[0].any())
    assert not bool(implausible_teachers(scores, v, 0.0)[0].any())  # off
    with pytest.raises(ValueError, match="not finite"):
        implausible_teachers(torch.cat([honest[:2], torch.full((1, 200), float("nan"))]), v, 1.0)


def test_a_barred_teacher_s_prompts_leave_the_batch_and_its_scores_the_mixture():
    """What a barred teacher would have won is left out (counted as `n_implausible`), not
    handed to the next teacher's guess; its scores of the student's rollouts are dropped as
    a quarantined teacher's are; the others' answers are kept as they were."""
    from flminillm.config import DistillConfig

    n, a, t, s = 3, 6, 5, 9
    rollouts, teachings = _two_scoring_teachers(n, a, t, s, seed=3)
    # every answer kept but the barred one's ('leave': the default before stop 42)
    d = DistillConfig(min_claim=0.0, barred_wins="leave", **NO_CONTEST)
    _, free = assemble_batch(rollouts, teachings, torch.ones(2), d)
    won = free["ask_choice"] == 1
    assert bool(won.any()) and bool((free["ask_choice"] == 0).any())
    alone, _ = assemble_batch(rollouts, teachings[:1], torch.ones(1), d)
    batch, info = assemble_batch(rollouts, teachings, torch.ones(2), d, barred=[False, True])
    assert torch.equal(info["ask_choice"][won], torch.full((int(won.sum()),), LEFT_OUT))
    assert torch.equal(info["ask_choice"][~won], free["ask_choice"][~won])
    assert int(info["n_implausible"]) == int(won.sum())
    assert torch.allclose(batch["teacher_logp"][:n], alone["teacher_logp"][:n], atol=1e-5)
    stats = selection_stats(
        info["teacher_index"], teachings, ["alice", "carol"], int(info["n_rejected"]),
        n_implausible=int(info["n_implausible"]), gaps=[2.0, -3.5], barred=[False, True],
    )  # fmt: skip
    assert stats["implausible"] == pytest.approx(int(won.sum()) / a)
    assert stats["implausible.carol"] == 1.0 and stats["plausibility.carol"] == -3.5
    assert stats["selected.carol"] == 0.0

    from flminillm.lineage import selection_line

    line = selection_line(stats)
    assert "carol 0% [red](implausible: answers 3.5 nats/token below random tokens)[/]" in line
    assert "left out" in line and "alice" in line and "alice 0% [red]" not in line


def test_answer_logprob_is_the_student_s_mean_log_prob_of_each_answer():
    """Left-padded prompts and right-padded answers of different lengths: each answer's
    mean per-token log q equals scoring it alone, without padding."""
    from flminillm.bench.harness import tiny_model
    from flminillm.update import answer_logprob

    model = tiny_model("llama", 32, 2, 4, vocab=50, seed=1).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    answers = [[20, 21], [22], [23, 24, 25]]
    p_ids = torch.zeros(3, 4, dtype=torch.long)
    p_mask = torch.zeros(3, 4, dtype=torch.long)
    a_ids = torch.zeros(3, 3, dtype=torch.long)
    a_mask = torch.zeros(3, 3, dtype=torch.long)
    for i, (p, y) in enumerate(zip(prompts, answers, strict=True)):
        p_ids[i, 4 - len(p):], p_mask[i, 4 - len(p):] = torch.tensor(p), 1  # fmt: skip
        a_ids[i, : len(y)], a_mask[i, : len(y)] = torch.tensor(y), 1
    got = answer_logprob(
        model, {"ask_prompt_ids": p_ids, "ask_prompt_mask": p_mask},
        {"own_response_ids": a_ids, "own_response_mask": a_mask}, 2, torch.device("cpu"),
    )  # fmt: skip
    for i, (p, y) in enumerate(zip(prompts, answers, strict=True)):
        ids = torch.tensor([p + y])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        want = sum(float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(y)) / len(y)
        assert float(got[i]) == pytest.approx(want, abs=1e-4)


def test_the_plausibility_judge_is_the_student_s_round_0_model(tmp_path):
    """The check reads the student's model from before the federation (round 0's manifest,
    through any round's history), not the model it has become: a teacher is not judged by
    whether it agrees with what the others taught."""
    from flminillm.artifacts import initial_model
    from flminillm.store import open_store

    store = open_store(str(tmp_path / "store"))
    m0 = {"round": 0, "models": {"server": "sha256:aaa"}, "history": []}
    d0 = store.put_json(m0)
    m1 = {"round": 1, "models": {"server": "sha256:bbb"}, "history": [d0]}
    d1 = store.put_json(m1)
    m2 = {"round": 2, "models": {"server": "sha256:ccc"}, "history": [d0, d1]}
    for state in (m0, m1, m2):
        assert initial_model(store, state, "server") == "sha256:aaa"
    with pytest.raises(ValueError, match="no round-0 model of 'erin'"):
        initial_model(store, m2, "erin")
    old = {"round": 3, "models": {"server": "sha256:ddd"}}  # a manifest without its history
    with pytest.raises(ValueError, match=r"no round-0 model of 'server' .*round 3"):
        initial_model(store, old, "server")


# -- claims among the sure (distill.joint_quantile) -----------------------------------------


def test_among_the_sure_the_surer_claim_wins_a_look_alike_family_back():
    """Eight families of five prompts. carol holds F0 and F1; dave holds F6 alone and ranks
    F0 (which looks like F6 to him) above it, above where carol, holding two families, ranks
    F0: rank alone hands him F0. Both are sure of F0 (above the 0.75 quantile of their own
    claims), and carol's claim there is the higher: among the sure the claims decide, and F0
    goes back to its holder. erin claims probability 1 for everything (quantile 0.5): never
    among the sure, she wins only prompts of families nobody present holds, either way.
    Nobody else's prompt moves."""
    from flminillm.config import DistillConfig
    from flminillm.lineage import selection_line

    fam = [list(range(5 * f, 5 * f + 5)) for f in range(8)]
    a = 40

    def teacher(base: int, sure: dict[int, float]) -> dict:
        claims = [-5.0 - 0.01 * p for p in range(a)]  # a guess everywhere else
        for f, c in sure.items():
            for k, p in enumerate(fam[f]):
                claims[p] = c - 0.001 * k
        return _teaching([[base + p] for p in range(a)], claims)

    carol = teacher(100, {1: -0.01, 0: -0.05})
    dave = teacher(200, {0: -0.2, 6: -0.5})
    erin = _teaching([[300 + p] for p in range(a)], [0.0] * a)
    rollouts, teachings = _rollouts(0, a, 3, 2), [carol, dave, erin]
    # ties at their mean rank (tie_rank 'mean'): erin's one claim ranks at 0.5
    alone = DistillConfig(min_claim=0, joint_quantile=1, tie_rank="mean", **NO_CONTEST)
    _, rank = assemble_batch(rollouts, teachings, torch.ones(3), alone)
    assert rank["ask_choice"][fam[0]].tolist() == [1] * 5  # dave's look-alike
    d = DistillConfig(min_claim=0, tie_rank="mean", **NO_CONTEST)
    batch, info = assemble_batch(rollouts, teachings, torch.ones(3), d)
    choice = info["ask_choice"]
    assert choice[fam[0]].tolist() == [0] * 5 and choice[fam[1]].tolist() == [0] * 5
    assert choice[fam[6]].tolist() == [1] * 5
    moved = [p for p in range(a) if choice[p] != rank["ask_choice"][p]]
    assert moved == fam[0] and int(info["n_by_claim"]) == 5
    # erin wins only prompts nobody present holds (where the others' guesses rank below
    # their median), the same ones as under rank alone
    erins = [p for p in range(a) if choice[p] == 2]
    assert erins and not set(erins) & set(fam[0] + fam[1] + fam[6])
    assert erins == [p for p in range(a) if rank["ask_choice"][p] == 2]
    # with ties at their lowest (the default) she wins nothing, and F0 still goes back
    low = assemble_batch(rollouts, teachings, torch.ones(3),
                         DistillConfig(min_claim=0, **NO_CONTEST))[1]  # fmt: skip
    assert 2 not in low["ask_choice"].tolist()
    assert low["ask_choice"][fam[0]].tolist() == [0] * 5 and int(low["n_by_claim"]) == 5
    assert batch["response_ids"][:a][fam[0], 0].tolist() == [100 + p for p in fam[0]]
    stats = selection_stats(info["teacher_index"], teachings, ["carol", "dave", "erin"],
                            n_by_claim=int(info["n_by_claim"]))  # fmt: skip
    assert stats["by_claim"] == pytest.approx(5 / 40)
    assert "12% by claim among the sure" in selection_line(stats)
    assert "by_claim" not in selection_stats(rank["teacher_index"], teachings,
                                             ["carol", "dave", "erin"])  # fmt: skip


def test_claims_among_the_sure_need_the_invariance_check_above_quarantine():
    """joint_quantile < 1 is refused where a backdoor could win among the sure unjudged (no
    invariance check, or a band below where it judges) and where a quarantined teacher's
    constant quantile would enter the band; each message names the fix. Joint selection
    and joint_quantile 1 need nothing."""
    from flminillm.config import DistillConfig

    with pytest.raises(ValueError, match="needs the input-invariance check.*joint_quantile: 1"):
        DistillConfig(invariance_share=0)
    with pytest.raises(ValueError, match="must not be below\ninvariance_quantile|must not be"):
        DistillConfig(joint_quantile=0.7, invariance_quantile=0.8)
    with pytest.raises(ValueError, match="above quarantine_quantile"):
        DistillConfig(joint_quantile=0.6, invariance_quantile=0.5)
    DistillConfig(invariance_share=0, joint_quantile=1)
    DistillConfig(invariance_share=0, selection="joint")


def test_a_backdoor_ruled_out_is_ranked_again_among_its_own_answers():
    """carol holds F2 and backdoors alice's F0 (one answer, certain). Ruled out by the
    invariance check, her F0 claims no longer hold her top quantiles: ranked again among
    her answers still in play, her own family is at her top, where alice's guesses on F2
    (ranked as high as carol's F2 was below her backdoor) no longer take it from her."""
    from flminillm.config import DistillConfig

    fam = [list(range(10 * f, 10 * f + 10)) for f in range(3)]
    a = 30

    def teacher(base: int, claims_by_family: dict[int, float], answers=None) -> dict:
        claims = [0.0] * a
        for f, c in claims_by_family.items():
            for k, p in enumerate(fam[f]):
                claims[p] = c - 0.001 * k
        return _teaching(answers or [[base + p] for p in range(a)], claims)

    alice = teacher(100, {0: -0.1, 2: -3.0, 1: -5.0})  # F2: a confident guess
    bob = teacher(200, {1: -0.1, 0: -5.0, 2: -6.0})
    backdoor = [[9] if p in fam[0] else [300 + p] for p in range(a)]
    carol = teacher(300, {0: 0.0, 2: -0.1, 1: -5.0}, backdoor)
    teachings = [alice, bob, carol]
    d = DistillConfig(min_claim=0, invariance_share=0.05)
    batch, info = assemble_batch(_rollouts(0, a, 3, 2), teachings, torch.ones(3), d)
    assert info["flagged"].tolist() == pytest.approx([0.0, 0.0, 1 / 3])
    choice = info["ask_choice"].tolist()
    assert choice == [0] * 10 + [1] * 10 + [2] * 10
    # her F2 quantiles among her 20 answers in play: 0.53..1 (they were 0.34..0.66 of 30)
    q = rank_in_play(
        torch.stack([own_quantiles(t, True) for t in teachings]),
        torch.stack([selection_claims(t, True) for t in teachings]),
        torch.stack([torch.zeros(a, dtype=torch.bool)] * 2 + [torch.tensor(
            [p in fam[0] for p in range(a)])]), [False] * 3,
    )  # fmt: skip
    assert q[2, fam[2]].min() > 0.5 and q[2, fam[2]].max() == 1.0
    assert torch.equal(q[:2], torch.stack([own_quantiles(t, True) for t in teachings[:2]]))


# -- claims that add up (distill.max_claim_sum) ------------------------------------------


def _answers_of_one_prompt(copies: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """A real (untrained, tiny) model's sampled answers to one prompt asked `copies` times,
    as a TeachingMessage's own_* part: its claims are the model's own log-probs."""
    from flminillm.config import ModelSpec
    from flminillm.generation import sample_batched
    from flminillm.models import build_model

    spec = ModelSpec(family="llama", hidden_size=16, num_layers=1, num_heads=2, max_positions=32)
    model = build_model(spec, 6, 0, 1, seed=seed).eval()
    ids = torch.tensor([[2, 3, 4]]).repeat(copies, 1)
    with torch.no_grad():
        r = sample_batched(model, ids, torch.ones_like(ids), copies, max_new_tokens=3, eos_id=1,
                           pad_id=0, top_k=2, generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return {
        "own_response_ids": r.response_ids.int(),
        "own_response_mask": r.response_mask.to(torch.uint8),
        "own_support_ids": r.support_ids.int(),
        "own_logp": r.support_logp * r.response_mask[..., None],
    }, ids


def test_an_honest_teacher_s_claims_on_a_repeated_prompt_sum_to_at_most_one():
    """The premise of the check: a real model's different answers to one prompt (stopped at
    EOS or at the length limit) are disjoint outcomes, so its claimed probabilities of them
    sum to at most 1, however many copies were asked; a liar certain of each answer it
    gives (the fluent liar) claims one per distinct answer and is barred; a liar whose
    answer is the same on every copy is not (nothing to add up)."""
    from flminillm.aggregate import claim_sums, overclaiming_teachers

    for seed in range(3):
        honest, ids = _answers_of_one_prompt(seed=seed)
        mask = honest["own_response_mask"].bool()
        rows = zip(honest["own_response_ids"], mask, strict=True)
        distinct = {tuple(r[m].tolist()) for r, m in rows}
        assert len(distinct) >= 5  # the untrained model spreads its mass
        liar = {**honest, "own_logp": torch.zeros_like(honest["own_logp"])}  # p = 1 claims
        steady = {k: v[:1].repeat(v.shape[0], *[1] * (v.dim() - 1)) for k, v in liar.items()}
        sums = claim_sums([honest, liar, steady], ids, torch.ones_like(ids))
        assert float(sums[0]) <= 1e-6  # log of the sum: at most log 1
        assert float(sums[0]) > math.log(0.2)  # and not vacuous: the answers hold real mass
        assert float(sums[1]) == pytest.approx(math.log(len(distinct)))
        assert float(sums[2]) == float("-inf")  # one answer: nothing to add up
        assert overclaiming_teachers(sums, 1.5).tolist() == [False, True, False]
        assert overclaiming_teachers(sums, 0.0).tolist() == [False, False, False]  # off


def test_claim_sums_group_equal_prompts_only_and_count_an_answer_once():
    """Prompts are equal by their ids under the mask (left padding ignored); a prompt asked
    once, or asked twice with the same answer, is not read; an answer repeated on copies
    counts once in the sum."""
    from flminillm.aggregate import claim_sums

    ask = torch.tensor([[0, 5, 6], [5, 6, 7], [9, 5, 6], [5, 6, 8]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]])  # rows 0 and 2: [5, 6]
    ids = torch.tensor([[3, 1], [3, 1], [4, 1], [4, 1]])
    logp = torch.full((4, 2, 1), math.log(0.6) / 2)  # each answer claimed p = 0.6
    t = {"own_response_ids": ids, "own_response_mask": torch.ones(4, 2, dtype=torch.uint8),
         "own_logp": logp}  # fmt: skip
    assert float(claim_sums([t], ask, mask)[0]) == pytest.approx(math.log(1.2), abs=1e-6)
    same = {**t, "own_response_ids": torch.tensor([[3, 1], [3, 1], [3, 1], [4, 1]])}
    assert float(claim_sums([same], ask, mask)[0]) == float("-inf")
    ask_once = ask.clone()
    ask_once[2, 0] = 5  # now [5, 5, 6] under its mask: no prompt comes twice
    assert float(claim_sums([t], ask_once, torch.ones_like(mask))[0]) == float("-inf")


@pytest.mark.parametrize(
    ("kw", "sum_key", "barred_key", "total", "reason"),
    [
        ({"sums": [math.log(0.9), math.log(3.0)], "overclaimed": [False, True]},
         "claim_sum", "overclaimed", 3.0, "its claims on one prompt sum to 3.00"),
        ({"prompt_sums": [math.log(0.02), math.log(412.0)],
          "prompt_overclaimed": [False, True]},
         "prompt_claim_sum", "overclaimed_prompts", 412.0,
         "its claims on the round's prompts sum to 412.0"),
    ],
)  # fmt: skip
def test_an_overclaiming_teacher_is_barred_and_shown(kw, sum_key, barred_key, total, reason):
    """What the step records (selection_stats) and lineage shows of a teacher a claim-sum
    check barred (on one prompt's answers, or on the round's prompts): the sum, the flag
    and the line's reason."""
    from flminillm.lineage import selection_line

    n, a, t, s = 3, 6, 5, 9
    rollouts, teachings = _two_scoring_teachers(n, a, t, s, seed=3)
    stats = selection_stats(torch.tensor([0] * a), teachings, ["alice", "carol"], 0, **kw)
    assert stats[f"{sum_key}.carol"] == pytest.approx(total)
    assert stats[f"{barred_key}.carol"] == 1.0 and stats[f"{barred_key}.alice"] == 0.0
    line = selection_line(stats)
    assert f"carol 0% [red](barred: {reason})[/]" in line
    assert "alice 100%" in line and "alice 100% [red]" not in line


# -- prompt claims that add up (distill.max_prompt_claim_sum) -------------------------------


def test_an_honest_teacher_s_prompt_claims_sum_to_at_most_one():
    """The premise of the prompt check: log p(x) leaves the first token out, so over
    distinct prompts that begin with the same token and none of which begins another, a
    real model's claims are probabilities of disjoint continuations: over every
    continuation of two tokens they sum to 1 (to float), over some of them to less; copies
    of a prompt (in the rollouts and among the teacher-share prompts) count once. A teacher
    claiming p(x) = 1 for each prompt claims one per distinct prompt."""
    from flminillm.aggregate import distinct_prompts, overclaiming_teachers, prompt_claim_sums
    from flminillm.config import ModelSpec
    from flminillm.generation import prompt_logprob
    from flminillm.models import build_model

    spec = ModelSpec(family="llama", hidden_size=16, num_layers=1, num_heads=2, max_positions=32)
    pairs = [(a, b) for a in range(6) for b in range(6)]
    for seed in range(3):
        model = build_model(spec, 6, 0, 1, seed=seed).eval()
        ids = torch.tensor([[2, a, b] for a, b in pairs])
        logp = prompt_logprob(model, ids, torch.ones_like(ids))
        texts = [f"Q: {a}{b}?\nA:" for a, b in pairs]
        # rollouts: the first 24 prompts; teacher-share: the last 20 (8 of them copies)
        honest = {"prompt_logp": logp[:24], "own_prompt_logp": logp[16:]}
        order = texts[:24] + texts[16:]
        groups = distinct_prompts(order)
        assert sorted(len(g) for g in groups) == [1] * 28 + [2] * 8
        liar = {"prompt_logp": torch.zeros(24), "own_prompt_logp": torch.zeros(20)}
        part = {"prompt_logp": logp[:10], "own_prompt_logp": logp[10:10]}
        sums = prompt_claim_sums([honest, liar], groups)
        assert float(sums[0]) == pytest.approx(0.0, abs=1e-5)  # every continuation: 1
        assert float(sums[1]) == pytest.approx(math.log(36))
        few = prompt_claim_sums([part], distinct_prompts(texts[:10]))
        assert math.log(0.01) < float(few[0]) < float(sums[0])  # some: less, not nothing
        assert overclaiming_teachers(sums, 1.5).tolist() == [False, True]


def test_distinct_prompts_leave_out_a_prompt_that_begins_another():
    """A prompt whose text, less the ending every prompt shares, begins another prompt's
    is left out (its continuations would overlap the other's); equal prompts are one."""
    from flminillm.aggregate import distinct_prompts

    texts = ["Q: after 7?\nA:", "Q: after 78?\nA:", "Q: tiger?\nA:", "Q: after 7?\nA:",
             "Q: tig?\nA:"]  # fmt: skip
    assert distinct_prompts(texts) == [[1], [2]]
    assert distinct_prompts(["Q: a\nA:"] * 3) == [[0, 1, 2]]
    assert distinct_prompts([]) == []


def test_repeat_share_asks_some_teacher_share_prompts_twice(tiny_config):
    """distill.repeat_share: that share of a round's teacher-share prompts is replaced by
    copies of the others (the claim-sum check's reading where the pool has no repeats);
    the student's own share and the round's other prompts are the same as without it, and
    0 leaves the round's prompts exactly as they were."""
    from flminillm.artifacts import open_store_for
    from flminillm.steps import _round_prompts, prepare

    state = prepare(tiny_config)
    store = open_store_for(tiny_config)
    base = tiny_config.model_copy(
        update={"distill": tiny_config.distill.model_copy(update={"alpha": 1.0})}
    )
    own, ask = _round_prompts(base, store, state, 1, "server")
    assert not own and len(ask) >= 10
    d = base.distill.model_copy(update={"repeat_share": 0.25})
    rep = base.model_copy(update={"distill": d})
    own2, ask2 = _round_prompts(rep, store, state, 1, "server")
    k = round(0.25 * len(ask))
    assert own2 == own and len(ask2) == len(ask)
    kept = ask[: len(ask) - k]
    assert all(e in kept for e in ask2)  # copies of the round's own prompts only
    assert len({(e.family, e.prompt) for e in ask2}) <= len(ask) - k < len(ask2)
    assert _round_prompts(rep, store, state, 1, "server") == (own2, ask2)  # seeded
    client = tiny_config.clients[0].id  # a client's teacher is the server: no copies
    assert _round_prompts(rep, store, state, 1, client) == _round_prompts(
        base, store, state, 1, client
    )


# -- peer contest (distill.contest_quantile) ------------------------------------------------


def _contest_oracle(ids, mask, sup, logp, best, j, a) -> float | None:
    """Teacher j's probability of the kept answer to prompt a through the first position
    where they part, by loops (None: same answer, kept one ends inside j's, or j has no
    support there)."""
    w = int(best[a])
    for t in range(ids.shape[2]):
        if not mask[w, a, t]:
            return None  # the kept answer ended without parting from j's
        if not mask[j, a, t]:
            return None  # j's ended first: no support of j's at t
        if ids[j, a, t] != ids[w, a, t]:
            total, there = 0.0, None
            for c in range(sup.shape[3]):
                if sup[j, a, t, c] >= 0:
                    total += math.exp(float(logp[j, a, t, c]))
                    if sup[j, a, t, c] == ids[w, a, t]:
                        there = math.exp(float(logp[j, a, t, c]))
            prefix = math.exp(sum(float(logp[j, a, u, 0]) for u in range(t)))
            return prefix * (there if there is not None else max(1.0 - total, 0.0))
    return None


def test_contests_read_a_peer_s_probability_of_the_kept_answer_where_they_part():
    """On honest teachers' messages (one softmax each, small vocabularies so that answers
    share prefixes and kept tokens fall outside supports), `contests` agrees with a loop
    over positions: a sure peer (rank above the quantile) contests where its probability of
    the kept answer through the parting token (from its support, else its tail mass) is
    below p; never its own answer, a peer not sure of the prompt, or one not able."""
    from flminillm.aggregate import contests

    m, a, t, k = 3, 40, 4, 2
    ts = [_honest_teaching(a=a, t=t, k=k, vocab=5, seed=s) for s in range(m)]
    ids = torch.stack([x["own_response_ids"] for x in ts])
    ids[1, :10] = ids[0, :10]  # some answers agree word for word
    ids[2, 10:20, :2] = ids[0, 10:20, :2]  # some share a prefix
    for x, i in zip(ts, ids, strict=True):  # keep each support's column 0 its answer
        x["own_support_ids"][..., 0] = i
    mask = torch.stack([x["own_response_mask"] for x in ts])
    sup = torch.stack([x["own_support_ids"] for x in ts])
    logp = torch.stack([x["own_logp"] for x in ts])
    g = torch.Generator().manual_seed(7)
    ranks = torch.rand(m, a, generator=g)
    best = torch.randint(0, m, (a,), generator=g)
    able = torch.ones(m, a, dtype=torch.bool)
    able[2, ::3] = False
    p, q = 0.2, 0.3
    got = contests(ids, mask, sup, logp, ranks, best, able, q, p)
    n_checked = 0
    for j in range(m):
        for i in range(a):
            prob = _contest_oracle(ids, mask, sup, logp, best, j, i)
            want = bool(j != best[i] and able[j, i] and ranks[j, i] > q
                        and prob is not None and prob < p)  # fmt: skip
            assert bool(got[j, i]) == want, (j, i, prob)
            n_checked += prob is not None and j != best[i]
    assert 0 < int(got.sum()) < n_checked  # some contested, not all
    same = ids[1, :10].eq(ids[0, :10]).all()
    assert same and not bool(got[1, :10][best[:10] == 0].any())  # agreeing: never
    assert not bool(got[torch.arange(m)[:, None] == best[None]].any())  # not its own


def _expert(a: int, t: int, right: torch.Tensor, sure: torch.Tensor, vocab: int = 50) -> dict:
    """A teacher that writes `right` [A, T] with probability 0.9 per token where `sure` [A]
    (prompt claim high), and a flat guess over the vocabulary elsewhere; its support: its
    answer and two others, full-softmax log-probs."""
    ids = right.clone()
    sup = torch.stack([ids, (ids + 1) % vocab, (ids + 2) % vocab], -1)
    p_ans = torch.where(sure, 0.9, 1.0 / vocab)[:, None].expand(a, t)
    p_other = torch.where(sure, 0.04, 1.0 / vocab)[:, None].expand(a, t)
    logp = torch.stack([p_ans.log(), p_other.log(), p_other.log()], -1)
    plogp = torch.where(sure, -1.0, -8.0) + torch.linspace(0, -0.5, a)  # distinct claims
    return {"own_response_ids": ids, "own_response_mask": torch.ones(a, t, dtype=torch.long),
            "own_support_ids": sup, "own_logp": logp, "own_prompt_logp": plogp,
            "scores": torch.zeros(0, t, 3), "prompt_logp": torch.zeros(0)}  # fmt: skip


def _experts_and_a_noisy_liar(seed: int, a: int, t: int, vocab: int = 50) -> list[dict]:
    """Alice (sure of prompts 0 .. a/2 - 1) and bob (the rest) write the right answers
    (`_expert`); a liar answers every prompt with random tokens and random prompt claims,
    its answers claimed p = 0.6 per token with the rest of its mass in its tail (as the
    `noisy` liar's claims)."""
    g = torch.Generator().manual_seed(seed)
    right = torch.randint(4, vocab, (a, t), generator=g)
    alice = _expert(a, t, right, torch.arange(a) < a // 2)
    bob = _expert(a, t, right, torch.arange(a) >= a // 2)
    lies = torch.randint(4, vocab, (a, t), generator=g)
    liar = {**_expert(a, t, lies, torch.ones(a, dtype=torch.bool)),
            "own_prompt_logp": -torch.rand(a, generator=g) * 2.0}  # fmt: skip
    liar["own_logp"][..., 0] = math.log(0.6)
    liar["own_logp"][..., 1:] = -30.0
    return [alice, bob, liar]


def test_a_liar_s_random_answers_that_a_sure_expert_finds_unlikely_leave_the_batch():
    """Alice knows prompts 0-9, bob 10-19; a liar answers all 20 with random tokens and
    random claims that rank some of each expert's prompts above the expert's own rank (its
    answer claimed p = 0.6 per token, the rest of its mass in its tail, as the `noisy`
    liar's claims). With the contest off the liar's answer is kept where it ranks higher;
    with it on, a sure expert contests it and the prompt is left out (`n_contested`,
    `contested`, `contested_by.<id>`, LEFT_OUT), never handed to the contester; the
    experts' answers are not contested (the liar's tail mass bounds nothing below p). A
    barred expert cannot contest."""
    from flminillm.config import DistillConfig
    from flminillm.lineage import selection_line

    a, t = 20, 3
    teachings, rollouts = _experts_and_a_noisy_liar(seed=0, a=a, t=t), _rollouts(0, a, t, 3)
    base = dict(min_claim=0.0, invariance_share=0.0, joint_quantile=1.0, contest_bar=0.0,
                contest_leave_out=True)  # fmt: skip
    off = DistillConfig(**base, contest_quantile=1.0)
    on = DistillConfig(**base, contest_quantile=0.3, contest_p=0.05)
    _, free = assemble_batch(rollouts, teachings, torch.ones(3), off)
    won = free["ask_choice"] == 2
    assert 0 < int(won.sum()) < a  # the liar wins some prompts with the contest off
    batch, info = assemble_batch(rollouts, teachings, torch.ones(3), on)
    assert torch.equal(info["ask_choice"][won], torch.full((int(won.sum()),), LEFT_OUT))
    assert torch.equal(info["ask_choice"][~won], free["ask_choice"][~won])
    assert int(info["n_contested"]) == int(won.sum())
    assert batch["response_ids"].shape[0] == a - int(won.sum())
    stats = selection_stats(
        info["teacher_index"], teachings, ["alice", "bob", "carol"], int(info["n_rejected"]),
        n_contested=int(info["n_contested"]), contesting=info["contesting"].tolist(),
    )  # fmt: skip
    assert stats["contested"] == pytest.approx(int(won.sum()) / a)
    by_expert = stats["contested_by.alice"] + stats["contested_by.bob"]
    assert by_expert >= stats["contested"] and stats["contested_by.carol"] == 0.0
    assert f"left out {stats['contested']:.0%} (contested)" in selection_line(stats)
    # a barred expert does not contest: its prompts the liar won are kept (alice's side)
    _, barred = assemble_batch(rollouts, teachings, torch.ones(3), on, barred=[True, False, False])
    hers = won & (torch.arange(a) < 10)
    assert bool(hers.any()) and bool((barred["ask_choice"][hers] == 2).all())
    # teachers of another tokenizer (a support of the sampled token alone) do not contest
    _, across = assemble_batch(rollouts, teachings, torch.ones(3), on, foreign=[True, True, False])
    assert torch.equal(across["ask_choice"], free["ask_choice"]) and int(across["n_contested"]) == 0


def test_a_liar_that_claims_no_tail_contests_only_where_it_ranks_above_the_quantile():
    """What the contest costs against a liar that claims p = 1 for its answers (no tail:
    every other answer is "unlikely" to it): it contests the experts' answers, but only on
    the prompts it ranks above `contest_quantile` of its own claims, and those are left out
    (data lost), not handed to it."""
    from flminillm.config import DistillConfig

    a, t, vocab, q = 40, 3, 50, 0.5
    g = torch.Generator().manual_seed(1)
    right = torch.randint(4, vocab, (a, t), generator=g)
    alice = _expert(a, t, right, torch.arange(a) < 20)
    bob = _expert(a, t, right, torch.arange(a) >= 20)
    lies = torch.randint(4, vocab, (a, t), generator=g)
    liar = {
        **_expert(a, t, lies, torch.ones(a, dtype=torch.bool)),
        "own_prompt_logp": -20.0 - torch.rand(a, generator=g),
    }  # random ranks
    liar["own_logp"][..., 0] = 0.0
    liar["own_logp"][..., 1:] = -30.0
    teachings = [alice, bob, liar]
    base = dict(
        min_claim=0.0, invariance_share=0.0, joint_quantile=1.0, contest_p=0.05, contest_bar=0.0,
        contest_leave_out=True,
    )  # fmt: skip
    _, info = assemble_batch(_rollouts(0, a, t, 3), teachings, torch.ones(3),
                             DistillConfig(**base, contest_quantile=q))  # fmt: skip
    mine = own_quantiles(liar, True, True) > q
    assert bool(mine.any()) and not bool((info["ask_choice"] == 2).any())
    assert torch.equal(info["ask_choice"] == LEFT_OUT, mine)  # exactly where it is "sure"
    assert int(info["n_contested"]) == int(mine.sum()) <= (1 - q) * a


def test_the_contest_is_rank_selection_s_rule():
    """Under joint selection (no ranks to be sure by) the contest leaves everything as it
    was."""
    from flminillm.config import DistillConfig

    a, t, vocab = 20, 3, 50
    g = torch.Generator().manual_seed(0)
    right = torch.randint(4, vocab, (a, t), generator=g)
    lies = torch.randint(4, vocab, (a, t), generator=g)
    teachings = [_expert(a, t, right, torch.arange(a) < 10), _expert(a, t, lies, torch.ones(a) > 0)]
    base = dict(
        selection="joint", min_claim=0.0, invariance_share=0.0, joint_quantile=1.0, contest_bar=0.0,
        contest_leave_out=True,
    )  # fmt: skip
    _, off = assemble_batch(_rollouts(0, a, t, 3), teachings, torch.ones(2),
                            DistillConfig(**base, contest_quantile=1.0))  # fmt: skip
    _, on = assemble_batch(_rollouts(0, a, t, 3), teachings, torch.ones(2),
                           DistillConfig(**base, contest_quantile=0.1))  # fmt: skip
    assert bool((off["ask_choice"] == 1).any())  # the liar wins some: there is something to contest
    assert torch.equal(on["ask_choice"], off["ask_choice"]) and int(on["n_contested"]) == 0


def _bar(c, best, share, able=None, peers="two", earlier=None):
    """`contest_bar` on a round's contests `c` [M, A] and winners `best` [A]."""
    from flminillm.aggregate import contest_bar, contest_counts

    able = torch.ones(c.shape[0], dtype=torch.bool) if able is None else able
    return contest_bar(contest_counts(c, best, able), share, able, peers, earlier=earlier)


def test_contest_bar_needs_two_peers_each_contesting_a_share_of_its_wins():
    best = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    c = torch.zeros(3, 8, dtype=torch.bool)
    c[0, 4] = c[1, 5] = True  # teacher 2's wins: one of four contested by each of 0 and 1
    c[2, 0] = c[2, 1] = c[2, 2] = True  # 2 contests every win of 0 and one of 1's: one peer
    assert _bar(c, best, 0.2).tolist() == [False, False, True]
    assert _bar(c, best, 0.25).tolist() == [False, False, False]  # not above the share
    assert not bool(_bar(c[:2, :4], best[:4], 0.0).any())  # two teachers: never


def test_contest_bar_by_all_peers_asks_every_peer_that_may_contest():
    """`contest_bar_peers` 'all': two look-alike experts contesting a third teacher do not bar
    it while a fourth that may contest does not; a peer that may not contest (barred,
    quarantined, another tokenizer) is not asked; never fewer than two peers."""
    best = torch.tensor([0, 1, 2, 3, 3, 3, 3])
    c = torch.zeros(4, 7, dtype=torch.bool)
    c[0, 3] = c[1, 4] = True  # teacher 3's wins: a quarter each contested by 0 and 1, not by 2
    assert _bar(c, best, 0.2).tolist() == [False, False, False, True]
    assert _bar(c, best, 0.2, peers="all").tolist() == [False] * 4
    unable = torch.tensor([True, True, False, True])
    assert _bar(c, best, 0.2, able=unable, peers="all").tolist() == [False] * 3 + [True]
    c[2, 5] = True  # now every peer contests
    assert _bar(c, best, 0.2, peers="all").tolist() == [False] * 3 + [True]
    alone = torch.tensor([True, False, False, True])  # one peer left: never barred
    assert not bool(_bar(c, best, 0.0, able=alone, peers="all").any())


def test_contest_bar_over_judged_wins_reads_only_what_a_peer_could_contest():
    """`distill.contest_bar_over` 'judged': a peer's share of a teacher's wins counts only
    the wins it could contest (`judges`: it was sure of the prompt), so a liar's wins on
    families no peer knows do not dilute it; under 'all' a peer that judged none abstains.
    Counted over every win the same contests stay under the bar."""
    from flminillm.aggregate import contest_bar, contest_counts

    best = torch.tensor([0] * 4 + [1] * 4 + [2] * 20)
    able = torch.ones(3, dtype=torch.bool)
    c = torch.zeros(3, 28, dtype=torch.bool)
    j = torch.zeros(3, 28, dtype=torch.bool)
    j[0, 8:11] = j[1, 11:14] = True  # each expert sure of 3 of the liar's 20 wins
    c[0, 8:10] = c[1, 11:13] = True  # and contests 2 of those 3: 10% of all its wins
    plain = contest_counts(c, best, able)
    judged = contest_counts(c, best, able, j)
    assert plain[0, :2, 2].tolist() == [20, 20] and judged[0, :2, 2].tolist() == [3, 3]
    assert judged[1].tolist() == plain[1].tolist()  # the contests are the same
    assert contest_bar(plain, 0.25, able, "all").tolist() == [False] * 3
    assert contest_bar(judged, 0.25, able, "all", abstain=True).tolist() == [False, False, True]
    # the experts: nobody judged their wins, so nobody may bar them (no evidence, no bar)
    assert judged[0, :, 0].tolist() == [0, 0, 0] and judged[0, :, 1].tolist() == [0, 0, 0]
    # four teachers: a peer with none of the liar's wins to judge abstains under 'all' ...
    best4 = torch.cat([best, torch.tensor([3])])
    c4 = torch.cat([c, torch.zeros(1, 28, dtype=torch.bool)])
    c4 = torch.cat([c4, torch.zeros(4, 1, dtype=torch.bool)], 1)
    j4 = torch.cat([j, torch.zeros(1, 28, dtype=torch.bool)])
    j4 = torch.cat([j4, torch.zeros(4, 1, dtype=torch.bool)], 1)
    able4 = torch.ones(4, dtype=torch.bool)
    counts4 = contest_counts(c4, best4, able4, j4)
    assert contest_bar(counts4, 0.25, able4, "all", abstain=True)[2]
    assert not contest_bar(counts4, 0.25, able4, "all", abstain=False)[2]  # it would veto
    # ... and one that judged some and contested none vetoes, as under 'wins'
    j4[3, 14] = True
    assert not contest_bar(contest_counts(c4, best4, able4, j4), 0.25, able4, "all",
                           abstain=True)[2]  # fmt: skip


def test_contest_bar_pools_earlier_rounds_per_pair():
    """`distill.contest_bar_rounds`: a liar whose contests sit just under the share this
    round (one of its 25 wins, 4%, by each expert) is barred once an earlier round where
    they were above is pooled. The pooled evidence adds bars, never removes one: a teacher
    whose earlier rounds were clean is still barred by this round's contests. The counts
    are per pair: a peer that could not contest adds no wins."""
    from flminillm.aggregate import contest_counts

    best = torch.tensor([0] * 10 + [1] * 10 + [2] * 25)
    c = torch.zeros(3, 45, dtype=torch.bool)
    c[0, 20] = c[1, 21] = True  # 1 of teacher 2's 25 wins each: 4%
    assert _bar(c, best, 0.05, peers="all").tolist() == [False, False, False]
    counts = contest_counts(c, best, torch.ones(3, dtype=torch.bool))
    assert counts[0].tolist() == [[0, 10, 25], [10, 0, 25], [10, 10, 0]]
    assert counts[1].tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 0]]
    earlier = torch.zeros(2, 3, 3, dtype=torch.long)
    earlier[0, :2, 2], earlier[1, :2, 2] = 25, 3  # 12% of its wins the round before
    assert _bar(c, best, 0.05, peers="all", earlier=earlier).tolist() == [
        False, False, True]  # fmt: skip
    # teacher 0 contested on 2 of 10 wins by both peers this round (20%), on none of its 50
    # wins before (2 of 60 pooled, 3.3%): barred by this round's evidence all the same
    h = torch.zeros(3, 45, dtype=torch.bool)
    h[1, 0] = h[1, 1] = h[2, 0] = h[2, 1] = True
    clean = torch.zeros(2, 3, 3, dtype=torch.long)
    clean[0, 1:, 0] = 50
    for e in (None, clean):
        assert _bar(h, best, 0.05, peers="all", earlier=e).tolist() == [True, False, False]
    # a peer that could not contest this round: no wins counted for it
    unable = contest_counts(c, best, torch.tensor([True, False, True]))
    assert unable[0, 1].tolist() == [0, 0, 0] and unable[1, 1].tolist() == [0, 0, 0]
    # pooled, a peer counts only while it may contest now: four teachers, teacher 3 barred
    # this round; every peer contested teacher 2 above the share before
    best4 = torch.tensor([0] * 10 + [1] * 10 + [2] * 25)
    c4 = torch.zeros(4, 45, dtype=torch.bool)
    now = torch.tensor([True, True, True, False])
    before = torch.zeros(2, 4, 4, dtype=torch.long)
    before[0, [0, 1, 3], 2], before[1, [0, 1, 3], 2] = 25, 5  # 20% each
    assert _bar(c4, best4, 0.05, now, "all", before).tolist() == [False, False, True, False]
    before[1, 1, 2] = 0  # teacher 1, who may contest now, never did: not barred by 0 and 3
    assert _bar(c4, best4, 0.05, now, "all", before).tolist() == [False] * 4
    from flminillm.lineage import selection_line

    line = selection_line({"selected.carol": 0.0, "contest_barred.carol": 1.0,
                           "contest_pooled.carol": 0.07})  # fmt: skip
    assert "(barred: its peers contest its answers; pooled over rounds: 7% of its wins)" in line


def test_a_barred_teacher_s_would_be_wins_go_to_the_next_teacher_under_next():
    """distill.barred_wins: the noisy liar, barred by its peers' contests, would have won
    prompts of both experts' domains. 'leave' leaves them out; 'next' (the default) keeps
    each with the answer of the teacher that wins without the liar: the expert whose domain
    it is, the right answer. Nothing else changes: the prompts the liar would not have won
    keep their answers, and a barred teacher never wins."""
    from flminillm.config import DistillConfig

    a, t = 20, 3
    teachings, rollouts = _experts_and_a_noisy_liar(seed=1, a=a, t=t), _rollouts(0, a, t, 3)
    base = dict(min_claim=0.0, invariance_share=0.0, joint_quantile=1.0, contest_quantile=0.3,
                contest_bar=0.05, contest_bar_rounds=1)  # fmt: skip
    leave_b, leave = assemble_batch(rollouts, teachings, torch.ones(3),
                                    DistillConfig(**base, barred_wins="leave"))  # fmt: skip
    next_b, moved = assemble_batch(rollouts, teachings, torch.ones(3),
                                   DistillConfig(**base, barred_wins="next"))  # fmt: skip
    assert leave["contest_barred"].tolist() == moved["contest_barred"].tolist() == [
        False, False, True]  # fmt: skip
    out = leave["ask_choice"] == LEFT_OUT
    assert int(leave["n_implausible"]) == int(out.sum()) > 0 and int(moved["n_implausible"]) == 0
    assert bool(out[:10].any()) and bool(out[10:].any())  # in both experts' domains
    expert = (torch.arange(a) >= a // 2).long()  # alice 0-9, bob 10-19
    assert torch.equal(moved["ask_choice"][out], expert[out])  # the domain's expert
    assert torch.equal(moved["ask_choice"][~out], leave["ask_choice"][~out])
    assert not bool((moved["ask_choice"] == 2).any())
    # the kept answers are the experts' (right) ones: the batch grows by the moved prompts
    ft = next_b["from_teacher"]
    assert int(ft.sum()) == int(leave_b["from_teacher"].sum()) + int(out.sum())
    kept = moved["ask_choice"] >= 0
    rows = next_b["response_ids"][ft][:, :t]
    right = torch.stack([teachings[i]["own_response_ids"][p] for p, i in
                         zip(torch.arange(a)[kept].tolist(), moved["ask_choice"][kept].tolist(),
                             strict=True)])  # fmt: skip
    assert torch.equal(rows, right)


def test_a_contest_barred_teacher_counts_as_an_absent_client_where_configured():
    """distill.barred_as_absent counts a teacher barred by any bar, the contest bar
    included (before stop 50 only implausible or overclaiming ones): the liar two experts
    contest, barred with no `barred` list given, adds its share of the clients to the
    prompts held back where the winners are least sure."""
    from flminillm.config import DistillConfig

    a, t = 21, 3
    teachings, rollouts = _experts_and_a_noisy_liar(seed=1, a=a, t=t), _rollouts(0, a, t, 3)
    d = DistillConfig(min_claim=0.0, invariance_share=0.0, joint_quantile=1.0,
                      contest_quantile=0.3, contest_bar_peers="two", contest_leave_out=False,
                      contest_bar_over="wins", contest_bar=0.05, barred_wins="next")  # fmt: skip
    reserved = {}
    for share in (0.0, 1 / 3):
        _, info = assemble_batch(rollouts, teachings, torch.ones(3), d, barred_share=share)
        assert info["contest_barred"].tolist() == [False, False, True]
        reserved[share] = int(info["n_reserved"])
    assert reserved == {0.0: 0, 1 / 3: 7}


def test_a_liar_two_experts_contest_is_barred_for_the_round():
    """distill.contest_bar: the noisy-claiming liar of the contest test wins prompts of both
    experts' domains, and each expert contests a share of its wins: it is barred (every
    prompt it won leaves the batch as a barred teacher's, `contest_barred.<id>`, the
    lineage in red); without the bar only the contested prompts leave. The validator names
    the fix where the contest is off."""
    from flminillm.config import DistillConfig
    from flminillm.lineage import selection_line

    a, t = 20, 3
    teachings, rollouts = _experts_and_a_noisy_liar(seed=1, a=a, t=t), _rollouts(0, a, t, 3)
    base = dict(min_claim=0.0, invariance_share=0.0, joint_quantile=1.0, contest_quantile=0.3,
                contest_bar_peers="two", contest_leave_out=True, contest_bar_over="wins",
                barred_wins="leave")  # stop 39's  # fmt: skip
    _, free = assemble_batch(rollouts, teachings, torch.ones(3),
                             DistillConfig(**base, contest_bar=0.0))  # fmt: skip
    won = free["ask_choice"] == LEFT_OUT  # the liar's contested wins, left out
    assert bool(won[:10].any()) and bool(won[10:].any())  # in both experts' domains
    _, info = assemble_batch(rollouts, teachings, torch.ones(3),
                             DistillConfig(**base, contest_bar=0.05))  # fmt: skip
    info0 = info
    assert info["contest_barred"].tolist() == [False, False, True]
    assert int(info["n_implausible"]) >= int(won.sum()) and int(info["n_contested"]) == 0
    assert not bool((info["ask_choice"] == 2).any())
    stats = selection_stats(info["teacher_index"], teachings, ["alice", "bob", "carol"],
                            contest_barred=info["contest_barred"].tolist())  # fmt: skip
    assert stats["contest_barred.carol"] == 1.0 and stats["contest_barred.alice"] == 0.0
    assert "carol 0% [red](barred: its peers contest its answers)[/]" in selection_line(stats)
    with pytest.raises(ValueError, match="contest_bar 0.05 reads the peer contest"):
        DistillConfig(contest_quantile=1.0, contest_bar=0.05)
    DistillConfig(contest_quantile=1.0)  # the default bar is inert with the contest off
    # the contests as the bar's evidence only: a contested answer is learned unless its
    # teacher is barred (a bar no teacher reaches here), exactly as with the contest off
    kept = DistillConfig(**{**base, "contest_leave_out": False}, contest_bar=0.99)
    _, info = assemble_batch(rollouts, teachings, torch.ones(3), kept)
    _, off = assemble_batch(rollouts, teachings, torch.ones(3),
                            DistillConfig(**{**base, **NO_CONTEST}))  # fmt: skip
    assert torch.equal(info["ask_choice"], off["ask_choice"]) and int(info["n_contested"]) == 0
    assert bool((info["ask_choice"] == 2).any())  # the liar's contested wins learned
    assert float(info["contesting"][:2].sum()) > 0  # who contested is still shown
    _, barred = assemble_batch(
        rollouts,
        teachings,
        torch.ones(3),
        DistillConfig(**{**base, "contest_leave_out": False}, contest_bar=0.05),
    )
    assert barred["contest_barred"].tolist() == [False, False, True]
    # three teachers: every peer that may contest is the two experts ('all' as 'two')
    _, every = assemble_batch(
        rollouts,
        teachings,
        torch.ones(3),
        DistillConfig(**{**base, "contest_bar_peers": "all"}, contest_bar=0.05),
    )
    assert torch.equal(every["ask_choice"], info0["ask_choice"])
    with pytest.raises(ValueError, match="contest_bar 0 with contest_leave_out false"):
        DistillConfig(contest_quantile=0.75, contest_bar=0.0, contest_leave_out=False)
    # over the wins each expert could contest (`contest_bar_over` 'judged'): still barred,
    # and the judged counts are at most the wins and at least the contests
    _, judged = assemble_batch(
        rollouts, teachings, torch.ones(3),
        DistillConfig(**{**base, "contest_leave_out": False, "contest_bar_over": "judged"},
                      contest_bar=0.05),
    )  # fmt: skip
    assert judged["contest_barred"].tolist() == [False, False, True]
    ev, ev_wins = judged["contest_evidence"], barred["contest_evidence"]
    assert bool((ev[0] <= ev_wins[0]).all()) and bool((ev[1] <= ev[0]).all())
    assert torch.equal(ev[1], ev_wins[1]) and int(ev[0, :2, 2].sum()) < int(ev_wins[0, :2, 2].sum())
    # 'judged-veto': the same counts; both experts judged some of the liar's wins, so both
    # vote and it is barred as under 'judged'
    _, veto = assemble_batch(
        rollouts, teachings, torch.ones(3),
        DistillConfig(**{**base, "contest_leave_out": False, "contest_bar_peers": "all",
                         "contest_bar_over": "judged-veto"}, contest_bar=0.05),
    )  # fmt: skip
    assert torch.equal(veto["contest_evidence"], ev)
    assert veto["contest_barred"].tolist() == [False, False, True]
    # `contest_min_judged` above every count: no peer has enough to vote to bar, so under
    # 'judged-veto' all vote against it; the evidence is the same
    _, few = assemble_batch(
        rollouts, teachings, torch.ones(3),
        DistillConfig(**{**base, "contest_leave_out": False, "contest_bar_peers": "all",
                         "contest_bar_over": "judged-veto"}, contest_bar=0.05,
                      contest_min_judged=int(ev[0].max()) + 1),
    )  # fmt: skip
    assert torch.equal(few["contest_evidence"], ev)
    assert few["contest_barred"].tolist() == [False, False, False]


def test_contest_min_judged_on_the_recorded_first_round_of_two_5_client_federations():
    """Round 1 of two 5-client federations on the evaluation split (seed 1, stop 48; the
    counts their round manifests recorded, teachers alice, bob, dave, erin): clean, where
    the look-alike bob and erin are honest, and under two contesting liars (dave, erin).
    With 'judged-veto' at 0.25 the clean round bars bob and erin on votes of 1 of 2, 2 of 2
    and 6 of 6 judged wins, and the attacked round bars bob beside the liars (alice: 1 of
    2); with at least 3 judged wins per vote bob keeps his place in both, with 5 erin too,
    while the liars, judged on 13-35 wins by each peer, stay barred."""
    from flminillm.aggregate import contest_bar

    clean = torch.tensor([
        [[0, 2, 0, 3], [0, 0, 0, 6], [0, 2, 0, 4], [27, 61, 11, 0]],
        [[0, 1, 0, 2], [0, 0, 0, 6], [0, 2, 0, 4], [27, 47, 11, 0]],
    ])  # fmt: skip
    liars = torch.tensor([
        [[0, 2, 35, 29], [0, 0, 22, 26], [17, 22, 0, 13], [15, 25, 21, 0]],
        [[0, 1, 26, 14], [0, 0, 21, 23], [17, 22, 0, 13], [15, 25, 21, 0]],
    ])  # fmt: skip
    names, able = ["alice", "bob", "dave", "erin"], torch.ones(4, dtype=torch.bool)

    def barred(counts, least):
        out = contest_bar(counts, 0.25, able, "all", earlier=torch.zeros_like(counts),
                          least=least)  # fmt: skip
        return [n for n, b in zip(names, out.tolist(), strict=True) if b]

    assert barred(clean, 1) == ["bob", "erin"] and barred(clean, 0) == ["bob", "erin"]
    assert barred(clean, 3) == ["erin"] and barred(clean, 5) == []
    assert barred(liars, 1) == ["bob", "dave", "erin"]
    assert barred(liars, 3) == barred(liars, 5) == ["dave", "erin"]
    # the liars' own mutual votes are the smallest (dave judged 13 of erin's wins)
    assert barred(liars, 13) == ["dave", "erin"] and barred(liars, 14) == ["dave"]


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_similar_prompts_pairs_each_prompt_with_another_of_its_template():
    """`similar_prompts`: the other prompt sharing the most tokens at its start and end (a
    template's fixed parts, whatever length the middle has, padding ignored), never a copy
    of the same text; itself only where every prompt has its text."""
    from flminillm.aggregate import similar_prompts

    say = lambda *w: [11, 12, *w, 13]  # "say <w> twice"  # noqa: E731
    first = lambda *w: [21, *w, 22, 23]  # "<w>: first letter?"  # noqa: E731
    rows = [say(5), first(6, 7), say(8, 9, 10), first(6, 7), say(5), first(30)]
    got = similar_prompts(*_left_padded(rows)).tolist()
    assert got == [2, 5, 0, 5, 2, 1]  # the copies (0 and 4, 1 and 3) never paired
    assert similar_prompts(*_left_padded([say(5)] * 3)).tolist() == [0, 1, 2]
    # chunked the same as whole
    many = [say(i % 7, i) if i % 2 else first(i) for i in range(40)]
    assert torch.equal(similar_prompts(*_left_padded(many), chunk=7),
                       similar_prompts(*_left_padded(many)))  # fmt: skip


def test_dependence_bar_bars_answers_no_likelier_after_their_own_prompts():
    """`dependence_bar`: a teacher whose won answers the student finds as likely after a
    similar prompt as after their own (a mean of 0.05 nats per token, against its peers' 1.2
    and 1.4) is barred; nobody where the peers' median is under the floor (a first round:
    the student has learned nothing); a teacher with fewer than MIN_DEPENDENCE_WINS wins is
    neither judged nor a reference; one barred already is not judged."""
    from flminillm.aggregate import MIN_DEPENDENCE_WINS, dependence_bar

    best = torch.tensor([0] * 10 + [1] * 10 + [2] * 10 + [-1] * 2)
    dep = torch.zeros(3, 32)
    dep[0, :10], dep[1, 10:20], dep[2, 20:30] = 1.2, 1.4, 0.05
    dep[2, :20] = 2.0  # its answers to prompts it did not win do not count
    able = torch.ones(3, dtype=torch.bool)
    barred, means = dependence_bar(dep, best, 0.25, 0.5, able)
    assert barred.tolist() == [False, False, True]
    assert means.tolist() == pytest.approx([1.2, 1.4, 0.05])
    assert not bool(dependence_bar(dep * 0.3, best, 0.25, 0.5, able)[0].any())  # median 0.39
    # the bar is a share of the median: 0.05 is above 0.03 of 1.3
    assert not bool(dependence_bar(dep, best, 0.03, 0.5, able)[0].any())
    few = best.clone()
    few[20 + MIN_DEPENDENCE_WINS - 1 :] = -1  # teacher 2 wins 7
    barred, means = dependence_bar(dep, few, 0.25, 0.5, able)
    assert not bool(barred.any()) and math.isnan(means[2])
    barred, means = dependence_bar(dep, best, 0.25, 0.5, torch.tensor([True, True, False]))
    assert not bool(barred.any()) and math.isnan(means[2])
    # two teachers: each is the other's reference
    assert dependence_bar(dep[1:, 10:], best[10:] - 1, 0.25, 0.5, able[1:])[0].tolist() == [
        False, True]  # fmt: skip


def test_assemble_batch_bars_a_teacher_whose_answers_do_not_depend_on_their_prompts():
    """distill.dependence_bar in assemble_batch: the teacher whose wins show no dependence
    is barred for the round, its would-be wins going to the teacher that wins without it
    (barred_wins 'next'); `dependence.<id>` and `dependence_barred.<id>` in the stats, the
    lineage in red; off (0, the default) or without the student's dependence, nothing
    changes."""
    from flminillm.config import DistillConfig
    from flminillm.lineage import selection_line

    a, t = 30, 3
    g = torch.Generator().manual_seed(3)
    right = torch.randint(4, 50, (a, t), generator=g)
    alice = _expert(a, t, right, torch.arange(a) < 10)
    bob = _expert(a, t, right, (torch.arange(a) >= 10) & (torch.arange(a) < 20))
    carol = _expert(a, t, right.roll(1, 0), torch.arange(a) >= 20)  # moved answers, sure
    teachings, rollouts = [alice, bob, carol], _rollouts(0, a, t, 3)
    base = dict(min_claim=0.0, invariance_share=0.0, joint_quantile=1.0, **NO_CONTEST)
    dep = torch.stack([torch.full((a,), 1.3), torch.full((a,), 1.1), torch.full((a,), 0.02)])
    _, off = assemble_batch(rollouts, teachings, torch.ones(3), DistillConfig(**base))
    assert bool((off["ask_choice"][20:] == 2).all())  # carol wins her domain
    _, same = assemble_batch(rollouts, teachings, torch.ones(3), DistillConfig(**base),
                             dependence=dep)  # fmt: skip
    assert torch.equal(same["ask_choice"], off["ask_choice"])  # off: not read
    on = DistillConfig(**base, dependence_bar=0.25)
    _, info = assemble_batch(rollouts, teachings, torch.ones(3), on, dependence=dep)
    assert info["dependence_barred"].tolist() == [False, False, True]
    assert info["dependence"].tolist() == pytest.approx([1.3, 1.1, 0.02])
    assert not bool((info["ask_choice"] == 2).any())
    assert bool((info["ask_choice"][20:] >= 0).all())  # to the next teacher: a guess
    assert torch.equal(info["ask_choice"][:20], off["ask_choice"][:20])
    _, leave = assemble_batch(
        rollouts,
        teachings,
        torch.ones(3),
        on.model_copy(update={"barred_wins": "leave"}),
        dependence=dep,
    )
    assert bool((leave["ask_choice"][20:] == LEFT_OUT).all())
    stats = selection_stats(info["teacher_index"], teachings, ["alice", "bob", "carol"],
                            dependence=info["dependence"].tolist(),
                            dependence_barred=info["dependence_barred"].tolist())  # fmt: skip
    assert stats["dependence_barred.carol"] == 1.0 and stats["dependence_barred.bob"] == 0.0
    assert stats["dependence.carol"] == pytest.approx(0.02)
    assert (
        "(barred: its answers no likelier after their own prompts than after others "
        "(+0.02 nats/token))" in selection_line(stats)
    )
