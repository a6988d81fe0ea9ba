"""The body of the distill step: assemble the student's batch from its teachers' messages
and run the PPO updates. Kept apart from steps.py so that steps read as recipes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flminillm.config import ExperimentConfig
from flminillm.distill import (
    MiniLLMHParams,
    aggregate_teachers,
    cap_log_weights,
    forward_kl_loss,
    masked_mean,
    minillm_loss,
    posterior_log_weights,
)
from flminillm.generation import left_pad, response_logits, right_pad
from flminillm.launch import rank_world
from flminillm.messages import validate_rollouts, validate_teaching
from flminillm.store import Store


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


def select_teacher_rollouts(
    teachings: list[dict[str, torch.Tensor]],
    prior: torch.Tensor,
    use_prompt: bool = True,
    cap: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Per teacher-share prompt, keep the answer of the teacher with the highest joint
    log-likelihood log pi_i + log p_i(x) + log p_i(y_i | x): the teacher that knows the
    prompt's domain and is sure of its answer (the mixture's most likely component).
    `cap` < 1: no teacher's answers are kept for more than that share of the prompts."""
    width = max(t["own_response_ids"].shape[1] for t in teachings)
    ids = torch.stack(
        [right_pad(t["own_response_ids"].long(), width, 0) for t in teachings]
    )  # [M,A,T]
    mask = torch.stack([right_pad(t["own_response_mask"].long(), width, 0) for t in teachings])
    sup = torch.stack([right_pad(t["own_support_ids"].long(), width, 0) for t in teachings])
    logp = torch.stack([right_pad(t["own_logp"].float(), width, 0.0) for t in teachings])
    joint = (logp[..., 0] * mask).sum(-1) + torch.log(prior)[:, None]  # [M, A]
    if use_prompt:
        joint = joint + torch.stack([t["own_prompt_logp"].float() for t in teachings])
    best = cap_selection(joint, cap).argmax(0)  # [A]
    idx = torch.arange(best.shape[0])
    return {
        "response_ids": ids[best, idx],
        "response_mask": mask[best, idx],
        "support_ids": sup[best, idx],
        "teacher_logp": logp[best, idx],
        "teacher_index": best,
    }


def assemble_batch(
    rollouts: dict[str, torch.Tensor],
    teachings: list[dict[str, torch.Tensor]],
    weights: torch.Tensor,
    method: str,
    trim: float,
    posterior: bool,
    cap: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Student rollouts scored by the aggregated teachers + the selected teacher rollouts.
    `cap` < 1 (aggregation capped_mixture) bounds each teacher's mean mixture weight."""
    stacked = torch.stack([t["scores"].float() for t in teachings])  # [M, N, T, S]
    log_w = None
    delta = torch.zeros(len(teachings))
    if posterior and method in ("mixture", "capped_mixture"):
        log_w = posterior_log_weights(
            weights / weights.sum(),
            torch.stack([t["prompt_logp"].float() for t in teachings]),
            stacked[..., 0],
            rollouts["response_mask"].float(),
        )
        if method == "capped_mixture":
            log_w, delta = cap_log_weights(log_w, rollouts["response_mask"].float(), cap)
    agg = "mixture" if method == "capped_mixture" else method
    scores = aggregate_teachers(stacked, weights, agg, trim, log_weights=log_w)
    n = rollouts["prompt_ids"].shape[0]
    parts = [
        {
            "prompt_ids": rollouts["prompt_ids"].long(),
            "prompt_mask": rollouts["prompt_mask"].long(),
            "response_ids": rollouts["response_ids"].long(),
            "response_mask": rollouts["response_mask"].long(),
            "support_ids": rollouts["support_ids"].long(),
            "teacher_logp": scores,
            "from_teacher": torch.zeros(n, dtype=torch.bool),
        }
    ]
    a = rollouts["ask_prompt_ids"].shape[0]
    if a:
        # a capped teacher's answers are selected with the same handicap, and (capped
        # mixture) no teacher supplies more than `cap` of the answers, also when the student
        # has no rollouts of its own to measure the mixture weights on (alpha = 1)
        prior = weights / weights.sum() * torch.exp(-delta)
        sel = select_teacher_rollouts(
            teachings, prior, use_prompt=posterior,
            cap=cap if method == "capped_mixture" else 1.0,
        )  # fmt: skip
        parts.append(
            {
                "prompt_ids": rollouts["ask_prompt_ids"].long(),
                "prompt_mask": rollouts["ask_prompt_mask"].long(),
                "response_ids": sel["response_ids"],
                "response_mask": sel["response_mask"],
                "support_ids": sel["support_ids"],
                "teacher_logp": sel["teacher_logp"],
                "from_teacher": torch.ones(a, dtype=torch.bool),
            }
        )
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
    return {k: torch.cat(v) for k, v in out.items()}


def run_distill(
    cfg: ExperimentConfig,
    store: Store,
    state: dict,
    round_index: int,
    student_id: str,
    model_digest: str,
    rollouts_manifest: dict,
    teachings_manifests: list[dict],
) -> tuple[str, dict[str, float]]:
    from flminillm.engine import make_engine
    from flminillm.steps import (
        EXCHANGE,
        _examples,
        _load_model,
        _load_tokenizer,
        _save_model,
        _seed,
    )
    from flminillm.training import batches, causal_lm_loss, encode_examples

    d = cfg.distill
    vocab = state["vocab_size"]
    exchange = store.scoped(EXCHANGE)
    rollouts = exchange.get_tensors(rollouts_manifest["rollouts"])
    validate_rollouts(rollouts, vocab)
    teachings = []
    for t in teachings_manifests:
        msg = exchange.get_tensors(t["teaching"])
        validate_teaching(msg, rollouts, vocab)
        teachings.append(msg)
    weights = torch.tensor([cfg.party(t["teacher"]).weight for t in teachings_manifests])
    batch = assemble_batch(
        rollouts, teachings, weights, d.aggregation, d.trim, d.posterior_weights, d.cap
    )

    tok = _load_tokenizer(store, state["tokenizer"])
    model = _load_model(store, student_id, model_digest)
    torch.manual_seed(_seed(cfg, "distill", round_index, student_id))

    # behaviour policy q_old: one teacher-forced pass before any update
    with torch.no_grad():
        model.eval()
        logits = response_logits(
            model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["response_ids"],
            batch["response_mask"],
        )
        behaviour = torch.log_softmax(logits.float(), -1).gather(
            -1, batch["response_ids"][..., None]
        )[..., 0]
        behaviour = behaviour * batch["response_mask"]

    own_rows = []
    if student_id in state["data"]["clients"] and d.lm_coef > 0:
        own = _examples(store, student_id, state["data"]["clients"][student_id]["train"])
        own_rows = encode_examples(
            tok, own, cfg.party(student_id).model.max_positions, cfg.local_sft.prompt_loss
        )
    own_iter = (
        batches(own_rows, d.batch_size, tok.pad_token_id, _seed(cfg, "lm", round_index, student_id))
        if own_rows
        else None
    )
    use_seqkd = d.seqkd_coef > 0 and round_index <= d.seqkd_rounds

    hp = MiniLLMHParams(
        clip_eps=d.clip_eps, alpha=d.alpha, iw_clip=d.iw_clip, gamma=d.gamma,
        single_step=d.single_step, length_norm=d.length_norm, teacher_mixed=d.teacher_mixed,
        iw_single_step=d.iw_single_step,
    )  # fmt: skip
    engine = make_engine(model, d.lr, 0.0, d.max_grad_norm, cfg.engine)
    model.train()
    n = batch["prompt_ids"].shape[0]
    g = torch.Generator().manual_seed(_seed(cfg, "distill-order", round_index, student_id))
    sums: dict[str, float] = {}
    count = 0
    first_rkl = None
    rank, world = rank_world()
    span = d.batch_size * world  # under the launcher: one global batch, a share per rank
    for _epoch in range(d.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, span):
            if world == 1:
                idx = order[i : i + d.batch_size]
            else:  # rank r takes the r-th micro-batch of the global batch (wrapping around
                # at the end, so every rank steps together): the split of one process with
                # gradient accumulation over `world` micro-batches
                idx = order[(i + rank * d.batch_size + torch.arange(d.batch_size)) % n]
            mb = {k: v[idx] for k, v in batch.items()}
            logits = response_logits(
                engine.model,
                mb["prompt_ids"],
                mb["prompt_mask"],
                mb["response_ids"],
                mb["response_mask"],
            )
            sup = mb["support_ids"]
            if d.method == "reverse_kl":
                loss, stats = minillm_loss(
                    logits, mb["response_ids"], mb["response_mask"], behaviour[idx],
                    sup, mb["teacher_logp"], hp,
                )  # fmt: skip
            else:  # forward KL on every scored position: the student's own sequences
                # (teacher scores on their support) and the selected teacher sequences
                loss, stats = forward_kl_loss(logits, mb["response_mask"], sup, mb["teacher_logp"])
            if use_seqkd and bool(mb["from_teacher"].any()):
                tmask = mb["response_mask"] * mb["from_teacher"][:, None]
                ce = F.cross_entropy(
                    logits.float().transpose(1, 2), mb["response_ids"], reduction="none"
                )
                seqkd = masked_mean(ce, tmask)
                loss = loss + d.seqkd_coef * seqkd
                stats["seqkd_ce"] = float(seqkd.detach())
            if own_iter is not None:
                lm = causal_lm_loss(engine.model, [next(own_iter) for _ in range(world)][rank])
                loss = loss + d.lm_coef * lm
                stats["lm_loss"] = float(lm.detach())
            engine.backward(loss)
            engine.step()
            stats["loss"] = float(loss.detach())
            if first_rkl is None and "reverse_kl" in stats:
                first_rkl = stats["reverse_kl"]
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    model.eval()
    metrics = {k: v / max(count, 1) for k, v in sums.items()}
    metrics["updates"] = float(count)
    metrics["n_student_rollouts"] = float(int((~batch["from_teacher"]).sum()))
    metrics["n_teacher_rollouts"] = float(int(batch["from_teacher"].sum()))
    if first_rkl is not None:
        metrics["reverse_kl_first"] = first_rkl
    metrics["bytes_received"] = float(sum(t["bytes"] for t in teachings_manifests))
    return _save_model(store, student_id, engine.hf_model), metrics
