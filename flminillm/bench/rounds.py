"""Round figures of `flminillm bench perf`: one round's model work in-process as clients and
widths grow, and one round under kfp.local against the same steps in one process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flminillm.bench.harness import ROOT, Figure, random_prompts, tiny_model
from flminillm.rounds import tasks_per_round


def round_compute(
    n_clients: int, prompts: int = 64, new_tokens: int = 8, hidden: int | None = None
) -> float:
    """Seconds of one round's model work for a server and `n_clients` clients, run one after
    another in this process: server generate, each client teaches, server distills; each
    client generates, the server teaches, the client distills. No store, no pipeline."""
    import torch

    from flminillm.aggregate import aggregate_teachers
    from flminillm.config import DistillConfig
    from flminillm.engine import make_engine
    from flminillm.generation import sample, score
    from flminillm.update import behaviour_logprobs, update_step

    vocab, k = 1024, 8
    archs = [("gpt2", 96, 2, 4), ("llama", 96, 2, 4), ("qwen2", 64, 3, 4)]
    server = tiny_model("llama", 128, 4, 4, vocab)
    if hidden:  # every client `hidden` wide, the server twice that
        archs = [(f, hidden, layers, heads) for f, _h, layers, heads in archs]
        server = tiny_model("llama", 2 * hidden, 4, 4, vocab)
    clients = [tiny_model(*archs[i % 3], vocab=vocab, seed=i + 1) for i in range(n_clients)]
    ids, mask = random_prompts(prompts, 24, vocab)
    g = torch.Generator().manual_seed(0)
    d = DistillConfig(alpha=0.0)

    def distill(student, r, teachers):
        scores = torch.stack(
            [
                score(m, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask,
                      r.support_ids)[0]
                for m in teachers
            ]
        )  # fmt: skip
        batch = {
            "prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask,
            "response_ids": r.response_ids, "response_mask": r.response_mask,
            "support_ids": r.support_ids,
            "teacher_logp": aggregate_teachers(scores, torch.ones(len(teachers)), "mixture"),
            "from_teacher": torch.zeros(prompts, dtype=torch.bool),
        }  # fmt: skip
        behaviour = behaviour_logprobs(student, batch)
        eng = make_engine(student, 1e-3, 0.0, 1.0)
        student.train()
        for i in range(0, prompts, 32):
            sl = slice(i, i + 32)
            update_step(eng, {k: v[sl] for k, v in batch.items()}, behaviour[sl], d)
        student.eval()

    t = time.perf_counter()
    kw = dict(max_new_tokens=new_tokens, eos_id=vocab, pad_id=0, top_k=k, generator=g)
    distill(server, sample(server, ids, mask, **kw), clients)
    for c in clients:
        distill(c, sample(c, ids, mask, **kw), [server])
    return time.perf_counter() - t


def bench_round(counts=(2, 4, 8), repeats: int = 3) -> list[Figure]:
    round_compute(counts[0])  # warm-up
    times = {c: float("inf") for c in counts}
    for _ in range(repeats):  # interleaved, best of `repeats`
        for c in counts:
            times[c] = min(times[c], round_compute(c))
    lo = counts[0]
    return [
        Figure(
            "round", f"in-process round compute, {c} vs {lo} clients", times[c], times[lo],
            "s", f"{c} clients", f"{lo} clients", "",
            "model work of one round (generate, teach, distill; 64 prompts, 8 new tokens) run "
            "one step after another in one process; no KFP, store or MLflow. A cluster runs "
            "the clients' steps in parallel; the server's teaching and distill grow with the "
            "number of clients",
        )
        for c in counts[1:]
    ]  # fmt: skip


def _round_times(base, tmp: str, warm: bool = True, all_cores: bool = False) -> dict:
    """Round 1 of `base`, set up in-process first; caching off, the torch thread budget of
    `flminillm run`: seconds under kfp.local (`kfp`) and in one process (`in_process`), and
    whether both gave the same model digests (`same`). `warm`: the tasks' steps run in forks
    of a warm step server, as `flminillm run` does. `all_cores`: also the same round in one
    process with every core per step (`in_process_all_cores`)."""
    from flminillm.inprocess import run_round, setup
    from flminillm.invoke import THREADS_ENV, deployment_env, warm_steps
    from pipelines.federation import build_round_pipeline
    from pipelines.local import init_local

    cfg = base.model_copy(
        update={
            "store": base.store.model_copy(update={"uri": f"{tmp}/store"}),
            "tracking": base.tracking.model_copy(update={"enabled": False}),
            "runner": base.runner.model_copy(
                update={"cache": False, "pipeline_root": f"{tmp}/kfp"}
            ),
        }
    )
    threads = max(1, (os.cpu_count() or 1) // cfg.runner.local_parallelism)
    os.environ[THREADS_ENV] = str(threads)  # as pipelines.local.run_local
    state = setup(cfg)
    t = time.perf_counter()
    direct, _ = run_round(cfg, state, 1)
    in_process = time.perf_counter() - t
    init_local(cfg.runner.pipeline_root, cache=False)
    pipeline = build_round_pipeline(cfg, parallelism=cfg.runner.local_parallelism)
    with deployment_env(cfg), warm_steps(warm):
        t = time.perf_counter()
        task = pipeline(
            experiment_json=cfg.experiment_json(), state_json=json.dumps(state), round_index=1
        )
        under_kfp = time.perf_counter() - t
    out = {
        "kfp": under_kfp,
        "in_process": in_process,
        "same": json.loads(task.output)["models"] == direct["models"],
    }
    if all_cores:  # the best one process can do: the steps one after another, all cores each
        os.environ[THREADS_ENV] = str(os.cpu_count() or 1)
        t = time.perf_counter()
        run_round(cfg, state, 1)
        out["in_process_all_cores"] = time.perf_counter() - t
    return out


def bench_orchestration(config: Path) -> list[Figure]:
    """One round under kfp.local's SubprocessRunner vs the same steps in one process, with
    the same torch thread budget per task as `flminillm run` gives."""
    import tempfile

    from flminillm.config import load_config

    base = load_config(config)
    # pre-training is set-up, not part of the measured round: shortened to save bench time
    base = base.model_copy(update={"pretrain": base.pretrain.model_copy(update={"steps": 20})})
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="flminillm-bench-") as tmp:
        r = _round_times(base, tmp, all_cores=True)
    under_kfp, in_process, same = r["kfp"], r["in_process"], r["same"]
    in_process_all = r["in_process_all_cores"]
    n = len(base.clients)
    threads = max(1, cores // base.runner.local_parallelism)
    return [
        Figure(
            "orchestration", "one round under kfp.local vs one process with every core",
            under_kfp, in_process_all, "s", f"kfp.local SubprocessRunner ({tasks_per_round(n)} tasks)",
            f"steps called one after another, {cores} torch threads each", "<= 1.3x",
            "the same round as the figure below; the baseline gives each step all the cores "
            "instead of running two at a time",
        ),
        Figure(
            "orchestration", "one round under kfp.local vs the same steps in one process",
            under_kfp, in_process, "s", f"kfp.local SubprocessRunner ({tasks_per_round(n)} tasks)",
            "steps called in one process", "<= 1.3x",
            f"{config.name} (pre-training cut to 20 steps: set-up, not timed), round 1 with "
            f"its 600-step local fine-tuning, {n} clients, caching off, {threads} torch "
            f"thread(s) per task; "
            f"each task is a new Python process whose step runs in a fork of the warm step "
            f"server (flminillm/stepserver.py); same model digests both ways: {same}",
        )
    ]  # fmt: skip


def scaled_federation(n_clients: int, hidden: int = 32):
    """configs/tiny.yaml with `n_clients` heterogeneous clients (one family each, from the
    8 families) and models of width `hidden` (server: 2x)."""
    from flminillm.config import Config, load_config
    from flminillm.data import FAMILIES

    base = load_config(ROOT / "configs" / "tiny.yaml").model_dump(mode="json")
    fams = list(FAMILIES)
    if n_clients > len(fams):
        raise ValueError(f"at most {len(fams)} clients (one family each), got {n_clients}")
    archs = ("gpt2", "llama", "qwen2")
    base["clients"] = [
        {"id": f"c{i}", "families": [fams[i]],
         "model": {"family": archs[i % 3], "hidden_size": hidden, "num_layers": 1,
                   "num_heads": 2, "max_positions": 64}}
        for i in range(n_clients)
    ]  # fmt: skip
    base["server"]["model"].update(hidden_size=2 * hidden, num_heads=4)
    base["data"]["families"] = fams[:n_clients]
    return Config.model_validate(base)


def bench_pipeline_rounds(counts=(2, 4, 8)) -> list[Figure]:
    """Round time through the real round pipeline (kfp.local, store, every step a process)
    as clients go 2, 4, 8, and its overhead over the same steps in one process."""
    import tempfile

    times = {}
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="flminillm-bench-") as tmp:
            times[n] = _round_times(scaled_federation(n), tmp)
    lo = counts[0]
    with tempfile.TemporaryDirectory(prefix="flminillm-bench-") as tmp:
        cold = _round_times(scaled_federation(lo), tmp, warm=False)
    figs = [
        Figure(
            "round",
            f"pipeline round, warm step server vs a cold process per step, {lo} clients",
            times[lo]["kfp"],
            cold["kfp"],
            "s",
            "steps in forks of a warm step server",
            "every step imports torch and transformers itself",
            "",
            "runner.warm_steps true (the default) vs false; same digests: "
            f"{cold['same'] and times[lo]['same']}",
        ),
    ]
    figs += [
        Figure(
            "round", f"pipeline round time, {n} vs {lo} clients", times[n]["kfp"],
            times[lo]["kfp"], "s",
            f"{n} clients ({tasks_per_round(n)} tasks)", f"{lo} clients ({tasks_per_round(lo)} tasks)", "",
            "one round of a tiny federation (configs/tiny.yaml models, one family per client) "
            "under kfp.local with local_parallelism 2 and warm steps",
        )
        for n in counts[1:]
    ]  # fmt: skip
    figs += [
        Figure(
            "round", f"pipeline vs in-process round, {n} clients", times[n]["kfp"],
            times[n]["in_process"], "s",
            "kfp.local", "in one process", "",
            f"same steps, same digests: {times[n]['same']}",
        )
        for n in counts
    ]  # fmt: skip
    return figs


def bench_model_size(hiddens=(64, 128, 256), clients: int = 3) -> list[Figure]:
    """In-process round compute as every model gets wider (server 2x the clients)."""
    times = {h: round_compute(clients, hidden=h) for h in hiddens}
    lo = hiddens[0]
    return [
        Figure(
            "round", f"in-process round compute, width {h} vs {lo}", times[h], times[lo], "s",
            f"clients {h} wide, server {2 * h}", f"clients {lo} wide, server {2 * lo}", "",
            f"{clients} clients, 64 prompts, 8 new tokens; parameters grow about 4x per doubling",
        )
        for h in hiddens[1:]
    ]  # fmt: skip
