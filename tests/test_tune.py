"""`flminillm bench tune`: the grid runs on the validation split, the choice is the best
validation score per method, and the benchmark config carries what docs/tune.json chose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flminillm.bench.quality import finished_result
from flminillm.bench.quality_report import honest_families
from flminillm.bench.tune import (
    BAR_GRID,
    CONTEST_BAR_T07_GRID,
    GRID,
    candidates,
    choose,
    choose_rounds,
    holds_against,
    on_validation,
    passes_under_attack,
    validation_score,
)
from flminillm.bench.variants import CONTEST_BAR, NO_INVARIANCE, UNDEFENDED, attacks, variant_config
from flminillm.cli import main
from flminillm.config import DistillConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "benchmark-tiny.yaml"


def test_tune_scores_validation_and_chooses_the_best(tmp_path):
    names = ["rkl-as-configured", "rkl-fixes-a1", "fkl-a1"]
    work = tmp_path / "work"
    args = ["bench", "tune", "--config", str(TINY), "--candidates", ",".join(names),
            "--out", str(tmp_path), "--workdir", str(work), "--jobs", "1"]  # fmt: skip
    assert main(args) == 0
    res = json.loads((tmp_path / "tune.json").read_text())
    meta = res["_meta"]
    assert meta["split"] == "validation" and meta["failures"] == {}
    # the evaluate step scored the validation sets (6 per family), not the eval sets (8)
    base = on_validation(load_config(TINY))
    for v in candidates(base, names):
        raw = finished_result(base, v, 0, work)
        last = raw["rounds"][max(raw["rounds"], key=int)]["eval"]
        assert {m["n"] for party in last.values() for m in party.values()} == {6}, v.name
    for method in ("reverse_kl", "forward_kl"):
        mine = {n: validation_score(r) for n, r in res.items() if r.get("group") == method}
        best = meta["chosen"][method]["candidate"]
        assert best == choose(res, method) and mine[best] == max(mine.values())
    assert "**(chosen)**" in (tmp_path / "tune.md").read_text()
    # the round budget: the best round of the chosen candidates' mean validation curve
    budget = meta["rounds"]
    chosen = [meta["chosen"][m]["candidate"] for m in ("reverse_kl", "forward_kl")]
    assert budget["curve"]["rounds"] == list(range(1, load_config(TINY).rounds + 1))
    assert budget["score"] == max(budget["curve"]["mean"])
    # the last round's score is the summary's (the curve reads the same evaluations)
    assert budget["curve"][chosen[0]][-1] == pytest.approx(validation_score(res[chosen[0]]))
    # resumed: nothing runs again, same numbers
    assert main([*args, "--resume"]) == 0
    again = json.loads((tmp_path / "tune.json").read_text())
    assert len(again["_meta"]["resumed"]) == len(names)
    assert again["_meta"]["chosen"] == meta["chosen"]


def test_tune_chooses_on_seeds_the_reports_never_used(tmp_path, capsys):
    """--first-seed: the validation runs of seeds 7.. train other federations than the
    evaluation runs of seeds 0-2 (a validation run of seed s is the evaluation run's
    federation, only the scored split differs)."""
    work = tmp_path / "work"
    args = ["bench", "tune", "--config", str(TINY), "--candidates", "rkl-as-configured",
            "--out", str(tmp_path), "--workdir", str(work), "--jobs", "1"]  # fmt: skip
    assert main([*args, "--first-seed", "7"]) == 0
    res = json.loads((tmp_path / "tune.json").read_text())
    assert res["_meta"]["seeds"] == [7] and res["rkl-as-configured"]["seeds"] == [7]
    assert "seeds [7]" in (tmp_path / "tune.md").read_text()
    base = on_validation(load_config(TINY))
    (v,) = candidates(base, ["rkl-as-configured"])
    assert finished_result(base, v, 7, work)["seed"] == 7
    assert finished_result(base, v, 0, work) is None  # seed 0 never ran
    assert main([*args, "--first-seed", "-1"]) == 2
    assert "--first-seed must be >= 0" in capsys.readouterr().err


def test_no_round_budget_is_chosen_from_a_curve_with_an_averaged_last_round(tmp_path):
    """With distill.server_average K > 1 the last round's point averages K servers and the
    others do not: the tune says so and chooses no budget from such a curve."""
    cfg = tmp_path / "avg.yaml"
    cfg.write_text(f"extends: {TINY}\ndistill: {{server_average: 2}}\n")
    args = ["bench", "tune", "--config", str(cfg), "--candidates", "fkl-a1", "--out",
            str(tmp_path), "--workdir", str(tmp_path / "work"), "--jobs", "1"]  # fmt: skip
    assert main(args) == 0
    meta = json.loads((tmp_path / "tune.json").read_text())["_meta"]
    assert "server_average: 1" in meta["rounds"]["skipped"]
    assert (
        "- round budget: not chosen: the runs average the server over its last 2 rounds"
        in (tmp_path / "tune.md").read_text()
    )


def test_tune_refuses_a_config_without_a_validation_split(tmp_path, capsys):
    data = yaml.safe_load(TINY.read_text())
    data["data"].pop("n_val_per_family")
    cfg = tmp_path / "noval.yaml"
    cfg.write_text(yaml.safe_dump(data))
    assert main(["bench", "tune", "--config", str(cfg), "--out", str(tmp_path)]) == 2
    assert "data.n_val_per_family is 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown"):
        candidates(load_config(TINY), ["no-such"])


def test_grid_starts_from_the_config_as_written():
    assert GRID["reverse_kl"][0] == ("rkl-as-configured", {})
    assert all(
        v.overrides["distill"]["method"] == v.group
        for v in candidates(load_config(TINY))
        if v.group in GRID
    )


def test_a_candidate_shared_by_two_grids_runs_once_and_a_name_clash_is_an_error(monkeypatch):
    """An incumbent two under-attack grids share (the same name and setting) is one variant,
    in the first grid's group, so its runs are measured once; one name for two different
    settings is refused rather than one of them silently run for both."""
    import flminillm.bench.tune as tune

    names = [v.name for v in candidates(load_config(TINY))]
    assert len(names) == len(set(names))
    shared = [v for v in candidates(load_config(TINY)) if v.name == "contest-min-default"]
    assert [v.group for v in shared] == ["contest_min"]
    clash = ("liar-contest", "contest", [("min-default", {"contest_min_judged": 3})])
    monkeypatch.setitem(tune.UNDER_ATTACK, "clash", clash)
    with pytest.raises(ValueError, match="'contest-min-default' names two settings"):
        candidates(load_config(TINY))


def test_stale_share_is_chosen_under_the_drop_out_it_is_for():
    """The replay share's candidates run with 30% of the clients dropping out of each round
    (the fault injection of bench quality's dropout-30), the default among them."""
    from flminillm.bench.variants import variant_env

    stale = [v for v in candidates(load_config(TINY)) if v.group == "stale_share"]
    shares = {v.overrides["distill"]["stale_share"] for v in stale}
    assert DistillConfig().stale_share in shares and len(shares) >= 2
    cfg = load_config(TINY)
    for v in stale:
        faults = variant_env(cfg, v)["FLMINILLM_FAULTS"].split(",")
        assert len(faults) == cfg.rounds  # one of the three clients out of every round
        assert all(f.startswith("local_sft:") for f in faults)


def test_the_default_replay_share_is_what_validation_chose():
    """docs/tune-dropout/tune.json (validation split, 30% drop-out) chose stale_share; the
    default carries it."""

    chosen = json.loads((ROOT / "docs" / "tune-dropout" / "tune.json").read_text())["_meta"]
    assert chosen["split"] == "validation"
    assert DistillConfig().stale_share == chosen["chosen"]["stale_share"]["distill"]["stale_share"]


def test_quarantine_quantile_is_chosen_under_the_broken_client_it_is_for():
    """Where a quarantined teacher ranks is chosen with the last client sending random
    scores (bench quality's random-teacher attack), the default among the candidates; the
    candidates differ only in that setting."""
    from flminillm.bench.variants import attacks

    cfg = load_config(TINY)
    group = [v for v in candidates(cfg) if v.group == "quarantine_quantile"]
    at = {v.overrides["distill"]["quarantine_quantile"] for v in group}
    assert DistillConfig().quarantine_quantile in at and len(at) >= 2
    for v in group:
        assert v.env == attacks(cfg)["random-teacher"][0]
        assert v.env["FLMINILLM_ADVERSARY"] == f"{cfg.clients[-1].id}:random"
        assert list(v.overrides["distill"]) == ["quarantine_quantile"]


def test_the_default_quarantine_quantile_is_what_validation_chose():
    """docs/tune-quarantine/tune.json (validation split, the last client broken) chose where a
    quarantined teacher ranks; the default carries it."""

    meta = json.loads((ROOT / "docs" / "tune-quarantine" / "tune.json").read_text())["_meta"]
    assert meta["split"] == "validation"
    chosen = meta["chosen"]["quarantine_quantile"]["distill"]["quarantine_quantile"]
    assert DistillConfig().quarantine_quantile == chosen


def test_a_tie_in_em_is_broken_by_rouge_l_then_by_order():
    """Long-form validation: no candidate writes a valid answer (EM 0 for all), so EM
    cannot choose; the Rouge-L mean does, and a full tie keeps the config as written."""

    def run(em: float, rouge: float, group: str = "reverse_kl") -> dict:
        side = {
            "em_all": {"mean": em},
            "em_unseen": {"mean": em},
            "rouge_l_all": {"mean": rouge},
            "rouge_l_unseen": {"mean": rouge},
        }
        return {"group": group, "server": side, "clients": side}  # fmt: skip

    res = {"as-written": run(0.0, 0.60), "other": run(0.0, 0.65), "_meta": {}}
    assert choose(res, "reverse_kl") == "other"
    res["as-written"] = run(0.01, 0.10)  # EM first, however far behind in Rouge-L
    assert choose(res, "reverse_kl") == "as-written"
    res["other"] = run(0.01, 0.10)
    assert choose(res, "reverse_kl") == "as-written"
    assert choose(res, "forward_kl") is None


def test_the_round_budget_is_the_first_best_round_of_the_mean_curve():
    """Two methods' per-round validation curves: the budget is the round where their mean
    peaks (one budget for both), the earlier round on a tie; round 0 is not a budget."""

    def run(server: list[float], unseen: list[float]) -> dict:
        return {"curve": {"rounds": list(range(len(server))), "server_em_all": server,
                          "clients_em_unseen": unseen}}  # fmt: skip

    res = {
        "a": run([0.0, 0.4, 0.6, 0.7, 0.6], [0.0, 0.2, 0.4, 0.5, 0.5]),  # 0.6 at round 3
        "b": run([0.9, 0.5, 0.6, 0.6, 0.8], [0.9, 0.3, 0.4, 0.4, 0.6]),  # 0.7 at round 4
        "_meta": {},
    }
    got = choose_rounds(res, ["a", "b"])
    assert got["curve"]["rounds"] == [1, 2, 3, 4]
    assert got["curve"]["mean"] == pytest.approx([0.35, 0.5, 0.55, 0.625])
    assert got["rounds"] == 4 and got["score"] == pytest.approx(0.625)
    assert choose_rounds(res, ["a"])["rounds"] == 3
    res["a"]["curve"]["server_em_all"][4] = 0.7  # round 4 ties round 3 for a: fewer rounds
    assert choose_rounds(res, ["a"])["rounds"] == 3
    assert choose_rounds(res, ["missing"]) is None


def test_lr_schedule_is_chosen_for_both_methods():
    """The distill step's learning-rate schedule is a group per method: FL-MiniLLM as the
    config is written, forward-kl as bench quality runs it; they differ only in it."""
    from flminillm.bench.variants import FORWARD_KL

    cfg = load_config(TINY)
    for group, base in (("lr_schedule", {}), ("lr_schedule-forward_kl", FORWARD_KL)):
        vs = [v for v in candidates(cfg) if v.group == group]
        assert {v.overrides["distill"]["lr_schedule"] for v in vs} == {"constant", "cosine"}
        for v in vs:
            assert {k: x for k, x in v.overrides["distill"].items() if k != "lr_schedule"} == base


def test_the_benchmark_s_lr_schedule_is_what_validation_chose():
    """docs/tune-schedule/tune.json (validation split) chose the distill step's schedule for
    both methods; the benchmark config and the forward-kl variant carry it."""
    from flminillm.bench.variants import FORWARD_KL

    meta = json.loads((ROOT / "docs" / "tune-schedule" / "tune.json").read_text())["_meta"]
    assert meta["split"] == "validation"
    chosen = meta["chosen"]
    bench = load_config(ROOT / "configs" / "benchmark.yaml")
    assert bench.distill.lr_schedule == chosen["lr_schedule"]["distill"]["lr_schedule"]
    fkl = chosen["lr_schedule-forward_kl"]["distill"]["lr_schedule"]
    assert FORWARD_KL.get("lr_schedule", bench.distill.lr_schedule) == fkl


def test_the_benchmark_s_server_average_is_what_validation_chose():
    """docs/tune-average (validation split, both methods' runs) chose how many last rounds
    the server's final weights average; the benchmark config carries it for every method
    (the forward-kl variant does not override it)."""
    from flminillm.bench.variants import FORWARD_KL

    meta = json.loads((ROOT / "docs" / "tune-average" / "average.json").read_text())
    assert "--tune" in meta["command"]
    assert {r["variant"] for r in meta["rows"]} == {"schedule-constant", "fkl-schedule-constant"}
    bench = load_config(ROOT / "configs" / "benchmark.yaml")
    assert bench.distill.server_average == meta["chosen"]["k"] > 1
    assert "server_average" not in FORWARD_KL


def test_the_benchmark_s_single_step_weight_is_what_validation_chose():
    """docs/tune-single-step (validation split, 3 seeds) chose whether the single-step
    reverse KL on a teacher's sequence carries the prefix importance weight; the benchmark
    config carries the choice, and the group's candidates differ only in it."""
    meta = json.loads((ROOT / "docs" / "tune-single-step" / "tune.json").read_text())["_meta"]
    assert meta["split"] == "validation" and meta["seeds"] == [0, 1, 2]
    chosen = meta["chosen"]["iw_single_step"]["distill"]["iw_single_step"]
    bench = load_config(ROOT / "configs" / "benchmark.yaml")
    assert bench.distill.iw_single_step == chosen
    vs = [v for v in candidates(bench) if v.group == "iw_single_step"]
    assert sorted(v.overrides["distill"]["iw_single_step"] for v in vs) == [False, True]
    assert all(set(v.overrides["distill"]) == {"iw_single_step"} for v in vs)


def test_the_benchmark_s_temperature_is_what_validation_chose():
    """docs/tune-temperature (validation split, 2 seeds) chose the teachers' sampling
    temperature for both methods alike; the benchmark configs of today's defaults carry it
    (the forward-kl variant takes it from them), and the configs of the tables measured
    before it was adopted pin the temperature those runs had (and their contest bar)."""
    from flminillm.bench.variants import variant_config, variants

    meta = json.loads((ROOT / "docs" / "tune-temperature" / "tune.json").read_text())["_meta"]
    assert meta["split"] == "validation" and meta["seeds"] == [0, 1]
    chosen = {g: c["generation"]["temperature"] for g, c in meta["chosen"].items()}
    assert chosen == {"temperature": 0.7, "temperature-forward_kl": 0.7}
    for name in ("benchmark", "benchmark-5clients", "benchmark-10rounds-default"):
        bench = load_config(ROOT / "configs" / f"{name}.yaml")
        assert bench.generation.temperature == 0.7, name
        fkl = next(v for v in variants(bench) if v.name == "forward-kl")
        assert variant_config(bench, fkl, 0, Path("/tmp/w")).generation.temperature == 0.7
        old = load_config(ROOT / "configs" / f"{name}-temperature-1.yaml")
        assert old.generation.temperature == 1.0
        # and the contest bar they had (the default from stop 40 to 47); nothing else differs
        assert (old.distill.contest_bar_over, old.distill.contest_bar) == ("wins", 0.05)
        same = old.model_copy(update={"generation": bench.generation, "distill": bench.distill})
        assert same.digest() == bench.digest()


def test_the_teachers_temperature_is_a_group_per_method():
    """generation.temperature (every rollout, the teachers' answers included) is a group per
    method: FL-MiniLLM as the config is written, forward-kl as bench quality runs it; the
    candidates differ only in it, and the chosen one names its generation setting."""
    from flminillm.bench.variants import FORWARD_KL

    cfg = load_config(TINY)
    for group, distill in (("temperature", None), ("temperature-forward_kl", FORWARD_KL)):
        vs = [v for v in candidates(cfg) if v.group == group]
        assert sorted(v.overrides["generation"]["temperature"] for v in vs) == [0.7, 1.0]
        for v in vs:
            assert set(v.overrides["generation"]) == {"temperature"}
            assert v.overrides.get("distill") == distill


def test_tie_rank_is_tuned_under_the_spread_liar_and_clean():
    """distill.tie_rank: group tie_rank under the liar whose claims are one number for
    everything (the liar-spread attack's fault injection), tie_rank-clean without a fault;
    the candidates differ only in it, and the benchmark config carries the choice ('low',
    docs/tune-ties) from DistillConfig's default."""
    from flminillm.bench.variants import attacks

    cfg = load_config(TINY)
    env = attacks(cfg)["liar-spread"][0]
    for group, want in (("tie_rank", env), ("tie_rank-clean", {})):
        vs = [v for v in candidates(cfg) if v.group == group]
        assert sorted(v.overrides["distill"]["tie_rank"] for v in vs) == ["low", "mean"]
        assert all(v.env == want and set(v.overrides["distill"]) == {"tie_rank"} for v in vs)
    meta = json.loads((ROOT / "docs" / "tune-ties" / "tune.json").read_text())["_meta"]
    assert meta["split"] == "validation"
    chosen = meta["chosen"]["tie_rank"]["distill"]["tie_rank"]
    assert chosen == "low"  # the rule: above 'mean' under the attack, within 1 point clean
    assert meta["chosen"]["tie_rank-clean"]["candidate"] == "clean-ties-low"  # its price
    assert DistillConfig().tie_rank == chosen
    assert load_config(ROOT / "configs" / "benchmark.yaml").distill.tie_rank == chosen


def test_a_setting_chosen_under_an_attack_must_beat_the_old_one_there_and_cost_little_clean():
    """choose_under_attack, the rule written before the runs: the best candidate under the
    attack that scores above the grid's first (the setting as it was) there and within 1
    point of it clean; else the first."""
    from flminillm.bench.tune import choose_under_attack

    def res(scores: dict[str, float]) -> dict:
        return {n: {"group": "g", "server": {"em_all": {"mean": v}},
                    "clients": {"em_unseen": {"mean": v}}} for n, v in scores.items()}  # fmt: skip

    base = {"noisy-contest-off": 0.40, "clean-contest-off": 0.67}
    adopt = res({**base, "noisy-contest-0.5": 0.45, "clean-contest-0.5": 0.665,
                 "noisy-contest-0.75": 0.42, "clean-contest-0.75": 0.67})  # fmt: skip
    assert choose_under_attack(adopt, "contest_quantile") == "noisy-contest-0.5"
    costly = res({**base, "noisy-contest-0.5": 0.45, "clean-contest-0.5": 0.65,
                  "noisy-contest-0.75": 0.42, "clean-contest-0.75": 0.67})  # fmt: skip
    assert choose_under_attack(costly, "contest_quantile") == "noisy-contest-0.75"
    none = res({**base, "noisy-contest-0.5": 0.40, "clean-contest-0.5": 0.67})
    assert choose_under_attack(none, "contest_quantile") == "noisy-contest-off"
    assert choose_under_attack(res({"clean-contest-off": 0.6}), "contest_quantile") is None


def test_the_peer_contest_is_tuned_under_the_noisy_liar_and_stays_off():
    """distill.contest_quantile: group contest_quantile under the noisy liar, its price in
    contest_quantile-clean, as a filter alone (contest_bar 0); by the rule (docs/tune-contest:
    0.5 scores above off under the liar but costs 3.8 clean, 0.75 does not beat off) the
    contest as a filter stays off: the default's contests are the bar's evidence only
    (contest_leave_out off; the next tests)."""
    from flminillm.bench.variants import attacks

    cfg = load_config(TINY)
    env = attacks(cfg)["liar-noisy"][0]
    for group, want in (("contest_quantile", env), ("contest_quantile-clean", {})):
        vs = [v for v in candidates(cfg) if v.group == group]
        assert sorted(v.overrides["distill"]["contest_quantile"] for v in vs) == [0.5, 0.75, 1.0]
        # the contest as a filter alone, as it ran at stop 39 (no bar; ids kept)
        assert all(v.env == want and v.overrides["distill"]["contest_bar"] == 0.0
                   and (DistillConfig(**v.overrides["distill"]).contest_leave_out
                        or v.overrides["distill"]["contest_quantile"] == 1.0)
                   for v in vs)  # fmt: skip
    meta = json.loads((ROOT / "docs" / "tune-contest" / "tune.json").read_text())["_meta"]
    assert meta["split"] == "validation"
    assert meta["chosen"]["contest_quantile"]["candidate"] == "noisy-contest-off"
    assert meta["chosen"]["contest_quantile-clean"]["candidate"] == "clean-contest-off"
    assert meta["chosen"]["contest_quantile"]["distill"] == {"contest_quantile": 1.0}
    assert DistillConfig().contest_leave_out is False
    assert load_config(ROOT / "configs" / "benchmark.yaml").distill.contest_leave_out is False


def test_barred_as_absent_is_tuned_under_the_consistent_liar_and_stays_off():
    """distill.barred_as_absent: group barred_as_absent under the consistent liar (barred
    every round), its price in barred_as_absent-clean; by the rule (docs/tune-barred: it
    scores below off under the liar) the default stays off."""
    from flminillm.bench.variants import attacks

    cfg = load_config(TINY)
    env = attacks(cfg)["liar-consistent"][0]
    for group, want in (("barred_as_absent", env), ("barred_as_absent-clean", {})):
        vs = [v for v in candidates(cfg) if v.group == group]
        assert sorted(v.overrides["distill"]["barred_as_absent"] for v in vs) == [False, True]
        assert all(v.env == want and set(v.overrides["distill"]) == {"barred_as_absent"}
                   for v in vs)  # fmt: skip
    meta = json.loads((ROOT / "docs" / "tune-barred" / "tune.json").read_text())["_meta"]
    assert meta["split"] == "validation"
    assert meta["chosen"]["barred_as_absent"]["candidate"] == "consistent-barred-kept"
    assert meta["chosen"]["barred_as_absent"]["distill"] == {"barred_as_absent": False}
    assert DistillConfig().barred_as_absent is False
    assert load_config(ROOT / "configs" / "benchmark.yaml").distill.barred_as_absent is False


def test_the_contest_bar_is_chosen_under_the_noisy_liar_on_validation():
    """distill.contest_bar: group contest_bar under the noisy liar, its price clean; by the
    rule it is chosen (docs/tune-contest-bar: 42.6 against 39.0 under the liar, the same
    runs clean), with the settings the `-contest-bar` defence of bench quality runs
    (CONTEST_BAR, one place); 'off' is the contest and its bar off, as the runs before
    them. Not the default: on the 5-client shape it fails the clean criterion (the next
    test)."""
    from flminillm.bench.variants import CONTEST_BAR

    meta = json.loads((ROOT / "docs" / "tune-contest-bar" / "tune.json").read_text())["_meta"]
    assert meta["split"] == "validation"
    assert meta["chosen"]["contest_bar"]["candidate"] == "noisy-bar-0.05"
    assert meta["chosen"]["contest_bar"]["distill"].items() <= CONTEST_BAR["distill"].items()
    assert dict(BAR_GRID)["bar-0.05"] == CONTEST_BAR["distill"]
    off = dict(BAR_GRID)["bar-off"]
    assert DistillConfig(**off).contest_quantile == 1.0 and DistillConfig(**off).contest_bar == 0


def test_the_contest_bar_by_every_peer_as_evidence_alone_passes_on_both_shapes():
    """Stop 40's rule, written before the runs (BAR_GRID's comment): a contest-bar setting
    becomes the default only if it passes `passes_under_attack` on both shapes' validation
    splits. 'all-kept' (every peer that may contest must; the contests only the bar's
    evidence) passes on both and is the default; 'two' with the filter (stop 39's) fails
    the 5-client clean criterion (honest look-alike teachers contest each other), as does
    'all' with the filter."""
    shapes = {
        "tune-contest-bar-kept": ("configs/benchmark-temperature-1.yaml", ["bar-0.05", "bar-all-kept"]),
        "tune-contest-bar-5clients": ("configs/benchmark-5clients-temperature-1.yaml",
                                      ["bar-all", "bar-all-kept"]),
    }  # fmt: skip
    passing = []
    for doc, (config, names) in shapes.items():
        results = json.loads((ROOT / "docs" / doc / "tune.json").read_text())
        assert results["_meta"]["split"] == "validation" and config in results["_meta"]["command"]
        passing.append({n for n in names if passes_under_attack(results, "contest_bar", n)})
    assert passing == [{"bar-0.05", "bar-all-kept"}, {"bar-all-kept"}]
    five = json.loads((ROOT / "docs" / "tune-contest-bar-5clients" / "tune.json").read_text())
    em = {n: five[n]["server"]["em_all"]["mean"] for n in ("clean-bar-off", "clean-bar-0.05")}
    assert em["clean-bar-0.05"] < em["clean-bar-off"] - 0.05  # 50.8 against 58.4
    chosen = dict(BAR_GRID)["bar-all-kept"]  # the default since, pooled over rounds (stop 41)
    assert chosen["contest_bar_rounds"] == 1 and dict(BAR_GRID)["bar-either"] == {
        **chosen, "contest_bar_rounds": 6}  # fmt: skip


def test_the_contest_bar_pooled_over_rounds_holds_against_stop_40s_on_both_shapes():
    """Stop 41's rule, written before the runs (BAR_GRID's comment): 'either' (the contest
    bar reading this round's shares and those pooled over the rounds so far) becomes the
    default only if on both shapes' validation splits it passes against 'off', is level
    with or above 'all-kept' (stop 40's default) under the noisy liar and within 1 point of
    it clean, and above it on one shape. It is the default (DistillConfig, and so the
    benchmark configs)."""
    shapes = {
        "tune-contest-bar-either": "configs/benchmark-temperature-1.yaml",
        "tune-contest-bar-either-5clients": "configs/benchmark-5clients-temperature-1.yaml",
    }
    above = []
    for doc, config in shapes.items():
        results = json.loads((ROOT / "docs" / doc / "tune.json").read_text())
        assert results["_meta"]["split"] == "validation" and config in results["_meta"]["command"]
        assert passes_under_attack(results, "contest_bar", "bar-either")
        assert holds_against(results, "contest_bar", "bar-either", "bar-all-kept")
        score = {
            n: validation_score(results[n]) for n in ("noisy-bar-either", "noisy-bar-all-kept")
        }
        above.append(score["noisy-bar-either"] > score["noisy-bar-all-kept"])
    assert any(above)
    # (as it ran: with barred_wins 'leave', the default until stop 42; its share of 0.05 of
    # every win became 0.25 of the judged wins at stop 48)
    chosen = {k: v for k, v in dict(BAR_GRID)["bar-either"].items() if k != "barred_wins"}
    chosen |= dict(CONTEST_BAR_T07_GRID)["bar-veto-0.25"]
    for distill in (DistillConfig(), load_config(ROOT / "configs" / "benchmark.yaml").distill,
                    load_config(ROOT / "configs" / "benchmark-5clients.yaml").distill):  # fmt: skip
        assert {k: getattr(distill, k) for k in chosen} == chosen


def test_barred_wins_next_passes_stop_41s_rule_on_both_shapes_and_is_the_default():
    """Stop 41 (BAR_GRID's comment): 'either-next' (a barred teacher's would-be wins to the
    teacher that wins without it) passes against 'off', holds against 'either' on both
    shapes' validation splits and beats it on both; the lower share 'either-0.025' fails
    on the first shape. 'next' is the default since stop 42 (DistillConfig, and so the
    benchmark configs), the settings measured before it pinning 'leave'."""
    for doc, config in (("tune-barred-next", "configs/benchmark-temperature-1.yaml"),
                        ("tune-barred-next-5clients", "configs/benchmark-5clients-temperature-1.yaml")):  # fmt: skip
        results = json.loads((ROOT / "docs" / doc / "tune.json").read_text())
        assert results["_meta"]["split"] == "validation" and config in results["_meta"]["command"]
        assert passes_under_attack(results, "contest_bar", "bar-either-next")
        assert holds_against(results, "contest_bar", "bar-either-next", "bar-either")
        assert validation_score(results["noisy-bar-either-next"]) > validation_score(
            results["noisy-bar-either"]
        )
    lower = json.loads((ROOT / "docs" / "tune-contest-bar-0.025" / "tune.json").read_text())
    assert not holds_against(lower, "contest_bar", "bar-either-0.025", "bar-either")
    chosen = dict(BAR_GRID)["bar-either-next"] | dict(CONTEST_BAR_T07_GRID)["bar-veto-0.25"]
    for distill in (DistillConfig(), load_config(ROOT / "configs" / "benchmark.yaml").distill,
                    load_config(ROOT / "configs" / "benchmark-5clients.yaml").distill):  # fmt: skip
        assert {k: getattr(distill, k) for k in chosen} == chosen
    for pinned in (dict(BAR_GRID)["bar-off"], dict(BAR_GRID)["bar-either"], UNDEFENDED["distill"],
                   CONTEST_BAR["distill"], NO_INVARIANCE["distill"]):  # fmt: skip
        assert pinned["barred_wins"] == "leave"  # as measured: their federation ids kept


def test_dependence_bar_fails_its_rule_on_the_3_client_validation_split_and_stays_off():
    """Stop 43 (DEPENDENCE_GRID's comment): under the liar on its own families the bar at
    0.25 does not score above off on the 3-client validation split (46.2 against 46.3: the
    score counts the liar's families, lost either way); it does on the 5-client one (40.9
    against 37.9); clean the same runs on both. The rule asks for both shapes, so it is not
    chosen, and `dependence_bar` stays 0 (off) in DistillConfig and the benchmark configs."""
    passed = []
    for doc, config in (("tune-dependence", "configs/benchmark-temperature-1.yaml"),
                        ("tune-dependence-5clients", "configs/benchmark-5clients-temperature-1.yaml")):  # fmt: skip
        results = json.loads((ROOT / "docs" / doc / "tune.json").read_text())
        meta = results["_meta"]
        assert meta["split"] == "validation" and config in meta["command"]
        passed.append(passes_under_attack(results, "dependence_bar", "dep-0.25"))
        clean = [validation_score(results[f"clean-dep-{v}"]) for v in ("0.25", "off")]
        assert clean[0] == clean[1]
    assert passed == [False, True]
    for distill in (DistillConfig(), load_config(ROOT / "configs" / "benchmark.yaml").distill,
                    load_config(ROOT / "configs" / "benchmark-5clients.yaml").distill):  # fmt: skip
        assert distill.dependence_bar == 0.0


def contest_grid_on_both_shapes(group: str):
    """(validation base, the group's candidates by name, the contesting liar) on the 3- and
    the 5-client benchmark config: the contest grids are validated on both shapes."""
    for config, liar in (("benchmark.yaml", "carol"), ("benchmark-5clients.yaml", "erin")):
        base = on_validation(load_config(ROOT / "configs" / config))
        yield base, {v.name: v for v in candidates(base) if v.group.startswith(group)}, liar


def test_the_contest_bar_under_temperature_0_7_is_a_challenger_under_the_contesting_liar():
    """Stop 45's candidate (CONTEST_BAR_T07_GRID's comment, written before its runs): the
    share 0.025 against the default's, under the contesting liar and clean, on both shapes.
    The grid's first candidate is the default the runs were measured against (0.05 of all
    wins), pinned since stop 48 made 'judged-veto' at 0.25 the default."""
    for base, vs, liar in contest_grid_on_both_shapes("contest_bar_t07"):
        assert sorted(vs) == [
            "clean-bar-0.025", "clean-bar-default", "clean-bar-judged-0.25",
            "clean-bar-judged-0.5", "clean-bar-veto-0.25", "contest-bar-0.025",
            "contest-bar-default", "contest-bar-judged-0.25", "contest-bar-judged-0.5",
            "contest-bar-veto-0.25",
        ]  # fmt: skip
        assert vs["contest-bar-default"].overrides == {
            "distill": {"contest_bar": 0.05, "contest_bar_over": "wins"}
        }
        assert vs["contest-bar-0.025"].overrides == {
            "distill": {"contest_bar": 0.025, "contest_bar_over": "wins"}
        }
        judged = variant_config(base, vs["contest-bar-judged-0.25"], 100, Path("/w"))
        assert judged.distill.contest_bar_over == "judged" and judged.distill.contest_bar == 0.25
        assert base.distill.contest_bar_over == "judged-veto"  # the default since stop 48
        attacked = vs["contest-bar-0.025"]
        assert attacked.env == attacks(base)["liar-contest"][0] and liar in attacked.note
        assert vs["clean-bar-0.025"].env == vs["clean-bar-default"].env
        assert base.distill.contest_bar == 0.25
    # the rule: above the default under the liar, clean within a point of it
    score = {"contest-bar-default": 0.40, "contest-bar-0.025": 0.43,
             "clean-bar-default": 0.60, "clean-bar-0.025": 0.595}  # fmt: skip
    results = {n: {"group": "x", "server": {"em_all": {"mean": v}},
                   "clients": {"em_unseen": {"mean": v}}} for n, v in score.items()}  # fmt: skip
    assert passes_under_attack(results, "contest_bar_t07", "bar-0.025")
    results["clean-bar-0.025"]["server"]["em_all"]["mean"] = 0.58  # 1 point of score lost
    results["clean-bar-0.025"]["clients"]["em_unseen"]["mean"] = 0.58
    assert not passes_under_attack(results, "contest_bar_t07", "bar-0.025")


def _both_shapes(doc: str) -> list[tuple[str, dict]]:
    """A validation run on both shapes (docs/<doc> on configs/benchmark.yaml and
    docs/<doc>-5clients on configs/benchmark-5clients.yaml), seeds 100-101, as the rules
    since stop 46 ask: [(doc, its tune.json)] for the two."""
    out = []
    for name, config in ((doc, "configs/benchmark.yaml"),
                         (f"{doc}-5clients", "configs/benchmark-5clients.yaml")):  # fmt: skip
        results = json.loads((ROOT / "docs" / name / "tune.json").read_text())
        meta = results["_meta"]
        assert meta["split"] == "validation" and meta["seeds"] == [100, 101]
        assert config in meta["command"]
        out.append((name, results))
    return out


def test_the_contest_bar_under_temperature_0_7_validated_on_both_shapes():
    """Stop 46's validation of CONTEST_BAR_T07_GRID (seeds 100-101, the rule written before
    the runs): the judged share with abstaining peers bars honest look-alike teachers on the
    5-client shape and fails there; the share 0.025 passes on 3 clients and is level with
    the default on 5 (the default already bars that liar in most of its rounds: the rule's
    strictly-above is not met); 'judged-veto' at 0.25 passes on both. It is the candidate
    re-measured on the evaluation split (configs/benchmark-contest-veto.yaml and its 5-client
    twin carry exactly the grid's setting), and the default since stop 48 (the configs and
    the library's own default carry it)."""
    verdict = {}
    for doc, results in _both_shapes("tune-contest-bar-t07"):
        verdict[doc] = {n: passes_under_attack(results, "contest_bar_t07", n)
                        for n in ("bar-0.025", "bar-judged-0.25", "bar-judged-0.5",
                                  "bar-veto-0.25")}  # fmt: skip
    assert verdict["tune-contest-bar-t07"] == dict.fromkeys(verdict["tune-contest-bar-t07"], True)
    assert verdict["tune-contest-bar-t07-5clients"] == {
        "bar-0.025": False, "bar-judged-0.25": False, "bar-judged-0.5": False,
        "bar-veto-0.25": True,
    }  # fmt: skip
    five = json.loads((ROOT / "docs" / "tune-contest-bar-t07-5clients" / "tune.json").read_text())
    assert validation_score(five["contest-bar-0.025"]) == validation_score(
        five["contest-bar-default"]
    )  # level: the rule's flaw, CONTEST_BAR_T07_GRID's comment
    veto = dict(CONTEST_BAR_T07_GRID)["bar-veto-0.25"]
    for name in ("benchmark-contest-veto.yaml", "benchmark-5clients-contest-veto.yaml"):
        d = load_config(ROOT / "configs" / name).distill
        assert {k: getattr(d, k) for k in veto} == veto
    for distill in (DistillConfig(), load_config(ROOT / "configs" / "benchmark.yaml").distill,
                    load_config(ROOT / "configs" / "benchmark-5clients.yaml").distill):  # fmt: skip
        assert {k: getattr(distill, k) for k in veto} == veto


def test_the_contest_bar_candidate_on_the_evaluation_split_bars_the_contesting_liar():
    """Stop 47's re-measure of 'judged-veto' at 0.25 on the evaluation split (seeds 0-2,
    docs/defence-contest-veto): the contesting and the noisy liar run, seed by seed, the
    federation of the claim-barred liars (barred every round), which the default let the
    contesting liar out of (docs/defence-temperature-0.7: its honest families 6.7 below the
    clean run). The default's rows re-run on the same machine (docs/defence-default-same-
    machine) run the very same clean and claim-barred federations, and under the
    contesting liar a different one, per seed no better than the candidate's: the
    candidate became the default at stop 48."""
    results = json.loads((ROOT / "docs" / "defence-contest-veto" / "results.json").read_text())
    meta = results["_meta"]
    assert "configs/benchmark-contest-veto.yaml" in meta["command"]
    assert meta["seeds"] == [0, 1, 2]
    by_seed = {n: results[n]["server_families_em_by_seed"] for n in results if n != "_meta"}
    barred = ("liar-contest", "liar-noisy", "liar-consistent", "liar-spread", "adversary")
    assert all(by_seed[n] == by_seed["liar-fluent"] for n in barred)
    assert by_seed["liar-mimic"] != by_seed["liar-fluent"]  # not barred outright
    old = json.loads((ROOT / "docs" / "defence-temperature-0.7" / "results.json").read_text())
    assert (
        old["liar-contest"]["server_families_em_by_seed"]
        != (old["liar-fluent"]["server_families_em_by_seed"])
    )
    same = json.loads((ROOT / "docs" / "defence-default-same-machine" / "results.json").read_text())
    assert "configs/benchmark.yaml" in same["_meta"]["command"]
    for name in ("fl-minillm", "liar-fluent"):
        assert same[name]["server_families_em_by_seed"] == by_seed[name]
    honest = honest_families(meta["families_by_client"], ["carol"])
    for seed, theirs in same["liar-contest"]["server_families_em_by_seed"].items():
        ours = by_seed["liar-contest"][seed]
        assert sum(theirs[f] for f in honest) <= sum(ours[f] for f in honest)


def test_contest_min_judged_is_a_candidate_under_the_contesting_liar_not_the_default():
    """Stop 48's candidate (CONTEST_MIN_GRID's comment, written before its runs): the fewest
    judged wins a peer's vote needs, 3 or 5, against the default's one, under the
    contesting liar and clean on both shapes; the rule kept the default (the next test)."""
    from flminillm.bench.tune import CONTEST_MIN_GRID

    # pinned: the grid's first is the default it is measured against, whatever comes later
    assert dict(CONTEST_MIN_GRID)["min-default"] == {
        "contest_bar_over": "judged-veto", "contest_bar": 0.25, "contest_min_judged": 0,
    }  # fmt: skip
    for base, vs, liar in contest_grid_on_both_shapes("contest_min"):
        assert sorted(vs) == [
            "clean-min-3", "clean-min-5", "clean-min-default",
            "contest-min-3", "contest-min-5", "contest-min-default",
        ]  # fmt: skip
        assert vs["contest-min-5"].overrides["distill"]["contest_min_judged"] == 5
        assert vs["contest-min-3"].env == attacks(base)["liar-contest"][0]
        assert liar in vs["contest-min-3"].note and vs["clean-min-3"].env == {}
        five = variant_config(base, vs["contest-min-5"], 100, Path("/w"))
        assert five.distill.contest_min_judged == 5
        assert five.distill.contest_bar_over == "judged-veto"
        assert base.distill.contest_min_judged == 0


def test_contest_min_judged_fails_its_rule_on_the_5_client_validation_split_and_stays_off():
    """Stop 49 (docs/tune-contest-min, -5clients; seeds 100-101): on the 3-client shape 3 and
    5 run the default's federations exactly, clean and under the contesting liar; on the
    5-client one both lose the liar's bar in round 2 of seed 100 (44.8 against 45.4 under
    it) and cost nothing clean. The rule asks for both shapes, so `contest_min_judged`
    stays 0, and the evaluation runs the rule asks for next are not run."""
    from flminillm.bench.tune import choose_under_attack

    held = {}
    for doc, results in _both_shapes("tune-contest-min"):
        held[doc] = [
            holds_against(results, "contest_min", n, "min-default") for n in ("min-3", "min-5")
        ]
        assert choose_under_attack(results, "contest_min") == "contest-min-default"
        clean = {validation_score(results[f"clean-min-{v}"]) for v in ("default", "3", "5")}
        assert len(clean) == 1  # no honest teacher barred on validation: nothing to win clean
    assert held == {"tune-contest-min": [True, True], "tune-contest-min-5clients": [False, False]}
    for distill in (DistillConfig(), load_config(ROOT / "configs" / "benchmark.yaml").distill,
                    load_config(ROOT / "configs" / "benchmark-5clients.yaml").distill):  # fmt: skip
        assert distill.contest_min_judged == 0


def test_barred_as_absent_under_the_contesting_liar_fails_its_rule_on_5_clients():
    """Stop 50's validation of BARRED_T07_GRID (seeds 100-101, the rule written before the
    runs): counting every barred teacher as an absent client scores above the default
    under the contesting liar on 3 clients and below it on 5 (clean: the same federations,
    no teacher barred there), so it holds on one shape only and stays off."""
    held = {}
    for doc, results in _both_shapes("tune-barred-t07"):
        held[doc] = holds_against(results, "barred_as_absent_t07", "absent-t07", "min-default")
        assert validation_score(results["clean-absent-t07"]) == validation_score(
            results["clean-min-default"]
        )
    assert held == {"tune-barred-t07": True, "tune-barred-t07-5clients": False}
    for distill in (DistillConfig(), load_config(ROOT / "configs" / "benchmark.yaml").distill,
                    load_config(ROOT / "configs" / "benchmark-5clients.yaml").distill):  # fmt: skip
        assert distill.barred_as_absent is False


def test_the_default_on_the_5_client_shape_under_temperature_0_7_meets_the_bars():
    """Stop 48's 5-client rows under the default (docs/defence-5clients-t07, seeds 0-2, the
    `-contest-veto` config being the default's federations): two colluding and two
    contesting liars of five and the backdoor leave the honest clients' families within 3
    points of the clean run of each seed (above it: the barred liars' families leave the
    server's curriculum), the backdoor never succeeds, and the defended clean run is not
    more than a point below the undefended one."""
    results = json.loads((ROOT / "docs" / "defence-5clients-t07" / "results.json").read_text())
    meta = results["_meta"]
    assert meta["seeds"] == [0, 1, 2] and "benchmark-5clients-contest-veto.yaml" in meta["command"]
    same = [load_config(ROOT / "configs" / n) for n in
            ("benchmark-5clients.yaml", "benchmark-5clients-contest-veto.yaml")]  # fmt: skip
    assert same[0].digest() == same[1].digest()
    clean = results["fl-minillm"]["server_families_em_by_seed"]
    for attack in ("collude-2", "contest-2", "backdoor"):
        r = results[attack]
        honest = honest_families(meta["families_by_client"], r["adversaries"])
        by = r["server_families_em_by_seed"]
        for seed in clean:  # each seed, not only the mean
            ours, theirs = (sum(x[seed][f] for f in honest) / len(honest) for x in (by, clean))
            assert ours - theirs >= -0.03, (attack, seed)
    assert results["backdoor"]["server_target_rate"]["mean"] == 0.0
    em = {n: results[n]["server"]["em_all"]["mean"] for n in ("clean-undefended", "fl-minillm")}
    assert em["clean-undefended"] - em["fl-minillm"] <= 0.01
    # the old default re-run on the same machine (docs/defence-5clients-t07-old-default):
    # the undefended and the claim-barred runs the same; its clean runs better where the new
    # default barred honest teachers (seeds 0 and 1), the same run where it did not (seed 2)
    old = json.loads(
        (ROOT / "docs" / "defence-5clients-t07-old-default" / "results.json").read_text()
    )
    for name in ("clean-undefended", "collude-2"):
        by = "server_families_em_by_seed"
        assert old[name][by] == results[name][by], name
    theirs, ours = (r["fl-minillm"]["server_families_em_by_seed"] for r in (old, results))
    assert ours["2"] == theirs["2"]
    assert all(sum(ours[s].values()) < sum(theirs[s].values()) for s in ("0", "1"))


def test_the_barred_liars_cost_on_six_seeds_and_against_a_federation_without_the_liar():
    """Stop 49 (docs/defence-default-6seeds, the default on the 3-client shape, evaluation
    seeds 0-5, seeds 0-2 the runs of docs/defence-contest-veto): every liar barred outright
    runs one federation per seed, which misses the 3-point bar on seeds 0-2 (-3.3) and meets
    it on six (-2.1); carol honest but never heard from (`absent-last`) costs the honest
    families -0.7 on six, and the barred liar is 1.4 below that. Drop-out and the defence's
    price stay within their bars on six seeds too. Read as the reports read them
    (`paired`: the mean over the seeds both runs have)."""
    from flminillm.bench.quality_report import paired

    def read(doc: str) -> dict:
        return json.loads((ROOT / "docs" / doc / "results.json").read_text())

    six, three = read("defence-default-6seeds"), read("defence-contest-veto")
    assert six["_meta"]["seeds"] == [0, 1, 2, 3, 4, 5] and three["_meta"]["seeds"] == [0, 1, 2]
    assert "configs/benchmark.yaml" in six["_meta"]["command"]
    fbc = six["_meta"]["families_by_client"]
    honest = honest_families(fbc, six["liar-fluent"]["adversaries"])

    def cost(results: dict, a: str, b: str, families: list[str] | None = None) -> float:
        ours, theirs, _ = paired(results, a, b, families)
        return round(100 * (ours - theirs), 1)

    liars = ("liar-contest", "liar-fluent", "liar-noisy")
    for liar in liars:  # one federation: the same numbers on every seed
        assert (
            six[liar]["server_families_em_by_seed"] == six[liars[0]]["server_families_em_by_seed"]
        )
        assert six[liar]["adversaries"] == {"carol": liar.split("-")[1]}
    assert six["absent-last"]["adversaries"] == {"carol": "absent"}
    assert cost(three, "liar-fluent", "fl-minillm", honest) == -3.3
    assert cost(six, "liar-fluent", "fl-minillm", honest) == -2.1
    assert cost(six, "absent-last", "fl-minillm", honest) == -0.7
    assert cost(six, "liar-fluent", "absent-last", honest) == -1.4
    assert cost(six, "dropout-30", "fl-minillm") == -3.7  # bar 5, all families
    assert cost(six, "clean-undefended", "fl-minillm") == 0.3  # bar 1
