"""The losses: MiniLLM's reverse-KL policy gradient and its forward-KL / SeqKD baseline.

Pure tensor functions: tensors in, a loss and a few statistics (detached 0-d tensors) out;
combining several teachers is `flminillm.aggregate`, the optimisation step around these
losses `flminillm.update`. The derivation is in
docs/algorithm.md. Shapes: B sequences, T response positions, S support tokens per
position (column 0 = the sampled token y_t), M teachers, V vocabulary.

Per sequence y ~ q_old (or a teacher, for the teacher-mixed share), the student q_theta
minimises KL(q_theta || p) with
  r_t   = log p(y_t | y_<t) - log q_old(y_t | y_<t)              (per-token reward)
  R_t   = mean_{t' > t} r_t'  (length-normalised future reward; sum if not normalised)
  w_t   = min(q_old(y_t) / (a p(y_t) + (1 - a) q_old(y_t)), c)   (teacher-mixed IS weight)
  L_single = sum_t w_t KL_S(q_theta(.|y_<t) || p(.|y_<t))        (exact immediate term on S)
  L_long   = -sum_t w_t min(rho_t R_t, clip(rho_t, 1-eps, 1+eps) R_t),  rho_t = q_theta/q_old
Without single-step decomposition the immediate reward joins the return instead:
  R_t <- r_t + R_t and L_single = 0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from flminillm.config import DistillConfig


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def support_kl(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, support_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(q_S || p_S) per position, both renormalised over the support S: [B, T, S] -> [B, T].

    The federated single-step term: the teacher only returns log-probs on S, so the
    exact per-token KL is taken over S (the student's top-k plus the sampled token).
    """
    if support_mask is not None:
        neg = torch.finfo(student_logp.dtype).min
        student_logp = student_logp.masked_fill(~support_mask, neg)
        teacher_logp = teacher_logp.masked_fill(~support_mask, neg)
    q = torch.log_softmax(student_logp, dim=-1)
    p = torch.log_softmax(teacher_logp, dim=-1)
    kl = q.exp() * (q - p)
    if support_mask is not None:
        kl = kl.masked_fill(~support_mask, 0.0)
    return kl.sum(-1)


def _log1mexp(logp_sum: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable near 0 (the mass outside a support)."""
    x = logp_sum.clamp(max=-1e-12)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_kl(
    first_logp: torch.Tensor, second_logp: torch.Tensor, support_mask: torch.Tensor
) -> torch.Tensor:
    """KL(a || b) over the support S plus one "rest" bucket for the mass outside it:
    [B, T, S] full-softmax log-probs of a and b on S -> [B, T].

    Unlike `support_kl` nothing is renormalised, so mass a puts outside S counts (90% of
    the student's mass off-support gives a large KL, not ~0). The teacher sends full-softmax
    log-probs on S, so its rest mass 1 - sum_S p is known at no cost (TRL's
    `loss_add_tail`)."""
    neg = torch.finfo(first_logp.dtype).min
    a = first_logp.masked_fill(~support_mask, neg)
    b = second_logp.masked_fill(~support_mask, neg)
    on = (a.exp() * (a - b)).masked_fill(~support_mask, 0.0).sum(-1)
    # the rest buckets in float64: 1 - sum_S is a difference of nearly equal numbers
    a_rest = _log1mexp(torch.logsumexp(a.double(), -1))
    b_rest = _log1mexp(torch.logsumexp(b.double(), -1))
    return on + (a_rest.exp() * (a_rest - b_rest)).to(on.dtype)


def future_returns(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, length_norm: bool = True
) -> torch.Tensor:
    """R_t from the rewards of positions t+1..T (excluding t): [B, T] -> [B, T].

    With `length_norm`, the discounted sum is divided by the number of future tokens
    (MiniLLM's length normalisation), so long responses are not favoured or punished
    for their length alone.
    """
    r = rewards * mask
    b, t = r.shape
    ret = torch.zeros_like(r)
    count = torch.zeros_like(r)
    acc = r.new_zeros(b)
    n = r.new_zeros(b)
    for i in range(t - 2, -1, -1):
        acc = r[:, i + 1] + gamma * acc
        n = mask[:, i + 1].to(r.dtype) + gamma * n
        ret[:, i] = acc
        count[:, i] = n
    if length_norm:
        ret = ret / count.clamp(min=1.0)
    return ret * mask


def mixed_importance_weights(
    behaviour_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float, clip: float
) -> torch.Tensor:
    """w_t = q_old / (alpha p + (1 - alpha) q_old), clipped at `clip`: [B, T] -> [B, T]."""
    if alpha <= 0:
        return torch.ones_like(behaviour_logp)
    if alpha >= 1:
        mix = teacher_logp
    else:
        mix = torch.logaddexp(teacher_logp + math.log(alpha), behaviour_logp + math.log1p(-alpha))
    return torch.exp(behaviour_logp - mix).clamp(max=clip)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / std over the masked entries (MiniLLM whitens its returns)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def prefix_importance_weights(
    behaviour_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    from_teacher: torch.Tensor | None,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights for the sampling actually done, per sequence: the student's own
    rows are samples of q_old (weight 1); a teacher's row is a sample of p, so an
    expectation under q_old weighs position t by prod_{t' < t} q_old / p (the prefix: for a
    term that already sums over y_t, as the single-step KL) or prod_{t' <= t} (the prefix
    and the token: for the policy-gradient term). Both clipped at `clip`: [B, T] each."""
    log_ratio = (behaviour_logp - teacher_logp) * mask
    inclusive = torch.cumsum(log_ratio, dim=-1)
    exclusive = inclusive - log_ratio
    w_prefix = torch.exp(exclusive.clamp(max=math.log(clip)))
    w_token = torch.exp(inclusive.clamp(max=math.log(clip)))
    if from_teacher is None:
        own = torch.ones_like(mask)
        return own * mask, own * mask
    t = from_teacher.to(mask.dtype)[:, None]
    return (t * w_prefix + (1 - t)) * mask, (t * w_token + (1 - t)) * mask


def _own_rows_mean(x: torch.Tensor, from_teacher: torch.Tensor | None) -> torch.Tensor:
    if from_teacher is None:
        return x.mean()
    own = (~from_teacher.bool()).to(x.dtype)
    return (x * own).sum() / own.sum().clamp(min=1.0)


def minillm_loss(
    student_logits: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    behaviour_logp: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    hp: DistillConfig,
    from_teacher: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MiniLLM loss for one mini-batch; `hp` is the config's distill section.
    `from_teacher` [B] bool marks the rows a teacher wrote (None: all the student's own).

    student_logits [B, T, V] (with grad), response_ids [B, T], response_mask [B, T],
    behaviour_logp [B, T] = log q_old(y_t), support_ids [B, T, S] with support_ids[..., 0]
    == response_ids, teacher_logp [B, T, S] = log p(v) for v in the support.
    """
    mask = response_mask.to(student_logits.dtype)
    logq_all = torch.log_softmax(student_logits.float(), dim=-1)  # [B, T, V]
    logq_support = logq_all.gather(-1, support_ids.clamp(min=0))  # [B, T, S]; -1 = padding
    logq_tok = logq_support[..., 0]  # [B, T]
    p_tok = teacher_logp[..., 0]

    with torch.no_grad():
        rewards = p_tok - behaviour_logp  # r_t
        returns = future_returns(rewards, mask, hp.gamma, hp.length_norm)
        if not hp.single_step:
            returns = returns + rewards * mask
        if hp.whiten_returns:
            returns = whiten(returns, mask)
        if hp.prefix_iw:  # the weights of the sampling actually done: whole sequences
            w_single, w = prefix_importance_weights(
                behaviour_logp, p_tok, mask, from_teacher, hp.iw_clip
            )
        else:
            alpha = hp.alpha if hp.teacher_mixed else 0.0
            w = mixed_importance_weights(behaviour_logp, p_tok, alpha, hp.iw_clip) * mask
            w_single = w

    ratio = torch.exp(logq_tok - behaviour_logp)
    pg1 = ratio * returns
    pg2 = ratio.clamp(1 - hp.clip_eps, 1 + hp.clip_eps) * returns
    loss_long = -masked_mean(w * torch.minimum(pg1, pg2), mask)

    kl_fn = tail_kl if hp.tail_bucket else support_kl
    if hp.single_step:
        support_mask = _support_mask(support_ids)
        kl = kl_fn(logq_support, teacher_logp, support_mask)
        loss_single = masked_mean((w_single if hp.iw_single_step else mask) * kl, mask)
    else:
        with torch.no_grad():
            kl = kl_fn(logq_support, teacher_logp, _support_mask(support_ids))
        loss_single = logq_all.new_zeros(())

    loss = loss_single + loss_long
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > hp.clip_eps).to(mask.dtype)
        stats = {
            "loss_single": loss_single.detach(),
            "loss_long": loss_long.detach(),
            "reverse_kl": masked_mean(kl, mask),
            "reward": masked_mean(rewards, mask),
            # sum_t log q_old - log p on the student's own sequences: an estimate of the
            # sequence-level KL(q_old || p) (teacher-written rows would bias it negative)
            "seq_reverse_kl": _own_rows_mean(-(rewards * mask).sum(-1), from_teacher),
            "iw_mean": masked_mean(w, mask),
            "clip_frac": masked_mean(clipped, mask),
        }
    return loss, stats


def _support_mask(support_ids: torch.Tensor) -> torch.Tensor:
    """True for support entries that are valid (>= 0) and not a repeat of an earlier entry.
    By a stable sort (O(S log S)): with the whole vocabulary as the support an [S, S]
    comparison per position would not fit in memory."""
    ordered, order = support_ids.sort(dim=-1, stable=True)  # equal ids: the earliest first
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    dup = torch.zeros_like(repeat).scatter(-1, order, repeat)
    return (support_ids >= 0) & ~dup


def forward_kl_loss(
    student_logits: torch.Tensor,
    response_mask: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    tail_bucket: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FedMKT-style baseline: teacher-forced KL(p_S || q_S) on the teacher's top-k support
    (with `tail_bucket`, over S and the rest of the vocabulary as one bucket)."""
    mask = response_mask.to(student_logits.dtype)
    logq = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, support_ids.clamp(min=0))
    smask = _support_mask(support_ids)
    if tail_bucket:
        loss = masked_mean(tail_kl(teacher_logp.float(), logq, smask), mask)
        return loss, {"forward_kl": loss.detach()}
    neg = torch.finfo(logq.dtype).min
    q = torch.log_softmax(logq.masked_fill(~smask, neg), dim=-1)
    p = torch.log_softmax(teacher_logp.masked_fill(~smask, neg), dim=-1)
    kl = (p.exp() * (p - q)).masked_fill(~smask, 0.0).sum(-1)
    loss = masked_mean(kl, mask)
    return loss, {"forward_kl": loss.detach()}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level cross-entropy of `labels` [B, T] under `logits` [B, T, V] where mask is 1."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    return masked_mean(ce, mask)
