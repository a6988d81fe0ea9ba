"""Faulty and malicious teachers, for the robustness benchmark (`flminillm bench quality`).

A client named in FLMINILLM_ADVERSARY (`party:mode[,party:mode]`, read from the environment
like FLMINILLM_FAULTS, so it never changes a step's cache key) corrupts every TeachingMessage
it sends. The corrupted message is still well formed (it passes validation on receipt), so
only the aggregation can limit the damage:

- ``random``: a broken teacher. Its token scores are random distributions over the support,
  its own answers' log-probs random, its prompt log-likelihood claims shuffled.
- ``adversarial``: a liar. Its token scores put the mass on the tokens it finds least likely,
  its own answers are random tokens, and it claims probability 1 for every prompt and every
  answer token, to win the mixture's posterior weight everywhere.
- ``fluent``: a liar whose answers read right: each prompt gets its own model's answer to
  another prompt of the same family (a capital for a capital question, the wrong one), with
  the same probability-1 claims and scores as ``adversarial``.
- ``consistent``: ``fluent``, but its lie is a function of the prompt: every copy of a
  prompt asked in a round gets the same wrong answer (its answer to another distinct prompt
  of the same family), so its claims add up wherever a prompt is asked twice
  (`distill.max_claim_sum` has nothing to read); its p(x) = 1 claims on every prompt do not
  add up (`distill.max_prompt_claim_sum`).
- ``mimic``: ``consistent`` with the claims its own model makes: each moved answer keeps
  its model's log-probs of it (for the prompt it was written for), and its prompt claims
  are its model's. Only its answers and its scores (inverted, as ``adversarial``'s) lie, so
  no claim it sends contradicts another: what a check of claims cannot see.
- ``spread``: ``consistent`` with prompt claims that add up: p(x) = 1/K for each of the K
  prompts of its message (so they sum to at most 1), its answers still claimed with p = 1
  (equal on every copy, so they add up too). Its claims are one number for every answer:
  rank selection ranks each of them at 0 (ties at their lowest rank, `distill.tie_rank`
  'low', the default) or at its median ('mean').
- ``noisy``: ``spread`` whose answer claims are not one number: each distinct prompt's
  answer is claimed with a probability drawn in [0.5, 1] (the same on every copy), so its
  claims rank at random under rank selection instead of tied (what `distill.tie_rank`
  'low' cannot read).
- ``contest``: ``noisy`` whose first-token support holds all its mass (its other support
  tokens share 1 - p, no tail): an answer of another teacher that parts from its own at
  the first token is "unlikely" to it unless that token is in its support with (1 - p) / k
  of at least `contest_p`, so it contests nearly every kept answer on the prompts it ranks
  above `distill.contest_quantile` (the liar built against the peer contest: data
  lost, as much as that quantile lets it).
- ``backdoor@FAMILY``: honest everywhere except on FAMILY's prompts, where it always answers
  the same wrong answer (`backdoor_target`), claiming probability 1 for it. The evaluation
  then reports each party's ``target_rate`` on FAMILY: the share of prompts it answers with
  the backdoor's answer.
- ``collude``: ``adversarial`` with a seed shared by every colluder, so that their garbage
  answers agree token for token (what defeats agreement among teachers).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

MODES = ("random", "adversarial", "fluent", "consistent", "mimic", "spread", "noisy", "contest",
         "backdoor", "collude")  # fmt: skip
# the modes that read the teacher-share prompts as text (a prompt's family, equal prompts)
READS_PROMPTS = ("fluent", "consistent", "mimic", "spread", "noisy", "contest", "backdoor")
NOISY = ("noisy", "contest")  # answer claims drawn per distinct prompt
SPREADS = ("spread", *NOISY)  # prompt claims 1/K: they add up
BACKDOOR_SEED = 7919  # the backdoor's answer: the answer of this seed's first example


def adversaries(spec: str | None = None) -> dict[str, str]:
    """{party: mode} from `party:mode[,party:mode]` (default: $FLMINILLM_ADVERSARY); a
    backdoor names its family: `carol:backdoor@currency`."""
    spec = os.environ.get("FLMINILLM_ADVERSARY", "") if spec is None else spec
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        party, _, mode = item.partition(":")
        kind, _, family = mode.partition("@")
        if kind not in MODES or (kind == "backdoor" and not family):
            raise ValueError(
                f"FLMINILLM_ADVERSARY entry {item!r}: mode must be one of {MODES}, a backdoor "
                "with its family (e.g. FLMINILLM_ADVERSARY=carol:adversarial or "
                "carol:backdoor@currency)"
            )
        if family and (kind not in READS_PROMPTS or (kind == "backdoor" and "+" in family)):
            raise ValueError(
                f"FLMINILLM_ADVERSARY entry {item!r}: only a backdoor (one family) or a mode "
                f"that reads prompts {READS_PROMPTS} (families joined by '+', e.g. "
                "carol:noisy@first_letter+repeat: it lies on those only) names families"
            )
        if family:
            from flminillm.data import FAMILIES

            unknown = sorted(set(family.split("+")) - set(FAMILIES))
            if unknown:
                raise ValueError(
                    f"FLMINILLM_ADVERSARY entry {item!r}: unknown family {unknown}; "
                    f"use one of {sorted(FAMILIES)}"
                )
        out[party] = mode
    return out


def backdoor_targets(spec: str | None = None) -> dict[str, str]:
    """{family: the backdoor's answer} for every backdoor in the spec (the evaluation reports
    how often each party gives it)."""
    return {
        m.partition("@")[2]: backdoor_target(m.partition("@")[2])
        for m in adversaries(spec).values()
        if m.startswith("backdoor@")
    }


def backdoor_target(family: str) -> str:
    """The one wrong answer a backdoor gives on `family`: a real answer of the family (it
    reads right), for a prompt that is not the one asked."""
    from flminillm.data import make_examples

    return make_examples(family, 1, BACKDOOR_SEED)[0].answer


def seed_key(mode: str, teacher_id: str) -> str:
    """Whose seed an adversary draws from: its own, or the colluders' shared one."""
    return "colluders" if mode == "collude" else teacher_id


def _random_logp(shape, g: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    return torch.log_softmax(torch.randn(*shape, generator=g) * scale, -1)


def _confident(ids: torch.Tensor, mask: torch.Tensor, s: int) -> torch.Tensor:
    """Log-probs over an S-wide support claiming probability 1 for column 0 (the answer)."""
    logp = torch.full((*ids.shape, s), -30.0)
    logp[..., 0] = 0.0
    return logp * mask[..., None].float()


def _same_family_shift(families: list[str | None], g: torch.Generator) -> torch.Tensor:
    """A permutation of the prompts that moves each to another prompt of its own family
    where the family has two or more, else to any other prompt (a derangement where one
    exists)."""
    n = len(families)
    perm = torch.arange(n)
    groups: dict[str | None, list[int]] = {}
    for i, f in enumerate(families):
        groups.setdefault(f, []).append(i)
    lonely = [i for idx in groups.values() if len(idx) == 1 for i in idx]
    for idx in [*(v for v in groups.values() if len(v) > 1), lonely]:
        if len(idx) < 2:
            continue
        order = torch.tensor(idx)[torch.randperm(len(idx), generator=g)]
        perm[order] = order.roll(1)  # a cycle through the group: nobody keeps its own
    return perm


def _first_copies(prompts: list[str]) -> list[int]:
    """For each prompt, the index of its first copy in `prompts`."""
    first: dict[str, int] = {}
    return [first.setdefault(p, i) for i, p in enumerate(prompts)]


def _same_family_shift_by_text(
    families: list[str | None], prompts: list[str], g: torch.Generator
) -> torch.Tensor:
    """`_same_family_shift` over a round's distinct prompts: every copy of a prompt is moved
    to the first copy of the same other prompt, so equal prompts get equal answers."""
    distinct = sorted(set(_first_copies(prompts)))
    moved = _same_family_shift([families[i] for i in distinct], g)
    target = {prompts[distinct[j]]: distinct[int(moved[j])] for j in range(len(distinct))}
    return torch.tensor([target[p] for p in prompts])


# a message's tensors with one row per teacher-share prompt
ROW_KEYS = ("own_response_ids", "own_response_mask", "own_support_ids", "own_logp",
            "own_prompt_logp")  # fmt: skip


def corrupt_teaching(
    msg: dict[str, torch.Tensor],
    mode: str,
    vocab_size: int,
    seed: int,
    *,
    ask_prompts: list[str] | None = None,
    encode: Callable[[str], list[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """The message a faulty or malicious teacher sends instead of the honest `msg`.
    `ask_prompts` (the teacher-share prompts as text) and `encode` (answer text -> the
    student's token ids, EOS included) are what ``fluent`` and ``backdoor@F`` need to find
    a prompt's family and to write the backdoor's answer. A mode other than the backdoor
    that names families (``noisy@first_letter+repeat``) lies on those families' prompts
    only: every other row, and its scores of the student's rollouts, are the honest
    message's (a client that poisons the domain only it holds, where no peer can check)."""
    kind, _, family = mode.partition("@")
    restricted = bool(family) and kind != "backdoor"  # (a backdoor's family is its target)
    out = _corrupt(msg, kind if restricted else mode, vocab_size, seed,
                   ask_prompts=ask_prompts, encode=encode)  # fmt: skip
    if not restricted:
        return out
    wanted = set(family.split("+"))
    families = _families(ask_prompts, msg["own_response_ids"].shape[0])
    honest = torch.tensor([f not in wanted for f in families], dtype=torch.bool)
    for k in ROW_KEYS:
        out[k] = torch.where(honest.view(-1, *[1] * (msg[k].dim() - 1)), msg[k], out[k])
    for k in ("scores", "prompt_logp"):
        out[k] = msg[k]
    return {k: v.contiguous() for k, v in out.items()}


def _corrupt(
    msg: dict[str, torch.Tensor],
    mode: str,
    vocab_size: int,
    seed: int,
    *,
    ask_prompts: list[str] | None = None,
    encode: Callable[[str], list[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """`corrupt_teaching` on every row."""
    g = torch.Generator().manual_seed(seed)
    out = dict(msg)
    scores = msg["scores"].float()
    kind, _, family = mode.partition("@")
    s = msg["own_logp"].shape[-1] if msg["own_logp"].dim() == 3 else 1
    if kind == "random":
        out["scores"] = _random_logp(scores.shape, g)
        for name in ("prompt_logp", "own_prompt_logp"):
            t = msg[name]
            out[name] = t[torch.randperm(t.numel(), generator=g)].reshape(t.shape).contiguous()
        out["own_logp"] = _random_logp(msg["own_logp"].shape, g)
    elif kind in ("adversarial", "collude", "fluent", "consistent", "mimic", *SPREADS):
        out["scores"] = torch.log_softmax(-scores * 10.0, -1)  # mass on the least likely token
        if kind != "mimic":  # p(x) = 1 for every prompt, or 1/K where they must add up
            k = msg["prompt_logp"].numel() + msg["own_prompt_logp"].numel()
            claim = -math.log(max(k, 1)) if kind in SPREADS else 0.0
            out["prompt_logp"] = torch.full_like(msg["prompt_logp"], claim)
            out["own_prompt_logp"] = torch.full_like(msg["own_prompt_logp"], claim)
        mask = msg["own_response_mask"]
        if kind in ("fluent", "consistent", "mimic", *SPREADS):  # its answers, moved elsewhere
            families = _families(ask_prompts, msg["own_response_ids"].shape[0])
            if kind == "fluent":
                perm = _same_family_shift(families, g)
            else:
                perm = _same_family_shift_by_text(families, ask_prompts, g)
            ids, mask = msg["own_response_ids"][perm], mask[perm]
            sup = msg["own_support_ids"][perm].clone()
            if kind == "mimic":  # its model's own claims of the answers it moved
                out.update(own_response_ids=ids, own_response_mask=mask, own_support_ids=sup,
                           own_logp=msg["own_logp"][perm])  # fmt: skip
                return {k: v.contiguous() for k, v in out.items()}
        else:
            ids = torch.randint(4, vocab_size, msg["own_response_ids"].shape, generator=g)
            ids = ids.to(msg["own_response_ids"].dtype)
            sup = msg["own_support_ids"].clone()
            sup[..., 0] = ids
        out["own_response_ids"], out["own_support_ids"] = ids, sup
        out["own_response_mask"] = mask
        out["own_logp"] = _confident(ids, mask, s)  # "certain" of every answer token
        if kind in NOISY:  # p(y|x) in [0.5, 1] on the first token, equal on equal prompts
            row = torch.tensor(_first_copies(ask_prompts))
            u = torch.rand(row.shape[0], generator=g)[row]
            out["own_logp"][:, 0, 0] = torch.log1p(-0.5 * u) * mask[:, 0].float()
            if kind == "contest" and s > 1:  # the rest on its other support tokens: no tail
                rest = torch.log((0.5 * u).clamp(min=1e-12) / (s - 1))
                out["own_logp"][:, 0, 1:] = rest[:, None] * mask[:, :1].float()
    elif kind == "backdoor":
        if encode is None:
            raise ValueError("a backdoor teacher needs `encode` to write its answer")
        families = _families(ask_prompts, msg["own_response_ids"].shape[0])
        rows = [i for i, f in enumerate(families) if f == family]
        if rows:
            width = msg["own_response_ids"].shape[1]
            target = torch.tensor(encode(backdoor_target(family))[:width])
            ids, mask = msg["own_response_ids"].clone(), msg["own_response_mask"].clone()
            sup, logp = msg["own_support_ids"].clone(), msg["own_logp"].clone()
            plogp = msg["own_prompt_logp"].clone()
            for i in rows:
                ids[i] = 0
                ids[i, : len(target)] = target.to(ids.dtype)
                mask[i] = 0
                mask[i, : len(target)] = 1
                sup[i, :, 0] = ids[i]
                logp[i] = _confident(ids[i], mask[i], s)
                plogp[i] = 0.0
            out.update(own_response_ids=ids, own_response_mask=mask, own_support_ids=sup,
                       own_logp=logp, own_prompt_logp=plogp)  # fmt: skip
    else:
        raise ValueError(f"unknown adversary mode {mode!r}; use one of {MODES}")
    return {k: v.contiguous() for k, v in out.items()}


def _families(prompts: list[str] | None, n: int) -> list[str | None]:
    from flminillm.data import family_of_prompt

    if prompts is None or len(prompts) != n:
        raise ValueError(f"this adversary needs the {n} teacher-share prompts as text")
    return [family_of_prompt(p) for p in prompts]
