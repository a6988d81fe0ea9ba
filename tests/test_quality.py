"""`flminillm bench quality`: one seed of the tiny benchmark end to end (every variant,
MLflow, the report files), plus the pieces it relies on: the non-IID knob, adversarial
teachers, drop-out schedules and the in-process memo."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch

from flminillm.attacks import MODES, adversaries, backdoor_target, corrupt_teaching, seed_key
from flminillm.bench.quality import run_variant, shared_setup
from flminillm.bench.quality_report import check_results
from flminillm.bench.variants import (
    FORWARD_KL,
    METHODS,
    absent_faults,
    attacks,
    dropout_faults,
    honest_clients,
    kept_out,
    variant_config,
    variant_env,
    variants,
)
from flminillm.cli import main
from flminillm.config import load_config
from flminillm.data import (
    FAMILIES,
    Example,
    build_benchmark,
    family_of_prompt,
    format_prompt,
    make_examples,
)
from flminillm.evaluation import target_rate
from flminillm.ledger import ledger
from flminillm.messages import validate_teaching
from flminillm.models import build_model, count_parameters
from flminillm.store import open_store

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "benchmark-tiny.yaml"


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    uri = f"sqlite:///{out}/mlflow.db"
    rc = main([
        "bench", "quality", "--config", str(TINY), "--seeds", "1", "--out", str(out),
        "--workdir", str(out / "work"), "--tracking-uri", uri,
    ])  # fmt: skip
    assert rc == 0
    return out


def test_every_method_and_ablation_lands_in_results_json(bench_out):
    results = json.loads((bench_out / "results.json").read_text())
    cfg = load_config(TINY)
    names = [v.name for v in variants(cfg)]
    assert set(METHODS) <= set(names)
    assert {"no-teacher-mixed", "no-single-step", "no-length-norm"} <= set(names)
    assert any(n.startswith("alpha-") for n in names) and any(n.startswith("top-k-") for n in names)
    assert set(names) <= set(results)
    assert check_results(results) == []
    for name in names:
        r = results[name]
        for who in ("server", "clients"):
            for k in ("em_all", "em_held", "em_unseen", "rouge_l_all", "rouge_l_held"):
                assert k in r[who]
        assert r["seeds"] == [0]
        assert "per_client" in r["bytes_per_round"]
    # the server holds no family: held is undefined, unseen is all
    assert results["fl-minillm"]["server"]["em_held"]["mean"] is None
    assert results["_meta"]["seeds"] == [0]
    # which code made the runs: this checkout's commit, in results.json and results.md
    from flminillm.bench.quality import code_version

    assert results["_meta"]["code"] == [code_version()]
    assert f"code: {code_version()}" in (bench_out / "results.md").read_text()


def test_bytes_per_round_follow_each_method(bench_out):
    results = json.loads((bench_out / "results.json").read_text())
    cfg = load_config(TINY)
    server = build_model(cfg.server.model, 400, 0, 1, 0)
    fedavg = results["fedavg"]["bytes_per_round"]["per_client"]
    assert fedavg == pytest.approx(2 * 4 * count_parameters(server), rel=0.05)
    assert results["local-only"]["bytes_per_round"]["per_client"] == 0
    ours = results["fl-minillm"]["bytes_per_round"]["per_client"]
    assert 0 < ours < fedavg
    # forward-KL exchanges the same messages (same prompts and support)
    assert results["forward-kl"]["bytes_per_round"]["per_client"] == pytest.approx(ours, rel=0.2)


def test_local_only_server_never_changes_and_dropout_drops(bench_out):
    results = json.loads((bench_out / "results.json").read_text())
    curve = results["local-only"]["curve"]["server_em_all"]
    assert len(set(curve)) == 1  # public prompts only: the server keeps its pre-trained model
    assert results["dropout-30"]["dropped_per_round"] > 0
    assert results["absent-last"]["dropped_per_round"] == 1.0  # the last client, every round
    # read on the families of the clients it hears from, as the attacks are
    assert results["absent-last"]["adversaries"] == {"carol": "absent"}
    assert "server_em_honest" in results["absent-last"]
    assert "- absent-last (carol: absent): server EM" in (bench_out / "results.md").read_text()
    assert results["fl-minillm"]["dropped_per_round"] == 0
    # an attacker's teach step runs (a failing one would drop out of every round unseen)
    for name in attacks(load_config(TINY)):
        assert results[name]["dropped_per_round"] == 0, name


def test_methods_and_ablations_have_their_distance_to_the_pooled_server(bench_out):
    """Every method and ablation (not FedAvg's other architecture, not the faults, not pooled
    itself) has the KL of its server to the pooled server of its seed, in both directions;
    the numbers are kept beside the run so that --resume reuses them."""
    results = json.loads((bench_out / "results.json").read_text())
    with_kl = {n for n, r in results.items() if not n.startswith("_") and r.get("kl_pooled")}
    cfg = load_config(TINY)
    want = {v.name for v in variants(cfg) if v.group in ("method", "ablation")}
    assert with_kl == want - {"pooled", "fedavg"}
    for n in with_kl:
        k = results[n]["kl_pooled"]
        for c in ("reverse_sampled", "reverse_greedy", "forward_sampled", "forward_greedy"):
            assert k[c]["mean"] > 0, (n, c)
    md = (bench_out / "results.md").read_text()
    assert "## Distance to the pooled server" in md and "| fl-minillm | " in md
    kept = list((bench_out / "work").rglob("kl-to-pooled.json"))
    assert len(kept) == len(with_kl)


def test_report_files_and_mlflow_runs(bench_out):
    md = (bench_out / "results.md").read_text()
    assert "## Methods" in md and "## Ablations" in md and "## Faults" in md
    assert "![results](results.png)" in md
    assert (bench_out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = load_config(TINY)
    n_runs = len(variants(cfg))
    with sqlite3.connect(bench_out / "mlflow.db") as db:
        runs = db.execute("select run_uuid, name from runs").fetchall()
        children = db.execute(
            "select count(*) from tags where key='mlflow.parentRunId'"
        ).fetchone()[0]
        rounds = db.execute(
            "select count(distinct step) from metrics where key='server.em_all'"
        ).fetchone()[0]
    assert len(runs) == n_runs + 1 and children == n_runs
    assert rounds == cfg.rounds + 1  # rounds 0..R as metric history
    # the server's distill steps record the round-0 judge's review of every teacher
    # (distill.plausibility_margin, on by default): the tiny benchmark's judge, pre-trained
    # for 5 steps, scores every answer near a random token's log-prob, and bars nobody
    recs = sorted((bench_out / "work" / "store" / "records").glob(
        "bench-tiny-adversary-s0-*/round-*/distill.server.json"))  # fmt: skip
    assert len(recs) == cfg.rounds
    first = json.loads(recs[0].read_text())["inputs"]["model"]["digest"]  # round 0's server
    for path in recs:
        rec = json.loads(path.read_text())
        assert rec["inputs"]["judge"]["digest"] == first  # the same judge every round
        m = rec["metrics"]
        for c in cfg.clients:
            assert abs(m[f"plausibility.{c.id}"]) < 1.0 and m[f"implausible.{c.id}"] == 0.0
        # claims that add up (distill.max_claim_sum, on by default; the tiny config asks a
        # quarter of the teacher-share prompts twice, distill.repeat_share): the honest
        # teachers' claims on a prompt asked twice sum to at most 1; the liar's different
        # random answers to one prompt, each claimed with p = 1, bar it in every round
        for c in cfg.clients[:-1]:
            assert m[f"claim_sum.{c.id}"] <= 1.0 + 1e-4 and m[f"overclaimed.{c.id}"] == 0.0
        liar = cfg.clients[-1].id
        assert m[f"claim_sum.{liar}"] >= 2.0 and m[f"overclaimed.{liar}"] == 1.0
        assert m[f"selected.{liar}"] == 0.0
    # prompt claims that add up (distill.max_prompt_claim_sum, on by default): the
    # consistent liar, whose answers the check above cannot read, claims p(x) = 1 for every
    # prompt and is barred in every round; the mimic, sending its model's own claims, is
    # not, nor the liar that spreads its prompt claims to sum to 1; honest teachers' claims
    # on the round's prompts sum to at most 1
    for name, barred in (("liar-consistent", 1.0), ("liar-mimic", 0.0), ("liar-spread", 0.0)):
        won = 0.0
        recs = sorted((bench_out / "work" / "store" / "records").glob(
            f"bench-tiny-{name}-s0-*/round-*/distill.server.json"))  # fmt: skip
        assert len(recs) == cfg.rounds
        for path in recs:
            m = json.loads(path.read_text())["metrics"]
            for c in cfg.clients[:-1]:
                assert m[f"prompt_claim_sum.{c.id}"] <= 1.0 + 1e-4
                assert m[f"overclaimed_prompts.{c.id}"] == 0.0
            liar = cfg.clients[-1].id
            assert m[f"overclaimed_prompts.{liar}"] == barred, name
            if barred:
                assert m[f"prompt_claim_sum.{liar}"] >= 10.0 and m[f"selected.{liar}"] == 0.0
            else:
                assert m[f"prompt_claim_sum.{liar}"] <= 1.0 + 1e-4
            won += m[f"selected.{liar}"]
        if name == "liar-mimic":  # its answers compete as an honest one's: it wins some
            assert won > 0.0


def test_the_default_report_leaves_the_hand_written_docs_alone(bench_out, tmp_path, monkeypatch):
    """`bench quality` without --out writes runs/quality/report/, never docs/: the
    repository's docs/results.md collects the published reports by hand and a default
    run must not replace it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    mine = "# Results\n\nwritten by hand\n"
    (tmp_path / "docs" / "results.md").write_text(mine)
    rc = main(["bench", "quality", "--config", str(TINY), "--seeds", "1", "--report-only",
               "--workdir", str(bench_out / "work"), "--tracking-uri", "none"])  # fmt: skip
    assert rc == 0
    assert (tmp_path / "docs" / "results.md").read_text() == mine
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["results.md"]
    report = tmp_path / "runs" / "quality" / "report"
    assert (report / "results.md").read_text().startswith("# Results: FL-MiniLLM")
    assert json.loads((report / "results.json").read_text())["_meta"]["seeds"] == [0]


def test_memo_shares_setup_between_variants(tmp_path):
    """run_grid computes a seed's set-up once (shared_setup) and gives it to all its runs."""
    cfg = load_config(TINY)
    by_name = {v.name: v for v in variants(cfg)}
    lead = run_variant(cfg.to_json(), by_name["fl-minillm"], 0, str(tmp_path))
    assert lead["memo_hits"] == 0
    shared = shared_setup(cfg.to_json(), by_name["fl-minillm"], 0, str(tmp_path))
    # prepare + 4 init_model + 3 round-1 local_sft, all of which the other run takes
    assert len(shared["memo"]) == 1 + len(cfg.parties) + len(cfg.clients)
    other = run_variant(cfg.to_json(), by_name["no-length-norm"], 0, str(tmp_path),
                        shared["memo"])  # fmt: skip
    assert other["memo_hits"] == 1 + len(cfg.parties) + len(cfg.clients)
    assert other["rounds"]["0"]["eval"] == lead["rounds"]["0"]["eval"]
    # the set-up's step records are its own federation's, not the run's
    own = variant_config(cfg, by_name["fl-minillm"], 0, tmp_path)
    own = own.model_copy(update={"name": f"{own.name}-setup"})
    run_id = variant_config(cfg, by_name["no-length-norm"], 0, tmp_path).federation_id()
    steps = {
        fid: {rec["step"] for recs in ledger(open_store(own.store.uri), fid).values() for rec in recs}
        for fid in (own.federation_id(), run_id)
    }  # fmt: skip
    assert {"prepare", "init_model", "local_sft"} <= steps[own.federation_id()]
    assert not {"prepare", "init_model"} & steps[run_id] and "distill" in steps[run_id]


def test_iid_mix_controls_non_iid_severity():
    fbc = {"a": ["successor"], "b": ["repeat"]}
    disjoint = build_benchmark(fbc, 50, 5, 5, 5, seed=0)
    assert {e.family for e in disjoint.client_train["a"]} == {"successor"}
    mixed = build_benchmark(fbc, 50, 5, 5, 5, seed=0, iid_mix=1.0)
    fams = [e.family for e in mixed.client_train["a"]]
    assert len(fams) == 50 and {"successor", "repeat"} == set(fams)
    assert 0.3 < fams.count("repeat") / len(fams) < 0.7
    with pytest.raises(ValueError, match="iid_mix"):
        build_benchmark(fbc, 50, 5, 5, 5, seed=0, iid_mix=1.5)


def _teaching(n=4, t=3, s=5, a=2, vocab=50):
    g = torch.Generator().manual_seed(0)
    rollouts = {
        "prompt_ids": torch.randint(4, vocab, (n, 4), generator=g).int(),
        "prompt_mask": torch.ones(n, 4, dtype=torch.uint8),
        "response_ids": torch.randint(4, vocab, (n, t), generator=g).int(),
        "response_mask": torch.ones(n, t, dtype=torch.uint8),
        "support_ids": torch.randint(4, vocab, (n, t, s), generator=g).int(),
        "ask_prompt_ids": torch.randint(4, vocab, (a, 4), generator=g).int(),
        "ask_prompt_mask": torch.ones(a, 4, dtype=torch.uint8),
    }
    rollouts["support_ids"][..., 0] = rollouts["response_ids"]
    own_ids = torch.randint(4, vocab, (a, t), generator=g).int()
    own_sup = torch.randint(4, vocab, (a, t, s), generator=g).int()
    own_sup[..., 0] = own_ids
    teaching = {
        "scores": torch.log_softmax(torch.randn(n, t, s, generator=g), -1),
        "prompt_logp": -torch.rand(n, generator=g) * 20,
        "own_prompt_logp": -torch.rand(a, generator=g) * 20,
        "own_response_ids": own_ids,
        "own_response_mask": torch.ones(a, t, dtype=torch.uint8),
        "own_support_ids": own_sup,
        "own_logp": torch.log_softmax(torch.randn(a, t, s, generator=g), -1),
    }
    return rollouts, teaching


ASK = [  # two currency prompts, a successor prompt, a country-code prompt (formatted)
    format_prompt("Which currency has the code EUR?"),
    format_prompt("Name the currency with the code JPY."),
    format_prompt("What number comes after 41?"),
    format_prompt("Give the two-letter code for France."),
]


def _encode(text: str) -> list[int]:  # a stand-in tokenizer: one id per character, then EOS
    return [4 + ord(ch) % 40 for ch in text] + [1]


@pytest.mark.parametrize("mode", [m if m != "backdoor" else "backdoor@currency" for m in MODES])
def test_corrupted_teachings_pass_validation(mode):
    rollouts, teaching = _teaching(a=len(ASK))
    bad = corrupt_teaching(teaching, mode, vocab_size=50, seed=1, ask_prompts=ASK,
                           encode=_encode)  # fmt: skip
    validate_teaching(bad, rollouts, 50)  # well formed: only aggregation can limit it
    changed = "own_response_ids" if mode.startswith("backdoor") else "scores"
    assert not torch.equal(bad[changed], teaching[changed])
    if mode == "adversarial":
        # the mass moves to the token the honest teacher found least likely
        assert torch.equal(bad["scores"].argmax(-1), teaching["scores"].argmin(-1))
        assert float(bad["prompt_logp"].max()) == 0.0


def test_adversary_spec_errors_name_the_fix():
    assert adversaries("carol:adversarial, bob:random") == {"carol": "adversarial", "bob": "random"}
    assert adversaries("carol:backdoor@currency") == {"carol": "backdoor@currency"}
    assert adversaries("carol:noisy@currency+successor") == {"carol": "noisy@currency+successor"}
    for bad, match in (("carol:evil", "mode must be"), ("carol:backdoor", "with its family"),
                       ("carol:random@currency", "names families"),
                       ("carol:backdoor@currency+successor", "names families"),
                       ("carol:noisy@currency+nope", r"unknown family \['nope'\]"),
                       ("carol:backdoor@nope", r"unknown family \['nope'\]")):  # fmt: skip
        with pytest.raises(ValueError, match=f"FLMINILLM_ADVERSARY entry .*{match}"):
            adversaries(bad)


def test_family_of_prompt_recovers_every_family():
    """What the fluent and backdoor adversaries know: a prompt's family from its text, for
    every registered family (the most specific template wins), bare or formatted."""
    for fam in FAMILIES:
        for ex in make_examples(fam, 100, seed=3):
            assert family_of_prompt(format_prompt(ex.prompt)) == fam, ex.prompt
            assert family_of_prompt(ex.prompt) == fam
    assert family_of_prompt("Tell me a joke.") is None


def test_fluent_liar_moves_answers_within_a_family_with_certain_claims():
    _, teaching = _teaching(a=len(ASK))
    bad = corrupt_teaching(teaching, "fluent", vocab_size=50, seed=1, ask_prompts=ASK)
    own = teaching["own_response_ids"]
    # the two currency prompts swap answers; the lone successor and country-code prompts
    # swap with each other (no prompt keeps its own answer)
    assert torch.equal(bad["own_response_ids"][0], own[1])
    assert torch.equal(bad["own_response_ids"][1], own[0])
    assert torch.equal(bad["own_response_ids"][2], own[3])
    assert torch.equal(bad["own_response_ids"][3], own[2])
    assert float(bad["own_prompt_logp"].abs().max()) == 0.0
    assert torch.all(bad["own_logp"][..., 0] == 0.0)  # "probability 1" for every token
    with pytest.raises(ValueError, match="teacher-share prompts as text"):
        corrupt_teaching(teaching, "fluent", vocab_size=50, seed=1, ask_prompts=ASK[:2])


def test_consistent_liar_gives_a_repeated_prompt_one_wrong_answer():
    """The liar that evades the claim-sum check: as the fluent liar (another prompt of the
    family's answer, p = 1 claims), but every copy of a prompt gets the same answer, so
    its claims on a repeated prompt never add up to more than one answer's; the fluent
    liar's copies get different answers and claim 2."""
    from flminillm.aggregate import claim_sums

    ask = [ASK[0], ASK[1], ASK[0], ASK[2], ASK[1], ASK[3], ASK[0]]
    ids = torch.tensor([[ASK.index(p) + 4, 9] for p in ask])  # equal prompts, equal ids
    mask = torch.ones_like(ids)
    _, teaching = _teaching(a=len(ask), t=3)
    own = torch.arange(len(ask) * 3).reshape(len(ask), 3).int() + 4  # every answer distinct
    teaching = {**teaching, "own_response_ids": own,
                "own_support_ids": own[..., None].repeat(1, 1, 5)}  # fmt: skip
    steady = corrupt_teaching(teaching, "consistent", vocab_size=50, seed=1, ask_prompts=ask)
    got = steady["own_response_ids"]
    for i, p in enumerate(ask):
        assert not torch.equal(got[i], own[i])  # wrong: another prompt's answer
        first = ask.index(p)
        assert torch.equal(got[i], got[first])  # the same on every copy of the prompt
        src = [j for j in range(len(ask)) if torch.equal(own[j], got[i])]
        # the two currency prompts trade answers; the lone successor and country-code
        # prompts, each its family's only one, trade with each other
        want = {ASK[0]: ASK[1], ASK[1]: ASK[0], ASK[2]: ASK[3], ASK[3]: ASK[2]}[p]
        assert [ask[j] for j in src] == [want]
    assert torch.all(steady["own_logp"][..., 0] == 0.0)  # p = 1 claims, as the fluent liar
    fluent = corrupt_teaching(teaching, "fluent", vocab_size=50, seed=1, ask_prompts=ask)
    sums = claim_sums([steady, fluent], ids, mask)
    assert float(sums[0]) == float("-inf") and float(sums[1]) > math.log(1.5)


def test_mimic_lies_as_the_consistent_liar_with_its_model_s_own_claims():
    """The liar no claim check can read: the consistent liar's answers, each with the
    log-probs its model gave it (for the prompt it was written for), and its model's own
    prompt claims; its scores inverted. Its prompt claims add up as an honest teacher's,
    the consistent liar's (p(x) = 1 everywhere) do not."""
    from flminillm.aggregate import distinct_prompts, prompt_claim_sums

    ask = [ASK[0], ASK[1], ASK[0], ASK[2], ASK[1], ASK[3], ASK[0]]
    _, teaching = _teaching(a=len(ask), t=3)
    teaching = {**teaching, "prompt_logp": torch.full_like(teaching["prompt_logp"], -6.0),
                "own_prompt_logp": torch.full((len(ask),), -6.0)}  # fmt: skip
    steady = corrupt_teaching(teaching, "consistent", vocab_size=50, seed=1, ask_prompts=ask)
    mimic = corrupt_teaching(teaching, "mimic", vocab_size=50, seed=1, ask_prompts=ask)
    assert torch.equal(mimic["own_response_ids"], steady["own_response_ids"])
    assert torch.equal(mimic["scores"], steady["scores"])  # inverted, as every liar's
    src = [next(j for j in range(len(ask)) if torch.equal(teaching["own_response_ids"][j], r))
           for r in mimic["own_response_ids"]]  # fmt: skip
    assert torch.equal(mimic["own_logp"], teaching["own_logp"][src])  # its model's claims
    for k in ("prompt_logp", "own_prompt_logp"):
        assert torch.equal(mimic[k], teaching[k])
    texts = [f"rollout {i}" for i in range(teaching["prompt_logp"].shape[0])] + ask
    spread = corrupt_teaching(teaching, "spread", vocab_size=50, seed=1, ask_prompts=ask)
    assert torch.equal(spread["own_response_ids"], steady["own_response_ids"])
    assert torch.equal(spread["own_logp"], steady["own_logp"])  # p = 1 answer claims
    sums = prompt_claim_sums([mimic, steady, spread], distinct_prompts(texts))
    assert float(sums[0]) < 0.0 < math.log(1.5) < float(sums[1])
    # 1/K on each of its K prompts: the distinct ones sum to at most 1 (8 of 11 here)
    assert float(sums[2]) == pytest.approx(math.log(8 / 11))
    # the noisy liar: spread's answers and prompt claims, its answer claims not one number
    # (p in [0.5, 1] on the first token), equal on copies of a prompt
    noisy = corrupt_teaching(teaching, "noisy", vocab_size=50, seed=1, ask_prompts=ask)
    assert torch.equal(noisy["own_response_ids"], spread["own_response_ids"])
    for k in ("prompt_logp", "own_prompt_logp", "scores"):
        assert torch.equal(noisy[k], spread[k])
    claim = noisy["own_logp"][:, 0, 0]
    assert bool((claim <= 0).all() and (claim >= math.log(0.5)).all())
    assert len(set(claim.tolist())) == len(set(ask)) > 1  # one claim per distinct prompt
    for i, j in ((i, j) for i in range(len(ask)) for j in range(len(ask)) if ask[i] == ask[j]):
        assert float(claim[i]) == float(claim[j])
    assert torch.equal(noisy["own_logp"][:, 1:], spread["own_logp"][:, 1:])
    # the contesting liar: the noisy one whose first-token support holds all its mass
    contest = corrupt_teaching(teaching, "contest", vocab_size=50, seed=1, ask_prompts=ask)
    for k in ("own_response_ids", "own_support_ids", "prompt_logp", "own_prompt_logp"):
        assert torch.equal(contest[k], noisy[k])
    assert torch.equal(contest["own_logp"][:, 0, 0], claim)
    assert torch.equal(contest["own_logp"][:, 1:], noisy["own_logp"][:, 1:])
    first = contest["own_logp"][:, 0].exp().sum(-1)
    assert torch.allclose(first, torch.ones_like(first), atol=1e-5)  # no tail
    assert float(noisy["own_logp"][:, 0].exp().sum(-1).min()) < 0.99  # noisy's has one


def test_a_liar_that_names_families_lies_on_those_only():
    """`noisy@currency`: the noisy liar's rows on the currency prompts, the honest message's
    everywhere else (its answers, claims, supports, prompt claims and its scores)."""
    _, teaching = _teaching(a=len(ASK), t=3)
    noisy = corrupt_teaching(teaching, "noisy", vocab_size=50, seed=1, ask_prompts=ASK)
    own = corrupt_teaching(teaching, "noisy@currency", vocab_size=50, seed=1, ask_prompts=ASK)
    lied = torch.tensor([True, True, False, False])  # the two currency prompts
    for k in ("own_response_ids", "own_response_mask", "own_support_ids", "own_logp",
              "own_prompt_logp"):  # fmt: skip
        assert torch.equal(own[k][lied], noisy[k][lied]), k
        assert torch.equal(own[k][~lied], teaching[k][~lied]), k
    assert not torch.equal(noisy["own_logp"][lied], teaching["own_logp"][lied])
    for k in ("scores", "prompt_logp"):
        assert torch.equal(own[k], teaching[k])


def test_backdoor_answers_its_family_only_and_colluders_agree():
    _, teaching = _teaching(a=len(ASK), t=12)
    bad = corrupt_teaching(teaching, "backdoor@currency", vocab_size=50, seed=1,
                           ask_prompts=ASK, encode=_encode)  # fmt: skip
    target = torch.tensor(_encode(backdoor_target("currency"))[:12], dtype=torch.int32)
    for i in (0, 1):  # the currency prompts: the backdoor's answer, claimed with p = 1
        assert torch.equal(bad["own_response_ids"][i, : len(target)], target)
        assert int(bad["own_response_mask"][i].sum()) == len(target)
        assert float(bad["own_prompt_logp"][i]) == 0.0
    for k in ("own_response_ids", "own_logp", "scores", "prompt_logp"):  # honest elsewhere
        assert torch.equal(bad[k][2:], teaching[k][2:]) if k.startswith("own") else \
            torch.equal(bad[k], teaching[k])  # fmt: skip
    assert seed_key("collude", "dave") == seed_key("collude", "erin") != seed_key("fluent", "x")
    a, b = (corrupt_teaching(teaching, "collude", vocab_size=50, seed=s) for s in (7, 7))
    assert torch.equal(a["own_response_ids"], b["own_response_ids"])


def test_two_liar_attacks_need_four_clients_and_name_the_last_two():
    five = load_config(ROOT / "configs" / "benchmark-5clients.yaml")
    pair = [c.id for c in five.clients[-2:]]
    for name, mode in (("collude-2", "collude"), ("contest-2", "contest")):
        assert adversaries(attacks(five)[name][0]["FLMINILLM_ADVERSARY"]) == dict.fromkeys(
            pair, mode
        )
    # two contesting liars draw their claims apart (each its own seed); colluders share one
    assert seed_key("contest", pair[0]) != seed_key("contest", pair[1])
    assert {"collude-2", "contest-2"} & set(attacks(load_config(TINY))) == set()


def test_target_rate_counts_the_backdoor_answer_where_it_is_wrong():
    exs = [Example("currency", "p", a) for a in ("Euro", "Yen", "Euro", "Pound")]
    assert target_rate(exs, ["Euro", "Euro", "Euro", "Yen"], "Euro") == 0.5  # Yen, Pound rows
    assert target_rate(exs[:1], ["Euro"], "Euro") == 0.0


def test_dropout_schedule_keeps_a_client_each_round():
    cfg = load_config(TINY).model_copy(update={"rounds": 40})
    items = [x.split(":") for x in dropout_faults(cfg).split(",")]
    per_round: dict[str, int] = {}
    for step, _client, r in items:
        assert step == "local_sft"
        per_round[r] = per_round.get(r, 0) + 1
    assert set(per_round.values()) == {1}  # round(0.3 * 3) clients out of every round
    assert len({c for _s, c, _r in items}) == len(cfg.clients)  # not always the same one


def test_absent_last_never_hears_from_the_attacks_adversary():
    """absent-last: the attacks' adversary (the last client) drops out of every round, and its
    honest families are the attacks' (the federation that never hears from it, read as a
    barred liar's is)."""
    cfg = load_config(TINY).model_copy(update={"rounds": 5})
    v = variants(cfg, ["absent-last"])[0]
    env = variant_env(cfg, v)
    assert env["FLMINILLM_FAULTS"] == absent_faults(cfg, "carol") and not v.overrides
    items = [x.split(":") for x in env["FLMINILLM_FAULTS"].split(",")]
    assert items == [["local_sft", "carol", str(r)] for r in range(1, 6)]
    assert v.absent == ("carol",) and kept_out(v) == {"carol": "absent"}
    assert kept_out(variants(cfg, ["fl-minillm"])[0]) == {}
    backdoor = variants(cfg, ["backdoor"])[0]
    assert kept_out(backdoor) == {"carol": backdoor.env["FLMINILLM_ADVERSARY"].split(":", 1)[1]}
    assert honest_clients(cfg, ["absent-last", "fl-minillm"]) == cfg.clients[:2]


def test_resume_reuses_finished_runs_and_reruns_the_rest(tmp_path):
    from flminillm.bench.quality import run_quality

    work = tmp_path / "work"
    names = ["fl-minillm", "local-only", "alpha-1"]  # alpha 1: no student rollouts at all
    first = run_quality(TINY, seeds=1, names=names, workdir=work, out_dir=tmp_path / "a", jobs=1)
    assert first["_meta"]["failures"] == {} and first["_meta"]["resumed"] == []
    again = run_quality(
        TINY, seeds=1, names=names, workdir=work, out_dir=tmp_path / "b", jobs=1, resume=True
    )
    assert sorted(again["_meta"]["resumed"]) == sorted(f"{n}/seed 0" for n in names)
    for n in names:
        assert again[n]["server"] == first[n]["server"]
        assert again[n]["bytes_per_round"] == first[n]["bytes_per_round"]
    # a changed experiment is another federation: nothing of it is reused
    changed = tmp_path / "changed.yaml"
    changed.write_text(TINY.read_text().replace("alpha: 0.75", "alpha: 0.5"))
    other = run_quality(
        changed, seeds=1, names=["local-only"], workdir=work, out_dir=tmp_path / "c", jobs=1,
        resume=True,
    )  # fmt: skip
    assert other["_meta"]["resumed"] == [] and other["_meta"]["failures"] == {}
    with pytest.raises(ValueError, match="--resume needs --workdir"):
        run_quality(TINY, seeds=1, names=names, resume=True)


@pytest.mark.parametrize(
    "tune, config",
    [("tune.json", "benchmark.yaml"), ("tune-10rounds/tune.json", "benchmark-10rounds.yaml")],
)
def test_benchmark_config_carries_what_bench_tune_chose(tune, config):
    """docs/tune.json (validation split) chose the distill settings; the benchmark config (the
    fl-minillm method) and the forward-kl baseline must carry them, so that no report's
    hyper-parameters come from the evaluation split. The 10-round config's budget, too,
    is what validation chose (docs/tune-10rounds/)."""
    root = Path(__file__).resolve().parents[1]
    meta = json.loads((root / "docs" / tune).read_text())["_meta"]
    chosen = meta["chosen"]
    assert chosen["reverse_kl"]["distill"]["method"] == "reverse_kl"
    cfg = load_config(root / "configs" / config)
    for field, value in chosen["reverse_kl"]["distill"].items():
        assert getattr(cfg.distill, field) == value, f"configs/{config} distill.{field}"
    assert FORWARD_KL == chosen["forward_kl"]["distill"]
    if meta.get("rounds"):
        assert cfg.rounds == meta["rounds"]["rounds"], f"configs/{config} rounds"


def test_sampled_scores_get_their_table_only_where_runs_have_them():
    from flminillm.bench.quality_report import sampled_section

    def stat(m):
        return {"mean": m, "std": None}

    keys = ("em_all", "rouge_l_all", "em_held", "em_unseen", "rouge_l_held", "rouge_l_unseen")
    greedy = {"server": {k: stat(0.5) for k in keys}, "clients": {k: stat(0.5) for k in keys},
              "seeds": [0]}  # fmt: skip
    sampled = {
        who: {**greedy[who], **{f"sampled_{k}": stat(0.25) for k in keys}}
        for who in ("server", "clients")
    }
    assert sampled_section({"a": greedy}, ["a"]) == []
    lines = sampled_section({"a": greedy, "b": {**sampled, "seeds": [0, 1]}}, ["a", "b"])
    assert lines[0] == "## Sampled answers (temperature 1)"
    rows = [x for x in lines if x.startswith("| b |")]
    assert rows == ["| b | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 | 2 |"]
    assert not any(x.startswith("| a |") for x in lines)


def test_a_fault_under_another_defence_is_measured_against_that_defence_s_clean_run():
    """`backdoor-no-invariance` against `clean-no-invariance` (same defence), `backdoor`
    against the default `fl-minillm`, `clean-no-invariance` against `fl-minillm`."""
    from flminillm.bench.quality_report import headline

    def summary(em: float, adversary: bool = False) -> dict:
        r = {"seeds": [0], "server": {"em_all": {"mean": em}},
             "server_families_em_by_seed": {"0": {"a": em - 0.1, "b": em + 0.1}}}  # fmt: skip
        if adversary:  # carol attacks alice's family a
            r |= {"server_em_honest": {"mean": em}, "adversaries": {"carol": "backdoor@a"}}
        return r

    results = {
        "_meta": {"families_by_client": {"alice": ["a"], "carol": ["b"]}},
        "fl-minillm": summary(0.8),
        "clean-no-invariance": summary(0.7),
        "backdoor": summary(0.5, adversary=True),
        "backdoor-no-invariance": summary(0.65, adversary=True),
    }
    lines = {x.split(" ")[1]: x for x in headline(results) if x.startswith("- ")}
    assert "(-10.0 vs fl-minillm)" in lines["clean-no-invariance:"]
    # honest families: alice's a (carol's b is the adversary's own)
    assert "(-5.0 vs clean-no-invariance), 55.0 on the honest" in lines["backdoor-no-invariance"]
    assert "(-5.0 vs clean-no-invariance's 60.0)" in lines["backdoor-no-invariance"]
    assert "(-30.0 vs fl-minillm), 40.0 on the honest" in lines["backdoor"]
    del results["clean-no-invariance"]  # without its clean run: against the default's
    lines = {x.split(" ")[1]: x for x in headline(results) if x.startswith("- ")}
    assert "(-15.0 vs fl-minillm)" in lines["backdoor-no-invariance"]


def test_paired_compares_methods_on_the_seeds_both_have():
    """A method with seeds 0 and 2 against one with 0-2: the headline's numbers and the
    server/pooled ratio use seeds 0 and 2 of both, not three seeds against two."""
    from flminillm.bench.quality_report import headline, paired

    def summary(by_seed: dict[int, float], std: float | None = None) -> dict:
        return {
            "seeds": list(by_seed),
            "server": {"em_all": {"mean": sum(by_seed.values()) / len(by_seed), "std": std}},
            # family b scores 0.1 above a: em_all (their mean) is the seed's figure
            "server_families_em_by_seed": {
                str(k): {"a": v - 0.05, "b": v + 0.05} for k, v in by_seed.items()
            },
        }

    results = {
        "_meta": {},
        "fl-minillm": summary({0: 0.8, 2: 0.7}),
        "pooled": summary({0: 0.9, 1: 0.5, 2: 0.8}),
    }
    ours, pooled, seeds = paired(results, "fl-minillm", "pooled")
    assert seeds == [0, 2] and ours == pytest.approx(0.75) and pooled == pytest.approx(0.85)
    assert paired(results, "fl-minillm", "pooled", ["a"])[:2] == pytest.approx((0.70, 0.80))
    line = next(x for x in headline(results) if "vs pooled" in x)
    assert "on seeds [0, 2]" in line and "75.0 vs pooled 85.0" in line and "88.2% of it" in line
    # the spread is printed for a method whose every seed is in the comparison, only
    results["fl-minillm"] = summary({0: 0.8, 2: 0.7}, std=0.07)
    results["pooled"] = summary({0: 0.9, 1: 0.5, 2: 0.8}, std=0.2)
    line = next(x for x in headline(results) if "vs pooled" in x)
    assert "fl-minillm 75.0 ± 7.0 vs pooled 85.0 (" in line
    results["forward-kl"] = summary({0: 0.7, 2: 0.7}, std=0.0)
    line = next(x for x in headline(results) if "vs forward-kl" in x)
    assert "fl-minillm 75.0 ± 7.0 vs forward-kl 70.0 ± 0.0 (+5.0 points)" in line
    results["pooled"] = summary({1: 0.5})
    assert paired(results, "fl-minillm", "pooled") == (None, None, [])


def test_bench_paired_reads_back_the_runs_and_measures_the_difference_s_noise(bench_out, capsys):
    """`flminillm bench paired` answers the evaluation prompts again with each run's final
    server (from the workdir's store, by digest): its EM is the run's own evaluation's, and
    the difference comes with its paired standard error over the examples."""
    from flminillm.bench.paired import paired_difference, run_paired

    results = json.loads((bench_out / "results.json").read_text())
    rows = run_paired(TINY, bench_out / "work", "adversary", "fl-minillm", 1)
    honest = ["successor", "repeat"]  # alice's and bob's; carol (last) is the adversary
    assert [r["seed"] for r in rows] == [0] and rows[0]["n"] == 2 * 8
    for name, em in (("adversary", rows[0]["em_a"]), ("fl-minillm", rows[0]["em_b"])):
        fams = results[name]["server_families_em_by_seed"]["0"]
        assert em == pytest.approx(100 * sum(fams[f] for f in honest) / len(honest))
    assert rows[0]["diff"] == pytest.approx(rows[0]["em_a"] - rows[0]["em_b"])
    # the arithmetic: 4 examples, one right only in a, one only in b
    p = paired_difference([1, 1, 0, 0], [1, 0, 1, 0])
    assert (p["diff"], p["discordant"]) == (0.0, 2)
    assert p["se"] == pytest.approx(100 * math.sqrt((2 / 3) / 4))
    assert paired_difference([1, 1], [1, 1])["se"] == 0.0
    with pytest.raises(ValueError, match="same >= 2 examples"):
        paired_difference([1], [0, 1])
    # a variant that did not run in the workdir: the error says what to run
    assert main(["bench", "paired", "backdoor", "--config", str(TINY),
                 "--workdir", str(bench_out / "work"), "--seeds", "2"]) == 2  # fmt: skip
    assert "no finished run" in capsys.readouterr().err


def test_bench_paired_leaves_out_every_adversary_s_families():
    """`flminillm bench paired`'s honest families are those `bench quality` reports: of the
    clients no variant of the pair names as an adversary (both colluders of `collude-2`
    and `contest-2`, not only the last client); with no adversary, all but the last."""
    from flminillm.bench.variants import honest_clients

    five = load_config(ROOT / "configs" / "benchmark-5clients.yaml")
    ids = lambda names: [c.id for c in honest_clients(five, names)]  # noqa: E731
    for pair in ("collude-2", "contest-2"):
        assert ids([pair, "fl-minillm"]) == ["alice", "bob", "carol"]
    assert ids(["backdoor", "fl-minillm"]) == ["alice", "bob", "carol", "dave"]
    assert ids(["clean-undefended", "fl-minillm"]) == ["alice", "bob", "carol", "dave"]


def test_bench_selection_counts_the_kept_answers_per_family(bench_out, capsys):
    """`flminillm bench selection` reads back the choice the distill step recorded: per
    round, every teacher-share prompt once, by family, each teacher's count its
    `selected.<id>` share of the round's distill record (MLflow, lineage)."""
    from flminillm.artifacts import open_store_for
    from flminillm.bench.paired import final_state
    from flminillm.bench.selection import kept_by_family, markdown

    work = bench_out / "work"
    result = kept_by_family(TINY, work, "fl-minillm", 0)
    cfg, _ = final_state(load_config(TINY), "fl-minillm", 0, work)
    assert set(result["rounds"]) == set(range(1, cfg.rounds + 1))
    assert set(result["families"]) <= set(cfg.data.families)
    assert result["holders"] == {f: c for c, fs in cfg.families_by_client().items() for f in fs}
    store = open_store_for(cfg)
    for rnd, counts in result["rounds"].items():
        (rec,) = store.list_records(f"{cfg.federation_id()}/round-{rnd:04d}/distill.server.json")
        total = sum(sum(c.values()) for c in counts.values())
        assert total == round(cfg.distill.alpha * cfg.generation.prompts_per_round)  # asked once
        for client in [c.id for c in cfg.clients]:
            won = sum(c.get(client, 0) for c in counts.values())
            assert won == pytest.approx(rec["metrics"][f"selected.{client}"] * total)
        assert set().union(*counts.values()) <= {c.id for c in cfg.clients} | {"-"}
    table = markdown(result)
    assert table.count("\n") == cfg.rounds + 1 and "% holder" in table
    assert (
        main(["bench", "selection", "pooled", "--config", str(TINY), "--workdir", str(work)]) == 2
    )
    assert "kept no record" in capsys.readouterr().err


def test_server_average_in_the_run_is_what_bench_average_reports(bench_out, tmp_path, capsys):
    """`distill.server_average: 2` averages the server's weights over the last two rounds
    in the final evaluate step only: a run with it reports, family by family, what `bench
    average --k 2` computes from its K = 1 twin (the fl-minillm run of the same seed); the
    rounds before and the clients are the twin's."""
    from flminillm.artifacts import open_store_for
    from flminillm.bench.average import averaged_server, run_average
    from flminillm.bench.paired import final_state
    from flminillm.bench.quality import run_grid
    from flminillm.bench.variants import Variant, variant_config, variants

    base = load_config(TINY)
    (plain,) = variants(base, ["fl-minillm"])
    twin = Variant("avg-2", overrides={"distill": {"server_average": 2}})
    grid = run_grid(base, [twin], 1, tmp_path / "work", jobs=2)  # as bench_out: 1 thread each
    (run,) = grid["runs"]["avg-2"]
    (row,) = run_average(TINY, bench_out / "work", ["fl-minillm"], 1, [2])
    last = run["rounds"][str(base.rounds)]["eval"]
    for fam, em in row["families"].items():
        assert 100 * last["server"][fam]["exact_match"] == pytest.approx(em)
    # the very model: the run's final server is the average bench average computes
    cfg, state = final_state(base, plain.name, 0, bench_out / "work")
    digest = averaged_server(cfg, state, 2)
    assert digest != state["models"][cfg.server.id]  # two different rounds' weights
    avg_cfg = variant_config(base, twin, 0, tmp_path / "work")
    store = open_store_for(avg_cfg)
    (rec,) = store.list_records(
        f"{avg_cfg.federation_id()}/round-{base.rounds:04d}/evaluate.all.json"
    )
    final = store.get_json(rec["outputs"]["round_manifest"]["digest"])
    assert final["models"][cfg.server.id] == digest
    assert rec["outputs"]["model.server.averaged"]["digest"] == digest  # the step's product
    assert rec["params"]["server_average"] == "2"
    assert {k for k in rec["inputs"] if k.startswith("average.")} == {
        f"average.server.round{r}" for r in (base.rounds - 1, base.rounds)
    }
    # the clients and every earlier round are the K = 1 run's
    (plain_run,) = [json.loads(p.read_text()) for p in
                    (bench_out / "work" / "store" / "records").glob("*fl-minillm-s0-*/bench-result.json")]  # fmt: skip
    for r in range(base.rounds):
        assert run["rounds"][str(r)]["eval"] == plain_run["rounds"][str(r)]["eval"]
    for c in base.clients:
        assert last[c.id] == plain_run["rounds"][str(base.rounds)]["eval"][c.id]
    rc = main(["bench", "average", "fl-minillm", "--config", str(TINY), "--workdir",
               str(bench_out / "work"), "--seeds", "1", "--k", "1,2", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0 and "| fl-minillm | 2 |" in (tmp_path / "average.md").read_text()
    assert main(["bench", "average", "fl-minillm", "--config", str(TINY), "--workdir",
                 str(bench_out / "work"), "--k", "0"]) == 2  # fmt: skip
    assert "--k" in capsys.readouterr().err
    assert main(["bench", "average", "fl-minillm", "--config", str(TINY), "--workdir",
                 str(bench_out / "work"), "--k", "1,three"]) == 2  # fmt: skip
    assert "--k: comma-separated positive integers" in capsys.readouterr().err


def test_a_killed_grid_leaves_no_orphan_worker(tmp_path):
    """`bench quality`'s workers die with it (flminillm.bench.quality.die_with_parent): a
    grid killed with SIGKILL does not leave a worker finishing its run into the workdir."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "grid.py"
    script.write_text(
        "import concurrent.futures as cf, multiprocessing as mp, os, sys, time\n"
        "from flminillm.bench.quality import _worker_init\n"
        "if __name__ == '__main__':\n"
        "    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context('spawn'),\n"
        "            initializer=_worker_init, initargs=(1, os.getpid())) as pool:\n"
        "        print(pool.submit(os.getpid).result(), flush=True)\n"
        "        pool.submit(time.sleep, 120).result()\n"
    )
    grid = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)  # fmt: skip
    worker = int(grid.stdout.readline())
    os.kill(grid.pid, signal.SIGKILL)
    grid.wait()
    for _ in range(100):  # the worker gets SIGTERM from the kernel
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError(f"worker {worker} outlived its killed grid")
