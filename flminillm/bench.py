"""`flminillm bench perf`: performance figures, each a ratio against a baseline measured in
the same run (absolute numbers depend on the machine; ratios much less so).

1. generation: tokens/s of `flminillm.generation.sample` vs transformers' `generate`;
2. communication: bytes per round per client of FL-MiniLLM messages vs FedAvg weights;
3. distill step: tokens/s and peak RSS with the torch engine vs DeepSpeed ZeRO-0/2 (CPU);
4. round compute: one round's generate/teach/distill work in-process, 2 vs 4 clients.

Every measurement uses models built from config (random weights: speed and sizes do not
depend on what the model learned). Results go to a rich table, docs/performance.md and
docs/performance.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Figure:
    section: str
    name: str
    ours: float
    baseline: float
    unit: str
    ours_label: str
    baseline_label: str
    goal: str = ""
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")

    @property
    def met(self) -> str:
        if not self.goal:
            return ""
        op, value = self.goal.split()
        target = float(value.rstrip("x%")) / (100 if value.endswith("%") else 1)
        ok = self.ratio >= target if op == ">=" else self.ratio <= target
        return "yes" if ok else "no"


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


# --- shared helpers -------------------------------------------------------------------------


def _model(family: str, hidden: int, layers: int, heads: int, vocab: int = 1024, seed: int = 0):
    from flminillm.config import ModelSpec
    from flminillm.models import build_model

    spec = ModelSpec(
        family=family, hidden_size=hidden, num_layers=layers, num_heads=heads, max_positions=64
    )
    return build_model(spec, vocab_size=vocab, pad_id=0, eos_id=1, seed=seed)


def _prompts(n: int, width: int, vocab: int, seed: int = 0):
    """Left-padded random prompts of lengths width/2 .. width."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(width // 2, width + 1, (1,), generator=g))
        ids[i, width - k :] = torch.randint(3, vocab, (k,), generator=g)
        mask[i, width - k :] = 1
    return ids, mask


def _best_times(fns: list, repeats: int) -> list[float]:
    """Best (minimum) seconds of each function over `repeats` interleaved runs, after one
    warm-up call each: other work on a shared machine only ever adds time, and interleaving
    spreads what it adds over all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [min(ts) for ts in times]


# --- 1. generation --------------------------------------------------------------------------


def bench_generation(
    n: int = 64, prompt_len: int = 24, new_tokens: int = 16, top_k: int = 8, repeats: int = 3
) -> list[Figure]:
    """Same model, prompts and lengths: no EOS can stop either early (ours: an EOS id
    outside the vocabulary; transformers: min_new_tokens = max_new_tokens)."""
    import torch

    from flminillm.generation import sample

    vocab = 1024
    model = _model("llama", 128, 4, 4, vocab).eval()  # the demo server's architecture
    ids, mask = _prompts(n, prompt_len, vocab)

    def ours():
        g = torch.Generator().manual_seed(0)
        r = sample(
            model, ids, mask, max_new_tokens=new_tokens, eos_id=vocab, pad_id=0,
            top_k=top_k, generator=g,
        )  # fmt: skip
        assert r.response_ids.shape[1] == new_tokens

    def hf(post: bool):
        def run():
            torch.manual_seed(0)
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                    temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                    eos_token_id=1,
                )  # fmt: skip
            assert out.sequences.shape[1] == prompt_len + new_tokens
            if post:  # what ours returns: log p of the sampled token and the top-k support
                logp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)
                tok = out.sequences[:, prompt_len:]
                logp.gather(-1, tok[..., None])
                logp.topk(top_k + 1, dim=-1)

        return run

    tokens = n * new_tokens
    t_ours, t_hf, t_hf_post = _best_times([ours, hf(False), hf(True)], repeats)
    shape = f"llama 128x4, batch {n}, prompt <= {prompt_len}, {new_tokens} new tokens"
    return [
        Figure(
            "generation", "sampling tokens/s", tokens / t_ours, tokens / t_hf, "tok/s",
            "flminillm.generation.sample", "transformers generate(output_scores)", ">= 1.0x",
            f"{shape}; ours also returns per-token log-probs and the top-k support. Both "
            "sample from the full distribution (transformers: top_k=0) with the same number of "
            "tokens; on a shared 2-core machine this ratio moves by about +-10% run to run",
        ),
        Figure(
            "generation", "tokens/s incl. log-probs + top-k", tokens / t_ours,
            tokens / t_hf_post, "tok/s", "flminillm.generation.sample",
            "generate + log_softmax/top-k on scores", ">= 1.0x",
            "the baseline post-processes the full-vocabulary scores it kept for every step",
        ),
    ]  # fmt: skip


# --- 2. communication -----------------------------------------------------------------------


def message_bytes(cfg, student_max_positions: int) -> tuple[int, int]:
    """Upper bounds of (RolloutMessage, TeachingMessage) bytes for one student, from the
    config's shapes (flminillm.messages layouts; prompts padded to their longest allowed)."""
    g, d = cfg.generation, cfg.distill
    n_all = g.prompts_per_round
    m = round(d.alpha * n_all) if d.teacher_mixed else 0
    n = n_all - m
    p = student_max_positions - g.max_new_tokens
    t, s = g.max_new_tokens, g.top_k + 1
    i32, u8, f32 = 4, 1, 4
    rollout = n * p * (i32 + u8) + n * t * (i32 + u8) + n * t * s * i32 + m * p * (i32 + u8)
    teaching = n * t * s * f32 + n * f32 + m * f32 + m * t * (i32 + u8) + m * t * s * (i32 + f32)
    return rollout, teaching


def bench_communication(config_path: Path) -> list[Figure]:
    from flminillm.config import load_config
    from flminillm.models import build_model, count_parameters

    cfg = load_config(config_path)
    vocab = cfg.tokenizer.vocab_size
    server_pos = cfg.server.model.max_positions
    figs = []
    cases = [(c.id, c.model) for c in cfg.clients[:1]]
    cases.append(("100M-param model", None))
    for name, spec in cases:
        if spec is not None:
            params = count_parameters(build_model(spec, vocab, 0, 1, seed=0))
            pos = spec.max_positions
        else:  # FedAvg of a 100M-parameter model; the messages keep the demo's shapes
            params = 100_000_000
            pos = server_pos
        # per client and round: the client answers the server's rollouts (in: rollouts,
        # out: teaching) and is the student of the server (out: rollouts, in: teaching)
        r_srv, t_srv = message_bytes(cfg, server_pos)
        r_cli, t_cli = message_bytes(cfg, pos)
        ours = r_srv + t_srv + r_cli + t_cli
        fedavg = 2 * params * 4  # fp32 weights down and up
        figs.append(
            Figure(
                "communication", f"bytes/round/client ({name}, {params / 1e6:.2f}M params)",
                ours, fedavg, "bytes", "FL-MiniLLM messages (4 per client)",
                "FedAvg fp32 weights both ways", "<= 1%",
                f"{cfg.generation.prompts_per_round} prompts, {cfg.generation.max_new_tokens} "
                f"new tokens, top-{cfg.generation.top_k}, alpha {cfg.distill.alpha}; an upper "
                "bound from the config's shapes (prompts padded to max_positions - "
                "max_new_tokens); message size does not grow with the model, so FL-MiniLLM "
                f"sends <= 1% of FedAvg's bytes from {ours / 0.08 / 1e6:.1f}M parameters up",
            )
        )  # fmt: skip
    return figs


# --- 3. distill step (one subprocess per engine: clean peak RSS, one DeepSpeed init each) ----


def _synthetic_distill_batch(n: int, prompt_len: int, t: int, k: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    pids, pmask = _prompts(n, prompt_len, vocab, seed)
    rids = torch.randint(3, vocab, (n, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (n,), generator=g)
    rmask = (torch.arange(t)[None] < lengths[:, None]).long()
    others = torch.randint(3, vocab, (n, t, k), generator=g)
    sup = torch.cat([rids[..., None], others], -1)
    tlogp = torch.log_softmax(torch.randn(n, t, vocab, generator=g), -1).gather(-1, sup)
    return {
        "prompt_ids": pids, "prompt_mask": pmask, "response_ids": rids, "response_mask": rmask,
        "support_ids": sup, "teacher_logp": tlogp * rmask[..., None],
    }  # fmt: skip


def distill_worker(args: dict) -> dict:
    """One engine's MiniLLM updates on a synthetic batch of the demo's shapes."""
    import resource

    import torch

    from flminillm.config import EngineConfig
    from flminillm.distill import MiniLLMHParams, minillm_loss
    from flminillm.engine import make_engine
    from flminillm.generation import response_logits

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    vocab, bs, updates = 1024, args["batch_size"], args["updates"]
    model = _model("llama", 128, 4, 4, vocab)
    batch = _synthetic_distill_batch(bs * 4, 24, args["new_tokens"], 8, vocab)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ecfg = EngineConfig(kind=args["kind"], zero_stage=args.get("zero_stage", 0))
    engine = make_engine(model, 1e-3, 0.0, 1.0, ecfg)
    t_init = time.perf_counter() - t0
    with torch.no_grad():
        logits = response_logits(
            model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
            batch["response_mask"],
        )  # fmt: skip
        behaviour = (
            torch.log_softmax(logits.float(), -1).gather(-1, batch["response_ids"][..., None])[
                ..., 0
            ]
            * batch["response_mask"]
        )
    hp = MiniLLMHParams(alpha=0.5)
    model.train()
    n = batch["prompt_ids"].shape[0]
    tokens, losses = 0, []
    times = []
    for u in range(updates + 1):  # the first update is a warm-up
        idx = torch.arange((u * bs) % n, (u * bs) % n + bs)
        mb = {k: v[idx] for k, v in batch.items()}
        t = time.perf_counter()
        logits = response_logits(
            engine.model, mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"],
            mb["response_mask"],
        )  # fmt: skip
        loss, _ = minillm_loss(
            logits, mb["response_ids"], mb["response_mask"], behaviour[idx], mb["support_ids"],
            mb["teacher_logp"], hp,
        )  # fmt: skip
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if u:
            times.append(time.perf_counter() - t)
            tokens += int(mb["prompt_mask"].sum() + mb["response_mask"].sum())
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "tokens_per_s": tokens / len(times) / statistics.median(times),
        "step_s": statistics.median(times),
        "init_s": t_init,
        "rss_before_mb": rss_before / 1024,
        "rss_peak_mb": rss_peak / 1024,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def _run_worker(args: dict, timeout: float = 300) -> dict:
    code = (
        "import json,sys; from flminillm.bench import distill_worker; "
        "print('RESULT ' + json.dumps(distill_worker(json.loads(sys.argv[1]))))"
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"distill worker {args} failed:\n{proc.stderr[-3000:]}")


def bench_distill(
    updates: int = 6,
    batch_size: int = 32,
    new_tokens: int = 8,
    deepspeed: bool = True,
    repeats: int = 2,
) -> tuple[list[Figure], dict]:
    base = {"updates": updates, "batch_size": batch_size, "new_tokens": new_tokens}
    kinds = {"torch": {"kind": "torch"}}
    if deepspeed:
        for stage in (0, 2):
            kinds[f"deepspeed ZeRO-{stage}"] = {"kind": "deepspeed", "zero_stage": stage}
    runs: dict[str, dict] = {}
    for _ in range(repeats):  # engines alternate; each keeps its fastest run
        for name, kw in kinds.items():
            r = _run_worker({**base, **kw})
            if name not in runs or r["tokens_per_s"] > runs[name]["tokens_per_s"]:
                runs[name] = r
    t = runs["torch"]
    shape = f"llama 128x4 student, micro-batch {batch_size}, prompt <= 24, {new_tokens} new tokens"
    figs = []
    for name, r in runs.items():
        if name == "torch":
            continue
        figs.append(
            Figure(
                "distill step", f"tokens/s, {name} (CPU, fp32)", r["tokens_per_s"],
                t["tokens_per_s"], "tok/s", name, "torch engine", "",
                f"{shape}; engine start-up {r['init_s']:.1f} s vs {t['init_s']:.2f} s",
            )
        )  # fmt: skip
    for name, r in runs.items():
        figs.append(
            Figure(
                "memory", f"peak RSS of the distill step, {name}", r["rss_peak_mb"],
                t["rss_before_mb"], "MiB", name, "same process before the engine", "",
                "resource.getrusage ru_maxrss; includes torch/transformers "
                + ("and deepspeed " if name != "torch" else "") + "imports",
            )
        )  # fmt: skip
    return figs, runs


# --- 4. one round's compute, in-process -----------------------------------------------------


def round_compute(
    n_clients: int, prompts: int = 64, new_tokens: int = 8, hidden: int | None = None
) -> float:
    """Seconds of one round's model work for a server and `n_clients` clients, run one after
    another in this process: server generate, each client teaches, server distills; each
    client generates, the server teaches, the client distills. No store, no pipeline."""
    import torch

    from flminillm.distill import MiniLLMHParams, aggregate_teachers, minillm_loss
    from flminillm.engine import make_engine
    from flminillm.generation import response_logits, sample, score

    vocab, k = 1024, 8
    archs = [("gpt2", 96, 2, 4), ("llama", 96, 2, 4), ("qwen2", 64, 3, 4)]
    server = _model("llama", 128, 4, 4, vocab)
    if hidden:  # every client `hidden` wide, the server twice that
        archs = [(f, hidden, layers, heads) for f, _h, layers, heads in archs]
        server = _model("llama", 2 * hidden, 4, 4, vocab)
    clients = [_model(*archs[i % 3], vocab=vocab, seed=i + 1) for i in range(n_clients)]
    ids, mask = _prompts(prompts, 24, vocab)
    g = torch.Generator().manual_seed(0)

    def distill(student, r, teachers):
        scores = torch.stack(
            [
                score(m, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask,
                      r.support_ids)[0]
                for m in teachers
            ]
        )  # fmt: skip
        w = torch.ones(len(teachers))
        tl = aggregate_teachers(scores, w, "mixture", 0.2)
        eng = make_engine(student, 1e-3, 0.0, 1.0)
        student.train()
        for i in range(0, prompts, 32):
            sl = slice(i, i + 32)
            logits = response_logits(
                eng.model, r.prompt_ids[sl], r.prompt_mask[sl], r.response_ids[sl],
                r.response_mask[sl],
            )  # fmt: skip
            loss, _ = minillm_loss(
                logits, r.response_ids[sl], r.response_mask[sl], r.logp[sl],
                r.support_ids[sl], tl[sl], MiniLLMHParams(),
            )  # fmt: skip
            eng.backward(loss)
            eng.step()
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


def _round_in_process(cfg, state: dict) -> dict:
    """Round 1's steps called one after another in this process (no KFP)."""
    from flminillm.inprocess import run_round

    return run_round(cfg, state, 1)


def _round_times(base, tmp: str, warm: bool = True, all_cores: bool = False) -> dict:
    """Round 1 of `base`, set up in-process first; caching off, the torch thread budget of
    `flminillm run`: seconds under kfp.local (`kfp`) and in one process (`in_process`), and
    whether both gave the same model digests (`same`). `warm`: the tasks' steps run in forks
    of a warm step server, as `flminillm run` does. `all_cores`: also the same round in one
    process with every core per step (`in_process_all_cores`)."""
    from flminillm import steps
    from flminillm.stepserver import step_server
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
    cj = cfg.to_json()
    threads = max(1, (os.cpu_count() or 1) // cfg.runner.local_parallelism)
    os.environ["FLMINILLM_TORCH_THREADS"] = str(threads)  # as pipelines.local.run_local
    prep = json.dumps(steps.prepare(cj))
    inits = [json.dumps(steps.init_model(cj, prep, p.id)) for p in cfg.parties]
    state = steps.evaluate(cj, prep, 0, "", inits)
    t = time.perf_counter()
    direct = _round_in_process(cfg, state)
    in_process = time.perf_counter() - t
    init_local(cfg.runner.pipeline_root, cache=False)
    pipeline = build_round_pipeline(cfg, parallelism=cfg.runner.local_parallelism)
    with step_server(warm):
        t = time.perf_counter()
        task = pipeline(config_json=cj, state_json=json.dumps(state), round_index=1)
        under_kfp = time.perf_counter() - t
    out = {
        "kfp": under_kfp,
        "in_process": in_process,
        "same": json.loads(task.output)["models"] == direct["models"],
    }
    if all_cores:  # the best one process can do: the steps one after another, all cores each
        os.environ["FLMINILLM_TORCH_THREADS"] = str(os.cpu_count() or 1)
        t = time.perf_counter()
        _round_in_process(cfg, state)
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
            under_kfp, in_process_all, "s", f"kfp.local SubprocessRunner ({4 + 5 * n} tasks)",
            f"steps called one after another, {cores} torch threads each", "<= 1.3x",
            "the same round as the figure below; the baseline gives each step all the cores "
            "instead of running two at a time",
        ),
        Figure(
            "orchestration", "one round under kfp.local vs the same steps in one process",
            under_kfp, in_process, "s", f"kfp.local SubprocessRunner ({4 + 5 * n} tasks)",
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
    from flminillm.config import ExperimentConfig, load_config
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
    return ExperimentConfig.model_validate(base)


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
            f"{n} clients ({4 + 5 * n} tasks)", f"{lo} clients ({4 + 5 * lo} tasks)", "",
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


# --- 5. TRL DistillationTrainer (optional: only when trl is installed) ---------------------


def bench_trl(steps: int = 30, batch_size: int = 32, new_tokens: int = 8) -> tuple[list, dict]:
    """TRL's DistillationTrainer (beta=1.0: reverse KL, on-policy) vs our pipeline's work for
    the same step, on the same student, teacher, prompts and completion length: student
    sampling, teacher scoring, one MiniLLM update. Tokens are completion tokens trained on."""
    import tempfile
    import warnings

    import torch
    from transformers import TrainerCallback

    from flminillm.data import format_prompt
    from flminillm.distill import MiniLLMHParams, minillm_loss
    from flminillm.engine import make_engine
    from flminillm.generation import encode_prompts, response_logits, sample, score
    from flminillm.tokenizer import train_tokenizer

    warnings.filterwarnings("ignore")
    texts = [
        f"What is {i} plus {i + 3}? The answer is {2 * i + 3}. Repeat apple{i}." for i in range(400)
    ]
    tok = train_tokenizer(texts, 512)
    vocab = len(tok)
    prompts = [format_prompt(f"What is {i} plus {i + 1}?") for i in range(batch_size * (steps + 1))]

    # ours: sample -> score -> one update per batch (the first batch is a warm-up)
    student = _model("llama", 128, 4, 4, vocab)
    teacher = _model("llama", 128, 4, 4, vocab, seed=1).eval()
    eng = make_engine(student, 1e-3, 0.0, 1.0)
    g = torch.Generator().manual_seed(0)
    ours_tokens, ours_times = 0, []
    for i in range(steps + 1):
        ids, mask = encode_prompts(tok, prompts[i * batch_size : (i + 1) * batch_size], 48)
        t = time.perf_counter()
        r = sample(
            student, ids, mask, max_new_tokens=new_tokens, eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id, top_k=8, generator=g,
        )  # fmt: skip
        tl, _ = score(teacher, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask,
                      r.support_ids)  # fmt: skip
        student.train()
        logits = response_logits(
            eng.model, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask
        )
        loss, _ = minillm_loss(
            logits, r.response_ids, r.response_mask, r.logp, r.support_ids, tl,
            MiniLLMHParams(teacher_mixed=False),
        )  # fmt: skip
        eng.backward(loss)
        eng.step()
        if i:
            ours_times.append(time.perf_counter() - t)
            ours_tokens += int(r.response_mask.sum())

    # TRL: the same architectures and weights, freshly built
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.times = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size,
        max_steps=steps + 1, max_completion_length=new_tokens, beta=1.0, bf16=False,
        gradient_checkpointing=False, use_cpu=True, report_to=[], logging_steps=1,
        save_strategy="no", temperature=1.0, top_k=0, learning_rate=1e-3,
        disable_dropout=True, shuffle_dataset=False,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=_model("llama", 128, 4, 4, vocab),
        teacher_model=_model("llama", 128, 4, 4, vocab, seed=1),
        args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok, callbacks=[timer],
    )  # fmt: skip
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h]  # fmt: skip
    trl_tokens = sum(lengths[1:]) * batch_size if len(lengths) > 1 else float("nan")
    # tokens per step over the median step time (robust to other work on the machine)
    ours_rate = ours_tokens / len(ours_times) / statistics.median(ours_times)
    trl_rate = trl_tokens / len(timer.times[1:]) / statistics.median(timer.times[1:])
    import trl

    fig = Figure(
        "TRL", f"on-policy distill step tokens/s vs TRL {trl.__version__} DistillationTrainer",
        ours_rate, trl_rate, "tok/s",
        "sample + teacher top-k score + MiniLLM update", "DistillationTrainer(beta=1.0)",
        ">= 1.0x",
        f"llama 128x4 student and teacher, batch {batch_size}, <= {new_tokens} completion "
        "tokens, one optimizer step per generated batch, first step excluded, tokens per step over the median step time. Both include "
        "student generation, the teacher pass and the student update; TRL matches the "
        "teacher's full-vocabulary distribution (generalised JSD with beta=1, i.e. reverse "
        "KL), ours the teacher's log-probs on the student's top-k support (the message a "
        "teacher sends in a federation). Tokens: completion tokens trained on",
    )  # fmt: skip
    return [fig], {"ours_tok_s": ours_rate, "trl_tok_s": trl_rate}


# --- report -------------------------------------------------------------------------------


def _fmt(v: float, unit: str) -> str:
    if unit == "bytes":
        for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if v >= s:
                return f"{v / s:.2f} {u}"
        return f"{v:.0f} B"
    return f"{v:,.1f} {unit}" if v < 1e4 else f"{v:,.0f} {unit}"


def _ratio(f: Figure) -> str:
    if f.unit == "bytes":
        return f"{100 * f.ratio:.3f}%"
    return f"{f.ratio:.2f}x"


def print_table(report: Report, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="flminillm bench perf (ratios: ours / baseline, same run)")
    for col in ("section", "figure", "ours", "baseline", "ratio", "goal", "met"):
        table.add_column(col)
    for f in report.figures:
        table.add_row(
            f.section, f.name, _fmt(f.ours, f.unit), _fmt(f.baseline, f.unit), _ratio(f),
            f.goal, f.met,
        )  # fmt: skip
    console.print(table)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = [f for f in report.figures if f.unit != "bytes"]
    comm = [f for f in report.figures if f.unit == "bytes"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    ax = axes[0]
    labels = [f"{f.section}: {f.name}" for f in figs]
    ax.barh(range(len(figs)), [f.ratio for f in figs], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(figs)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio ours / baseline (same run)")
    ax = axes[1]
    ax.bar(range(len(comm)), [100 * f.ratio for f in comm], color="tab:green")
    ax.set_xticks(range(len(comm)), [f.name.split("(")[1].split(",")[0] for f in comm], fontsize=7)
    ax.set_yscale("log")
    ax.axhline(1.0, color="r", lw=0.8, ls="--", label="goal 1%")
    ax.set_ylabel("FL-MiniLLM bytes / FedAvg bytes (%)")
    ax.legend(fontsize=7)
    fig.suptitle("FL-MiniLLM performance (CPU, 2 cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(report: Report, path: Path, png: Path, command: str) -> None:
    import torch

    lines = [
        "# Performance",
        "",
        "Generated by `flminillm bench perf`; every figure is a ratio against a baseline",
        "measured in the same run on the same machine, so the ratios carry over better than",
        "the absolute numbers.",
        "",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads).",
        "- **No GPU on this machine: GPU figures (bf16, NCCL, several GPUs per step) were not "
        "measured here.**",
        f"- Bench wall time: {report.extra.get('wall_s', float('nan')):.0f} s; 1-minute load "
        f"average {report.extra.get('load_before', float('nan')):.2f} before, "
        f"{report.extra.get('load_after', float('nan')):.2f} after (the bench's own load included)"
        + (
            " (**other work was running: the timings are noisy**)."
            if report.extra.get("load_before", 0) > 0.5 * (os.cpu_count() or 1)
            or report.extra.get("load_after", 0) > (os.cpu_count() or 1) + 1
            else "."
        ),
        "",
        "Reproduce:",
        "",
        "```bash",
        command,
        "flminillm bench perf --quick      # smaller: no DeepSpeed, rounds or TRL",
        "pip install trl==1.16.0           # optional: adds the TRL comparison",
        ".venv/bin/python -m pytest -q tests/test_engine.py   # engine equivalence",
        "```",
        "",
        "## Training engine",
        "",
        "`train_lm` (pre-training, local SFT) and the distill step train through",
        "`flminillm.engine`: plain torch AdamW by default (bit-identical to the loop before the",
        "engine existed), or DeepSpeed with a ZeRO stage. The config's `engine` block picks it",
        "for every training step (pre-training, local SFT and distill):",
        "",
        "```yaml",
        "engine: {kind: deepspeed, zero_stage: 2, gradient_accumulation_steps: 1}",
        "# bf16: empty = on with a GPU, fp32 on CPU",
        "# gpus_per_step: N > 1 runs local_sft and distill under the DeepSpeed launcher (ZeRO 0-2)",
        "```",
        "",
        "With `gpus_per_step: N` the step starts `python -m deepspeed.launcher.runner --num_gpus N",
        "--module flminillm.launch ...`; each rank trains on its share of every global batch and",
        "DeepSpeed averages the gradients, so N ranks take the same optimizer steps as one process",
        "with N-step gradient accumulation. `tests/test_launch.py` runs local_sft and distill on",
        "2 ranks (gloo processes on this CPU machine) and checks the weights against one process",
        "with gradient accumulation 2 (equal within 1e-5); rank 0 alone writes the step's record",
        "and output. On GPUs the ranks use NCCL; that path was not run here.",
        "",
        "A GPU-sized federation, `configs/cluster/gpu-large.yaml` (Llama server of 367M parameters,",
        "GPT-2 / Llama / Qwen2 clients of 110M / 80M / 68M, ZeRO-2, bf16), is checked for shape on",
        "the meta device and compiled for a cluster in `tests/test_gpu_config.py`; no GPU was",
        "available to run it, so there are no tokens/s, MFU or GPU-memory figures for it.",
        "",
        "Leaving `engine` out keeps the config's digest, and so every cached step, unchanged.",
        "On CPU DeepSpeed runs as one gloo process with the torch AdamW (its fused Adam needs",
        "CUDA ops); `tests/test_engine.py` checks that ZeRO-0 and ZeRO-2 give the plain loop's",
        "loss at step 0 (within 1e-6) and the same losses after.",
        "",
        "## Local runner",
        "",
        "Under kfp.local every task is its own Python process. Importing torch, transformers",
        "and DeepSpeed cost each of them 2-4 s of CPU, which was most of a small step and",
        "made a demo round twice as slow under the runner as in one process. `flminillm run`",
        "now starts one warm step server per run (`flminillm/stepserver.py`): it imports",
        "those once and forks a child per step call; the task sends the call with its",
        "environment, working directory and stdout/stderr and gets back the result or the",
        "error. The figures below compare it with a cold process per step (`runner.warm_steps:",
        "false`) and with the same steps called in one process. On a cluster there is no",
        "step server: each pod runs its step itself.",
        "",
        "## Results",
        "",
        "| section | figure | ours | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in report.figures:
        lines.append(
            f"| {f.section} | {f.name} | {_fmt(f.ours, f.unit)} ({f.ours_label}) | "
            f"{_fmt(f.baseline, f.unit)} ({f.baseline_label}) | {_ratio(f)} | {f.goal} | "
            f"{f.met} |"
        )
    lines += ["", f"![ratios]({png.name})", "", "## What each figure covers", ""]
    for f in report.figures:
        if f.note:
            lines.append(f"- **{f.section}, {f.name}**: {f.note}.")
    runs = report.extra.get("distill_runs")
    if runs:
        lines += [
            "",
            "Distill step details (per engine, one subprocess each):",
            "",
            "| engine (fastest of the runs) | tokens/s | median update s | engine start-up s | RSS before MiB | "
            "peak RSS MiB | loss first -> last |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in runs.items():
            lines.append(
                f"| {name} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['init_s']:.2f} | "
                f"{r['rss_before_mb']:.0f} | {r['rss_peak_mb']:.0f} | "
                f"{r['loss_first']:.4f} -> {r['loss_last']:.4f} |"
            )
    lines += ["", *report.extra.get("notes", []), ""]
    if report.extra.get("section_s"):
        lines += [
            "Time per section: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in report.extra["section_s"].items())
            + ".",
            "",
        ]
    path.write_text("\n".join(lines))


def run_perf(
    out_md: Path,
    out_png: Path,
    config: Path,
    quick: bool = False,
    deepspeed: bool = True,
    rounds: bool = True,
    trl: bool = True,
    console=None,
) -> Report:
    from rich.console import Console

    console = console or Console()
    t0 = time.perf_counter()
    report = Report()
    report.extra["load_before"] = os.getloadavg()[0]
    sections: dict[str, float] = {}
    report.extra["section_s"] = sections

    @contextlib.contextmanager
    def timed(name: str):
        console.print(f"[bold]{name}[/] ...")
        t = time.perf_counter()
        try:
            yield
        finally:
            sections[name] = time.perf_counter() - t

    with timed("generation"):
        report.figures += bench_generation(
            n=32 if quick else 64, new_tokens=8 if quick else 16, repeats=2 if quick else 15
        )
    with timed("communication"):
        report.figures += bench_communication(config)
    with timed("distill step"):
        figs, runs = bench_distill(
            updates=2 if quick else 20,
            deepspeed=deepspeed and not quick and _has("deepspeed"),
            repeats=1 if quick else 2,
        )
        report.figures += figs
        report.extra["distill_runs"] = runs
    notes = []
    if rounds and not quick:
        with timed("round compute"):
            report.figures += bench_round()
        with timed("round time as models grow"):
            report.figures += bench_model_size()
        with timed("pipeline rounds, 2/4/8 clients"):
            threads, env = torch_threads_state()
            try:
                report.figures += bench_pipeline_rounds()
            finally:
                restore_threads(threads, env)
        with timed("orchestration overhead"):
            threads, env = torch_threads_state()
            try:  # the steps set the per-task thread budget in this process too
                report.figures += bench_orchestration(Path(config))
            finally:
                restore_threads(threads, env)
    else:
        notes.append("Round compute and time for 2, 4, 8 clients: not measured in this run.")
        notes.append("Orchestration overhead: not measured in this run.")
    if trl and not quick and _has("trl"):
        with timed("TRL DistillationTrainer"):
            # in a fresh process, like the distill-step runs: nothing the benches before it
            # left in this process (threads, KFP's log streaming, allocator state) can skew it
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(1) as pool:
                report.figures += pool.apply(bench_trl)[0]
    elif not _has("trl"):
        notes.append("TRL comparison: not run (`pip install trl==1.16.0` to include it).")
    notes += [
        "DeepSpeed on CPU: the first use on a fresh machine JIT-compiles DeepSpeed's shared-memory "
        "communication op (about a minute, cached under ~/.cache/torch_extensions); the "
        "start-up times above are with that cache warm.",
    ]
    report.extra["notes"] = notes
    report.extra["wall_s"] = time.perf_counter() - t0
    report.extra["load_after"] = os.getloadavg()[0]
    print_table(report, console)
    plot(report, out_png)
    cmd = "flminillm bench perf" + (" --quick" if quick else "")
    write_markdown(report, out_md, out_png, cmd)
    console.print(f"wrote {out_md} and {out_png}")
    return report


def torch_threads_state() -> tuple[int, str | None]:
    import torch

    return torch.get_num_threads(), os.environ.get("FLMINILLM_TORCH_THREADS")


def restore_threads(threads: int, env: str | None) -> None:
    """The steps set the per-task thread budget in this process too: put it back."""
    import torch

    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("FLMINILLM_TORCH_THREADS", None)
    else:
        os.environ["FLMINILLM_TORCH_THREADS"] = env


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
