"""The student's optimisation step, written once: the behaviour log-probs, the MiniLLM (or
forward-KL) loss with SeqKD and the LM loss on the party's own data, the optimizer step,
and the epochs over a round's batch. Used by the distill step and by every benchmark.

Statistics stay tensors on the model's device until a whole pass is done, and are read
back once (`as_floats`). Shapes as in flminillm.distill.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from flminillm.devices import to_device
from flminillm.distill import forward_kl_loss, lm_loss, minillm_loss
from flminillm.generation import response_logits
from flminillm.training import causal_lm_loss, lr_schedule

if TYPE_CHECKING:
    from flminillm.config import DistillConfig
    from flminillm.engine import Engine

Batch = dict[str, torch.Tensor]


def behaviour_logprobs(model, batch: Batch, micro_batch: int = 0) -> torch.Tensor:
    """log q_old(y_t), the behaviour policy: one teacher-forced pass of the model before any
    update, `micro_batch` sequences at a time (0: all at once). [N, T], 0 where masked."""
    n = batch["response_ids"].shape[0]
    step = micro_batch or max(n, 1)
    parts = []
    model.eval()
    with torch.no_grad():
        for i in range(0, n, step):
            ids, mask = batch["response_ids"][i : i + step], batch["response_mask"][i : i + step]
            logits = response_logits(
                model, batch["prompt_ids"][i : i + step], batch["prompt_mask"][i : i + step],
                ids, mask,
            )  # fmt: skip
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])[..., 0]
            parts.append(logp * mask)
    return (
        torch.cat(parts)
        if parts
        else batch["response_ids"].new_zeros(batch["response_ids"].shape, dtype=torch.float32)
    )


def answer_logprob(
    model, rollouts: Batch, teaching: Batch, micro_batch: int, device
) -> torch.Tensor:
    """The student's mean per-token log q(y | x) [A] of a teacher's answers (`own_response_ids`)
    to the teacher-share prompts (`ask_prompt_ids`): what `distill.plausibility_margin`
    judges a teacher by (flminillm.aggregate.implausible_teachers)."""
    batch = {
        "prompt_ids": rollouts["ask_prompt_ids"].long().to(device),
        "prompt_mask": rollouts["ask_prompt_mask"].long().to(device),
        "response_ids": teaching["own_response_ids"].long().to(device),
        "response_mask": teaching["own_response_mask"].long().to(device),
    }
    logp = behaviour_logprobs(model, batch, micro_batch).float().cpu()
    length = batch["response_mask"].sum(1).clamp(min=1).cpu()
    return logp.sum(1) / length


def distill_loss(
    logits: torch.Tensor, mb: Batch, behaviour: torch.Tensor, d: DistillConfig, seqkd: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch `mb` (an assembled batch's rows) given the student's
    logits [B, T, V]: MiniLLM's reverse-KL policy gradient (or the forward-KL baseline on
    every scored position) plus, with `seqkd`, cross-entropy on the teachers' sequences
    (the caller says whether `mb` has any: deciding it here would read the device)."""
    if d.method == "reverse_kl":
        loss, stats = minillm_loss(
            logits, mb["response_ids"], mb["response_mask"], behaviour, mb["support_ids"],
            mb["teacher_logp"], d, mb.get("from_teacher"),
        )  # fmt: skip
    else:  # forward KL on every scored position: the student's own sequences (teacher
        # scores on their support) and the selected teacher sequences
        loss, stats = forward_kl_loss(
            logits, mb["response_mask"], mb["support_ids"], mb["teacher_logp"], d.tail_bucket
        )
    if seqkd:
        tmask = mb["response_mask"] * mb["from_teacher"][:, None]
        ce = lm_loss(logits, mb["response_ids"], tmask)
        loss = loss + d.seqkd_coef * ce
        stats["seqkd_ce"] = ce.detach()
    return loss, stats


def update_step(
    engine: Engine,
    mb: Batch,
    behaviour: torch.Tensor,
    d: DistillConfig,
    seqkd: bool = True,
    lm_batch: Batch | None = None,
    has_teacher_rows: bool | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step on the micro-batch `mb` (behaviour: its rows of
    `behaviour_logprobs`), with `d.lm_coef` x the LM loss on `lm_batch` when given.
    `has_teacher_rows`: whether `mb` holds teacher sequences (for SeqKD), when the caller
    knows it without a device read."""
    if has_teacher_rows is None:
        has_teacher_rows = bool(mb["from_teacher"].any())
    with engine.autocast():
        logits = response_logits(
            engine.model, mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"],
            mb["response_mask"],
        )  # fmt: skip
        loss, stats = distill_loss(logits, mb, behaviour, d, seqkd and has_teacher_rows)
        if lm_batch is not None:
            lm = causal_lm_loss(engine.model, lm_batch)
            loss = loss + d.lm_coef * lm
            stats["lm_loss"] = lm.detach()
    engine.backward(loss)
    engine.step()
    stats["loss"] = loss.detach()
    return stats


def n_updates(n: int, d: DistillConfig, world: int = 1) -> int:
    """Mini-batch updates `distill_epochs` takes over a batch of `n` rows."""
    return d.epochs * -(-n // (d.batch_size * world))


def distill_lr(d: DistillConfig, n: int, world: int = 1, accumulation: int = 1):
    """The lr multiplier of `d.lr_schedule` over the optimizer steps of one distill step
    (None: constant)."""
    if d.lr_schedule == "constant":
        return None
    total = max(n_updates(n, d, world) // accumulation, 1)  # a partial accumulation: no step
    return lambda s: lr_schedule(s, total - 1, 0)  # the last step at 10% of lr


def distill_epochs(
    engine: Engine,
    batch: Batch,
    behaviour: torch.Tensor,
    d: DistillConfig,
    *,
    order_seed: int,
    seqkd: bool,
    lm_batches: Iterator[Batch] | None = None,
    rank: int = 0,
    world: int = 1,
) -> dict[str, torch.Tensor]:
    """`d.epochs` passes over `batch` in seeded random order, `d.batch_size` rows per step.
    Returns the mean of every statistic over the steps, `updates` and, when the loss has
    one, `reverse_kl_first` (the first step's). Under the launcher (`world` > 1) rank r
    takes the r-th micro-batch of each global batch of `world` micro-batches."""
    n = batch["prompt_ids"].shape[0]
    g = torch.Generator().manual_seed(order_seed)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    first_rkl = None
    span = d.batch_size * world
    from_teacher = batch["from_teacher"].cpu()  # read once: which rows get SeqKD
    for _epoch in range(d.epochs):
        order = torch.randperm(n, generator=g, device="cpu")  # host-side: the same on any device
        for i in range(0, n, span):
            if world == 1:
                idx = order[i : i + d.batch_size]
            else:  # wrapping around at the end, so that every rank steps together: the
                # split of one process with gradient accumulation over `world` micro-batches
                idx = order[
                    (i + rank * d.batch_size + torch.arange(d.batch_size, device="cpu")) % n
                ]
            mb = {k: v[idx.to(v.device)] for k, v in batch.items()}
            lm_batch = [next(lm_batches) for _ in range(world)][rank] if lm_batches else None
            if lm_batch is not None:
                lm_batch = to_device(lm_batch, behaviour.device)
            stats = update_step(
                engine, mb, behaviour[idx.to(behaviour.device)], d, seqkd, lm_batch,
                has_teacher_rows=bool(from_teacher[idx].any()),
            )  # fmt: skip
            if first_rkl is None and "reverse_kl" in stats:
                first_rkl = stats["reverse_kl"]
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.double()
            count += 1
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["updates"] = torch.tensor(float(count), device=behaviour.device)
    if first_rkl is not None:
        out["reverse_kl_first"] = first_rkl
    return out


def as_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Statistics read back to the host in one transfer."""
    if not stats:
        return {}
    device = next(iter(stats.values())).device
    values = torch.stack([v.detach().to(device, torch.float64).reshape(()) for v in stats.values()])
    return dict(zip(stats, values.tolist(), strict=True))
