"""MiniLLM reverse-KL policy gradient, its forward-KL baseline, and teacher aggregation.

Pure tensor functions: tensors in, a loss and a few statistics out. The derivation is in
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MiniLLMHParams:
    clip_eps: float = 0.2
    alpha: float = 0.0  # share of teacher-sampled rollouts (teacher-mixed sampling)
    iw_clip: float = 3.0
    gamma: float = 1.0
    single_step: bool = True
    length_norm: bool = True
    teacher_mixed: bool = True
    # weight the single-step KL by the clipped importance weights, as MiniLLM does; False:
    # the exact support KL at every visited prefix, the teachers' sequences at full weight
    iw_single_step: bool = True


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
    acc = torch.zeros(b, dtype=r.dtype)
    n = torch.zeros(b, dtype=r.dtype)
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


def minillm_loss(
    student_logits: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    behaviour_logp: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    hp: MiniLLMHParams,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The MiniLLM loss for one mini-batch.

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
        alpha = hp.alpha if hp.teacher_mixed else 0.0
        w = mixed_importance_weights(behaviour_logp, p_tok, alpha, hp.iw_clip) * mask

    ratio = torch.exp(logq_tok - behaviour_logp)
    pg1 = ratio * returns
    pg2 = ratio.clamp(1 - hp.clip_eps, 1 + hp.clip_eps) * returns
    loss_long = -masked_mean(w * torch.minimum(pg1, pg2), mask)

    if hp.single_step:
        support_mask = _support_mask(support_ids)
        kl = support_kl(logq_support, teacher_logp, support_mask)
        loss_single = masked_mean((w if hp.iw_single_step else mask) * kl, mask)
    else:
        with torch.no_grad():
            kl = support_kl(logq_support, teacher_logp, _support_mask(support_ids))
        loss_single = torch.zeros((), dtype=logq_all.dtype)

    loss = loss_single + loss_long
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > hp.clip_eps).to(mask.dtype)
        stats = {
            "loss_single": float(loss_single),
            "loss_long": float(loss_long),
            "reverse_kl": float(masked_mean(kl, mask)),
            "reward": float(masked_mean(rewards, mask)),
            "seq_reverse_kl": float((-(rewards * mask).sum(-1)).mean()),
            "iw_mean": float(masked_mean(w, mask)),
            "clip_frac": float(masked_mean(clipped, mask)),
        }
    return loss, stats


def _support_mask(support_ids: torch.Tensor) -> torch.Tensor:
    """True for support entries that are valid (>= 0) and not a repeat of an earlier entry."""
    valid = support_ids >= 0
    s = support_ids.shape[-1]
    eq = support_ids[..., :, None] == support_ids[..., None, :]  # [.., S, S]
    earlier = torch.ones(s, s, dtype=torch.bool).tril(-1)
    dup = (eq & earlier).any(-1)
    return valid & ~dup


def forward_kl_loss(
    student_logits: torch.Tensor,
    response_mask: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """FedMKT-style baseline: teacher-forced KL(p_S || q_S) on the teacher's top-k support."""
    mask = response_mask.to(student_logits.dtype)
    logq = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, support_ids.clamp(min=0))
    smask = _support_mask(support_ids)
    neg = torch.finfo(logq.dtype).min
    q = torch.log_softmax(logq.masked_fill(~smask, neg), dim=-1)
    p = torch.log_softmax(teacher_logp.masked_fill(~smask, neg), dim=-1)
    kl = (p.exp() * (p - q)).masked_fill(~smask, 0.0).sum(-1)
    loss = masked_mean(kl, mask)
    return loss, {"forward_kl": float(loss.detach())}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level cross-entropy of `labels` [B, T] under `logits` [B, T, V] where mask is 1."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    return masked_mean(ce, mask)


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
