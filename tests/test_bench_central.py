"""`flminillm bench central` (flminillm/bench/central.py): the tiny setting end to end for
every method, --resume, and each method's loss on small tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flminillm.bench.central import (
    METHODS,
    MINILLM,
    ON_POLICY,
    PAIR,
    full_support,
    run_central,
)
from flminillm.bench.harness import has_module
from flminillm.distill import minillm_loss

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "benchmark-tiny.yaml"
# every method; TRL's only where the bench extra (trl) is installed
ALL = [m for m in METHODS if m != "trl-distill" or has_module("trl")]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One seed of the tiny setting, every method: (results, workdir, out dir)."""
    wd, out = tmp_path_factory.mktemp("wd"), tmp_path_factory.mktemp("out")
    return run_central(TINY, seeds=1, methods=ALL, workdir=wd, out_dir=out), wd, out


def _evals(results: dict) -> dict:
    return {k: [r["eval"] for r in v["runs"]] for k, v in results.items() if k != "_meta"}


def test_tiny_setting_runs_every_method_and_writes_the_report(tiny):
    results, _, out = tiny
    assert results["_meta"]["setups_built"] == [0] and not results["_meta"]["resumed"]
    for name in ["teacher", "warm-start", *ALL]:
        for k in ("exact_match", "rouge_l", "reverse_kl", "forward_kl"):
            assert math.isfinite(results[name][k]["mean"]), (name, k)
        assert results[name]["reverse_kl"]["mean"] >= 0 and results[name]["forward_kl"]["mean"] >= 0
    assert results["teacher"]["reverse_kl"]["mean"] == pytest.approx(0.0, abs=1e-6)
    for name in ALL:  # every method trained its student, and none touched the teacher
        assert results[name]["student_change"]["mean"] > 1e-4, name
        assert results[name]["teacher_unchanged"], name
    md = (out / "central.md").read_text()
    assert "evaluation split" in md and "flminillm bench central" in md
    assert all(f"| {name} |" in md for name in ALL)
    assert (
        json.loads((out / "central.json").read_text())["_meta"]["steps"]
        == results["_meta"]["steps"]
    )
    assert (out / "central.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reruns_nothing_and_gives_the_same_results(tiny, tmp_path, capsys):
    from flminillm.cli import main

    results, wd, _ = tiny
    argv = ["bench", "central", "--config", str(TINY), "--seeds", "1", "--methods", ",".join(ALL),
            "--workdir", str(wd), "--out", str(tmp_path), "--resume"]  # fmt: skip
    assert main(argv) == 0
    again = json.loads((tmp_path / "central.json").read_text())
    assert sorted(again["_meta"]["resumed"]) == sorted(f"{m}-s0" for m in ALL)
    assert again["_meta"]["setups_built"] == [] and again["_meta"]["setups_loaded"] == []
    assert _evals(again) == _evals(results)
    assert "| sft |" in capsys.readouterr().out


def test_resume_reuses_the_checkpoints_and_reproduces_a_lost_result(tiny, tmp_path):
    results, wd, _ = tiny
    lost = ["sft", "minillm", "federated-step"]
    for m in lost:
        (path,) = wd.glob(f"setup-*/run-*/{m}-s0.json")
        path.unlink()
    again = run_central(TINY, seeds=1, methods=ALL, workdir=wd, out_dir=tmp_path, resume=True)
    assert again["_meta"]["setups_loaded"] == [0] and again["_meta"]["setups_built"] == []
    assert sorted(again["_meta"]["resumed"]) == sorted(f"{m}-s0" for m in ALL if m not in lost)
    assert _evals(again) == _evals(results)  # the saved teacher and warm start, bit for bit


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--methods"):
        run_central(TINY, methods=["nope"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="--resume needs --workdir"):
        run_central(TINY, resume=True, out_dir=tmp_path)


def _tensors(v: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, p = torch.randn(2, 5, v, generator=g), 3 * torch.randn(2, 5, v, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ids = torch.randint(0, v, (2, 5), generator=g)
    return q, p, mask, ids


def _by_hand(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over the masked positions of sum_v a(v) (log a(v) - log b(v))."""
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (la.exp() * (la - lb)).sum(-1)
    return (kl * mask).sum() / mask.sum()


def test_token_level_losses_are_what_they_claim():
    q, p, mask, ids = _tensors()
    b = {"teacher_logits": p, "response_mask": mask, "response_ids": ids}
    for name in ("gkd-reverse",):  # KL(q || p) on the student's samples
        torch.testing.assert_close(METHODS[name].loss(q, b), _by_hand(q, p, mask))
    for name in ("gkd-forward", "forward-kd"):  # KL(p || q)
        torch.testing.assert_close(METHODS[name].loss(q, b), _by_hand(p, q, mask))
    ce = torch.nn.functional.cross_entropy(q.transpose(1, 2), ids, reduction="none")
    for name in ("sft", "seqkd"):
        torch.testing.assert_close(METHODS[name].loss(q, b), (ce * mask).sum() / mask.sum())
    # gradients reach the student only
    qq = q.clone().requires_grad_()
    METHODS["gkd-reverse"].loss(qq, b).backward()
    assert qq.grad is not None and qq.grad.abs().sum() > 0


@pytest.mark.skipif(not has_module("trl"), reason="trl (the bench extra) is not installed")
def test_trl_beta_one_is_the_reverse_kl_of_gkd_reverse():
    """What trl-distill's beta = 1 means: TRL's per-token divergence (its CPU path) equals
    gkd-reverse's KL(q || p); beta = 0 equals the forward KL(p || q)."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)  # student
    ht, wt = torch.randn(6, 5, generator=g), torch.randn(11, 5, generator=g)  # teacher
    b = {"teacher_logits": (ht @ wt.T)[None], "response_mask": torch.ones(1, 6)}
    for beta, ours in ((1.0, "gkd-reverse"), (0.0, "gkd-forward")):
        div, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, beta, 1.0, 1.0,
                                                 None, 1.0, None)  # fmt: skip
        torch.testing.assert_close(div.mean(), METHODS[ours].loss((hs @ ws.T)[None], b))


def test_minillm_uses_minillm_loss_over_the_whole_vocabulary():
    from flminillm.config import DistillConfig

    q, p, mask, ids = _tensors()
    sup, tlogp = full_support(ids, p)
    assert sup.shape[-1] == q.shape[-1] + 1 and torch.equal(sup[..., 0], ids)
    hp = DistillConfig(**{k: v for k, v in MINILLM.items()})
    behaviour = torch.log_softmax(q, -1).gather(-1, ids[..., None])[..., 0] * mask
    loss, stats = minillm_loss(q, ids, mask, behaviour, sup, tlogp * mask[..., None], hp)
    full = _by_hand(q, p, mask)  # S = V: the single-step term is the exact KL(q || p)
    torch.testing.assert_close(stats["reverse_kl"], full)
    torch.testing.assert_close(stats["loss_single"], full)  # unweighted, as in LMOps
    assert torch.isfinite(loss)
    assert (hp.alpha, hp.gamma, hp.iw_single_step, hp.whiten_returns) == (0.2, 0.95, False, True)


def test_method_batches_on_the_tiny_setting(tiny):
    """minillm's batch (mixed sampling, S = V) and federated-step's (top-k support, a share
    alpha of teacher answers) as built from the tiny setting's saved models."""
    from flminillm.bench.central import _federated_batch, _minillm_batch, _with_top_k, build_setup
    from flminillm.config import DistillConfig, load_config
    from flminillm.devices import generator
    from flminillm.generation import response_logits
    from flminillm.update import behaviour_logprobs, distill_loss

    results, wd, _ = tiny
    cfg = load_config(TINY).model_copy(update={"seed": 0})
    meta = results["_meta"]
    (sdir,) = wd.glob("setup-*/s0")
    s = build_setup(cfg, meta["families"], meta["student"], meta["steps"], meta["warm_steps"],
                    sdir, reuse=True)  # fmt: skip
    exs, gen = s.train[:6], generator(s.device, 0)
    hp = cfg.distill.model_copy(update=MINILLM)
    b = _minillm_batch(s, s.student, exs, hp, gen)
    v = len(s.tok)
    assert b["support_ids"].shape[-1] == v + 1 and not b["from_teacher"].any()
    pair = [b[k] for k in PAIR]
    logits = response_logits(s.student, *pair)
    with torch.no_grad():
        teacher = response_logits(s.teacher, *pair)
    _, stats = distill_loss(logits, b, behaviour_logprobs(s.student, b), hp, seqkd=False)
    torch.testing.assert_close(
        stats["reverse_kl"], _by_hand(logits.float(), teacher.float(), b["response_mask"]),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    d = DistillConfig(alpha=0.5, min_claim=0.0)  # every answer kept: the floor, which drops
    # the tiny teacher's least sure answers by default, is tests/test_aggregate.py's
    f = _federated_batch(s, s.student, exs, d, gen)
    assert (
        int(f["from_teacher"].sum()) == 3 and f["support_ids"].shape[-1] == cfg.generation.top_k + 1
    )
    # the -full methods: the same message path with S = V, so the teacher's log-probs on the
    # support are its whole softmax and the tail bucket is empty
    f = _with_top_k(_federated_batch)(s, s.student, exs, d, gen)
    on = f["response_mask"].bool()
    assert f["support_ids"].shape[-1] == len(s.tok) and int(f["from_teacher"].sum()) == 3
    assert (f["support_ids"][on].sort(-1).values == torch.arange(len(s.tok))).all()
    mass = torch.logsumexp(f["teacher_logp"][on].double(), -1).exp()
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=1e-4)
    f = _with_top_k(_federated_batch, 6)(s, s.student, exs, d, gen)  # the -k methods' support
    assert f["support_ids"].shape[-1] == 7 and (f["support_ids"][on] >= 0).all()
    # federated-step-a0.2: the schedule past its warm-up in every collection (a fifth of the
    # sequences the teacher's answers, no SeqKD), whatever the config's warm-up
    on = cfg.distill.model_copy(update={"warmup_rounds": 3, "min_claim": 0.0})
    on = on.model_copy(update=ON_POLICY)  # what the method does to the config's section
    assert all((on.for_round(r).alpha, on.for_round(r).seqkd_rounds) == (0.2, 0) for r in (1, 5))
    f = _federated_batch(s, s.student, s.train[:10], on.for_round(1), gen)
    assert int(f["from_teacher"].sum()) == 2


def test_long_form_families_run_without_changes(tmp_path):
    """Long-form answers (flminillm.longform) longer than the tiny models' room for an
    answer: the labelled ones are cut to fit, and evaluation scores them by validity."""
    from flminillm.data import FAMILIES

    families = [f for f in FAMILIES if f.endswith("_profile")][:1] + ["successor"]
    if len(families) < 2:
        pytest.skip("no long-form family registered")
    r = run_central(TINY, families=families, seeds=1, methods=["sft", "federated-step"],
                    out_dir=tmp_path)  # fmt: skip
    assert set(r["sft"]["runs"][0]["eval"]["families"]) == set(families)
    assert r["sft"]["student_change"]["mean"] > 0 and r["federated-step"]["teacher_unchanged"]
