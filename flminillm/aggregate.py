"""Combining several teachers into one signal for the student, and the student's batch.

Per student rollout, the teachers' log-probs on its support are combined (a posterior-
weighted mixture by default, or median / trimmed mean); per teacher-share prompt, one
teacher's answer is kept. The defences against a faulty or lying teacher (capped weights
and capped answer selection) live here too. Shapes as in flminillm.distill, M teachers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from flminillm.generation import left_pad, right_pad

if TYPE_CHECKING:
    from flminillm.config import DistillConfig


def aggregate_teachers(
    teacher_logp: torch.Tensor,
    weights: torch.Tensor | None = None,
    method: str = "mixture",
    trim: float = 0.2,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine M teachers' log-probs on the same support: [M, B, T, S] -> [B, T, S].

    mixture: log sum_i w_i p_i with w = normalised `weights` [M], or, when `log_weights`
    [M, B, T] is given, per-position weights w_i(b, t) = softmax_i(log_weights): with
    log_weights = log pi_i + log p_i(x) + log p_i(y_<t | x) this is the exact next-token
    conditional of the mixture LM sum_i pi_i p_i(x, y), so a teacher counts where it
    knows the prompt. median: per-entry median of p_i; trimmed_mean: mean of p_i after
    dropping the `trim` share at both ends. The robust options bound the influence of
    one faulty or malicious teacher.
    """
    m = teacher_logp.shape[0]
    if weights is None:
        weights = torch.ones(m)
    if method == "mixture":
        if log_weights is None:
            log_weights = (
                torch.log(weights / weights.sum()).view(m, 1, 1).expand(teacher_logp.shape[:3])
            )
        logw = log_weights - torch.logsumexp(log_weights, dim=0, keepdim=True)
        return torch.logsumexp(teacher_logp + logw[..., None], dim=0)
    probs = teacher_logp.exp()
    if method == "median":
        srt = probs.sort(dim=0).values
        agg = srt[m // 2] if m % 2 else srt[m // 2 - 1 : m // 2 + 1].mean(0)
    elif method == "trimmed_mean":
        cut = int(m * trim)
        agg = probs.sort(dim=0).values[cut : m - cut].mean(0)
    else:
        raise ValueError(f"unknown aggregation {method!r}; use mixture, median or trimmed_mean")
    return torch.log(agg.clamp(min=1e-30))


def posterior_log_weights(
    prior: torch.Tensor, prompt_logp: torch.Tensor, token_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """log pi_i + log p_i(x) + log p_i(y_<t | x): [M], [M, B], [M, B, T], [B, T] -> [M, B, T]."""
    prefix = torch.cumsum(token_logp * mask, dim=-1) - token_logp * mask  # exclusive cumsum
    return torch.log(prior)[:, None, None] + prompt_logp[..., None] + prefix


def cap_log_weights(
    log_weights: torch.Tensor, mask: torch.Tensor, cap: float, iters: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounded influence for the posterior mixture: lower a teacher's log-weights by a
    constant delta_i until its mean weight over the scored positions is at most `cap`.

    log_weights [M, B, T], mask [B, T] -> (capped log-weights, delta [M]). A teacher that
    claims to know every prompt (log p(x) = 0) would otherwise take all the weight; capped,
    it keeps at most `cap` of it, on the positions where its claim stands out least, and
    the others keep their relative weights. Honest non-IID teachers (each sure of its own
    domain) stay under the cap and are left as they are."""
    m = log_weights.shape[0]
    delta = torch.zeros(m)
    if cap >= 1.0 or m < 2:
        return log_weights, delta
    w_mask = mask.float()
    n = w_mask.sum().clamp(min=1.0)

    def mean_weights(d: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(log_weights - d[:, None, None], dim=0)
        return (w * w_mask).sum((1, 2)) / n

    for _ in range(m):
        share = mean_weights(delta)
        i = int(share.argmax())
        if float(share[i]) <= cap + 1e-4:
            break
        lo, hi = float(delta[i]), float(delta[i]) + 1e4
        for _ in range(iters):  # mean weight is decreasing in delta_i: bisection
            mid = (lo + hi) / 2
            trial = delta.clone()
            trial[i] = mid
            if float(mean_weights(trial)[i]) > cap:
                lo = mid
            else:
                hi = mid
        delta[i] = hi
    return log_weights - delta[:, None, None], delta


def cap_selection(joint: torch.Tensor, cap: float) -> torch.Tensor:
    """joint [M, A] selection scores -> the same, lowered per teacher by the least constant
    that leaves it the best score on at most floor(cap * A) prompts. A teacher that claims
    to be sure of everything keeps the prompts where the others are least sure; teachers
    already under the cap are left as they are."""
    m, a = joint.shape
    if cap >= 1.0 or m < 2 or a == 0:
        return joint
    joint = joint.clone()
    limit = int(cap * a)
    for _ in range(m):
        wins = torch.bincount(joint.argmax(0), minlength=m)
        i = int(wins.argmax())
        if int(wins[i]) <= limit:
            break
        others = torch.cat([joint[:i], joint[i + 1 :]]).max(0).values
        margin = joint[i] - others  # teacher i is selected where margin > 0
        keep = torch.sort(margin, descending=True).values
        # lower it to the (limit+1)-th largest margin: it then wins (strictly) <= limit prompts
        joint[i] = joint[i] - keep[limit].clamp(min=0) - 1e-6
    return joint


def claim_quantiles(joint: torch.Tensor, low_ties: bool = False) -> torch.Tensor:
    """[M, A] claims -> each teacher's claims replaced by their quantiles among its own, in
    [0, 1] (ties share their mean rank, or with `low_ties` their lowest; one prompt: 0.5).
    What is left of a claim is *where* the teacher is surer than elsewhere, never *how*
    sure: a teacher that claims probability 1 for everything has every quantile at 0.5, or
    at 0 with `low_ties` (one claim for everything tells nothing: `distill.tie_rank`)."""
    m, a = joint.shape
    if a < 2:
        return torch.full_like(joint, 0.5)
    srt = joint.sort(dim=1).values.contiguous()
    below = torch.searchsorted(srt, joint.contiguous()).float()  # claims strictly lower
    if low_ties:
        return below / (a - 1)
    ties = torch.searchsorted(srt, joint.contiguous(), right=True).float() - below - 1
    return (below + ties / 2) / (a - 1)


def answer_claims(teaching: dict[str, torch.Tensor]) -> torch.Tensor:
    """[A] a teacher's claimed log p(y | x) of each of its answers: the sum of its answer
    tokens' log-probs, or its `own_claim` where given (a quarantined teacher: one constant,
    `quarantine`)."""
    if "own_claim" in teaching:
        return teaching["own_claim"].float()
    logp = teaching["own_logp"].float()
    logp = logp[..., 0] if logp.dim() == 3 else logp
    return (logp * teaching["own_response_mask"].float()).sum(-1)


def selection_claims(teaching: dict[str, torch.Tensor], use_prompt: bool) -> torch.Tensor:
    """[A] what selection compares of a teacher's answers (before its prior): the claimed
    log p(y | x) (`answer_claims`), plus its claimed log p(x) with `use_prompt`."""
    claims = answer_claims(teaching)
    return claims + teaching["own_prompt_logp"].float() if use_prompt else claims


def own_quantiles(
    teaching: dict[str, torch.Tensor], use_prompt: bool, low_ties: bool = False
) -> torch.Tensor:
    """[A] where rank selection places a teacher's answers: the quantiles of its
    `selection_claims` among its own (`claim_quantiles`; its prior, one constant per
    teacher, does not move them), or its `own_quantile` where given (a quarantined teacher:
    `quarantine`)."""
    if "own_quantile" in teaching:
        return teaching["own_quantile"].float()
    return claim_quantiles(selection_claims(teaching, use_prompt)[None], low_ties)[0]


def invariant_answers(
    ids: torch.Tensor, mask: torch.Tensor, quantiles: torch.Tensor, share: float, sure: float
) -> torch.Tensor:
    """The input-invariance check (`distill.invariance_share`; after STRIP, Gao et al. 2019:
    a backdoor's output does not depend on its input). ids/mask [M, A, T]: each teacher's
    answer per teacher-share prompt; quantiles [M, A]: where each teacher ranks each prompt
    among its own claims (`own_quantiles`). Returns [M, A] bool: True where teacher i's
    answer is one it gave word for word to a set S of prompts, and another teacher j
    answers differently the part of S that both rank above the quantile `sure`
    (`distill.invariance_quantile`) of their own claims, if that part holds more than
    `share` * A prompts: the same answer as i on fewer than half of them, and at least
    max(3, n / 8) distinct answers on those n. Then all of S is flagged. An honest expert's
    answer repeats where the prompts share it (a letter, yes/no), and then an informed
    teacher agrees or varies little; one answer for prompts an informed teacher tells apart
    is what a backdoor writes. Only the part both are sure of is judged: under rank
    selection a backdoor wins a prompt only by ranking it above the family's expert, who
    ranks its own family at its top; an honest teacher whose one collapsed guess on other
    families' prompts also happens to be a right answer in its own family (a letter) ranks
    those guesses low, and is not judged on them (docs/algorithm.md, measured). Claims
    alone cannot tell the backdoor from the family's expert; this reads the answers. It
    does not see a backdoor whose wrong answers vary, nor one on prompts no other teacher
    is sure of."""
    m, a = ids.shape[:2]
    flagged = torch.zeros(m, a, dtype=torch.bool)
    if share <= 0 or m < 2 or a < 2:
        return flagged
    keys = [row_keys(ids[i], mask[i]) for i in range(m)]
    high = (quantiles > sure).tolist()  # [M][A]
    for i in range(m):
        groups: dict[tuple, list[int]] = {}
        for p, k in enumerate(keys[i]):
            groups.setdefault(k, []).append(p)
        for k, s in groups.items():
            if len(s) <= share * a:
                continue
            for j in range(m):
                both = [p for p in s if high[i][p] and high[j][p]] if j != i else []
                if len(both) <= share * a or len(both) < 2:
                    continue
                theirs = [keys[j][p] for p in both]
                agree = sum(t == k for t in theirs) / len(both)
                if agree < 0.5 and len(set(theirs)) >= max(3, math.ceil(len(both) / 8)):
                    flagged[i, s] = True
                    break
    return flagged


def rank_in_play(
    quantiles: torch.Tensor,
    claims: torch.Tensor,
    flagged: torch.Tensor,
    fixed: list[bool],
    low_ties: bool = False,
) -> torch.Tensor:
    """quantiles [M, A] with each teacher that has answers ruled out (`flagged` [M, A], the
    input-invariance check) ranked again, by its `claims` [M, A] (`selection_claims`),
    among its answers still in play. A ruled-out
    claim says nothing, and left in the ranking it would push the teacher's other answers
    down: a backdoor certain of its target family holds its own top quantiles, and its own
    families, ranked below them, lose prompts to the other teachers' guesses (on the
    3-client benchmark 8-15% of carol's repeat prompts went to guesses). Ranked again,
    the teacher stands where it would without the ruled-out answers. A teacher whose
    quantile is `fixed` (quarantined: one constant quantile) keeps it."""
    out = quantiles.clone()
    for i in range(out.shape[0]):
        if bool(flagged[i].any()) and not fixed[i]:
            keep = ~flagged[i]
            out[i, keep] = claim_quantiles(claims[i, keep][None], low_ties)[0]
    return out


def contests(
    ids: torch.Tensor,
    mask: torch.Tensor,
    sup: torch.Tensor,
    logp: torch.Tensor,
    ranks: torch.Tensor,
    best: torch.Tensor,
    able: torch.Tensor,
    quantile: float,
    p: float,
) -> torch.Tensor:
    """Peer contest (`distill.contest_quantile`). ids/mask [M, A, T]: each teacher's answer
    per teacher-share prompt; sup/logp [M, A, T, S]: its support there (its sampled token,
    then its top-k others; -1 pads) with full-softmax log-probs; ranks [M, A]: where each
    ranks each prompt among its own claims (`own_quantiles`); best [A]: whose answer is kept;
    able [M, A]: who may contest (not barred, quarantined or ruled out). Returns [M, A]
    bool: teacher j contests prompt a where it ranks a above `quantile`, its answer parts
    from the kept one at a position d it has a support for, and its probability of the kept
    answer through d is below `p`: its own log-probs on the common prefix (its sampled
    tokens there), then the kept token at d from its support, or, where that token is not
    in it, the support's tail mass 1 - sum(support) (an upper bound). The same answer, or a
    kept answer that ends inside j's (truncated), is never contested."""
    m, a, t = ids.shape
    idx = torch.arange(a)
    win, win_mask = ids[best, idx], mask[best, idx].bool()  # [A, T]
    mine = mask.bool()
    parts = win_mask[None] & (~mine | (ids != win[None]))  # [M, A, T]
    found = parts.any(-1)
    d = parts.long().argmax(-1)  # [M, A] the first position where they part
    at = d[..., None]
    has = mine.gather(-1, at)[..., 0]  # j has a support there
    own = logp[..., 0].float() * mine.float()  # j's log-probs of its sampled tokens
    before = torch.arange(t)[None, None] < at  # the common prefix
    prefix = (own * before.float()).sum(-1)  # [M, A]
    s_at = sup.gather(2, at[..., None].expand(m, a, 1, sup.shape[-1]))[:, :, 0]  # [M, A, S]
    l_at = logp.float().gather(2, at[..., None].expand(m, a, 1, logp.shape[-1]))[:, :, 0]
    token = win.gather(-1, d.T).T  # [M, A] the kept answer's token at d
    valid = s_at >= 0
    hit = valid & (s_at == token[..., None])
    tail = (1.0 - (l_at.exp() * valid.float()).sum(-1)).clamp(min=0.0)
    at_hit = torch.logsumexp(l_at.masked_fill(~hit, float("-inf")), -1)
    there = torch.where(hit.any(-1), at_hit, torch.log(tail))
    unlikely = (prefix + there) < math.log(p)
    return could_contest(ranks, best, able, quantile) & found & has & unlikely


def could_contest(
    ranks: torch.Tensor, best: torch.Tensor, able: torch.Tensor, quantile: float
) -> torch.Tensor:
    """[M, A] bool: who could contest each kept answer (`contests` asks the rest): a teacher
    that may (`able` [M, A]), ranks the prompt above `quantile` among its own claims
    (`ranks` [M, A]: it is sure of it) and is not the answer's author (`best` [A]). What
    `distill.contest_bar_over` 'judged' divides by."""
    return able & (ranks > quantile) & (torch.arange(ranks.shape[0])[:, None] != best[None])


def contest_counts(
    contested: torch.Tensor,
    best: torch.Tensor,
    able: torch.Tensor,
    judges: torch.Tensor | None = None,
) -> torch.Tensor:
    """One round's evidence for `contest_bar`: [2, M, M] counts, [0, j, i] the prompts
    teacher i won (best [A]) while j may contest (`able` [M]), [1, j, i] those j contested
    (`contests`: [M, A]); 0 on the diagonal. With `judges` [M, A] (who could contest each
    prompt: `select_teacher_rollouts`' "judges"; `distill.contest_bar_over` 'judged'),
    [0, j, i] counts only i's wins that j could contest. Rounds add up:
    `distill.contest_bar_rounds` pools them per pair of teachers (what the server carries
    across rounds)."""
    m = contested.shape[0]
    won = torch.stack([best == i for i in range(m)]).long()  # [M, A]
    if judges is None:
        n = won.sum(1)[None].expand(m, m) * able.long()[:, None]
    else:
        n = (judges.long() & able.long()[:, None]) @ won.T  # [j, i]
    c = (contested.long() & able.long()[:, None]) @ won.T  # [j, i]
    out = torch.stack([n, c]).clone()
    out[:, torch.arange(m), torch.arange(m)] = 0
    return out


def contest_shares(counts: torch.Tensor, able: torch.Tensor, least: int = 1) -> torch.Tensor:
    """[M, M] float: the share of teacher i's wins peer j contested (`contest_counts`, one
    round or pooled), computed as a mean; -1 where j has fewer than `least` (at least one)
    of i's wins to contest (`distill.contest_min_judged`: too few to judge by) or may not
    contest now (`able` [M]): its earlier contests count only while it may."""
    n, c = counts[0], counts[1]
    share = c.float() / n.clamp(min=1).float()
    return share.masked_fill((n < max(least, 1)) | ~able.bool()[:, None], -1.0)


def contest_bar(
    counts: torch.Tensor,
    share: float,
    able: torch.Tensor,
    peers: str = "two",
    earlier: torch.Tensor | None = None,
    abstain: bool = False,
    least: int = 1,
) -> torch.Tensor:
    """`distill.contest_bar`: [M] bool, the teachers at least two of whose peers each contest
    more than `share` of the prompts it won (`contest_counts` [2, M, M] of this round);
    `peers` 'all' (`distill.contest_bar_peers`): every peer that may contest (`able` [M]; at
    least two) does. `earlier` [2, M, M] (`contest_counts` of earlier rounds, summed per
    pair: `distill.contest_bar_rounds`): a teacher is also barred where the shares over those
    rounds and this one are above, counting the peers that may contest now (this round's
    evidence bars as before; the pooled adds to it). Evidence the teacher does not write,
    from two sources: in the 3-client benchmark honest teachers at contest_quantile 0.75
    never contest each other, and a liar that contests is one peer, so it cannot bar an
    honest teacher alone (two colluding contesters could; with 'all', only with every other
    peer). Where two clients' families look alike, honest teachers contest each other (the
    5-client benchmark, docs/results.md stop 40): 'all' asks the rest too. `abstain`
    (`distill.contest_bar_over` 'judged', whose counts are of the wins a peer could
    contest): under 'all', a peer with none of the teacher's wins to judge abstains. `least`
    (`distill.contest_min_judged`): a peer with fewer of the teacher's wins than that (in
    this round's counts, or in the pooled ones) is taken as one with none: it abstains, or
    under 'judged-veto' votes against the bar."""
    out = _barred_by(counts, share, able, peers, abstain, least)
    if earlier is not None:  # pooled: more evidence can bar, never unbar
        out = out | _barred_by(counts + earlier.long(), share, able, peers, abstain, least)
    return out


def _barred_by(
    counts: torch.Tensor,
    share: float,
    able: torch.Tensor,
    peers: str,
    abstain: bool = False,
    least: int = 1,
) -> torch.Tensor:
    # [j, i]; -1: too little evidence, or j may not contest
    shares = contest_shares(counts, able, least)
    above = shares > share
    out = torch.zeros(counts.shape[1], dtype=torch.bool)
    for i in range(counts.shape[1]):
        k = int(above[:, i].sum())
        if abstain:
            voters = int((shares[:, i] >= 0).sum())
        else:
            voters = int(able.sum()) - int(able[i])
        out[i] = k >= 2 and (peers != "all" or k == voters)
    return out


def similar_prompts(ids: torch.Tensor, mask: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """[A]: for each prompt of a left-padded set (`ids`, `mask` [A, P]), the index of the most
    similar other prompt: the one sharing the most tokens at its start and its end (a
    template's fixed parts, whatever sits between), among those of a different text; ties to
    the first; itself where every prompt has its text. What `distill.dependence_bar` moves
    an answer to. `chunk` prompts are compared at a time (0: as many as keep the comparison
    near 64 MiB: A x A x P bytes in all)."""
    a, p = ids.shape
    mask = mask.bool()
    lengths = mask.sum(1)
    # left-padded rows end together: compare from the end for the suffix, and shifted to
    # start together for the prefix (pad -1: never equal to a token)
    right = torch.where(mask, ids.long(), torch.full_like(ids.long(), -1))
    start = p - lengths
    cols = (torch.arange(p)[None] + start[:, None]).clamp(max=p - 1)
    left = torch.where(torch.arange(p)[None] < lengths[:, None], right.gather(1, cols), -1)
    out = torch.arange(a)
    chunk = chunk or max(1, 2**26 // max(a * p, 1))
    flipped = right.flip(1)
    for lo in range(0, a, chunk):
        hi = min(lo + chunk, a)
        pre = _common_run(left[lo:hi], left)
        suf = _common_run(flipped[lo:hi], flipped)
        both = torch.minimum(pre + suf, torch.minimum(lengths[lo:hi, None], lengths[None]))
        same = (pre == lengths[lo:hi, None]) & (lengths[lo:hi, None] == lengths[None])
        both = both.masked_fill(same, -1)
        best = both.max(1)
        out[lo:hi] = torch.where(best.values >= 0, best.indices, torch.arange(lo, hi))
    return out


def _common_run(rows: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """[c, A]: how many leading tokens each of `rows` [c, P] shares with each of `against`
    [A, P] (pad -1 never counts)."""
    eq = (rows[:, None] == against[None]) & (rows[:, None] >= 0)
    return eq.to(torch.uint8).cummin(-1).values.sum(-1)


# a teacher with fewer wins than this is neither judged by `dependence_bar` nor a reference;
# nor is one the student kept that many answers of in fewer earlier rounds than
# DEPENDENCE_ROUNDS (`steps.kept_before`): after one round an honest teacher's answers can
# still look independent of their prompts (the 5-client benchmark's look-alike families,
# docs/results.md stop 43)
MIN_DEPENDENCE_WINS = 8
DEPENDENCE_ROUNDS = 2


def dependence_bar(
    dependence: torch.Tensor, best: torch.Tensor, share: float, floor: float, able: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`distill.dependence_bar`: ([M] bool, the barred teachers; [M], each teacher's mean
    dependence over its wins, NaN where not judged). `dependence` [M, A]: per teacher and
    teacher-share prompt, how much likelier the student finds the teacher's answer to it
    after the prompt itself than after the most similar other prompt (`similar_prompts`;
    nats per token, from the student as it is before the round); `best` [A], the teacher
    whose answer selection kept (-1: none); `able` [M], who is judged and may be a reference
    (not barred already); a row of NaN, a teacher neither judged nor a reference (the student
    has not learned from it yet: `steps.kept_before`). A teacher is barred where its wins'
    mean is below `share` of the median of the other judged teachers' means, and that
    median is at least `floor`: the
    student has learned to tell prompts apart from its peers' answers but finds this
    teacher's answers no likelier after their own prompts than after others. What an answer
    moved from another prompt of the family looks like (the fluent, consistent and noisy
    liars, on families only they hold: no peer can check those). Not judged in a first round
    (the student has learned nothing: every teacher near 0, the median under `floor`), nor
    with fewer than MIN_DEPENDENCE_WINS wins; a wrong answer that depends on its prompt
    (a systematic error) passes."""
    m = dependence.shape[0]
    means = torch.full((m,), float("nan"))
    for i in range(m):
        won = best == i
        if bool(able[i]) and int(won.sum()) >= MIN_DEPENDENCE_WINS:
            means[i] = dependence[i, won].float().mean()  # NaN: a teacher not judged
    out = torch.zeros(m, dtype=torch.bool)
    for i in range(m):
        if torch.isnan(means[i]):
            continue
        others = torch.cat([means[:i], means[i + 1 :]])
        others = others[~torch.isnan(others)]
        if not others.numel():
            continue
        ref = float(others.quantile(0.5))  # an even count: the mean of the middle two
        out[i] = ref >= floor and float(means[i]) < share * ref
    return out, means


def lowest_pooled_share(counts: torch.Tensor, able: torch.Tensor, least: int = 1) -> torch.Tensor:
    """[M]: per teacher, the lowest share of its (pooled) wins any peer that may contest now
    and judged at least `least` of them contested (`contest_shares`; `contest_bar`'s
    evidence under 'all'); 0 with none."""
    s = contest_shares(counts, able, least)
    low = s.masked_fill(s < 0, float("inf")).min(0).values
    return torch.where(torch.isinf(low), torch.zeros_like(low), low)


def select_teacher_rollouts(
    teachings: list[dict[str, torch.Tensor]],
    prior: torch.Tensor,
    use_prompt: bool = True,
    cap: float = 1.0,
    rank: bool = False,
    invariance_share: float = 0.0,
    invariance_quantile: float = 0.75,
    joint_quantile: float = 1.0,
    low_ties: bool = False,
    contest_quantile: float = 1.0,
    contest_p: float = 0.05,
    can_contest: torch.Tensor | None = None,
    cannot_win: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per teacher-share prompt, keep the answer of the teacher with the highest joint
    log-likelihood log pi_i + log p_i(x) + log p_i(y_i | x): the teacher that knows the
    prompt's domain and is sure of its answer (the mixture's most likely component).
    `rank`: compare the teachers by the quantile of that claim among their own claims
    (`claim_quantiles`) instead: a teacher's claims cannot outbid the others', only say
    where it is surest. `cap` < 1: no teacher's answers are kept for more than that share
    of the prompts. `invariance_share` > 0: answers `invariant_answers` flags cannot win,
    and under `rank` their teacher is ranked again among its other answers (`rank_in_play`);
    where every teacher's answer to a prompt is flagged, `invariant` marks it (left out).
    `joint_quantile` < 1 (under `rank`, without a `cap`): where teachers rank a prompt above
    that quantile of their own claims, they compete on it by their joint claims
    (`selection: joint` among the sure), the rest by rank; `by_claim` marks the prompts
    where that changed the winner (`distill.joint_quantile`, docs/algorithm.md). `low_ties`:
    under `rank`, tied claims rank at their lowest (`distill.tie_rank`). `contest_quantile`
    < 1 (under `rank`): `contests` [M, A] marks the teachers (of `can_contest` [M], default
    all) that contest each kept answer (`contests`, `distill.contest_quantile`); a teacher
    whose own answer the invariance check ruled out does not. `cannot_win` [M] (default:
    none): teachers whose answers are out of the contest for every prompt (a barred
    teacher's, under `distill.barred_wins` 'next'); they still contest."""
    width = max(t["own_response_ids"].shape[1] for t in teachings)
    ids = torch.stack(
        [right_pad(t["own_response_ids"].long(), width, 0) for t in teachings]
    )  # [M,A,T]
    mask = torch.stack([right_pad(t["own_response_mask"].long(), width, 0) for t in teachings])
    sup = torch.stack([right_pad(t["own_support_ids"].long(), width, 0) for t in teachings])
    logp = torch.stack([right_pad(t["own_logp"].float(), width, 0.0) for t in teachings])
    answer = torch.stack([answer_claims(t) for t in teachings])  # [M, A]
    raw = torch.stack([selection_claims(t, use_prompt) for t in teachings])  # [M, A]
    # what joint selection compares, and under rank the sure among themselves
    claims = raw + torch.log(prior)[:, None]
    low_ties = low_ties and rank  # rank selection's rule: the invariance check under joint
    quantiles = [own_quantiles(t, use_prompt, low_ties) for t in teachings]  # keeps mean ties
    joint = torch.stack(quantiles) if rank else claims
    flagged = torch.zeros(joint.shape, dtype=torch.bool)
    if invariance_share > 0:
        flagged = invariant_answers(ids, mask, torch.stack(quantiles), invariance_share,
                                    invariance_quantile)  # fmt: skip
        if rank and bool(flagged.any()):
            fixed = ["own_quantile" in t for t in teachings]
            joint = rank_in_play(joint, raw, flagged, fixed, low_ties)
    out = flagged
    if cannot_win is not None:
        out = flagged | cannot_win.bool()[:, None]
    best = cap_selection(joint, cap).masked_fill(out, float("-inf")).argmax(0)  # [A]
    by_claim = torch.zeros(best.shape, dtype=torch.bool)
    if rank and cap >= 1.0 and joint_quantile < 1.0:
        sure = (joint > joint_quantile) & ~out  # [M, A]
        among = claims.masked_fill(~sure, float("-inf")).argmax(0)
        chosen = torch.where(sure.any(0), among, best)
        by_claim = chosen != best
        best = chosen
    idx = torch.arange(best.shape[0])
    length = mask[best, idx].sum(-1).clamp(min=1)
    contested = torch.zeros(joint.shape, dtype=torch.bool)
    judges = torch.zeros(joint.shape, dtype=torch.bool)
    if rank and contest_quantile < 1.0:
        able = ~flagged
        if can_contest is not None:
            able &= can_contest.bool()[:, None]
        contested = contests(ids, mask, sup, logp, joint, best, able, contest_quantile,
                             contest_p)  # ranks among the answers in play  # fmt: skip
        judges = could_contest(joint, best, able, contest_quantile)
    return {
        # under rank selection, the kept answer's quantile among its teacher's claims
        "quantile": joint[best, idx] if rank else torch.full_like(answer[0], float("nan")),
        # the kept answer's claimed mean per-token log-probability (`min_claim`)
        "claim": answer[best, idx] / length,
        "response_ids": ids[best, idx],
        "response_mask": mask[best, idx],
        "support_ids": sup[best, idx],
        "teacher_logp": logp[best, idx],
        "teacher_index": best,
        # invariance check: [M, A] the answers it ruled out; [A] prompts with none left
        "flagged": flagged,
        "invariant": flagged[best, idx],
        "by_claim": by_claim,
        # [M, A] who contested each kept answer (`contests`); a contested prompt is left out
        "contests": contested,
        # [M, A] who could have contested it (`distill.contest_bar_over` 'judged')
        "judges": judges,
    }


# select_teacher_rollouts' fields per teacher and prompt ([M, A]); the rest are per prompt
PER_TEACHER = ("flagged", "contests", "judges")


def _where_prompts(at: torch.Tensor, new: dict, old: dict) -> dict[str, torch.Tensor]:
    """Two selections merged: `new`'s fields where `at` [A], else `old`'s."""
    out = {}
    for k, v in old.items():
        mask = at[None] if k in PER_TEACHER else at.view(-1, *([1] * (v.dim() - 1)))
        out[k] = torch.where(mask, new[k], v)
    return out


def claim_floor(claims: torch.Tensor, min_claim: float, max_rejected: float) -> float:
    """The log-probability floor of `min_claim` for kept answers' claims [A] (mean per-token
    log p): log(min_claim), lowered where needed so that no more than `max_rejected` of the
    answers fall strictly below it (a federation whose teachers are unsure everywhere still
    learns from their surer answers; a liar claiming p = 1 can only raise the quantile)."""
    floor = math.log(min_claim)
    if max_rejected < 1.0 and claims.numel():
        q = torch.quantile(claims.float(), max_rejected, interpolation="lower")
        floor = min(floor, float(q))
    return floor


# a teacher whose claims agree with its own support at fewer of its answer positions than
# this is quarantined (`coherence`, `quarantine`); an honest one agrees at every position
MIN_COHERENCE = 0.9


def coherence(teaching: dict[str, torch.Tensor]) -> float:
    """The share of a teacher's own answer positions whose claimed log-probs agree with its
    support. Columns 1.. of `own_support_ids` are its top-k other tokens in descending order
    (the TeachingMessage spec), so their log-probs in `own_logp` never increase: an honest
    teacher, whose ids and log-probs come from one softmax, scores 1 exactly; a broken one
    (random scores) agrees at a position by chance only (1/k! for k others). 1 where nothing
    can be checked (fewer than two others: another tokenizer's sampled-token support; no
    answers). A liar can keep its claims in order, so this catches broken teachers, not
    lying ones (rank selection and `min_claim` are for those)."""
    logp, mask = teaching["own_logp"], teaching["own_response_mask"].bool()
    if logp.dim() != 3 or logp.shape[-1] < 3 or not bool(mask.any()):
        return 1.0
    others = logp[..., 1:].float()
    ordered = (others[..., :-1] >= others[..., 1:]).all(-1)  # [M, T']
    return float(ordered[mask].float().mean())


# a quarantined teacher's answer token gets this probability; the rest of the mass is spread
# evenly over its other support tokens and the rest of the vocabulary (label smoothing)
QUARANTINE_P = 0.9


def quarantine(teaching: dict[str, torch.Tensor], quantile: float) -> dict[str, torch.Tensor]:
    """What counts of the message of a teacher whose claims contradict its own support
    (`coherence` < MIN_COHERENCE): its answers, as smoothed hard labels (QUARANTINE_P on
    each answer token, the rest spread evenly over its k other support tokens and the rest
    of the vocabulary: a finite target for the reverse KL, which a one-hot target would make
    infinite off the answer) with one constant claim for all (`own_claim`, probability 1:
    `min_claim` keeps them) and one constant place under rank selection (`own_quantile`,
    `distill.quarantine_quantile`): on every prompt they rank at that quantile, and never
    beat a teacher on the prompts it is surer of; its log-probs, claims and scores are
    dropped (`assemble_batch` leaves it out of the mixture that scores the student's
    rollouts). At worst a broken teacher is then a liar claiming to be sure everywhere,
    which the defence bounds. One constant per answer: a sum of the smoothed log-probs
    would rank its short answers above its long ones (log QUARANTINE_P per token), whatever
    their worth."""
    mask = teaching["own_response_mask"].bool()
    k = teaching["own_logp"].shape[-1] - 1
    smooth = torch.full_like(teaching["own_logp"].float(), math.log((1 - QUARANTINE_P) / (k + 1)))
    smooth[..., 0] = math.log(QUARANTINE_P) if k else 0.0
    return {
        **teaching,
        "own_logp": smooth * mask[..., None],
        "own_prompt_logp": torch.zeros_like(teaching["own_prompt_logp"].float()),
        "own_claim": torch.zeros(mask.shape[0]),
        "own_quantile": torch.full((mask.shape[0],), float(quantile)),
    }


def replay_rows(
    rounds: list[tuple[torch.Tensor, int]], share: float, seed: int
) -> list[torch.Tensor]:
    """Which answers of an absent teacher to replay. `rounds`: per round it took part in,
    oldest first, that round's `ask_choice` [A] and the teacher's index in it; its answers
    are the prompts whose choice is its index. Draws round(share * n_last) of them, n_last
    being how many it had kept in its latest round, at random from all its rounds' answers:
    its families get the volume of a round it took part in (times `share`), from every
    prompt it answered, not more. Returns the rows to take per round (sorted)."""
    kept = [(choice.long() == index).nonzero()[:, 0] for choice, index in rounds]
    if not kept:
        return []
    pool = torch.cat([torch.stack([torch.full_like(r, i), r], 1) for i, r in enumerate(kept)])
    g = torch.Generator().manual_seed(seed)
    n = round(share * kept[-1].numel())
    take = pool[torch.randperm(pool.shape[0], generator=g)[:n]]
    return [take[take[:, 0] == i, 1].sort().values for i in range(len(kept))]


# how many of an absent teacher's earlier prompts stand in for a new one (`imputed_quantile`)
DOMAIN_NEIGHBOURS = 8
# `ask_choice` of a prompt left out for a reason other than `min_claim` (-1): reserved for
# an absent teacher (`imputed_quantile`, `unknown_domain`), every answer ruled out by the
# invariance check, won by a barred teacher, or contested (`contests`). For the present
# teachers it is a prompt they lost (`lost_prompts`), deliberately: where an absent
# teacher's domain was imputed, it is not theirs. (Not `teacher_index`'s -2, a stale row, in another tensor.)
LEFT_OUT = -2


def lost_prompts(choice: torch.Tensor, index: int) -> torch.Tensor:
    """The prompts of a round (its `ask_choice` [A]) that the teacher at `index` lost: won by
    another teacher, or left out (`LEFT_OUT`: its answer ruled out or barred, or the prompt
    kept for a teacher absent then). [A] bool. Not lost: its own, and those no teacher
    claimed well enough (`min_claim`, -1). What `imputed_quantile` reads as not its domain:
    a look-alike family it claims high but loses, a backdoor's family, a round it was
    barred."""
    choice = choice.long()
    return ((choice >= 0) & (choice != index)) | (choice == LEFT_OUT)


class _Bags:
    """Token-id bags of prompt sets [(ids [N, P], mask [N, P])], rows L2-normalised, columns
    the ids that occur in any of them: `bag(i)` [N_i, U], one set at a time (a federation's
    history holds many rounds of prompts). Plain counts, no idf: a domain is what its
    prompts share (the template of a task), and idf would weigh up the rare tokens, the
    varying part (a country's name in the prompts of two families)."""

    def __init__(self, prompts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.prompts = prompts
        self.vocab = torch.unique(torch.cat([i.long()[m.bool()] for i, m in prompts]))

    def bag(self, k: int) -> torch.Tensor:
        ids, mask = self.prompts[k]
        col = torch.searchsorted(self.vocab, ids.long()).clamp(max=self.vocab.numel() - 1)
        counts = torch.zeros(ids.shape[0], self.vocab.numel()).scatter_add_(1, col, mask.float())
        return F.normalize(counts, dim=1)


def imputed_quantile(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    past: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    k: int = DOMAIN_NEIGHBOURS,
) -> torch.Tensor:
    """What an absent teacher would have claimed for this round's teacher-share prompts
    [A, P], as a quantile among its own claims (`claim_quantiles`): the mean of its
    quantiles on the k earlier prompts nearest to each (cosine of token-count bags, in the
    student's token space). `past`: per round it took part in, that round's ask prompt ids
    [A', P'], mask, its claims' quantiles there [A'] and which of those prompts it lost
    [A'] (bool, `lost_prompts`). A teacher's quantiles are uniform in every round by
    construction, so those of different rounds compare, as rank selection compares
    teachers: where the imputed quantile beats the present winner's, rank selection would
    have kept the absent teacher's answer had it been there (`assemble_batch`, `rivals`). A
    prompt it lost counts 0: it claimed it, did not win it, and would not win its
    neighbours now either. [A]; zeros without a past."""
    a = prompt_ids.shape[0]
    past = [x for x in past if x[0].shape[0]]
    if not a or not past:
        return torch.zeros(a)
    bags = _Bags([(prompt_ids, prompt_mask), *((i, m) for i, m, _, _ in past)])
    new = bags.bag(0)
    sims, qs = [], []
    for r, (_, _, q, lost) in enumerate(past, start=1):
        if lost.shape != q.shape:
            raise ValueError(
                f"imputed_quantile: lost {tuple(lost.shape)} != quantiles {tuple(q.shape)}"
            )
        sim = new @ bags.bag(r).T  # [A, A']
        top = sim.topk(min(k, sim.shape[1]), dim=1)
        sims.append(top.values)
        qs.append(q.float().masked_fill(lost.bool(), 0.0)[top.indices])
    sims, qs = torch.cat(sims, 1), torch.cat(qs, 1)  # the nearest of every round
    near = sims.topk(min(k, sims.shape[1]), dim=1).indices
    return qs.gather(1, near).mean(1)


def unknown_domain(quantile: torch.Tensor, free: torch.Tensor, share: float) -> torch.Tensor:
    """The prompts [A] (bool) to reserve for absent clients the server has never heard from
    (no answers to replay, no past to impute a domain from, `imputed_quantile`): their
    domain is unknown, its size is taken as theirs of the clients (`share`, an equal split;
    not tuned). They are the round(share * A) prompts, among those still `free` (not
    reserved for an absent teacher with a past), whose rank winner ranks them lowest among
    its own claims (`quantile` [A]): where a present teacher knows the prompt, it is among
    its surest, and guesses at an absent expert's family rank low (in the 3-client
    drop-out runs of stop 32, round 1 without bob, this catches 225-256 of bob's 225-284
    prompts; in the 5-client runs, round 1 without the unsampled client, 105-153 of
    105-209). Left out, not learnt wrong: the cost is a round's fewer answers."""
    n = min(round(share * quantile.numel()), int(free.sum()))
    out = torch.zeros(quantile.numel(), dtype=torch.bool)
    if n > 0:
        # stable: ties (rank quantiles are k / A) go to the earlier prompt on every device
        out[quantile.float().masked_fill(~free, float("inf")).argsort(stable=True)[:n]] = True
    return out


def stale_part(
    rollouts: dict[str, torch.Tensor], teaching: dict[str, torch.Tensor], rows: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Answers `rows` of a teacher that an earlier round kept (`replay_rows`), from that
    round's rollouts and the teacher's message: a part for `assemble_batch(extra=...)`
    (teacher_index -2: stale)."""
    take = rows.long()
    return {
        "prompt_ids": rollouts["ask_prompt_ids"].long()[take],
        "prompt_mask": rollouts["ask_prompt_mask"].long()[take],
        "response_ids": teaching["own_response_ids"].long()[take],
        "response_mask": teaching["own_response_mask"].long()[take],
        "support_ids": teaching["own_support_ids"].long()[take],
        "teacher_logp": teaching["own_logp"].float()[take],
        "from_teacher": torch.ones(take.numel(), dtype=torch.bool),
        "teacher_index": torch.full((take.numel(),), -2, dtype=torch.long),
    }


def row_keys(ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, ...]]:
    """Each row's tokens under its mask [N, T] -> N hashable keys: equal keys, equal
    sequences (left or right padding ignored)."""
    return [tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask, strict=True)]


def repeated_prompts(ask_ids: torch.Tensor, ask_mask: torch.Tensor) -> list[list[int]]:
    """The prompts asked more than once in a round: groups of row indices of equal prompts."""
    groups: dict[tuple, list[int]] = {}
    for a, k in enumerate(row_keys(ask_ids, ask_mask)):
        groups.setdefault(k, []).append(a)
    return [g for g in groups.values() if len(g) > 1]


def group_claim_sums(teaching: dict[str, torch.Tensor], groups: list[list[int]]) -> torch.Tensor:
    """Per group of equal prompts (`repeated_prompts`), the log of the sum of the
    probabilities the teacher claims (`answer_claims`) for its distinct answers there, each
    answer once: [G] float64, -inf where it gave one answer (nothing to add up)."""
    answers = row_keys(teaching["own_response_ids"], teaching["own_response_mask"])
    claim = answer_claims(teaching).double()
    out = torch.full((len(groups),), float("-inf"), dtype=torch.float64)
    for j, g in enumerate(groups):
        distinct: dict[tuple, torch.Tensor] = {}
        for a in g:
            distinct.setdefault(answers[a], claim[a])
        if len(distinct) > 1:
            out[j] = torch.logsumexp(torch.stack(list(distinct.values())), 0)
    return out


def claim_sums(
    teachings: list[dict[str, torch.Tensor]], ask_ids: torch.Tensor, ask_mask: torch.Tensor
) -> torch.Tensor:
    """Claims that add up (`distill.max_claim_sum`). Per teacher, over the prompts asked
    more than once in the round (`repeated_prompts`), the largest sum of the probabilities
    it claims for its distinct answers to one prompt (`group_claim_sums`), as a log: [M]
    (-inf where no prompt comes twice with two different answers). A teacher's answers to
    one prompt are outcomes of one generation (each stops at EOS or at the length limit,
    so no two distinct ones overlap), and an honest teacher's claims, log p(y | x) as the
    sum of its answer tokens' log-probs, sum to at most 1 (log <= 0) over them; a liar
    certain of two different answers to one prompt claims 2."""
    groups = repeated_prompts(ask_ids, ask_mask)
    out = torch.full((len(teachings),), float("-inf"), dtype=torch.float64)
    for i, t in enumerate(teachings):
        if groups:
            out[i] = group_claim_sums(t, groups).max()
    return out


def overclaiming_teachers(sums: torch.Tensor, limit: float) -> torch.Tensor:
    """[M] bool: the teachers whose claims on some prompt sum above `limit` (`claim_sums`;
    limit 0: the check is off, nobody)."""
    if limit <= 0:
        return torch.zeros(sums.shape[0], dtype=torch.bool)
    return sums > math.log(limit)


def distinct_prompts(texts: list[str]) -> list[list[int]]:
    """The distinct prompts of a round for `prompt_claim_sums`, as groups of the row indices
    of each one's copies (`texts`: the prompts as the student formats them). Left out: a
    prompt whose core (its text without the suffix every prompt of the round shares, which
    holds the format's end) is a prefix of another's, since "x1 then more" and "x2" overlap
    where x1 begins x2 (under any party's format: a teacher's formatted x1 can begin its
    formatted x2 only where the core of x1 begins the core of x2)."""
    copies: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        copies.setdefault(t, []).append(i)
    keys = sorted(copies)
    if len(keys) < 2:
        return list(copies.values())
    tail = len(_common_suffix(keys))
    core = [k[: len(k) - tail] for k in keys]
    # sorted, a core that begins another begins the one right after it
    order = sorted(range(len(keys)), key=core.__getitem__)
    out = []
    for j, a in enumerate(order):
        nxt = core[order[j + 1]] if j + 1 < len(order) else None
        if nxt is None or not nxt.startswith(core[a]):
            out.append(copies[keys[a]])
    return out


def _common_suffix(texts: list[str]) -> str:
    rev = [t[::-1] for t in texts]  # the common prefix of the set is that of min and max
    lo, hi = min(rev), max(rev)
    n = 0
    while n < min(len(lo), len(hi)) and lo[n] == hi[n]:
        n += 1
    return lo[:n][::-1]


def prompt_claim_sums(
    teachings: list[dict[str, torch.Tensor]], groups: list[list[int]]
) -> torch.Tensor:
    """Prompt claims that add up (`distill.max_prompt_claim_sum`). Per teacher, the log of
    the sum over a round's distinct prompts (`distinct_prompts`, whose row indices run over
    the rollouts' prompts then the teacher-share prompts) of the probability it claims for
    each, log p(x): [M] float64 (the largest claim where a prompt comes twice). log p(x)
    leaves the prompt's first token out (`generation._prompt_logp`), and every party's
    prompt format begins with the same text (the Q/A format's "Q:", a chat template's
    start), so each claim is the probability of a continuation of the same first token; no
    distinct prompt begins another, so those continuations are disjoint and an honest
    teacher's claims sum to at most 1. A teacher that claims p(x) = 1 for every prompt, to
    win the mixture's weight and the selection wherever it likes, claims one per prompt."""
    out = torch.full((len(teachings),), float("-inf"), dtype=torch.float64)
    if not groups:
        return out
    for i, t in enumerate(teachings):
        claims = torch.cat([t["prompt_logp"], t["own_prompt_logp"]]).double()
        per = torch.stack([claims[g].max() for g in groups])
        out[i] = torch.logsumexp(per, 0)
    return out


PLAUSIBILITY_QUANTILE = 0.9  # a teacher is judged by its likelier answers: the top tenth


def implausible_teachers(
    lm_scores: torch.Tensor, vocab_size: int, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Peer review by the student's round-0 LM (`distill.plausibility_margin`). `lm_scores`
    [M, A]: the judge's mean per-token log q0(y | x) of each teacher's answer to each
    teacher-share prompt. Returns (barred [M] bool, score [M]): score_i is the 90th
    percentile of teacher i's answers' scores minus log(1 / vocab_size), in nats per token:
    how much likelier than a uniformly random token the judge finds even the teacher's
    likelier answers. A teacher with score_i < -margin is barred for the round.

    Why a random token is the yardstick: for answers of uniformly random tokens, E log q0(y)
    = log(1/V) - KL(U || q0) < log(1/V) (Jensen), lower the more the judge has learnt of the
    language; honest answers, right or wrong, are language and score above it. The yardstick
    reads no other teacher, so any number of colluders (half of a round's teachers, or all
    but one) is judged alike. The 90th percentile, not the median: an honest teacher's
    guesses on families it never held can be garbage for a round (a median 4 nats below
    uniform was seen), but a tenth of its answers (its own families) stays fluent. A judge
    that knows nothing (an untrained model) scores every answer near log(1/V): nobody is
    barred. Margin 0 (off) or no answers: nobody."""
    m = lm_scores.shape[0]
    if lm_scores.shape[1] == 0:
        return torch.zeros(m, dtype=torch.bool), torch.zeros(m)
    if not torch.isfinite(lm_scores).all():
        raise ValueError("plausibility: the student's scores of the answers are not finite")
    top = torch.quantile(lm_scores.float(), PLAUSIBILITY_QUANTILE, dim=1)
    score = top + math.log(vocab_size)
    barred = (score < -margin) if margin > 0 else torch.zeros(m, dtype=torch.bool)
    return barred, score


def assemble_batch(
    rollouts: dict[str, torch.Tensor],
    teachings: list[dict[str, torch.Tensor]],
    weights: torch.Tensor,
    d: DistillConfig,
    extra: list[dict[str, torch.Tensor]] = (),
    trusted: list[bool] | None = None,
    rivals: torch.Tensor | None = None,
    barred: list[bool] | None = None,
    unknown_share: float = 0.0,
    foreign: list[bool] | None = None,
    contest_earlier: torch.Tensor | None = None,
    dependence: torch.Tensor | None = None,
    barred_share: float = 0.0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The student's training batch: its rollouts scored by the aggregated teachers, then
    the selected teacher rollouts (`from_teacher`). `d` is the config's distill section:
    its aggregation, trim, posterior_weights and cap (capped_mixture: each teacher's mean
    mixture weight, and its share of the selected answers, at most `cap`). Returns (batch,
    info), info holding what selection did: `teacher_index` [N], whose answer each row is
    (-1: the student's own rollout, -2: a stale one from `extra`; `selection_stats`);
    `n_rejected`, the teacher-share prompts left out for `min_claim`; `n_invariant`, those
    left out because the invariance check ruled out every answer (`distill.invariance_share`,
    `invariant_answers`), and `flagged` [M], the share of each teacher's answers it ruled
    out; `ask_choice` [A], whose answer was kept per teacher-share prompt (-1: none, for
    `min_claim`; `LEFT_OUT`: none, for the reserved, invariant or implausible), what a later
    round's `stale_part` and `lost_prompts` read. `trusted` [M] (default: all): False for
    a quarantined teacher (`quarantine`), whose scores are left out of the mixture; where no
    teacher is trusted, the student's rollouts have no scores and are left out. `rivals`
    [A]: the highest quantile an absent teacher would have claimed per prompt
    (`imputed_quantile`); under rank selection a prompt whose kept answer's quantile it
    beats is left out (`n_reserved`): that teacher's replayed answers (`extra`) teach its
    domain, not the present teachers' guesses. `unknown_share`: the share of the clients
    absent with no past to impute from (`unknown_domain`): under rank selection that share
    of the prompts, those whose kept answer's quantile is lowest, is reserved too.
    `barred` [M] (default: none): teachers barred for the round, implausible to the student's
    LM (`implausible_teachers`) or overclaiming (`claim_sums`): their scores leave the
    mixture as a quarantined teacher's do, and a prompt they would win leaves the batch
    (`n_implausible`) rather than going to the next teacher's guess. `foreign` [M]
    (default: none): teachers whose messages came across tokenizers (`teach_across`: a
    support of the sampled token alone, its log-probs spread over a segment's tokens), which
    cannot contest (`contests` reads a support's tail mass as a bound). `contest_earlier`
    [2, M, M] (default: none): earlier rounds' `contest_counts` for these teachers, pooled
    into `contest_bar`'s evidence (`distill.contest_bar_rounds`); info's `contest_evidence`
    is this round's counts, `contest_pooled` [M] each teacher's `lowest_pooled_share`.
    `dependence` [M, A] (default: none): the student's dependence of each teacher's answers
    on their prompts (`dependence_bar`, `distill.dependence_bar`), judged on the wins of the
    selection without the bars; info's `dependence_barred` [M] and `dependence` [M], each
    teacher's mean over its wins (NaN where not judged). `barred_share` (default 0): what
    each teacher barred for the round by any bar (`barred`, `contest_bar`, `dependence_bar`)
    adds to `unknown_share`, counted as an absent client with no past
    (`distill.barred_as_absent`: 1 / the number of clients)."""
    method, trim, posterior = d.aggregation, d.trim, d.posterior_weights
    cap = d.cap
    trusted = [True] * len(teachings) if trusted is None else list(trusted)
    barred_t = torch.zeros(len(teachings), dtype=torch.bool)
    if barred is not None:
        barred_t = torch.tensor([bool(b) for b in barred], dtype=torch.bool)
    home = ~torch.tensor(foreign or [False] * len(teachings), dtype=torch.bool)

    can_contest = torch.tensor(trusted, dtype=torch.bool) & ~barred_t & home

    def select(prior: torch.Tensor, cannot_win=None) -> dict[str, torch.Tensor]:
        return select_teacher_rollouts(
            teachings, prior, use_prompt=posterior,
            cap=cap if method == "capped_mixture" else 1.0, rank=d.selection == "rank",
            invariance_share=d.invariance_share, invariance_quantile=d.invariance_quantile,
            joint_quantile=d.joint_quantile,
            low_ties=d.tie_rank == "low",
            contest_quantile=d.contest_quantile, contest_p=d.contest_p,
            can_contest=can_contest, cannot_win=cannot_win,
        )  # fmt: skip

    # contested by two peers: barred for the round before its scores count (`contest_bar`;
    # the selection's prior without the capped mixture's handicap, not known yet)
    contest_barred = torch.zeros(len(teachings), dtype=torch.bool)
    evidence = torch.zeros(2, len(teachings), len(teachings), dtype=torch.long)
    pooled_share = torch.zeros(len(teachings))
    first = None
    if d.contest_bar_on and rollouts["ask_prompt_ids"].shape[0]:
        first = select(weights / weights.sum())
        judged = d.contest_bar_over != "wins"
        evidence = contest_counts(first["contests"], first["teacher_index"], can_contest,
                                  first["judges"] if judged else None)  # fmt: skip
        contest_barred = contest_bar(evidence, d.contest_bar, can_contest, d.contest_bar_peers,
                                     earlier=contest_earlier,
                                     abstain=d.contest_bar_over == "judged",
                                     least=d.contest_min_judged)  # fmt: skip
        if contest_earlier is not None:
            pooled_share = lowest_pooled_share(evidence + contest_earlier, can_contest,
                                               d.contest_min_judged)  # fmt: skip
        barred_t = barred_t | contest_barred
    # answers no likelier after their own prompts than after similar ones: barred for the
    # round (`dependence_bar`), judged on the same first selection's wins
    dependence_barred = torch.zeros(len(teachings), dtype=torch.bool)
    dependence_means = torch.full((len(teachings),), float("nan"))
    if dependence is not None and d.dependence_bar > 0 and rollouts["ask_prompt_ids"].shape[0]:
        if first is None:
            first = select(weights / weights.sum())
        dependence_barred, dependence_means = dependence_bar(
            dependence, first["teacher_index"], d.dependence_bar, d.dependence_min, ~barred_t
        )
        barred_t = barred_t | dependence_barred
    if barred_share > 0:  # each barred teacher as an absent client with no past
        unknown_share = unknown_share + barred_share * int(barred_t.sum())
    scorers = [i for i, ok in enumerate(trusted) if ok and not barred_t[i]]
    delta = torch.zeros(len(teachings))
    n = rollouts["prompt_ids"].shape[0] if scorers else 0
    sup = rollouts["support_ids"].long()
    scores = torch.zeros(0, *sup.shape[1:])
    if scorers:
        stacked = torch.stack([teachings[i]["scores"].float() for i in scorers])  # [M', N, T, S]
        w = weights[scorers]
        log_w = None
        if posterior and method in ("mixture", "capped_mixture"):
            log_w = posterior_log_weights(
                w / w.sum(),
                torch.stack([teachings[i]["prompt_logp"].float() for i in scorers]),
                stacked[..., 0],
                rollouts["response_mask"].float(),
            )
            if method == "capped_mixture":
                log_w, d_sub = cap_log_weights(log_w, rollouts["response_mask"].float(), cap)
                delta[scorers] = d_sub
        agg = "mixture" if method == "capped_mixture" else method
        scores = aggregate_teachers(stacked, w, agg, trim, log_weights=log_w)
    parts = [
        {
            "prompt_ids": rollouts["prompt_ids"].long()[:n],
            "prompt_mask": rollouts["prompt_mask"].long()[:n],
            "response_ids": rollouts["response_ids"].long()[:n],
            "response_mask": rollouts["response_mask"].long()[:n],
            "support_ids": sup[:n],
            "teacher_logp": scores,
            "from_teacher": torch.zeros(n, dtype=torch.bool),
            "teacher_index": torch.full((n,), -1, dtype=torch.long),
        }
    ]
    a = rollouts["ask_prompt_ids"].shape[0]
    rejected, n_reserved, ask_choice = 0, 0, torch.zeros(0, dtype=torch.long)
    n_invariant, n_implausible, flagged = 0, 0, torch.zeros(len(teachings))
    n_by_claim, n_contested, contesting = 0, 0, torch.zeros(len(teachings))
    if a:
        # a capped teacher's answers are selected with the same handicap, and (capped
        # mixture) no teacher supplies more than `cap` of the answers, also when the student
        # has no rollouts of its own to measure the mixture weights on (alpha = 1)
        prior = weights / weights.sum() * torch.exp(-delta)
        sel = select(prior)
        if d.barred_wins == "next" and bool(barred_t.any()) and not bool(barred_t.all()):
            # a barred teacher's would-be wins go to the teacher that wins without it
            # (distill.barred_wins); every other prompt keeps its selection, contests included
            alt = select(prior, cannot_win=barred_t)
            moved = barred_t[sel["teacher_index"]]
            sel = _where_prompts(moved, alt, sel)
        flagged = sel["flagged"].float().mean(1)  # [M] share of each teacher's answers
        free = torch.ones(a, dtype=torch.bool)
        if d.selection == "rank":  # left out for absent teachers (`n_reserved`)
            if rivals is not None:  # one with a past would have won
                free = ~(rivals.float() > sel["quantile"])
            if unknown_share > 0:  # ones with no past: their share, where the present are unsure
                free &= ~unknown_domain(sel["quantile"], free, unknown_share)
        out = free & sel["invariant"]  # every answer to it ruled out by the invariance check
        # won by a teacher the student's LM found implausible: left out, not re-assigned
        implausible = free & ~out & barred_t[sel["teacher_index"]]
        # a teacher sure of the prompt finds the kept answer unlikely: left out (`contests`;
        # with `contest_leave_out` off the contests are only the bar's evidence)
        disputed = free & ~out & ~implausible & sel["contests"].any(0)
        contesting = (sel["contests"] & disputed[None]).float().mean(1)  # [M], shown either way
        contested = disputed & d.contest_leave_out
        judged = free & ~out & ~implausible & ~contested  # what min_claim judges
        keep = judged.clone()
        # no teacher present knows the prompt well enough to claim `min_claim`: learn nothing
        if d.min_claim > 0 and bool(keep.any()):
            floor = claim_floor(sel["claim"][keep], d.min_claim, d.max_rejected)
            keep &= sel["claim"] >= floor
        rejected = int((judged & ~keep).sum())
        n_reserved, n_invariant, n_implausible, n_contested = (
            int((~free).sum()),
            int(out.sum()),
            int(implausible.sum()),
            int(contested.sum()),
        )
        n_by_claim = int((keep & sel["by_claim"]).sum())
        ask_choice = torch.where(
            keep,
            sel["teacher_index"],
            torch.where(judged, -1, LEFT_OUT),
        )
        parts.append(
            {
                "prompt_ids": rollouts["ask_prompt_ids"].long()[keep],
                "prompt_mask": rollouts["ask_prompt_mask"].long()[keep],
                "response_ids": sel["response_ids"][keep],
                "response_mask": sel["response_mask"][keep],
                "support_ids": sel["support_ids"][keep],
                "teacher_logp": sel["teacher_logp"][keep],
                "from_teacher": torch.ones(int(keep.sum()), dtype=torch.bool),
                "teacher_index": sel["teacher_index"][keep],
            }
        )
    parts += [p for p in extra if p["prompt_ids"].shape[0]]
    wp = max(p["prompt_ids"].shape[1] for p in parts)
    wt = max(p["response_ids"].shape[1] for p in parts)
    s = max(p["support_ids"].shape[2] for p in parts)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in parts[0]}
    for p in parts:
        out["prompt_ids"].append(left_pad(p["prompt_ids"], wp, 0))
        out["prompt_mask"].append(left_pad(p["prompt_mask"], wp, 0))
        out["response_ids"].append(right_pad(p["response_ids"], wt, 0))
        out["response_mask"].append(right_pad(p["response_mask"], wt, 0))
        # supports of different widths: pad with -1 (invalid, masked in the KL)
        sup = F.pad(p["support_ids"], (0, s - p["support_ids"].shape[2]), value=-1)
        out["support_ids"].append(right_pad(sup, wt, 0))
        tl = F.pad(p["teacher_logp"], (0, s - p["teacher_logp"].shape[2]), value=-1e4)
        out["teacher_logp"].append(right_pad(tl, wt, 0.0))
        out["from_teacher"].append(p["from_teacher"])
        out["teacher_index"].append(p["teacher_index"])
    batch = {k: torch.cat(v) for k, v in out.items()}
    info = {
        "teacher_index": batch.pop("teacher_index"),
        "n_rejected": torch.tensor(rejected),
        "n_reserved": torch.tensor(n_reserved),
        "n_invariant": torch.tensor(n_invariant),
        "n_implausible": torch.tensor(n_implausible),
        "n_by_claim": torch.tensor(n_by_claim),
        "n_contested": torch.tensor(n_contested),
        "contest_barred": contest_barred,
        "contest_evidence": evidence,
        "contest_pooled": pooled_share,
        "dependence_barred": dependence_barred,
        "dependence": dependence_means,
        "contesting": contesting,
        "flagged": flagged,
        "ask_choice": ask_choice,
    }
    return batch, info


def selection_stats(
    teacher_index: torch.Tensor,
    teachings: list[dict[str, torch.Tensor]],
    ids: list[str],
    n_rejected: int = 0,
    coherent: list[float] | None = None,
    n_reserved: int = 0,
    n_invariant: int = 0,
    flagged: list[float] | None = None,
    n_implausible: int = 0,
    gaps: list[float] | None = None,
    barred: list[bool] | None = None,
    n_by_claim: int = 0,
    n_contested: int = 0,
    contesting: list[float] | None = None,
    contest_barred: list[bool] | None = None,
    sums: list[float] | None = None,
    overclaimed: list[bool] | None = None,
    prompt_sums: list[float] | None = None,
    prompt_overclaimed: list[bool] | None = None,
    dependence: list[float] | None = None,
    dependence_barred: list[bool] | None = None,
) -> dict[str, float]:
    """What the selection did, per teacher (MLflow, `flminillm lineage`): `selected.<id>`,
    the share of the teacher-share prompts whose kept answer is its; `certain.<id>`, the
    share of its answers for which it claimed p(y | x) >= 0.99 (a teacher certain of
    everything is either perfect or lying: rank selection gives such claims no weight);
    `rejected`, the share of them left out (`min_claim`): shares are of all teacher-share
    prompts, kept or not; `reserved`, the share left out for absent teachers: to their
    replayed answers (`imputed_quantile`), or, for those with no past, to nobody
    (`unknown_domain`); `stale_rows`, the answers replayed from absent teachers;
    `coherent.<id>` (given `coherent`), the `coherence` of its claims: below MIN_COHERENCE
    it was quarantined (its answers counted as hard labels, its scores not at all);
    `invariant.<id>` (given `flagged`, where the invariance check is on), the share of its
    answers that check ruled out; `invariant`, the share of prompts left with none;
    `plausibility.<id>` (given `gaps`, where the plausibility check is on), how much likelier
    than a random token the judge found its likelier answers (`implausible_teachers`, nats
    per token), `implausible.<id>` 1 where that barred it, and `implausible`, the share of
    prompts left out because a barred teacher (by any bar) would have won
    them; `claim_sum.<id>` (given `sums`, where the claim-sum check is on), the largest sum
    of its claimed probabilities over its distinct answers to a prompt asked twice
    (`claim_sums`; 0 where none), `overclaimed.<id>` 1 where that barred it;
    `prompt_claim_sum.<id>` and `overclaimed_prompts.<id>` (given `prompt_sums`) the same
    for its claims on the round's distinct prompts (`prompt_claim_sums`); `by_claim`,
    the share of prompts whose kept answer the teachers' claims chose among the sure where
    their ranks would have chosen another (`distill.joint_quantile`); `contested`, the
    share left out because a teacher sure of the prompt found the kept answer unlikely
    (`distill.contest_quantile`), and `contested_by.<id>` (given `contesting`) the share of
    prompts each teacher contested so; `contest_barred.<id>` (given `contest_barred`) 1
    where two peers' contests barred it (`distill.contest_bar`); `dependence.<id>` (given
    `dependence`, where it was judged) how much likelier the student found its won answers
    after their own prompts than after similar ones (nats per token), `dependence_barred.<id>`
    1 where that barred it (`distill.dependence_bar`)."""
    kept = teacher_index[teacher_index >= 0]
    total = kept.numel() + n_rejected + n_reserved + n_invariant + n_implausible + n_contested
    out: dict[str, float] = {"rejected": n_rejected / total} if total else {}
    if n_reserved:
        out["reserved"] = n_reserved / total
    if n_invariant:
        out["invariant"] = n_invariant / total
    if n_implausible:
        out["implausible"] = n_implausible / total
    if n_by_claim and total:
        out["by_claim"] = n_by_claim / total
    if n_contested:
        out["contested"] = n_contested / total
    stale = int((teacher_index == -2).sum())
    if stale:  # replayed from an absent teacher's earlier answers (`stale_part`)
        out["stale_rows"] = float(stale)
    for i, (t, name) in enumerate(zip(teachings, ids, strict=True)):
        if total:
            out[f"selected.{name}"] = float((kept == i).sum()) / total
        seq = answer_claims(t)
        if seq.numel():
            out[f"certain.{name}"] = float((seq >= torch.log(torch.tensor(0.99))).float().mean())
        if coherent is not None:
            out[f"coherent.{name}"] = float(coherent[i])
        if flagged is not None:
            out[f"invariant.{name}"] = float(flagged[i])
        if contesting is not None:
            out[f"contested_by.{name}"] = float(contesting[i])
        if contest_barred is not None:
            out[f"contest_barred.{name}"] = float(bool(contest_barred[i]))
        if dependence is not None and not math.isnan(dependence[i]):
            out[f"dependence.{name}"] = float(dependence[i])
        if dependence_barred is not None:
            out[f"dependence_barred.{name}"] = float(bool(dependence_barred[i]))
        if gaps is not None:
            out[f"plausibility.{name}"] = float(gaps[i])
            out[f"implausible.{name}"] = float(bool(barred[i])) if barred is not None else 0.0
        if sums is not None:
            out[f"claim_sum.{name}"] = math.exp(sums[i])
            out[f"overclaimed.{name}"] = float(bool(overclaimed[i])) if overclaimed else 0.0
        if prompt_sums is not None:
            out[f"prompt_claim_sum.{name}"] = math.exp(prompt_sums[i])
            out[f"overclaimed_prompts.{name}"] = (
                float(bool(prompt_overclaimed[i])) if prompt_overclaimed else 0.0
            )
    return out
