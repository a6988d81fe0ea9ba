"""`flminillm bench tune`: choose the distillation hyper-parameters on the validation split.

Every candidate runs the benchmark's federation (the same runs as `flminillm bench quality`,
flminillm.bench.quality.run_grid) with `data.evaluate_on: validation`: the evaluate step
scores the validation sets, which are disjoint from the evaluation sets that `bench quality`
reports. For each method the candidate with the best validation score is chosen; the
benchmark config then carries the chosen values, and tests/test_quality.py checks that it
does (docs/tune.json is the committed output).

Validation score: the mean of the server's EM on all families and the clients' EM on the
families they do not hold (what distillation is for: the server learns every family from
the clients, a client the families it lacks from the server). A tie is broken by the same mean in
Rouge-L: on long-form families EM is validity, which no candidate may reach.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flminillm.bench.quality import _workdir, grid_meta, run_grid, summarise_grid, write_json
from flminillm.bench.variants import CONTEST_BAR, FORWARD_KL, Variant, attacks
from flminillm.config import Config, load_config

# The corrections of docs/algorithm.md ("Corrections under review"), all on.
FIXES = {"tail_bucket": True, "prefix_iw": True, "whiten_returns": True}

# (name, distill settings) per method; the first of each method is the config as written.
GRID: dict[str, list[tuple[str, dict]]] = {
    "reverse_kl": [
        ("rkl-as-configured", {}),
        ("rkl-fixes-a1", {**FIXES, "alpha": 1.0, "warmup_rounds": 0}),
        ("rkl-fixes-w2-a0.2", {**FIXES, "warmup_rounds": 2, "warmup_alpha": 1.0, "alpha": 0.2}),
        ("rkl-fixes-w3-a0.2", {**FIXES, "warmup_rounds": 3, "warmup_alpha": 1.0, "alpha": 0.2}),
        ("rkl-fixes-w2-a0.5", {**FIXES, "warmup_rounds": 2, "warmup_alpha": 1.0, "alpha": 0.5}),
    ],
    "forward_kl": [  # SeqKD on every teacher answer; the variant's settings are spelled out
        ("fkl-a1", {"alpha": 1.0, "warmup_rounds": 0, "tail_bucket": False}),
        ("fkl-tail-a1", {"alpha": 1.0, "warmup_rounds": 0, "tail_bucket": True}),
    ],
}


# The defence's replay of absent clients' answers (distill.stale_share), chosen under the
# drop-out it is for: 30% of the clients drop out of each round (as the `dropout-30` variant
# of bench quality); group `stale_share`, whose choice is DistillConfig's default.
DROPOUT = 0.3
STALE_GRID = [
    ("dropout-stale-0.5", {"stale_share": 0.5}),
    ("dropout-stale-1", {"stale_share": 1.0}),
]


# Where a quarantined (broken) teacher's answers rank under rank selection
# (distill.quarantine_quantile), chosen under the broken client it is for: the last client
# sends random scores (the `random-teacher` attack of bench quality); group
# `quarantine_quantile`, whose choice is DistillConfig's default.
QUARANTINE_GRID = [
    ("quarantine-0.5", {"quarantine_quantile": 0.5}),
    ("quarantine-0.65", {"quarantine_quantile": 0.65}),
    ("quarantine-0.8", {"quarantine_quantile": 0.8}),
]


# The learning rate over each distill step (distill.lr_schedule), for both methods under
# the benchmark's settings: group `lr_schedule` (FL-MiniLLM, the config as written) and
# `lr_schedule-forward_kl` (the forward-kl variant of bench quality). The benchmark configs
# carry the FL-MiniLLM choice; forward-kl's choice goes into its variant where they differ.
SCHEDULE_GRID = [
    ("schedule-constant", {"lr_schedule": "constant"}),
    ("schedule-cosine", {"lr_schedule": "cosine"}),
]


# Whether the single-step reverse KL on a teacher's sequence is weighted by the prefix
# importance weight (an expectation under the student; small wherever the student is still
# wrong) or taken at full weight on every visited prefix (MiniLLM's released code):
# group `iw_single_step`; the benchmark configs carry the choice.
SINGLE_STEP_GRID = [
    ("single-step-weighted", {"iw_single_step": True}),
    ("single-step-full", {"iw_single_step": False}),
]


# The teachers' sampling temperature (generation.temperature: every rollout, the teachers'
# answers included), for both methods: group `temperature` (FL-MiniLLM) and
# `temperature-forward_kl`. An unsure teacher's samples at temperature 1 are often wrong,
# and SeqKD learns them at full weight.
TEMPERATURE_GRID = [
    ("temperature-1", {"temperature": 1.0}),
    ("temperature-0.7", {"temperature": 0.7}),
]


# Where a teacher's tied claims rank under rank selection (distill.tie_rank): group
# `tie_rank` under the liar whose claims are one number for everything (the `liar-spread`
# attack of bench quality), and `tie_rank-clean` without a fault (its price). Decided
# before any run: 'low' is adopted if it scores above 'mean' under the attack and within 1
# point of it clean.
TIE_GRID = [
    ("ties-mean", {"tie_rank": "mean"}),
    ("ties-low", {"tie_rank": "low"}),
]


# Peer contest (distill.contest_quantile; contest_p at its default 0.05, set before any run):
# group `contest_quantile` under the liar whose random answer claims add up and rank
# anywhere (the `liar-noisy` attack of bench quality), and `contest_quantile-clean` without
# a fault (its price). Decided before any run: the quantile with the best score under the
# attack is adopted if it scores above 'off' (1) there and within 1 point of 'off' clean;
# else the next best that does; else the contest stays off. The contest alone, as a filter:
# without its bar (contest_bar 0, the default when these ran; the bar needs the contest).
CONTEST_GRID = [
    ("contest-off", {"contest_quantile": 1.0, "contest_bar": 0.0}),
    ("contest-0.5", {"contest_quantile": 0.5, "contest_bar": 0.0, "contest_leave_out": True}),
    ("contest-0.75", {"contest_quantile": 0.75, "contest_bar": 0.0, "contest_leave_out": True}),
]


# Two peers' contests bar a teacher for the round (distill.contest_bar, with the contest at
# contest_quantile 0.75): group `contest_bar` under the noisy liar and `contest_bar-clean`.
# The share 0.05 was read, before any run with the bar, from the contests recomputed on the
# training rounds' messages of docs/tune-contest's off runs (validation federations): honest
# teachers contested each other on 0% of their wins, the experts the liar on 6-12% each.
# Decided before any run: the rule of `choose_under_attack` (chosen; not the default: the
# 5-client shape, docs/results.md stop 40). 'off' is the contest and its bar off, as the runs
# were before. Stop 40 added 'all' (every peer that may contest must, `contest_bar_peers`)
# and 'all-kept' (the contests only the bar's evidence, `contest_leave_out` off) after the
# 5-client federations' training messages showed honest teachers whose families look alike
# contesting each other: recomputed offline on those messages, 'two' bars an honest teacher
# in 2 of 18 rounds and 'all' in none, and both bar the noisy liar in all 12 rounds of the
# 3-client validation federations. Decided before their runs: one becomes the default only
# if `choose_under_attack`'s rule holds for it on both shapes' validation splits
# (configs/benchmark.yaml and configs/benchmark-5clients.yaml). Its criteria are
# `passes_under_attack`'s; 'all-kept' alone met them on both (the default since stop 40:
# docs/tune-contest-bar-kept, docs/tune-contest-bar-5clients). Stop 41 added 'either'
# ('all-kept' with `contest_bar_rounds` 6: the counts of every round so far in these 6-round
# federations; a teacher is barred where this round's shares or the pooled ones are above
# the share) after the contests recomputed on the stop-40 federations' training messages
# (validation and evaluation, both shapes) showed the noisy liar's contests under 5% in
# half its rounds and above it in the others, and honest teachers' lowest peer share at
# most 1.5% in any round; replayed offline on the recorded rounds (exact for all-kept), the
# noisy and contesting liars are barred in 41 of their 48 3-client rounds (all-kept: 28),
# the 5-client liar as before, no honest teacher in any round. Decided before its runs:
# 'either' becomes the default only if, on both shapes' validation splits, it passes
# `passes_under_attack` (against 'off'), scores at least 'all-kept''s score under the
# attack and within 1 point of 'all-kept''s clean score, and on at least one shape scores
# above 'all-kept' under the attack (where the liar's contests are as before it may change
# nothing: level is allowed, a loss is not). (A first form, stopped within minutes of its
# first runs and not compared: the pooled shares alone, which a liar honest in its first
# rounds would dilute.) 'either' passed and is the default since stop 41
# (docs/tune-contest-bar-either, docs/tune-contest-bar-either-5clients). Then 'either-0.025'
# (the same at a share of 0.025): in those validation runs (`contest_pooled.<id>`) the
# honest teachers' lowest pooled peer share was at most 1.5% in any round of either shape,
# the 3-client liar's at least 2.7% in the rounds it escaped (seed 1's first three). Decided
# before its runs: it becomes the default only if it passes against 'off' and holds against
# 'either' (`holds_against`) on both shapes' validation splits, and scores above 'either'
# under the attack on one. And 'either-next' ('either' with `barred_wins` 'next': a barred
# teacher's would-be wins go to the teacher that wins without it), after a reading (not a
# choice) of the evaluation split's stop-41 runs: the noisy liar barred in every round
# still cost the honest families 4.5-6 points while 28-31% of each round's prompts, its
# would-be wins, left the batch (a training statistic, the same in the validation runs);
# the flat-claimed liars, which win nothing, cost 1.8. The same rule as 'either-0.025'.
BAR_GRID = [
    ("bar-off", {"contest_quantile": 1.0, "contest_bar": 0.0, "barred_wins": "leave"}),
    ("bar-0.05", CONTEST_BAR["distill"]),
    ("bar-all", {**CONTEST_BAR["distill"], "contest_bar_peers": "all"}),
    ("bar-all-kept", {**CONTEST_BAR["distill"], "contest_bar_peers": "all",
                      "contest_leave_out": False}),
    ("bar-either", {**CONTEST_BAR["distill"], "contest_bar_peers": "all",
                    "contest_leave_out": False, "contest_bar_rounds": 6}),
    ("bar-either-next", {**CONTEST_BAR["distill"], "contest_bar_peers": "all",
                         "contest_leave_out": False, "contest_bar_rounds": 6,
                         "barred_wins": "next"}),
    ("bar-either-0.025", {**CONTEST_BAR["distill"], "contest_bar_peers": "all",
                          "contest_leave_out": False, "contest_bar_rounds": 6,
                          "contest_bar": 0.025}),
]  # fmt: skip


# A barred teacher counted as an absent client with no past (distill.barred_as_absent):
# group `barred_as_absent` under the consistent liar (p = 1 claims: barred every round, the
# `liar-consistent` attack of bench quality), and `barred_as_absent-clean` (its price).
# Decided before any run: adopted if it scores above off under the liar and within 1
# point of off clean.
BARRED_GRID = [
    ("barred-kept", {"barred_as_absent": False}),
    ("barred-absent", {"barred_as_absent": True}),
]


# The student's own LM judging whether a teacher's answers depend on their prompts
# (distill.dependence_bar): group `dependence_bar` under the liar that lies on its own
# families only (the `liar-noisy-own` attack of bench quality: answers moved from another
# prompt of the family, where no peer can contest), and `dependence_bar-clean`. The share
# 0.25 (with dependence_min 0.5 and two earlier rounds kept, DEPENDENCE_ROUNDS) was set
# before any run with the bar, from the statistic recomputed on recorded training rounds
# (docs/results.md stop 43). Decided before its runs: it becomes the default only if
# `passes_under_attack` holds for it on both shapes' validation splits (configs/benchmark.yaml
# and configs/benchmark-5clients.yaml), and then only once every attack of the defence table
# is measured under it on the evaluation split with nothing past its bar that was within it.
DEPENDENCE_GRID = [
    ("dep-off", {"dependence_bar": 0.0}),
    ("dep-0.25", {"dependence_bar": 0.25}),
]


# The contest bar's share under the teachers' temperature 0.7 (stop 45): group
# `contest_bar_t07` under the contesting liar (the `liar-contest` attack of bench quality)
# and `contest_bar_t07-clean`. The 3-client defence table under 0.7 (docs/defence-
# temperature-0.7, evaluation split, seeds 0-2) has that liar past its bar (6.7 against 3).
# Read from those runs' training metrics (`contest_pooled.<id>`; not their scores): its
# lowest pooled peer share was 0.030-0.064 of its wins under 0.7 (0.043-0.075 at
# temperature 1), so the share of 0.05 let it through in 1, 4 and 2 of its 6 rounds, each
# time with a full teacher's share of the prompts; an honest teacher's was 0.000 in every
# 3-client round and at most 0.016 on the 5-client shape (clean, 0.7, seeds 0-2). Decided
# before its runs: validated on seeds the reports never used (`--first-seed 100 --seeds 2`:
# the candidate came from seeds 0-2's federations, which the validation runs of seeds 0-2
# would train again) on both shapes (configs/benchmark.yaml, configs/benchmark-5clients.yaml);
# 'bar-0.025' becomes the default only if `passes_under_attack` holds for it on both, and
# then only once every attack of the defence table is re-measured under it on the
# evaluation split. Added at stop 46, before any run of theirs and before the 0.025 runs
# reported: 'bar-judged-0.25' and 'bar-judged-0.5', the share read over only the wins each
# peer could contest (`distill.contest_bar_over` 'judged': the prompts it ranked above
# contest_quantile). Why: the liar's wins on its own families, which no peer is sure of,
# dilute its share over all its wins (seed 3's first rounds: 0.013-0.016, as low as an
# honest 5-client teacher's), while a sure honest peer contests nearly every fluent wrong
# answer it judges; an honest teacher's judged wins are rarely contested (never in a
# 3-client round). The shares 0.25 and 0.5 are guesses, not read from any run (no run
# recorded the judged counts). The same rule: a candidate becomes the default only if
# `passes_under_attack` holds for it on both shapes' validation splits (seeds 100-101);
# of several that do, the one with the higher mean validation score under the attack over
# the two shapes; then every attack of the defence table is re-measured under it on the
# evaluation split before it is called the default's. Then, once the 3-client runs of
# those had reported (all three passed there, the judged two alike) and before any 5-client
# run had: 'bar-veto-0.25' (`contest_bar_over` 'judged-veto': a peer with none of a
# teacher's wins to judge votes against its bar instead of abstaining). Why: in those runs
# an honest teacher's wins were judged by the contesting liar alone (its honest peer was
# never sure of them), so under 'judged' the bar on an honest teacher rests on whoever did
# judge: two contesting colluders could bar it. The same rule.
# A flaw of that rule, seen in the first 5-client runs (seed 101): the default bars the
# 5-client liar in every round it takes part in, so no candidate can score above it there
# and 'bar-0.025' ran the default's federation exactly; strictly above on both shapes
# cannot be met (stop 41's rule allowed level on one shape for this reason). Written before
# the seed-100 5-client runs reported: the seeds 100-101 verdict stands as the rule says;
# a candidate that passes on the 3-client shape and is level with the default under the
# attack on the 5-client one (and within 1 point clean on both) is validated again on
# fresh seeds (`--first-seed 102 --seeds 2`) by: above the default under the attack on
# the 3-client shape, at least level on the 5-client one (`holds_against` against
# 'bar-default'), clean within 1 point on both.
# 'bar-default' is the default these runs were measured against ('wins' at 0.05), pinned
# since stop 48 made 'bar-veto-0.25' the default, so that its runs keep their ids.
CONTEST_BAR_T07_GRID = [
    ("bar-default", {"contest_bar": 0.05, "contest_bar_over": "wins"}),
    ("bar-0.025", {"contest_bar": 0.025, "contest_bar_over": "wins"}),
    ("bar-judged-0.25", {"contest_bar_over": "judged", "contest_bar": 0.25}),
    ("bar-judged-0.5", {"contest_bar_over": "judged", "contest_bar": 0.5}),
    ("bar-veto-0.25", {"contest_bar_over": "judged-veto", "contest_bar": 0.25}),
]

# The fewest judged wins a peer's contest share needs to count (distill.contest_min_judged):
# group `contest_min` under the contesting liar, and `contest_min-clean`. Stop 48 found the
# default ('judged-veto' at 0.25) barring two honest look-alike teachers (bob, erin) in
# the first round of a clean 5-client federation on the evaluation split (seed 1), each
# peer's vote resting on 1-6 judged wins (1 of 2, 2 of 2, 6 of 6); replayed on the recorded
# validation rounds (seeds 100-101, both shapes, `contest_bar` on the stored counts), 3
# keeps every bar of the contesting liar and 5 drops one round's on each shape (the first
# it lies in; the pooled counts bar it from the next). Decided before any run with it:
# validation seeds 100-101 show no honest teacher barred under the default, so the rule can
# only check that a candidate costs nothing there: it becomes the default only if, on both
# shapes' validation splits, it is at least level with 'min-default' under the liar and
# within 1 point of it clean (`holds_against` against 'min-default'),
# then every row of the 5-client table (clean, contest-2, collude-2, backdoor) and the
# 3-client liar-contest row on the evaluation split, against the default's rows re-run on
# the same machine. Stop 49 (docs/tune-contest-min, -5clients): the replay above, which took
# every teacher as able to contest, mispredicted on both shapes (5 kept carol's round-1 bar;
# 3 lost erin's round 2 as 5 did, dave having judged 1 of her wins): neither holds against
# 'min-default' on the 5-client shape (44.8 against 45.4 under the liar), so neither is run
# on the evaluation split and contest_min_judged stays 0.
_VETO = dict(CONTEST_BAR_T07_GRID)["bar-veto-0.25"]  # the default since stop 48
CONTEST_MIN_GRID = [
    ("min-default", {**_VETO, "contest_min_judged": 0}),
    ("min-3", {**_VETO, "contest_min_judged": 3}),
    ("min-5", {**_VETO, "contest_min_judged": 5}),
]

# A teacher barred for the round counted as an absent client with no past, under the
# teachers' temperature 0.7 and with every bar (distill.barred_as_absent, since stop 50 also
# for contest- and dependence-barred teachers): group `barred_as_absent_t07` under the
# contesting liar, and `barred_as_absent_t07-clean`. Why, read from the evaluation split's
# runs (docs/defence-default-6seeds; a reading, not a choice): the barred liar costs the
# honest families 2.1 points over six seeds (3.3 on seeds 0-2, the one row past its bar),
# the federation that never hears from carol (`absent-last`) 0.7; most of the difference
# is on successor (-5.0 against -1.0), and the two differ in what a round does with the
# prompts of carol's families: under `barred_wins` 'next' the honest teachers' guesses there are
# learned (those that pass min_claim), for an absent client with no past its share of the
# prompts the present teachers are least sure of is held back. With both, a barred
# teacher's would-be wins go first to the teacher that wins without it, and then its share
# of the least-sure prompts is held back. (Tried at stop 37 at temperature 1, before 'next'
# and the contest bar, under the consistent liar: 0.9 below off, docs/tune-barred.) Decided
# before its runs: it becomes the default only if, on both shapes' validation splits
# (configs/benchmark.yaml, configs/benchmark-5clients.yaml; seeds 100-101), it holds
# against 'min-default' (`holds_against`: at least level under the liar, clean within 1
# point) and scores above it under the liar on at least one shape; then every row of both
# defence tables is re-measured under it on the evaluation split before it is called the
# default's. 'min-default' is CONTEST_MIN_GRID's, the same runs (shared by name).
# Stop 50 (docs/tune-barred-t07, -5clients): 3 clients 46.4 against 46.1 under the liar,
# 5 clients 45.37 against 45.44 (below: it does not hold), clean the same federations on
# both (no teacher barred in a clean validation round): not chosen, so not run on the
# evaluation split; barred_as_absent stays off.
BARRED_T07_GRID = [
    CONTEST_MIN_GRID[0],
    ("absent-t07", {**_VETO, "barred_as_absent": True}),
]

# The settings chosen under the attack they are for, each with its price clean: {group:
# (the bench quality attack, its candidates' name prefix, the grid)}; candidates
# `<prefix>-<name>` in `group` and `clean-<name>` in `<group>-clean`.
UNDER_ATTACK = {
    "tie_rank": ("liar-spread", "spread", TIE_GRID),
    "contest_quantile": ("liar-noisy", "noisy", CONTEST_GRID),
    "barred_as_absent": ("liar-consistent", "consistent", BARRED_GRID),
    "contest_bar": ("liar-noisy", "noisy", BAR_GRID),
    "dependence_bar": ("liar-noisy-own", "noisy-own", DEPENDENCE_GRID),
    "contest_bar_t07": ("liar-contest", "contest", CONTEST_BAR_T07_GRID),
    "contest_min": ("liar-contest", "contest", CONTEST_MIN_GRID),
    "barred_as_absent_t07": ("liar-contest", "contest", BARRED_T07_GRID),
}


def _under_attack(base: Config, group: str, attack: str, prefix: str, grid) -> list[Variant]:
    """A grid's candidates under `attack` (group `group`), then clean (`<group>-clean`)."""
    env, what = attacks(base)[attack]
    return [
        Variant(f"{prefix}-{name}", group=group, env=env, overrides={"distill": d},
                note=f"{_note(d)}; {what}")
        for name, d in grid
    ] + [
        Variant(f"clean-{name}", group=f"{group}-clean", overrides={"distill": d}, note=_note(d))
        for name, d in grid
    ]  # fmt: skip


def _under_attack_all(base: Config) -> list[Variant]:
    """Every `UNDER_ATTACK` grid's candidates. One shared by two grids (the same name: the
    same setting under the same attack, an incumbent measured once) runs once, in the
    group of the first; a name shared by different settings is an error."""
    out: dict[str, Variant] = {}
    for group, (attack, prefix, grid) in UNDER_ATTACK.items():
        for v in _under_attack(base, group, attack, prefix, grid):
            seen = out.setdefault(v.name, v)
            if (seen.env, seen.overrides) != (v.env, v.overrides):
                raise ValueError(f"tune grids: {v.name!r} names two settings")
    return list(out.values())


def _note(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "as configured"


def candidates(base: Config, names: list[str] | None = None) -> list[Variant]:
    """The grid as variants for the federation of `base` (group = the method,
    `stale_share` or `quarantine_quantile`), optionally only the named ones."""
    broken, what = attacks(base)["random-teacher"]
    out = [
        Variant(name, group=method, overrides={"distill": {"method": method, **d}}, note=_note(d))
        for method, grid in GRID.items()
        for name, d in grid
    ] + [
        Variant(name, group="stale_share", dropout=DROPOUT,
                overrides={"sampling": {"min_clients": 1}, "distill": d},
                note=f"{_note(d)}, {DROPOUT:.0%} of the clients dropping out of each round")
        for name, d in STALE_GRID
    ] + [
        Variant(name, group="quarantine_quantile", env=broken, overrides={"distill": d},
                note=f"{_note(d)}; {what}")
        for name, d in QUARANTINE_GRID
    ] + [
        Variant(name, group="lr_schedule", overrides={"distill": d}, note=_note(d))
        for name, d in SCHEDULE_GRID
    ] + [
        Variant(name, group="iw_single_step", overrides={"distill": d}, note=_note(d))
        for name, d in SINGLE_STEP_GRID
    ] + [
        Variant(name, group="temperature", overrides={"generation": d}, note=_note(d))
        for name, d in TEMPERATURE_GRID
    ] + [
        Variant(f"fkl-{name}", group="temperature-forward_kl",
                overrides={"distill": FORWARD_KL, "generation": d}, note=f"forward-kl, {_note(d)}")
        for name, d in TEMPERATURE_GRID
    ] + _under_attack_all(base) + [
        Variant(f"fkl-{name}", group="lr_schedule-forward_kl",
                overrides={"distill": {**FORWARD_KL, **d}}, note=f"forward-kl, {_note(d)}")
        for name, d in SCHEDULE_GRID
    ]  # fmt: skip
    if names:
        unknown = sorted(set(names) - {v.name for v in out})
        if unknown:
            raise ValueError(
                f"--candidates: unknown {unknown}; choose from {[v.name for v in out]}"
            )
        out = [v for v in out if v.name in names]
    return out


def validation_score(summary: dict, metric: str = "em") -> float | None:
    """Mean of the server's `metric` (em, rouge_l) on all families and the clients' on
    unseen families."""
    return _score(summary["server"][f"{metric}_all"]["mean"],
                  summary["clients"][f"{metric}_unseen"]["mean"])  # fmt: skip


def _score(server_all: float | None, clients_unseen: float | None) -> float | None:
    """The validation score from its two parts (None where either is missing)."""
    if server_all is None or clients_unseen is None:
        return None
    return (server_all + clients_unseen) / 2


def choose(results: dict[str, dict], group: str) -> str | None:
    """The candidate of `group` with the best validation score; a tie (long-form families,
    where EM is validity and no candidate may write a valid answer) broken by the same
    score in Rouge-L, then by order (the config as written first)."""
    scored = [
        ((validation_score(r), validation_score(r, "rouge_l") or 0.0), n)
        for n, r in results.items()
        if not n.startswith("_") and r["group"] == group
    ]
    scored = [(k, n) for k, n in scored if k[0] is not None]
    return max(scored, key=lambda x: x[0])[1] if scored else None


def _scores(results: dict[str, dict]) -> dict[str, float | None]:
    return {n: validation_score(r) for n, r in results.items() if not n.startswith("_")}


def _passes(score: dict[str, float | None], prefix: str, first: str, name: str,
            level: bool = False) -> bool:  # fmt: skip
    """`name` against `first`: above it under the attack (`level`: at least level with it)
    and clean within 1 point of its clean score."""
    need = (f"{prefix}-{first}", f"clean-{first}", f"{prefix}-{name}", f"clean-{name}")
    if any(score.get(n) is None for n in need):
        return False
    attacked, before = score[f"{prefix}-{name}"], score[f"{prefix}-{first}"]
    return (attacked >= before if level else attacked > before) and (
        score[f"clean-{name}"] >= score[f"clean-{first}"] - 0.01  # scores are fractions
    )


def passes_under_attack(results: dict[str, dict], group: str, name: str) -> bool:
    """The criteria of the rule written before the runs of a setting chosen under an attack
    (`UNDER_ATTACK`), for candidate `name` of `group`'s grid: its validation score under the
    attack above the first of its grid (the setting as it was) there, and clean within 1
    point of the first's clean score."""
    _, prefix, grid = UNDER_ATTACK[group]
    return _passes(_scores(results), prefix, grid[0][0], name)


def holds_against(results: dict[str, dict], group: str, name: str, incumbent: str) -> bool:
    """A challenger to a setting already chosen (stop 41's rule, BAR_GRID's comment): for
    candidate `name` of `group`'s grid, its validation score under the attack at least
    `incumbent`'s there, and clean within 1 point of `incumbent`'s clean score."""
    _, prefix, _ = UNDER_ATTACK[group]
    return _passes(_scores(results), prefix, incumbent, name, level=True)


def choose_under_attack(results: dict[str, dict], group: str) -> str | None:
    """The rule written before the runs of a setting chosen under an attack (`UNDER_ATTACK`):
    the candidate of `group` with the best validation score under the attack among those
    that pass (`passes_under_attack`); else the first of its grid (the setting as it was).
    None where the first is not in `results`."""
    _, prefix, grid = UNDER_ATTACK[group]
    score = _scores(results)  # once: every candidate is judged against the same scores
    first = grid[0][0]
    if score.get(f"{prefix}-{first}") is None:
        return None
    ok = [name for name, _ in grid[1:] if _passes(score, prefix, first, name)]
    return f"{prefix}-{max(ok, key=lambda n: score[f'{prefix}-{n}']) if ok else first}"


AVERAGED_CURVE = (
    "the runs average the server over its last {k} rounds (distill.server_average), so the "
    "per-round curve would compare an averaged last round with unaveraged earlier ones; "
    "choose the budget with `distill: {{server_average: 1}}` in the config"
)


def choose_rounds(results: dict[str, dict], names: list[str]) -> dict[str, Any] | None:
    """The round budget, on validation: for every round k >= 1 the runs of `names` have
    (the methods' chosen candidates: one budget for every method, as bench quality gives
    them), the validation score after round k (`validation_score`'s EM mean, from the
    summaries' per-round curve) averaged over `names`; the first round with the best mean
    (fewer rounds on a tie). None without runs. {"rounds", "score", "curve": {"rounds":
    [..], name: [..], "mean": [..]}}."""
    names = [n for n in names if n in results]
    curves = [results[n]["curve"] for n in names]
    if not curves or any("clients_em_unseen" not in c for c in curves):
        return None
    rounds = sorted(set.intersection(*(set(c["rounds"]) for c in curves)) - {0})

    def score(c: dict, k: int) -> float | None:
        i = c["rounds"].index(k)
        return _score(c["server_em_all"][i], c["clients_em_unseen"][i])

    table: dict[str, list] = {"rounds": rounds}
    for n, c in zip(names, curves, strict=True):
        table[n] = [score(c, k) for k in rounds]
    cols = [table[n] for n in names]
    table["mean"] = [
        None if any(col[i] is None for col in cols) else sum(col[i] for col in cols) / len(cols)
        for i in range(len(rounds))
    ]
    scored = [(m, -k) for k, m in zip(rounds, table["mean"], strict=True) if m is not None]
    if not scored:
        return None
    best, neg_k = max(scored)
    return {"rounds": -neg_k, "score": best, "curve": table}


def on_validation(base: Config) -> Config:
    """`base` scoring its validation split (refused without one)."""
    if base.data.n_val_per_family == 0 and base.data.source == "benchmark":
        raise ValueError(
            "bench tune chooses on the validation split, but data.n_val_per_family is 0 in "
            "the config: set it (e.g. 50), and keep it when reporting so the training data "
            "is the same"
        )
    data = base.model_dump(mode="json")
    data["data"]["evaluate_on"] = "validation"
    return Config.model_validate(data)


def run_tune(
    config: Path,
    seeds: int = 1,
    names: list[str] | None = None,
    workdir: Path | None = None,
    out_dir: Path = Path("docs"),
    jobs: int = 0,
    console=None,
    command: str = "",
    resume: bool = False,
    first_seed: int = 0,
) -> dict[str, Any]:
    """Run the grid on validation, choose per method, write tune.{json,md} into out_dir.
    Seeds `first_seed` to `first_seed` + `seeds` - 1: a validation run of seed s trains the
    same federation as the evaluation run of seed s (only the scored split differs), so a
    setting suggested by what an evaluation report's runs did in training is chosen on seeds
    the reports never used."""
    base = on_validation(load_config(config))
    vs = candidates(base, names)
    if resume and workdir is None:
        raise ValueError("--resume needs --workdir: the directory of the run to resume")
    with _workdir(workdir) as wd:
        grid = run_grid(base, vs, seeds, wd, jobs=jobs, console=console, resume=resume,
                        title="bench tune", first_seed=first_seed)  # fmt: skip
    results = summarise_grid(vs, grid)
    chosen = {}
    for method in dict.fromkeys(v.group for v in vs):
        name = choose(results, method)
        attacked = method.removesuffix("-clean")
        if attacked in UNDER_ATTACK:  # the rule, and the chosen setting's price clean
            under = choose_under_attack(results, attacked)
            if under is not None:
                setting = under.removeprefix(UNDER_ATTACK[attacked][1] + "-")
                name = under if method == attacked else f"clean-{setting}"
                name = name if name in results else None
        if name:
            v = next(v for v in vs if v.name == name)
            chosen[method] = {"candidate": name, "score": validation_score(results[name]),
                              "rouge_l_score": validation_score(results[name], "rouge_l"),
                              "distill": v.overrides.get("distill", {}),
                              **({"generation": v.overrides["generation"]}
                                 if "generation" in v.overrides else {})}  # fmt: skip
    budget = choose_rounds(results, [c["candidate"] for m, c in chosen.items() if m in GRID])
    if budget and base.distill.server_average > 1:
        # the last round's point is the average of K rounds' servers, the others are not:
        # no budget is chosen from such a curve (docs/tune.md)
        budget = {"skipped": AVERAGED_CURVE.format(k=base.distill.server_average)}
    results["_meta"] = {**grid_meta(config, base, grid, command), "chosen": chosen,
                        "split": "validation", "rounds": budget}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(results, out_dir / "tune.json")
    _write_markdown(results, out_dir / "tune.md")
    return results


def _write_markdown(results: dict, path: Path) -> None:
    from flminillm.bench.quality_report import _pm
    from flminillm.store import atomic_write_text

    meta = results["_meta"]
    lines = [
        "# Hyper-parameters chosen on the validation split",
        "",
        f"Produced by `{meta['command'] or 'flminillm bench tune'}` in "
        f"{meta['seconds'] / 60:.1f} min on {meta['cpu_count']} CPU cores "
        f"(the runs' own time, resumed ones included: {meta.get('run_seconds', meta['seconds']) / 60:.1f} min) "
        f"({meta['jobs']} worker processes). Config: `{meta['config']}`; seeds {meta['seeds']}. "
        "Every number here is on the **validation** split (data.evaluate_on: validation), "
        "disjoint from the evaluation split that docs/results.md reports; nothing in "
        "docs/results.md was used to choose. Score = mean of server EM (all families) and "
        "clients' EM on unseen families; a tie is broken by the same mean in Rouge-L. Raw "
        "numbers: `tune.json`.",
        "",
    ]
    if meta.get("resumed"):
        lines += [f"Resumed: {len(meta['resumed'])} runs reused from the workdir.", ""]
    for name, fails in (meta.get("failures") or {}).items():
        lines += [f"- **FAILED** `{name}` seed {f['seed']}: {f['error']}" for f in fails]
    lines += ["| method | candidate | settings | score | server EM all | clients EM unseen "
              "| clients EM held | Rouge-L score (ties) | seeds |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        if name.startswith("_"):
            continue
        score = validation_score(r)
        mark = (
            " **(chosen)**" if meta["chosen"].get(r["group"], {}).get("candidate") == name else ""
        )
        lines.append(
            f"| {r['group']} | `{name}`{mark} | {r['note']} | "
            f"{_pm({'mean': score})} | {_pm(r['server']['em_all'])} | "
            f"{_pm(r['clients']['em_unseen'])} | {_pm(r['clients']['em_held'])} | "
            f"{_pm({'mean': validation_score(r, 'rouge_l')})} | {len(r['seeds'])} |"
        )
    lines += [
        "",
        "Chosen (the benchmark config carries these, DistillConfig's defaults the `stale_share` "
        "and the `quarantine_quantile`; "
        "tests/test_quality.py and tests/test_tune.py check it). A setting chosen under an "
        f"attack ({', '.join(UNDER_ATTACK)}) is the best under it that "
        "scores above the first of its grid (the setting as it was) there and within 1 point "
        "of it clean, else that first one (`choose_under_attack`, written before the runs); "
        "its `-clean` group shows the chosen setting's price:",
        "",
    ]
    for method, c in meta["chosen"].items():
        what = {k: c[k] for k in ("distill", "generation") if c.get(k)}
        lines.append(f"- {method}: `{c['candidate']}` → `{json.dumps(what)}`")
    budget = meta.get("rounds")
    if budget and "skipped" in budget:
        lines.append(f"- round budget: not chosen: {budget['skipped']}")
    elif budget:
        curve = budget["curve"]
        names = [n for n in curve if n not in ("rounds", "mean")]
        lines += [
            f"- round budget (of the config's {max(curve['rounds'])}): **{budget['rounds']}**, "
            "the first round with the best validation score averaged over the chosen "
            "candidates (one budget for every method):",
            "",
            "| round | " + " | ".join(f"`{n}`" for n in names) + " | mean |",
            "|---|" + "---|" * (len(names) + 1),
        ]
        for i, k in enumerate(curve["rounds"]):
            mark = " **(chosen)**" if k == budget["rounds"] else ""
            cells = [_pm({"mean": curve[n][i]}) for n in [*names, "mean"]]
            lines.append(f"| {k}{mark} | " + " | ".join(cells) + " |")
    atomic_write_text(path, "\n".join(lines) + "\n")
