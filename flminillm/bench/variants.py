"""The variants of `flminillm bench quality`: the method, its baselines, its ablations, and
faults and attacks, each a change to the benchmark's config (and environment).

- fl-minillm: the method (reverse-KL policy gradient, both directions every round);
- forward-kl: federated forward KL / SeqKD (FedDF/FedMKT-style): the student fits the
  teachers' top-k distributions on every scored sequence (its own and the teachers') and
  the teachers' answers (SeqKD); same prompts, messages and bytes as fl-minillm;
- local-only, fedavg, pooled: flminillm.bench.baselines;
- ablations of fl-minillm (no teacher-mixed sampling, no single-step decomposition, no
  length normalisation, alpha and top-k sweeps);
- faults: one client (the last) a random, adversarial, fluent-lying or backdoor teacher
  (flminillm.attacks), the last two colluding (4 clients or more), 30% of clients dropping
  out of each round, each with the default defence, without it (`-undefended`) and with
  all of it but the input-invariance check (`-no-invariance`), and the non-IID severity
  (data.iid_mix) swept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from flminillm.config import Config, deep_merge

METHODS = ("fl-minillm", "local-only", "fedavg", "forward-kl", "pooled")

# the defence of flminillm.aggregate (DistillConfig's defaults: rank selection, min_claim 0.5
# within max_rejected 0.5, stale_share 1, the input-invariance check, the plausibility
# check; claims compared among the sure) taken away: joint selection, every answer kept,
# nothing replayed, no answer ruled out, no teacher judged by the student's LM (joint_quantile
# 1: joint selection compares every claim anyway, and the runs keep their ids); the `-undefended`
# variants measure what the defence buys and costs
UNDEFENDED = {
    "distill": {"selection": "joint", "min_claim": 0.0, "stale_share": 0.0,
                "invariance_share": 0.0, "plausibility_margin": 0.0, "joint_quantile": 1.0,
                "max_claim_sum": 0.0, "max_prompt_claim_sum": 0.0, "tie_rank": "mean",
                "contest_quantile": 1.0, "contest_bar": 0.0, "barred_wins": "leave"}
}  # fmt: skip
# the default defence without the input-invariance check (distill.invariance_share 0;
# flminillm.aggregate.invariant_answers): what the check buys against the backdoor and
# what it costs a clean federation; claims among the sure need the check (joint_quantile 1)
NO_INVARIANCE = {
    "distill": {"invariance_share": 0.0, "joint_quantile": 1.0, "barred_wins": "leave"}
}
# the default defence plus two peers' contests barring a teacher for the round
# (distill.contest_bar with the peer contest at 0.75; chosen on the 3-client validation
# split, docs/tune-contest-bar, stop 39; not the default: on the 5-client benchmark honest
# teachers whose families look alike contest each other, docs/results.md, stop 40; the
# default since is its refinement, contest_bar_peers 'all' and contest_leave_out off)
CONTEST_BAR = {
    "distill": {"contest_quantile": 0.75, "contest_bar": 0.05, "contest_bar_peers": "two",
                "contest_leave_out": True, "contest_bar_rounds": 1, "barred_wins": "leave",
                "contest_bar_over": "wins"}
}  # fmt: skip
# the default defence with a barred teacher's would-be wins kept, the answer of the teacher
# that wins without it (distill.barred_wins 'next'; tried on validation at stop 41, the
# default since stop 42: these runs are the default's, under the names they were measured
# with). UNDEFENDED, NO_INVARIANCE and CONTEST_BAR pin 'leave', as they were measured;
# CONTEST_BAR also pins its share over every win ('wins', the default until stop 48).
BARRED_NEXT = {"distill": {"barred_wins": "next"}}
# the default defence plus the student's own LM judging whether each teacher's answers
# depend on their prompts (distill.dependence_bar at 0.25; tried on validation at stop 43)
DEPENDENCE = {"distill": {"dependence_bar": 0.25}}
# The other defences the faults run under, as `<fault><suffix>` beside `<fault>` (the
# default defence): {suffix: (overrides, what it is)}. Each comes with `clean<suffix>`, the
# same without a fault, which flminillm.bench.quality_report measures them against.
DEFENCES = {
    "-undefended": (UNDEFENDED, "without the default defence (joint selection, no min_claim, "
                                "no stale replay, no invariance, plausibility or claim-sum check)"),
    "-no-invariance": (NO_INVARIANCE, "the default defence without the invariance check "
                                      "(and so rank alone among the sure)"),
    "-contest-bar": (CONTEST_BAR, "the default defence plus the peer contest at 0.75 and "
                                  "its bar (two peers contesting over 5% of a teacher's wins)"),
    "-barred-next": (BARRED_NEXT, "the default defence with a barred teacher's would-be wins "
                                  "going to the teacher that wins without it "
                                  "(distill.barred_wins next)"),
    "-dependence": (DEPENDENCE, "the default defence plus the dependence bar (a teacher whose "
                                "answers the student finds no likelier after their own "
                                "prompts than after similar ones, distill.dependence_bar "
                                "0.25)"),
}  # fmt: skip
DEFENCE_SUFFIXES = tuple(DEFENCES)
# what `dropout-30` changes besides the drop-out itself: rounds go on with one client
DROPOUT_OVERRIDES = {"sampling": {"min_clients": 1}}
# The forward-KL/SeqKD baseline's own distill settings, chosen on the validation split by
# `flminillm bench tune` (docs/tune.json; tests/test_quality.py checks they agree), so the
# baseline is not run at the reverse-KL method's schedule.
FORWARD_KL = {"method": "forward_kl", "alpha": 1.0, "warmup_rounds": 0, "tail_bucket": False}


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str = "federated"  # federated | local-only | fedavg | pooled
    group: str = "method"  # method | ablation | fault
    overrides: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # FLMINILLM_* fault injection
    note: str = ""
    dropout: float = 0.0  # this share of the clients drops out of each round (dropout_faults)
    absent: tuple[str, ...] = ()  # clients that drop out of every round (absent_faults)


def attacks(cfg: Config) -> dict[str, tuple[dict[str, str], str]]:
    """Each attack of bench quality: its fault injection (FLMINILLM_ADVERSARY, the last
    client attacking) and what it does, written once for the variants with and without the
    defence and for bench tune's candidates chosen under an attack."""
    last = cfg.clients[-1].id
    pair = [c.id for c in cfg.clients[-2:]]  # colluders, where there are 4 clients or more
    fbc = cfg.families_by_client()
    target = next(
        (f for c in cfg.clients[:-1] for f in fbc[c.id] if f not in fbc[last]), fbc[last][0]
    )
    adv = "FLMINILLM_ADVERSARY"
    return {
        "random-teacher": ({adv: f"{last}:random"},
                           f"{last} sends random scores (a broken model)"),
        "adversary": ({adv: f"{last}:adversarial"},
                      f"{last} lies (random-token answers, inverted scores, claims p=1)"),
        "liar-fluent": ({adv: f"{last}:fluent"},
                        f"{last} answers each prompt with its answer to another prompt of the "
                        "same family (reads right, is wrong), claims p=1"),
        "liar-consistent": ({adv: f"{last}:consistent"},
                            f"{last} lies fluently as liar-fluent, but the same prompt gets the "
                            "same wrong answer wherever it is asked in a round, claims p=1"),
        "liar-mimic": ({adv: f"{last}:mimic"},
                       f"{last} lies as liar-consistent, but every claim it sends is what its "
                       "model would claim (its answers' log-probs moved with them)"),
        "liar-spread": ({adv: f"{last}:spread"},
                        f"{last} lies as liar-consistent, its prompt claims spread to sum to 1 "
                        "(p(x) = 1/K each), its answers claimed p=1"),
        "liar-noisy": ({adv: f"{last}:noisy"},
                       f"{last} lies as liar-spread, its answers claimed with p drawn in "
                       "[0.5, 1] (not one number: they rank at random)"),
        "liar-noisy-own": ({adv: f"{last}:noisy@{'+'.join(fbc[last])}"},
                           f"{last} lies as liar-noisy on its own families' prompts only "
                           f"({', '.join(fbc[last])}: where no peer knows the answer), "
                           "honest elsewhere"),
        "liar-contest": ({adv: f"{last}:contest"},
                         f"{last} lies as liar-noisy, its first-token support holding all its "
                         "mass (no tail): it contests nearly every answer it ranks "
                         "above contest_quantile"),
        "backdoor": ({adv: f"{last}:backdoor@{target}"},
                     f"{last} is honest except on {target} (an honest client's family), where "
                     "it always gives the same wrong answer, claiming p=1"),
        **({"collude-2": ({adv: ",".join(f"{c}:collude" for c in pair)},
                          f"{' and '.join(pair)} lie together (identical garbage answers, p=1 "
                          "claims)"),
            "contest-2": ({adv: ",".join(f"{c}:contest" for c in pair)},
                          f"{' and '.join(pair)} each lie as liar-contest: two peers contest "
                          "the honest teachers' answers (what a bar read from two peers' "
                          "contests alone would let bar an honest teacher)")}
           if len(cfg.clients) >= 4 else {}),
    }  # fmt: skip


def _variants(cfg: Config) -> list[Variant]:
    last = cfg.clients[-1].id
    attack = attacks(cfg)
    a, k = cfg.distill.alpha, cfg.generation.top_k
    # the two teacher-mixed shares nearest the default, 0.25 apart, inside [0, 1]
    near = [round(a + d, 2) for d in (-0.25, 0.25, -0.5, 0.5) if 0.0 <= a + d <= 1.0]
    alphas = sorted(near[:2])
    topks = sorted({max(1, k // 2), k * 2} - {k})
    v = [
        Variant("fl-minillm", note="reverse-KL policy gradient (MiniLLM), both directions"),
        Variant("local-only", "local-only", note="own data only; server keeps its pre-training"),
        Variant("fedavg", "fedavg", note="homogeneous: every party has the server's model"),
        Variant(
            "forward-kl", overrides={"distill": FORWARD_KL},
            note="forward KL to the teachers' top-k on every scored sequence + SeqKD on their "
            "answers (FedDF/FedMKT-style); same prompts, messages and bytes",
        ),
        Variant("pooled", "pooled", note="all clients' data in one place (upper bound)"),
        Variant("no-teacher-mixed", group="ablation",
                overrides={"distill": {"teacher_mixed": False}}, note="student rollouts only"),
        Variant("no-single-step", group="ablation",
                overrides={"distill": {"single_step": False}}, note="sampled-token reward only"),
        Variant("no-length-norm", group="ablation",
                overrides={"distill": {"length_norm": False}}, note="unnormalised future return"),
        *[Variant(f"alpha-{x:g}", group="ablation", overrides={"distill": {"alpha": x}},
                  note=f"teacher-mixed share {x:g} (default {a:g})") for x in alphas],
        *[Variant(f"top-k-{x}", group="ablation", overrides={"generation": {"top_k": x}},
                  note=f"support size {x} (default {k})") for x in topks],
        Variant("clean-median", group="fault", overrides={"distill": {"aggregation": "median"}},
                note="no fault, median aggregation (the price of robustness)"),
        *[Variant(name, group="fault", env=env, note=note)
          for name, (env, note) in attack.items()],
        Variant("dropout-30", group="fault", overrides=DROPOUT_OVERRIDES, dropout=0.3,
                note="30% of the clients (rounded, at least 1) drop out of each round, at random"),
        Variant("absent-last", group="fault", absent=(last,),
                note=f"{last} (the attacks' adversary) drops out of every round, honest: the "
                "federation that never hears from it (an absent client with no past: its "
                "share of the prompts the present teachers are least sure of is held back), "
                "what the others reach without its teaching"),
        # the same, clean and under each fault, under the other defences: what they buy
        *[w for suffix, (over, what) in DEFENCES.items() for w in (
            Variant(f"clean{suffix}", group="fault", overrides=over,
                    note=f"no fault, {what}: its price"),
            *[Variant(f"{name}{suffix}", group="fault", env=env, overrides=over,
                      note=f"{name}, {what}") for name, (env, _) in attack.items()],
            Variant(f"dropout-30{suffix}", group="fault", dropout=0.3,
                    overrides=deep_merge(over, DROPOUT_OVERRIDES), note=f"dropout-30, {what}"),
        )],
        Variant("adversary-median", group="fault", env=attack["adversary"][0],
                overrides=deep_merge(UNDEFENDED, {"distill": {"aggregation": "median"}}),
                note=f"{last} lies; median aggregation, no other defence"),
        Variant("adversary-capped", group="fault", env=attack["adversary"][0],
                overrides=deep_merge(
                    UNDEFENDED, {"distill": {"aggregation": "capped_mixture", "cap": 0.5}}),
                note=f"{last} lies; mixture with each teacher's mean weight (and share of the "
                "kept answers) capped at 0.5, no other defence"),
        *[Variant(f"iid-mix-{x:g}", group="fault", overrides={"data": {"iid_mix": x}},
                  note=f"non-IID severity: share {x:g} of private data from all families")
          for x in (0.5, 1.0)],
    ]  # fmt: skip
    return v


def variants(cfg: Config, names: list[str] | None = None) -> list[Variant]:
    allv = _variants(cfg)
    if not names:
        return allv
    known = {v.name: v for v in allv}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {sorted(known)}")
    return [known[n] for n in names]


def variant_config(base: Config, v: Variant, seed: int, workdir: Path) -> Config:
    """The config of (variant, seed): the benchmark's with the variant's changes, its own
    name, the shared store in `workdir`, no MLflow of its own."""
    data = deep_merge(base.model_dump(mode="json"), v.overrides)
    data["seed"] = seed
    data["name"] = f"{base.name}-{v.name}-s{seed}"
    data["store"]["uri"] = str(workdir / "store")
    data["tracking"]["enabled"] = False
    if v.kind == "fedavg":  # homogeneous: every client gets the server's architecture
        for c in data["clients"]:
            c["model"] = dict(data["server"]["model"])
    return Config.model_validate(data)


def variant_env(cfg: Config, v: Variant) -> dict[str, str]:
    """The environment a run of `v` needs (fault injection), with one attempt per step."""
    env = dict(v.env)
    faults = [dropout_faults(cfg, v.dropout)] if v.dropout else []
    faults += [absent_faults(cfg, c) for c in v.absent]
    if faults:
        env["FLMINILLM_FAULTS"] = ",".join(faults)
    env.setdefault("FLMINILLM_STEP_RETRIES", "1")
    return env


def dropout_faults(cfg: Config, p: float = 0.3) -> str:
    """FLMINILLM_FAULTS that make round(p * N) clients, drawn at random (seeded) each
    round, drop out of it (at least one client always stays)."""
    rng = random.Random(f"dropout/{cfg.seed}")
    ids = [c.id for c in cfg.clients]
    k = min(len(ids) - 1, max(1, round(p * len(ids))))
    items = []
    for r in range(1, cfg.rounds + 1):
        items += [f"local_sft:{c}:{r}" for c in rng.sample(ids, k)]
    return ",".join(items)


def absent_faults(cfg: Config, client: str) -> str:
    """FLMINILLM_FAULTS that make `client` drop out of every round (it never teaches)."""
    return ",".join(f"local_sft:{client}:{r}" for r in range(1, cfg.rounds + 1))


def kept_out(v: Variant) -> dict[str, str]:
    """{client: what it does} for the clients whose families are not the honest ones in `v`'s
    runs: its adversaries (FLMINILLM_ADVERSARY, with their modes) and its absent clients
    ('absent')."""
    from flminillm.attacks import adversaries

    return {
        **adversaries(v.env.get("FLMINILLM_ADVERSARY", "")),
        **dict.fromkeys(v.absent, "absent"),
    }


def honest_clients(base: Config, names: list[str]) -> list:
    """The clients kept out of none of the variants `names` (`kept_out`, as `bench quality`'s
    honest families read it); where none keeps one out, every client but the last, the
    benchmark's adversary."""
    liars = {p for v in variants(base, names) for p in kept_out(v)}
    return [c for c in base.clients if c.id not in liars] if liars else base.clients[:-1]
