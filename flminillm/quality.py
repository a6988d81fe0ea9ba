"""`flminillm bench quality`: FL-MiniLLM against baselines, ablations and faults on one
non-IID benchmark, over several seeds; writes docs/results.{md,json,png} and logs to MLflow.

Every variant runs the same rounds on the same data (per seed) through the same steps as
`flminillm run` (flminillm.steps), called in-process (flminillm.inprocess) so that one
seed's pre-training and round-1 local fine-tuning are shared by all variants that use the
same models. Variants:

- fl-minillm: the method (reverse-KL policy gradient, both directions every round);
- forward-kl: federated forward KL / SeqKD (FedDF/FedMKT-style): the student fits the
  teachers' top-k distributions on every scored sequence (its own and the teachers') and
  the teachers' answers (SeqKD); same prompts, messages and bytes as fl-minillm;
- local-only: clients fine-tune on their own data each round, nothing is exchanged; the
  server (public prompts only) keeps its pre-trained model;
- fedavg: every party gets the server's architecture; clients fine-tune from the global
  model, the server averages their weights (by data size) and sends the average back;
- pooled: each architecture fine-tuned on the union of all clients' data for as many
  steps as a client's local fine-tuning gets over all rounds (the upper bound);
- ablations of fl-minillm (no teacher-mixed sampling, no single-step decomposition, no
  length normalisation, alpha and top-k sweeps);
- faults: one client (the last) a random or adversarial teacher (flminillm.attacks) with
  the mixture or a robust aggregation, 30% of clients dropping out of each round, and
  the non-IID severity (data.iid_mix) swept.

Held / unseen: a client's held families are the ones it was given in the federation's
config (also for pooled and IID variants); the server holds none, so its "unseen" is all.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flminillm.config import ExperimentConfig, load_config

METHODS = ("fl-minillm", "local-only", "fedavg", "forward-kl", "pooled")


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str = "federated"  # federated | local-only | fedavg | pooled
    group: str = "method"  # method | ablation | fault
    overrides: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # FLMINILLM_* fault injection
    note: str = ""


def _variants(cfg: ExperimentConfig) -> list[Variant]:
    last = cfg.clients[-1].id
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
            "forward-kl", overrides={"distill": {"method": "forward_kl"}},
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
        Variant("random-teacher", group="fault", env={"FLMINILLM_ADVERSARY": f"{last}:random"},
                note=f"{last} sends random scores; mixture aggregation"),
        Variant("adversary-mixture", group="fault",
                env={"FLMINILLM_ADVERSARY": f"{last}:adversarial"},
                note=f"{last} lies (inverted scores, claims p=1); mixture aggregation"),
        Variant("adversary-median", group="fault",
                env={"FLMINILLM_ADVERSARY": f"{last}:adversarial"},
                overrides={"distill": {"aggregation": "median"}},
                note=f"{last} lies; median aggregation"),
        Variant("adversary-capped", group="fault",
                env={"FLMINILLM_ADVERSARY": f"{last}:adversarial"},
                overrides={"distill": {"aggregation": "capped_mixture", "cap": 0.5}},
                note=f"{last} lies; mixture with each teacher's mean weight capped at 0.5"),
        Variant("dropout-30", group="fault", overrides={"sampling": {"min_clients": 1}},
                note="30% of the clients (rounded, at least 1) drop out of each round, at random"),
        *[Variant(f"iid-mix-{x:g}", group="fault", overrides={"data": {"iid_mix": x}},
                  note=f"non-IID severity: share {x:g} of private data from all families")
          for x in (0.5, 1.0)],
    ]  # fmt: skip
    return v


def variants(cfg: ExperimentConfig, names: list[str] | None = None) -> list[Variant]:
    allv = _variants(cfg)
    if not names:
        return allv
    known = {v.name: v for v in allv}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {sorted(known)}")
    return [known[n] for n in names]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def variant_config(
    base: ExperimentConfig, v: Variant, seed: int, workdir: Path
) -> ExperimentConfig:
    data = _merge(base.model_dump(mode="json"), v.overrides)
    data["seed"] = seed
    data["name"] = f"{base.name}-{v.name}-s{seed}"
    data["store"]["uri"] = str(workdir / "store")
    data["tracking"]["enabled"] = False
    if v.kind == "fedavg":  # homogeneous: every client gets the server's architecture
        for c in data["clients"]:
            c["model"] = dict(data["server"]["model"])
    return ExperimentConfig.model_validate(data)


def dropout_faults(cfg: ExperimentConfig, p: float = 0.3) -> str:
    """FLMINILLM_FAULTS that make round(p * N) clients, drawn at random (seeded) each
    round, drop out of it (at least one client always stays)."""
    rng = random.Random(f"dropout/{cfg.seed}")
    ids = [c.id for c in cfg.clients]
    k = min(len(ids) - 1, max(1, round(p * len(ids))))
    items = []
    for r in range(1, cfg.rounds + 1):
        items += [f"local_sft:{c}:{r}" for c in rng.sample(ids, k)]
    return ",".join(items)


# --------------------------------------------------------------------------------------
# running one variant
# --------------------------------------------------------------------------------------
def _sft(cfg, store, state: dict, party: str, examples, steps_: int, tag: str) -> str:
    from flminillm import steps
    from flminillm.training import encode_examples, train_lm

    tok = steps._load_tokenizer(store, state["tokenizer"])
    model = steps._load_model(store, party, state["models"][party])
    s = cfg.local_sft
    rows = encode_examples(tok, examples, cfg.party(party).model.max_positions, s.prompt_loss)
    train_lm(
        model, rows, steps=steps_, batch_size=s.batch_size, lr=s.lr, pad_id=tok.pad_token_id,
        seed=steps._seed(cfg, tag, party), warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm, engine=cfg.engine,
    )  # fmt: skip
    return steps._save_model(store, party, model)


def _run_local_only(cfg, memo, on_round) -> list[dict]:
    from flminillm import steps
    from flminillm.inprocess import setup, without_bytes

    cj = cfg.to_json()
    states = [setup(cfg, memo)]
    on_round(0, states[0])
    for r in range(1, cfg.rounds + 1):
        sj = json.dumps(without_bytes(states[-1]))
        outs = [
            json.dumps(memo.call(cfg, "local_sft", c.id, steps.local_sft, cj, sj, r, c.id))
            for c in cfg.clients
        ]
        states.append(steps.evaluate(cj, sj, r, "", outs))
        states[-1]["bytes"] = {}
        on_round(r, states[-1])
    return states


def _run_fedavg(cfg, memo, on_round) -> list[dict]:
    import torch

    from flminillm import steps
    from flminillm.inprocess import without_bytes
    from flminillm.models import count_parameters

    cj, store, server = cfg.to_json(), steps.open_store_for(cfg), cfg.server.id
    prep = memo.call(cfg, "prepare", None, steps.prepare, cj)
    init = memo.call(cfg, "init_model", server, steps.init_model, cj, json.dumps(prep), server)
    # one global model: the server's pre-trained one, copied to every client
    glob = steps._load_model(store, server, init["models"][server])
    size = count_parameters(glob) * 4  # fp32 weights, each way
    models = {server: init["models"][server]}
    models.update({c.id: steps._save_model(store, c.id, glob) for c in cfg.clients})
    state = steps.evaluate(cj, json.dumps(prep), 0, json.dumps({"models": models}), [])
    states = [state]
    on_round(0, state)
    sizes = {
        c: len(store.scoped(c).get_json(d["train"])) for c, d in state["data"]["clients"].items()
    }
    for r in range(1, cfg.rounds + 1):
        sj = json.dumps(without_bytes(state))
        live = []
        for c in cfg.clients:
            out = memo.call(cfg, "local_sft", c.id, steps.local_sft, cj, sj, r, c.id)
            if not out.get("dropped"):
                live.append(out)
        total = sum(sizes[o["party"]] for o in live)
        avg: dict[str, torch.Tensor] = {}
        for o in live:
            sd = steps._load_model(store, o["party"], o["models"][o["party"]]).state_dict()
            w = sizes[o["party"]] / total
            for k, t in sd.items():
                avg[k] = avg.get(k, 0) + w * t.float() if t.is_floating_point() else t
        glob.load_state_dict(avg)
        models = {server: steps._save_model(store, server, glob)}
        models.update({c.id: steps._save_model(store, c.id, glob) for c in cfg.clients})
        state = steps.evaluate(cj, sj, r, json.dumps({"models": models}), [])
        state["bytes"] = {o["party"]: {"sent": size, "received": size} for o in live}
        state["bytes"][server] = {"sent": size * len(live), "received": size * len(live)}
        states.append(state)
        on_round(r, state)
    return states


def _run_pooled(cfg, memo, on_round) -> list[dict]:
    from flminillm import steps
    from flminillm.inprocess import setup

    cj, store = cfg.to_json(), steps.open_store_for(cfg)
    state = setup(cfg, memo)
    on_round(0, state)
    pooled = [
        e
        for c, d in state["data"]["clients"].items()
        for e in steps._examples(store, c, d["train"])
    ]
    n_steps = cfg.local_sft.steps + (cfg.rounds - 1) * cfg.local_sft.later_round_steps
    models = {p.id: _sft(cfg, store, state, p.id, pooled, n_steps, "pooled") for p in cfg.parties}
    final = steps.evaluate(cj, json.dumps(state), cfg.rounds, json.dumps({"models": models}), [])
    final["bytes"] = {}
    on_round(cfg.rounds, final)
    return [state, final]


def run_variant(
    base_json: str, v: Variant, seed: int, workdir: str, memo_entries: dict | None = None
) -> dict:
    """Run one (variant, seed); returns per-round evaluations, bytes and timing."""
    from flminillm.config import config_from_json
    from flminillm.inprocess import Memo, run_federation

    base = config_from_json(base_json)
    cfg = variant_config(base, v, seed, Path(workdir))
    memo = Memo(memo_entries)
    env = dict(v.env)
    if v.name.startswith("dropout"):
        env["FLMINILLM_FAULTS"] = dropout_faults(cfg)
    env.setdefault("FLMINILLM_STEP_RETRIES", "1")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    rounds: dict[int, dict] = {}

    def on_round(r: int, st: dict) -> None:
        rounds[r] = {"eval": st["eval"], "bytes": st.get("bytes", {}),
                     "dropped": sorted(st.get("dropped", {}))}  # fmt: skip

    t0 = time.perf_counter()
    try:
        runner: Callable = {
            "federated": run_federation,
            "local-only": _run_local_only,
            "fedavg": _run_fedavg,
            "pooled": _run_pooled,
        }[v.kind]
        runner(cfg, memo, on_round)
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
    result = {
        "variant": v.name,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "families_by_client": cfg.families_by_client(),
        "server": cfg.server.id,
        "rounds": {str(k): x for k, x in sorted(rounds.items())},
        "config_digest": run_digest(cfg),
    }
    from flminillm.steps import federation_id, open_store_for

    # the run's result beside its ledger, so that `--resume` can reuse it
    open_store_for(cfg).put_record(f"{federation_id(cfg)}/bench-result.json", result)
    return {**result, "memo": memo.entries, "memo_hits": memo.hits}


def run_digest(cfg: ExperimentConfig) -> str:
    """The config's digest without where things are stored (what a resume must match)."""
    import hashlib

    data = json.loads(cfg.to_json())
    for k in ("store", "tracking", "runner", "cluster", "output_dir"):
        data.pop(k, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def result_from_ledger(base: ExperimentConfig, v: Variant, seed: int, workdir: Path) -> dict | None:
    """A finished run of (variant, seed) in workdir's store, or None. Its bench-result
    record when there is one (checked against the config); else rebuilt from the step
    ledger and the round manifests (runs of a version that wrote no such record)."""
    from flminillm.models import build_model, count_parameters
    from flminillm.steps import open_store_for
    from flminillm.tracking import bytes_by_party, ledger, round_manifest

    cfg = variant_config(base, v, seed, workdir)
    store = open_store_for(cfg)
    feds = sorted({k.split("/")[1] for k in store._list(f"records/{cfg.name}-")})
    feds = [f for f in feds if f.rsplit("-", 1)[0] == cfg.name]
    for fed in feds:
        saved = store.list_records(f"{fed}/bench-result.json")
        if saved and saved[0].get("config_digest") == run_digest(cfg):
            return {**saved[0], "resumed": "bench-result record"}
    for fed in feds:
        rounds_recs = ledger(store, fed)
        if cfg.rounds not in rounds_recs:
            continue
        rounds: dict[str, dict] = {}
        for r, recs in sorted(rounds_recs.items()):
            man = round_manifest(store, recs)
            if man is None:
                break
            if v.kind == "federated" and r > 0:
                b = {
                    p: {"sent": int(x["bytes_sent"]), "received": int(x["bytes_received"])}
                    for p, x in bytes_by_party(recs).items()
                }
            elif v.kind == "fedavg" and r > 0:
                with __import__("torch").device("meta"):
                    size = 4 * count_parameters(
                        build_model(cfg.server.model, man["vocab_size"], 0, 1, 0)
                    )
                live = [c.id for c in cfg.clients if c.id not in man.get("dropped", {})]
                b = {c: {"sent": size, "received": size} for c in live}
                b[cfg.server.id] = {"sent": size * len(live), "received": size * len(live)}
            else:
                b = {}
            rounds[str(r)] = {"eval": man["eval"], "bytes": b,
                              "dropped": sorted(man.get("dropped", {}))}  # fmt: skip
        else:
            if str(cfg.rounds) not in rounds:
                continue
            recs = [x for rs in rounds_recs.values() for x in rs]
            seconds = max(x["started"] + x.get("duration_s", 0) for x in recs) - min(
                x["started"] for x in recs
            )
            return {
                "variant": v.name, "seed": seed, "seconds": seconds,
                "families_by_client": cfg.families_by_client(), "server": cfg.server.id,
                "rounds": rounds, "config_digest": None, "resumed": f"ledger of {fed}",
            }  # fmt: skip
    return None


# --------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------
def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def party_scores(ev: dict, fams: list[str], held: list[str]) -> dict[str, float | None]:
    unseen = [f for f in fams if f not in held]
    out: dict[str, float | None] = {}
    for metric, key in (("em", "exact_match"), ("rouge_l", "rouge_l")):
        out[f"{metric}_all"] = _mean([ev[f][key] for f in fams])
        out[f"{metric}_held"] = _mean([ev[f][key] for f in held])
        out[f"{metric}_unseen"] = _mean([ev[f][key] for f in unseen])
    return out


def run_scores(run: dict, r: str | None = None) -> dict[str, Any]:
    """Server and client-mean scores of one run at round r (default: the last)."""
    r = r or max(run["rounds"], key=int)
    ev = run["rounds"][r]["eval"]
    fbc = run["families_by_client"]
    fams = sorted(next(iter(ev.values())))
    server = party_scores(ev[run["server"]], fams, [])
    per_client = [party_scores(ev[c], fams, held) for c, held in fbc.items()]
    clients = {k: _mean([p[k] for p in per_client if p[k] is not None]) for k in server}
    return {"server": server, "clients": clients, "families": {
        f: ev[run["server"]][f]["exact_match"] for f in fams}}  # fmt: skip


def bytes_per_round(run: dict) -> dict[str, float]:
    """Mean over rounds (1..R) of bytes each client sent+received, and the round's total."""
    per_client, totals = [], []
    for r, x in run["rounds"].items():
        if r == "0" or not x["bytes"]:
            continue
        b = x["bytes"]
        clients = [v["sent"] + v["received"] for p, v in b.items() if p != run["server"]]
        if clients:
            per_client.append(sum(clients) / len(clients))
        totals.append(sum(v["sent"] for v in b.values()))
    return {
        "per_client": _mean(per_client) or 0.0,
        "total": _mean(totals) or 0.0,
    }


def _stat(xs: list[float | None]) -> dict[str, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarise(runs: list[dict], v: Variant) -> dict[str, Any]:
    scores = [run_scores(r) for r in runs]
    out: dict[str, Any] = {"kind": v.kind, "group": v.group, "note": v.note,
                           "seeds": [r["seed"] for r in runs]}  # fmt: skip
    for who in ("server", "clients"):
        out[who] = {k: _stat([s[who][k] for s in scores]) for k in scores[0][who]}
    b = [bytes_per_round(r) for r in runs]
    out["bytes_per_round"] = {k: _stat([x[k] for x in b])["mean"] for k in b[0]}
    out["server_families_em"] = {
        f: _stat([s["families"][f] for s in scores])["mean"] for f in scores[0]["families"]
    }
    rounds = sorted({int(k) for r in runs for k in r["rounds"]})
    out["curve"] = {
        "rounds": rounds,
        "server_em_all": [
            _stat([run_scores(r, str(k))["server"]["em_all"] for r in runs if str(k) in r["rounds"]])["mean"]
            for k in rounds
        ],
        "clients_em_all": [
            _stat([run_scores(r, str(k))["clients"]["em_all"] for r in runs if str(k) in r["rounds"]])["mean"]
            for k in rounds
        ],
    }  # fmt: skip
    out["seconds"] = _stat([r["seconds"] for r in runs])["mean"]
    out["dropped_per_round"] = _stat(
        [_mean([len(x["dropped"]) for k, x in r["rounds"].items() if k != "0"]) for r in runs]
    )["mean"]
    return out


# --------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------
def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_quality(
    config: Path,
    seeds: int = 3,
    names: list[str] | None = None,
    fault_seeds: int | None = None,
    workdir: Path | None = None,
    out_dir: Path = Path("docs"),
    jobs: int = 0,
    tracking_uri: str | None = None,
    console=None,
    command: str = "",
    resume: bool = False,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run every variant for `seeds` seeds (faults for `fault_seeds`, default all) and write
    results.json / results.md / results.png into out_dir. Returns the results dict."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from flminillm.config import config_from_json  # noqa: F401  (workers import it)

    base = load_config(config)
    vs = variants(base, names)
    fault_seeds = seeds if fault_seeds is None else fault_seeds
    jobs = jobs or max(1, min(2, (os.cpu_count() or 1)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    tmp = None
    resume = resume or report_only
    if resume and workdir is None:
        raise ValueError("--resume needs --workdir: the directory of the run to resume")
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="flminillm-quality-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    base_json = base.to_json()
    t_start = time.perf_counter()
    runs: dict[str, list[dict]] = {v.name: [] for v in vs}
    failures: dict[str, list[dict]] = {}
    resumed: list[str] = []
    missing: list[str] = []
    todo = [(v, s) for s in range(seeds) for v in vs if v.group != "fault" or s < fault_seeds]
    first = next((v for v in vs if v.kind == "federated" and v.group == "method"), vs[0])
    ctx = mp.get_context("spawn")
    with Progress(
        TextColumn("[bold]bench quality"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=False,
    ) as progress, cf.ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
    ) as pool:  # fmt: skip
        bar = progress.add_task("", total=len(todo))
        to_run = []
        for v, x in todo:  # --resume: runs that finished in an earlier invocation
            done_before = result_from_ledger(base, v, x, workdir) if resume else None
            if done_before is None and report_only:
                missing.append(f"{v.name}/seed {x}")
            elif done_before is None:
                to_run.append((v, x))
            else:
                runs[v.name].append(done_before)
                resumed.append(f"{v.name}/seed {x}")
                progress.advance(bar)
        # every seed's lead run (it computes the set-up the others share: pre-training,
        # round-1 local fine-tuning) is queued first; when one finishes, the rest of its
        # seed is queued with its memo, so no worker waits for a lead
        pending: dict = {}

        def submit(v: Variant, x: int, memo: dict) -> None:
            pending[pool.submit(run_variant, base_json, v, x, str(workdir), memo)] = (v, x)

        lead_seeds = {x for v, x in to_run if v is first}
        for v, x in to_run:
            if v is first or x not in lead_seeds:  # a seed without a lead to wait for
                submit(v, x, {})
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                v, s = pending.pop(fut)
                memo: dict = {}
                try:
                    res = fut.result()
                    memo = res.pop("memo")
                    runs[v.name].append(res)
                    progress.update(bar, description=f"seed {s}: {v.name} done")
                except Exception as err:  # one failed run must not lose the others
                    failures.setdefault(v.name, []).append(
                        {"seed": s, "error": f"{type(err).__name__}: {err}"}
                    )
                    progress.update(bar, description=f"seed {s}: {v.name} FAILED")
                progress.advance(bar)
                if v is first and s in lead_seeds:
                    for w, x in to_run:
                        if x == s and w is not first:
                            submit(w, x, memo)
    elapsed = time.perf_counter() - t_start
    results: dict[str, Any] = {}
    for v in vs:
        if runs[v.name]:
            results[v.name] = summarise(sorted(runs[v.name], key=lambda r: r["seed"]), v)
    pooled_em = results.get("pooled", {}).get("server", {}).get("em_all", {}).get("mean")
    ours = results.get("fl-minillm", {}).get("server", {}).get("em_all", {}).get("mean")
    results["_meta"] = {
        "config": str(config),
        "config_json": json.loads(base_json),
        "seeds": list(range(seeds)),
        "fault_seeds": list(range(fault_seeds)),
        "command": command,
        "jobs": jobs,
        "torch_threads_per_job": threads,
        "seconds": elapsed,
        "cpu_count": os.cpu_count(),
        "server_vs_pooled": (ours / pooled_em) if ours is not None and pooled_em else None,
        "failures": failures,
        "resumed": resumed,
        "missing": missing,
        "workdir": str(workdir) if tmp is None else None,
        "families_by_client": base.families_by_client(),
        "adversary": base.clients[-1].id,
    }
    if tmp is not None:
        tmp.cleanup()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(results, out_dir / "results.json")
    plot_results(results, out_dir / "results.png")
    write_markdown(results, out_dir / "results.md", "results.png")
    if tracking_uri:
        log_to_mlflow(results, runs, tracking_uri, base.tracking.experiment + "-quality")
    return results


def write_json(results: dict, path: Path) -> None:
    from flminillm.store import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(results, indent=2, sort_keys=False) + "\n").encode())


# --------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------
def _pm(s: dict | None, scale: float = 100.0) -> str:
    if not s or s.get("mean") is None:
        return "–"
    m, sd = s["mean"] * scale, (s.get("std") or 0.0) * scale
    return f"{m:.1f} ± {sd:.1f}"


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f}" if b else "0"


def table_rows(results: dict, group: str) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        if name.startswith("_") or r["group"] != group:
            continue
        s, c = r["server"], r["clients"]
        rows.append([
            name, _pm(s["em_all"]), _pm(s["rouge_l_all"]), _pm(c["em_all"]), _pm(c["em_held"]),
            _pm(c["em_unseen"]), _pm(c["rouge_l_all"]), _mb(r["bytes_per_round"]["per_client"]),
            str(len(r["seeds"])),
        ])  # fmt: skip
    return rows


HEADER = [
    "method", "server EM all", "server Rouge-L all", "clients EM all", "clients EM held",
    "clients EM unseen", "clients Rouge-L all", "MB/round/client", "seeds",
]  # fmt: skip


def print_tables(results: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for group, title in (("method", "Methods"), ("ablation", "Ablations"), ("fault", "Faults")):
        rows = table_rows(results, group)
        if not rows:
            continue
        t = Table(title=f"{title} (EM and Rouge-L in %, mean ± std over seeds)")
        for h in HEADER:
            t.add_column(h, justify="left" if h == "method" else "right")
        for row in rows:
            t.add_row(*row)
        console.print(t)


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot_results(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if not n.startswith("_")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    for n in names:
        r = results[n]
        if r["group"] == "method" or n in ("adversary-mixture", "adversary-median"):
            cur = r["curve"]
            ax.plot(cur["rounds"], [100 * (x or 0) for x in cur["server_em_all"]], marker="o",
                    label=n, linestyle="-" if r["group"] == "method" else "--")  # fmt: skip
    ax.set_xlabel("round")
    ax.set_ylabel("server exact match, all families (%)")
    ax.set_title("Server over rounds (mean over seeds)")
    ax.legend(fontsize=8)
    for ax, group, title in ((axes[1], ("method", "ablation"), "Methods and ablations"),
                             (axes[2], ("fault",), "Faults and non-IID severity")):  # fmt: skip
        sel = [n for n in names if results[n]["group"] in group]
        if group == ("fault",):
            sel = ["fl-minillm", *sel] if "fl-minillm" in names else sel
        xs = range(len(sel))
        for off, who, colour in ((-0.2, "server", "tab:blue"), (0.2, "clients", "tab:orange")):
            m = [100 * (results[n][who]["em_all"]["mean"] or 0) for n in sel]
            e = [100 * (results[n][who]["em_all"]["std"] or 0) for n in sel]
            ax.bar([x + off for x in xs], m, 0.4, yerr=e, label=f"{who} EM all", color=colour)
        ax.set_xticks(list(xs), sel, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("exact match, all families (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(suffix=".png", dir=path.parent, delete=False) as f:
        tmp = Path(f.name)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _server_em(results: dict, name: str, families: list[str] | None = None) -> float | None:
    r = results.get(name)
    if not r:
        return None
    if families is None:
        return r["server"]["em_all"]["mean"]
    f = r["server_families_em"]
    return _mean([f[x] for x in families if f.get(x) is not None])


def headline(results: dict) -> list[str]:
    """The claims, in numbers: against pooled, forward-KL and local-only; under attack."""
    meta = results["_meta"]
    out = []
    ours = _server_em(results, "fl-minillm")
    if ours is None:
        return out
    out.append("## Headline")
    out.append("")
    for other in ("pooled", "forward-kl", "local-only", "fedavg"):
        theirs = _server_em(results, other)
        if theirs is None:
            continue
        sd = results[other]["server"]["em_all"]["std"] or 0.0
        out.append(
            f"- server EM (all families): fl-minillm {100 * ours:.1f} vs {other} "
            f"{100 * theirs:.1f} ± {100 * sd:.1f} ({100 * (ours - theirs):+.1f} points"
            + (
                f"; {100 * ours / theirs:.0f}% of it, target >= 80%)"
                if other == "pooled" and theirs
                else ")"
            )
        )
    adv = meta.get("adversary")
    fbc = meta.get("families_by_client", {})
    honest = [f for c, fs in fbc.items() if c != adv for f in fs]
    for name in ("random-teacher", "adversary-mixture", "adversary-median", "adversary-capped"):
        if name not in results:
            continue
        a, h = _server_em(results, name), _server_em(results, name, honest)
        ca, ch = ours, _server_em(results, "fl-minillm", honest)
        out.append(
            f"- {name}: server EM {100 * a:.1f} on all families ({100 * (a - ca):+.1f} vs the "
            f"clean run), {100 * h:.1f} on the honest clients' families "
            f"({100 * (h - ch):+.1f} vs the clean run's {100 * ch:.1f})"
        )
    out.append("")
    return out


def write_markdown(results: dict, path: Path, png: str) -> None:
    from flminillm.store import atomic_write_bytes

    meta = results["_meta"]
    names = [n for n in results if not n.startswith("_")]
    lines = [
        "# Results: FL-MiniLLM against baselines, ablations and faults",
        "",
        f"Produced by `{meta['command'] or 'flminillm bench quality'}` "
        f"in {meta['seconds'] / 60:.1f} min on {meta['cpu_count']} CPU cores "
        f"({meta['jobs']} worker processes, {meta['torch_threads_per_job']} torch thread(s) each). "
        f"Config: `{meta['config']}`; seeds {meta['seeds']} (faults: {meta['fault_seeds']}). "
        "Numbers: exact match (EM) and Rouge-L in %, mean ± standard deviation over seeds, "
        "after the last round, on every family's held-out set. A client's *held* families are "
        "the ones it was given; *unseen* are the others; the server holds none. "
        "MB/round/client: bytes a client sent plus received per round (messages or weights). "
        "Raw numbers: `results.json` beside this file; every run is also in MLflow.",
        "",
    ]
    if meta.get("server_vs_pooled") is not None:
        lines += [
            f"**FL-MiniLLM server / pooled server, EM on all families: "
            f"{100 * meta['server_vs_pooled']:.0f}%** (target: >= 80%).",
            "",
        ]
    if meta.get("resumed"):
        lines += [
            f"Resumed (`--resume`): {len(meta['resumed'])} runs were reused from the workdir "
            "of an earlier invocation, the rest ran in this one; the time above is this "
            "invocation's only.",
            "",
        ]
    if meta.get("missing"):
        lines += [f"Not run (`--report-only`): {', '.join(meta['missing'])}.", ""]
    for name, fails in (meta.get("failures") or {}).items():
        lines += [f"- **FAILED** `{name}` seed {f['seed']}: {f['error']}" for f in fails]
    if meta.get("failures"):
        lines.append("")
    lines += headline(results)
    for group, title in (("method", "Methods"), ("ablation", "Ablations of FL-MiniLLM"),
                         ("fault", "Faults, attacks and non-IID severity")):  # fmt: skip
        rows = table_rows(results, group)
        if rows:
            lines += [f"## {title}", "", _md_table(rows), ""]
            lines += [f"- `{n}`: {results[n]['note']}" for n in names
                      if results[n]["group"] == group]  # fmt: skip
            lines += [""]
    fams = list(next(iter(results[n] for n in names))["server_families_em"])
    lines += ["## Server EM per family (%)", "",
              "| method | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]  # fmt: skip
    for n in names:
        f = results[n]["server_families_em"]
        lines.append(f"| {n} | " + " | ".join(f"{100 * (f[x] or 0):.1f}" for x in fams) + " |")
    lines += ["", f"![results]({png})", ""]
    atomic_write_bytes(path, "\n".join(lines).encode())


def log_to_mlflow(results: dict, runs: dict[str, list[dict]], uri: str, experiment: str) -> str:
    """A parent run for the benchmark, a child run per (variant, seed) with per-round
    server/client EM and bytes as metric histories."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    parent = client.create_run(exp_id, run_name="bench-quality", tags={"flminillm.kind": "bench"})
    pid = parent.info.run_id
    meta = results["_meta"]
    client.log_param(pid, "config", meta["config"])
    client.log_param(pid, "seeds", len(meta["seeds"]))
    if meta.get("server_vs_pooled") is not None:
        client.log_metric(pid, "server_vs_pooled", meta["server_vs_pooled"])
    for name, rs in runs.items():
        for run in rs:
            child = client.create_run(
                exp_id, run_name=f"{name}-seed{run['seed']}",
                tags={"mlflow.parentRunId": pid, "flminillm.variant": name},
            )  # fmt: skip
            cid = child.info.run_id
            ts = int(time.time() * 1000)
            metrics = [
                Metric(f"{who}.{k}", float(val), ts, int(r))
                for r in run["rounds"]
                for who, sc in run_scores(run, r).items()
                if who in ("server", "clients")
                for k, val in sc.items()
                if val is not None
            ]
            b = bytes_per_round(run)
            metrics += [
                Metric("bytes_per_round_per_client", float(b["per_client"]), ts, 0),
                Metric("seconds", float(run["seconds"]), ts, 0),
            ]
            params = [Param("variant", name), Param("seed", str(run["seed"]))]
            for i in range(0, len(metrics), 900):  # MLflow's batch limit is 1000
                client.log_batch(cid, metrics=metrics[i : i + 900], params=params if i == 0 else [])
            client.set_terminated(cid)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "results.json"
        p.write_text(json.dumps(results, indent=2))
        client.log_artifact(pid, str(p))
    client.set_terminated(pid)
    return pid


def check_results(results: dict) -> list[str]:
    """Shape problems of a results dict (empty when fine)."""
    problems = []
    for name in (n for n in results if not n.startswith("_")):
        r = results[name]
        for who in ("server", "clients"):
            for k in ("em_all", "rouge_l_all", "em_unseen"):
                m = r[who][k]["mean"]
                if m is None or not (0.0 <= m <= 1.0) or math.isnan(m):
                    problems.append(f"{name}.{who}.{k} = {m}")
    return problems
