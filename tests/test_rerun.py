"""Failures, reruns and client drop-out, through the local KFP runner and MLflow."""

import json

import pytest

from flminillm.cli import main
from flminillm.faults import FAULTS_ENV, RETRIES_ENV, parse_faults
from flminillm.ledger import ledger
from flminillm.store import open_store
from tests.isolated import inprocess_states, isolated_config


def _executions(cfg) -> dict[tuple, tuple]:
    """(round, step, party) -> (status, started) of the latest execution of each step."""
    store = open_store(cfg.store.uri)
    return {
        (r, rec["step"], rec["party"]): (rec["status"], rec["started"])
        for r, recs in ledger(store, cfg.federation_id()).items()
        for rec in recs
    }


def _federation_runs(cfg):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs(
        [exp.experiment_id], filter_string="tags.`flminillm.kind` = 'federation'"
    )


def test_parse_faults():
    assert parse_faults("distill:alice:2, teach:*:*:1") == [
        {"step": "distill", "party": "alice", "round": "2", "times": None},
        {"step": "teach", "party": "*", "round": "*", "times": 1},
    ]
    with pytest.raises(ValueError, match="step:party:round"):
        parse_faults("distill:alice")


def test_rerun_executes_only_the_failed_step_and_its_dependants(
    tiny_config, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(RETRIES_ENV, "2")
    rounds = 2  # the fault is in the second round's pipeline
    # an uninterrupted run, the reference: in one process (the same models as a KFP run),
    # which saves the suite a third KFP federation
    ref_cfg, _ = isolated_config(tiny_config, tmp_path, "reference", rounds=rounds)
    reference = inprocess_states(ref_cfg)[-1]["models"]

    # the same federation with alice's distill step failing in the last round
    cfg, path = isolated_config(tiny_config, tmp_path, "faulty", rounds=rounds)
    monkeypatch.setenv(FAULTS_ENV, f"distill:alice:{rounds}")
    assert main(["run", "--config", str(path)]) == 1
    failed_run = _federation_runs(cfg)[0]
    assert failed_run.info.status == "FAILED"
    error = failed_run.data.tags["flminillm.error"]
    assert f"injected fault in distill of alice, round {rounds}" in error
    before = _executions(cfg)
    assert before[(rounds, "distill", "alice")][0] == "failed"
    assert (rounds, "evaluate", "all") not in before
    succeeded = {k: v for k, v in before.items() if v[0] == "succeeded"}
    assert (rounds, "local_sft", "alice") in succeeded and (0, "prepare", "all") in succeeded

    # lineage shows the failed step
    capsys.readouterr()
    assert main(["lineage", failed_run.info.run_id, "--tracking-uri", cfg.tracking.uri]) == 0
    tree = capsys.readouterr().out
    assert "distill.alice failed" in tree and "injected fault" in tree

    # fix the cause, rerun: only the failed step and what depends on it execute again
    monkeypatch.delenv(FAULTS_ENV)
    assert main(["rerun", failed_run.info.run_id, "--tracking-uri", cfg.tracking.uri]) == 0
    after = _executions(cfg)
    again = {k for k, v in after.items() if k in before and v[1] != before[k][1]}
    assert (rounds, "distill", "alice") in again
    assert not again & set(succeeded), sorted(again & set(succeeded))
    assert after[(rounds, "distill", "alice")][0] == "succeeded"
    assert after[(rounds, "evaluate", "all")][0] == "succeeded"
    # and the outcome is the uninterrupted run's, digest for digest
    final = json.loads((path.parent / "out" / "round_manifest.json").read_text())
    assert final["models"] == reference
    rerun = [r for r in _federation_runs(cfg) if r.data.tags.get("flminillm.rerun_of")]
    assert rerun and rerun[0].data.tags["flminillm.rerun_of"] == failed_run.info.run_id
    assert rerun[0].info.status == "FINISHED"


def test_client_drops_out_and_the_round_goes_on(tiny_config, tmp_path, monkeypatch, capsys):
    """alice drops out of round 2 and bob lies throughout (the default defence). alice keeps her
    model, bob and the server go on; the server replays (distill.stale_share) the answers of
    alice's it kept in round 1, marked stale; whose answers were kept and who claims
    certainty are in the distill step's MLflow metrics and in `flminillm lineage`."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv(RETRIES_ENV, "1")
    sampling = tiny_config.sampling.model_copy(update={"min_clients": 1})
    distill = tiny_config.distill.model_copy(update={"stale_share": 1.0})
    cfg, path = isolated_config(
        tiny_config, tmp_path, "dropout", sampling=sampling, distill=distill, rounds=2
    )
    monkeypatch.setenv(FAULTS_ENV, "local_sft:alice:2")
    monkeypatch.setenv("FLMINILLM_ADVERSARY", "bob:adversarial")
    assert main(["run", "--config", str(path)]) == 0
    final = json.loads((path.parent / "out" / "round_manifest.json").read_text())
    assert list(final["dropped"]) == ["alice"]
    assert "injected fault" in final["dropped"]["alice"]
    first = open_store(cfg.store.uri).get_json(final["history"][-1])
    assert final["models"]["alice"] == first["models"]["alice"]  # kept its model
    assert final["models"]["bob"] != first["models"]["bob"]  # bob took part
    # the replay buffer: one entry per round each client took part in
    assert [e["round"] for e in final["stale"]["alice"]] == [1]
    assert [e["round"] for e in final["stale"]["bob"]] == [1, 2]

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    steps = client.search_runs([exp.experiment_id], "attributes.run_name = 'distill.server'")
    by_round = {int(r.data.params["round"]): r for r in steps}
    one, two = by_round[1].data, by_round[2].data
    m = one.metrics
    assert m["certain.bob"] == 1.0 and m["certain.alice"] < 0.5  # the liar's p=1 claims
    # real messages keep their claims in their support's order (a liar's too): nobody is
    # quarantined, which only a broken teacher is
    assert m["coherent.alice"] == 1.0 and m["coherent.bob"] == 1.0
    # bob's p(x) = 1 claims on every prompt do not add up (distill.max_prompt_claim_sum): he
    # is barred in both rounds, and the prompts he would have won are left out
    for r in (one, two):
        assert r.metrics["overclaimed_prompts.bob"] == 1.0 and r.metrics["selected.bob"] == 0.0
    assert m["overclaimed_prompts.alice"] == 0.0  # (round 2: absent)
    # every teacher-share prompt is kept (alice's), rejected (min_claim) or left out (bob's),
    # and the tiny teachers, unsure of everything, lose at most max_rejected to the floor
    kept = m["selected.alice"] + m["rejected"] + m.get("implausible", 0.0)
    assert kept == pytest.approx(1.0)
    assert m["rejected"] <= cfg.distill.max_rejected
    asked = round(cfg.distill.alpha * cfg.generation.prompts_per_round)
    won = round(m["selected.alice"] * asked)
    assert won > 0 and two.metrics["stale_rows"] == won  # all of them, at stale_share 1
    assert "stale_rows" not in m
    # round 2: bob's answers on alice's domain (where she beat him in round 1) are left to
    # her replayed answers (flminillm.aggregate.imputed_quantile)
    m2 = two.metrics
    left = m2["rejected"] + m2.get("reserved", 0.0) + m2.get("implausible", 0.0)
    assert left == pytest.approx(1.0)
    assert "reserved" not in m
    assert two.tags["in.stale.alice.r1"] == one.tags["in.teaching.alice"]  # what was replayed
    assert two.params["dropped"] == "alice"
    capsys.readouterr()
    assert main(["lineage", _federation_runs(cfg)[0].info.run_id, "--tracking-uri",
                 cfg.tracking.uri]) == 0  # fmt: skip
    tree = capsys.readouterr().out
    assert "answers kept: alice" in tree and "certain of 100%" in tree
    assert "barred: its claims on the round's prompts sum to" in tree


def test_an_absent_client_s_domain_is_imputed_from_what_it_won(tiny_config, tmp_path, monkeypatch):
    """alice takes part in round 1 and drops out of round 2. The server imputes her domain
    in round 2 from her round-1 claims, with the prompts she lost there marked lost: the
    mask is `lost_prompts` of the choice the server stored in round 1 (won by bob, or left
    out), read back from the replay buffer, not all False (flminillm.aggregate
    .imputed_quantile reads a lost prompt as 0)."""
    import torch

    import flminillm.aggregate as aggregate
    from flminillm.aggregate import lost_prompts

    seen = []
    real = aggregate.imputed_quantile

    def spy(prompt_ids, prompt_mask, past, *args, **kwargs):
        seen.append(past)
        return real(prompt_ids, prompt_mask, past, *args, **kwargs)

    monkeypatch.setattr(aggregate, "imputed_quantile", spy)
    monkeypatch.setenv(RETRIES_ENV, "1")
    monkeypatch.setenv(FAULTS_ENV, "local_sft:alice:2")
    # bob claims the same for every prompt: with ties at their mean rank (tie_rank 'mean';
    # with 'low', the default, he would win nothing) his quantile is 0.5 and he wins where
    # alice ranks lowest; barred (his claims overclaim), his would-be wins leave the batch
    # (barred_wins 'leave'; with 'next', the default, they would be alice's: nothing lost)
    monkeypatch.setenv("FLMINILLM_ADVERSARY", "bob:adversarial")
    sampling = tiny_config.sampling.model_copy(update={"min_clients": 1})
    distill = tiny_config.distill.model_copy(
        update={"stale_share": 1.0, "tie_rank": "mean", "barred_wins": "leave"}
    )
    cfg, _ = isolated_config(
        tiny_config, tmp_path, "lost", sampling=sampling, distill=distill, rounds=2
    )
    states = inprocess_states(cfg)
    assert list(states[-1]["dropped"]) == ["alice"]
    assert len(seen) == 1 and len(seen[0]) == 1  # round 2's server: alice's one past round
    _, _, quantiles, lost = seen[0][0]
    (entry,) = states[-1]["stale"]["alice"]
    choice = open_store(cfg.store.uri).scoped(cfg.server.id).get_tensors(entry["choice"])["choice"]
    assert torch.equal(lost, lost_prompts(choice, entry["index"]))
    assert lost.shape == quantiles.shape
    assert bool(lost.any()) and not bool(lost.all())  # bob won some of round 1, alice others
    assert bool((choice[lost] != entry["index"]).all())


def test_round_fails_clearly_below_min_clients(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(RETRIES_ENV, "1")
    sampling = tiny_config.sampling.model_copy(update={"min_clients": 1})
    cfg, path = isolated_config(tiny_config, tmp_path, "below", sampling=sampling)
    monkeypatch.setenv(FAULTS_ENV, "local_sft:*:1")
    assert main(["run", "--config", str(path)]) == 1
    run = _federation_runs(cfg)[0]
    error = run.data.tags["flminillm.error"]
    assert "below sampling.min_clients=1" in error
    assert "alice" in error and "bob" in error


def test_a_client_that_misses_round_1_gets_its_full_fine_tuning_later(
    tiny_config, tmp_path, monkeypatch
):
    """alice drops out of round 1, where every client runs its full local fine-tuning
    (local_sft.steps); in round 2 she gets the full fine-tuning, bob (who had his) the
    refresh (later_round_steps). In one process: the bookkeeping is the round manifest's.
    bob is also broken (random scores): the server quarantines him every round, alone in
    round 1 (so nobody scores its rollouts) and beside alice in round 2."""
    from flminillm.aggregate import MIN_COHERENCE

    monkeypatch.setenv(RETRIES_ENV, "1")
    monkeypatch.setenv(FAULTS_ENV, "local_sft:alice:1")
    monkeypatch.setenv("FLMINILLM_ADVERSARY", "bob:random")
    sampling = tiny_config.sampling.model_copy(update={"min_clients": 1})
    cfg, _ = isolated_config(tiny_config, tmp_path, "late", sampling=sampling, rounds=2)
    states = inprocess_states(cfg)
    assert [s["fine_tuned"] for s in states] == [[], ["bob"], ["alice", "bob"]]
    steps = {
        (r, rec["party"]): rec["params"].get("steps")
        for r, recs in ledger(open_store(cfg.store.uri), cfg.federation_id()).items()
        for rec in recs
        if rec["step"] == "local_sft" and rec["status"] == "succeeded"
    }
    s = cfg.local_sft
    assert s.steps != s.later_round_steps
    assert steps == {(1, "bob"): s.steps, (2, "alice"): s.steps, (2, "bob"): s.later_round_steps}
    server = {
        r: rec["metrics"]
        for r, recs in ledger(open_store(cfg.store.uri), cfg.federation_id()).items()
        for rec in recs
        if rec["step"] == "distill" and rec["party"] == cfg.server.id
    }
    assert server[1]["coherent.bob"] < MIN_COHERENCE and "coherent.alice" not in server[1]
    # alice, absent with no past, is one of two clients: half the prompts, where bob is
    # least sure, are left out rather than learnt from his guesses
    # (flminillm.aggregate.unknown_domain); nobody is absent in round 2
    asked = round(cfg.distill.for_round(1).alpha * cfg.generation.prompts_per_round)
    assert server[1]["reserved"] == pytest.approx(round(asked / 2) / asked)
    assert "reserved" not in server[2]
    assert server[1]["n_student_rollouts"] == 0  # no trusted teacher to score them
    assert server[2]["coherent.bob"] < MIN_COHERENCE and server[2]["coherent.alice"] == 1.0
    assert server[2]["n_student_rollouts"] > 0  # alice scores them
    assert server[2]["selected.bob"] > 0  # his answers still count (hard labels)


def test_a_barred_teacher_counts_as_an_absent_client_with_no_past(tiny_config, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    """distill.barred_as_absent: bob claims p(x) = 1 everywhere and is barred (prompt
    claims), and his share of the clients (1/2) of the prompts, where alice is least sure,
    is reserved (`reserved`); without it nothing is reserved. What is kept is alice's,
    either way."""
    from flminillm.artifacts import open_store_for

    monkeypatch.setenv("FLMINILLM_ADVERSARY", "bob:adversarial")
    metrics = {}
    for on in (False, True):
        distill = tiny_config.distill.model_copy(update={"barred_as_absent": on})
        cfg, _ = isolated_config(tiny_config, tmp_path / str(on), "barred", distill=distill,
                                 rounds=1)  # fmt: skip
        inprocess_states(cfg)
        (rec,) = open_store_for(cfg).list_records(
            f"{cfg.federation_id()}/round-0001/distill.server.json"
        )
        metrics[on] = rec["metrics"]
    off, on = metrics[False], metrics[True]
    for m in (off, on):
        assert m["overclaimed_prompts.bob"] == 1.0 and m["selected.bob"] == 0.0
    assert "reserved" not in off
    assert on["reserved"] == pytest.approx(0.5, abs=0.02)
    assert on["selected.alice"] < off["selected.alice"]


def test_the_server_pools_contest_counts_across_rounds(tiny_config, tmp_path, monkeypatch):
    """distill.contest_bar_rounds: the server's distill step hands its round's contest
    counts to evaluate, which keeps them in the round manifest (`contest_evidence`, per
    round); the next round's bar is given them (`steps.pooled_evidence`: summed per pair,
    matched by name) and `contest_pooled.<id>` is the share over both rounds. Corrupt
    counts in a manifest are an error naming the round to rerun."""
    import torch

    import flminillm.aggregate as aggregate
    from flminillm.artifacts import open_store_for
    from flminillm.steps import pooled_evidence

    given = []
    bar = aggregate.contest_bar

    def spy(counts, share, able, peers="two", earlier=None, abstain=False, least=1):
        given.append((counts.clone(), None if earlier is None else earlier.clone()))
        assert not abstain  # 'judged-veto' (the default): every peer that may contest votes
        assert least == 0  # contest_min_judged's default: one judged win is enough
        return bar(counts, share, able, peers, earlier=earlier, abstain=abstain, least=least)

    monkeypatch.setattr(aggregate, "contest_bar", spy)
    distill = tiny_config.distill.model_copy(update={"contest_bar_rounds": 2})
    cfg, _ = isolated_config(tiny_config, tmp_path, "pooled", distill=distill, rounds=2)
    states = inprocess_states(cfg)
    first, second = states[1]["contest_evidence"], states[2]["contest_evidence"]
    assert set(first) == {"1"} and set(second) == {"1", "2"}
    assert first["1"]["teachers"] == ["alice", "bob"]
    counts = [torch.tensor(second[r]["counts"]) for r in ("1", "2")]
    for t in counts:
        assert t.shape == (2, 2, 2) and int(t[0].sum()) > 0  # each won prompts the other saw
    # the server's bar: round 1 with no earlier counts, round 2 with round 1's
    server = [(c, e) for c, e in given if c.shape == (2, 2, 2) and e is not None]
    assert len(server) == 2
    assert torch.equal(server[0][0], counts[0]) and int(server[0][1].sum()) == 0
    assert torch.equal(server[1][0], counts[1]) and torch.equal(server[1][1], counts[0])
    (rec,) = open_store_for(cfg).list_records(
        f"{cfg.federation_id()}/round-0002/distill.server.json"
    )
    both = (counts[0] + counts[1]).float()
    for i, name in enumerate(["alice", "bob"]):
        j = 1 - i
        share = float(both[1, j, i] / both[0, j, i]) if both[0, j, i] else 0.0  # no wins: 0
        assert rec["metrics"][f"contest_pooled.{name}"] == pytest.approx(share)
    # the window: round 3 of 2 pools round 2 only; 1 pools nothing
    assert torch.equal(pooled_evidence(second, ["alice", "bob"], 3, 2), counts[1])
    assert pooled_evidence(second, ["alice", "bob"], 2, 1).sum() == 0
    # teachers matched by name, in any order; one absent from an earlier round adds nothing
    swapped = pooled_evidence(second, ["bob", "carol", "alice"], 2, 2)
    assert swapped[:, 0, 2].tolist() == counts[0][:, 1, 0].tolist()  # bob on alice's wins
    assert swapped[:, 2, 0].tolist() == counts[0][:, 0, 1].tolist()
    assert int(swapped[:, 1].sum()) == 0 and int(swapped[:, :, 1].sum()) == 0
    bad = {"1": {"teachers": ["alice", "bob"], "counts": [[[0, 1], [1, 0]], [[0, 2], [0, 0]]]}}
    with pytest.raises(ValueError, match="round 1's contest_evidence.*rerun round 1"):
        pooled_evidence(bad, ["alice", "bob"], 2, 2)
    twice = {"1": {"teachers": ["bob", "bob"], "counts": [[[0, 1], [1, 0]], [[0, 0], [0, 0]]]}}
    with pytest.raises(ValueError, match="a teacher twice"):
        pooled_evidence(twice, ["alice", "bob"], 2, 2)


def test_the_server_judges_each_teacher_s_answers_by_the_student_s_own_lm(
    tiny_config, tmp_path, monkeypatch
):
    """distill.dependence_bar in the server's distill step: the student (as it is before the
    round) scores every teacher's answers after their own prompts and after the most similar
    other prompt; a teacher is judged only once the student has kept enough of its answers
    in two earlier rounds (rounds 1 and 2: no one, `steps.kept_before`), and its mean over its wins is
    in the step's metrics (`dependence.<id>`, `dependence_barred.<id>`). The tensor handed to
    the bar is the student's own difference of log-likelihoods, recomputed here."""
    import torch

    import flminillm.aggregate as aggregate
    from flminillm.artifacts import load_model, open_store_for
    from flminillm.update import answer_logprob

    given = []
    bar = aggregate.dependence_bar

    def spy(dependence, best, share, floor, able):
        given.append(dependence.clone())
        return bar(dependence, best, share, floor, able)

    monkeypatch.setattr(aggregate, "dependence_bar", spy)
    distill = tiny_config.distill.model_copy(update={"dependence_bar": 0.25})
    distill = distill.model_copy(update={"alpha": 1.0})  # every prompt a teacher's (A = 96)
    generation = tiny_config.generation.model_copy(update={"prompts_per_round": 96})
    data = tiny_config.data.model_copy(update={"n_public_per_family": 40})
    cfg, _ = isolated_config(tiny_config, tmp_path, "dependence", distill=distill, rounds=3,
                             generation=generation, data=data)  # fmt: skip
    inprocess_states(cfg)
    server = [g for g in given if g.shape[0] == 2]  # the server's two teachers
    assert len(server) == 3
    assert bool(server[0].isnan().all())  # round 1: it has learned from nobody
    assert bool(server[1].isnan().all())  # round 2: from one round each (DEPENDENCE_ROUNDS)
    assert not bool(server[2].isnan().any())  # round 3: both kept in two rounds
    store = open_store_for(cfg)
    (rec,) = store.list_records(f"{cfg.federation_id()}/round-0003/distill.server.json")
    for name in ("alice", "bob"):
        assert rec["metrics"][f"dependence_barred.{name}"] in (0.0, 1.0)
    judged = [n for n in ("alice", "bob") if f"dependence.{n}" in rec["metrics"]]
    assert judged  # at least one teacher won enough prompts to be judged
    # recompute the student's dependence of alice's answers
    from safetensors.torch import load_file

    def tensors(key):
        return load_file(rec["inputs"][key]["uri"].replace("file://", ""))

    rollouts = tensors("rollouts")
    student = load_model(store, "server", rec["inputs"]["model"]["digest"])
    near = aggregate.similar_prompts(rollouts["ask_prompt_ids"], rollouts["ask_prompt_mask"])
    moved = {**rollouts, "ask_prompt_ids": rollouts["ask_prompt_ids"][near],
             "ask_prompt_mask": rollouts["ask_prompt_mask"][near]}  # fmt: skip
    teaching = tensors("teaching.alice")
    bs = cfg.generation.batch_size
    mine = answer_logprob(student, rollouts, teaching, bs, "cpu") - answer_logprob(
        student, moved, teaching, bs, "cpu"
    )
    assert torch.allclose(server[2][0], mine, atol=1e-4)
