"""`flminillm bench quality`: FL-MiniLLM against baselines, ablations and faults on one
non-IID benchmark, over several seeds; writes results.{md,json,png} (`--out`) and logs to MLflow.

Every variant (flminillm.bench.variants) runs the same rounds on the same data (per seed)
through the same steps as `flminillm run` (flminillm.steps), called in-process
(flminillm.inprocess, or a baseline of flminillm.bench.baselines) so that one seed's
pre-training and round-1 local fine-tuning are shared by all variants that use the same
models. This module runs them (in worker processes, resumable) and summarises them; the
report is flminillm.bench.quality_report.

Held / unseen: a client's held families are the ones it was given in the federation's
config (also for pooled and IID variants); the server holds none, so its "unseen" is all.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flminillm.bench.baselines import RUNNERS
from flminillm.bench.divergence import add_kl_to_pooled
from flminillm.bench.quality_report import (
    log_to_mlflow,
    paired,
    plot_results,
    summarise,
    write_markdown,
)
from flminillm.bench.variants import Variant, variant_config, variant_env, variants
from flminillm.config import Config, load_config


def git_output(repo: Path, *args: str) -> str | None:
    """A git command's stdout in `repo`, stripped; None where it fails (no git, outside a
    checkout, an unknown commit)."""
    import subprocess

    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                           timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def code_version() -> str:
    """The code a run ran: the git commit of this checkout (`+dirty` where flminillm/ has
    uncommitted changes), else the package version. Recorded with every result, so that a
    report made of runs from several invocations says which code made them."""
    from flminillm import __version__

    root = Path(__file__).resolve().parents[2]
    head = git_output(root, "rev-parse", "--short=12", "HEAD")
    if head is None:
        return __version__
    dirty = git_output(root, "status", "--porcelain", "--", "flminillm")
    return f"{head}+dirty" if dirty else head


def run_variant(
    base_json: str, v: Variant, seed: int, workdir: str, memo_entries: dict | None = None
) -> dict:
    """Run one (variant, seed); returns per-round evaluations, bytes and timing."""
    from flminillm.artifacts import open_store_for
    from flminillm.config import config_from_json
    from flminillm.inprocess import Memo, run_federation

    base = config_from_json(base_json)
    cfg = variant_config(base, v, seed, Path(workdir))
    memo = Memo(memo_entries)
    env = variant_env(cfg, v)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    rounds: dict[int, dict] = {}

    def on_round(r: int, st: dict, sent: dict) -> None:
        rounds[r] = {"eval": st["eval"], "bytes": sent, "dropped": sorted(st.get("dropped", {}))}

    t0 = time.perf_counter()
    try:
        runner: Callable = RUNNERS.get(v.kind, run_federation)
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
        "code": code_version(),
        "families_by_client": cfg.families_by_client(),
        "server": cfg.server.id,
        "rounds": {str(k): x for k, x in sorted(rounds.items())},
    }
    # the run's result beside its ledger, so that `--resume` can reuse it
    open_store_for(cfg).put_record(f"{cfg.federation_id()}/bench-result.json", result)
    return {**result, "memo": memo.entries, "memo_hits": memo.hits}


def shared_setup(base_json: str, v: Variant, seed: int, workdir: str) -> dict:
    """The set-up every run of a seed shares (prepare, every party's init_model, every
    client's round-1 local_sft), computed once, before the seed's runs, so that none of
    them waits for another. It runs under v's config with its own federation id (name
    suffix "-setup"): its step records do not mix with any run's. Returns {"memo",
    "seconds"}."""
    from flminillm.config import config_from_json
    from flminillm.inprocess import Memo, clients_local_sft, setup

    t0 = time.perf_counter()
    cfg = variant_config(config_from_json(base_json), v, seed, Path(workdir))
    cfg = cfg.model_copy(update={"name": f"{cfg.name}-setup"})
    memo = Memo()
    clients_local_sft(cfg, setup(cfg, memo), 1, memo)  # from the round-0 manifest
    return {"memo": memo.entries, "seconds": time.perf_counter() - t0}


def finished_result(base: Config, v: Variant, seed: int, workdir: Path) -> dict | None:
    """The result of (variant, seed) if a run of this very experiment finished in workdir's
    store (its bench-result record, under the federation id: the experiment's digest), else
    None."""
    from flminillm.artifacts import open_store_for

    cfg = variant_config(base, v, seed, workdir)
    saved = open_store_for(cfg).list_records(f"{cfg.federation_id()}/bench-result.json")
    return {**saved[0], "resumed": "bench-result record"} if saved else None


# --------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------
def _worker_init(threads: int, parent: int | None = None) -> None:
    import torch

    torch.set_num_threads(threads)
    if parent is not None:
        die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """Make this worker process die (SIGTERM) when `parent` does, where the OS can (Linux:
    prctl PR_SET_PDEATHSIG): a `bench quality` or `bench tune` killed with SIGTERM or
    SIGKILL leaves no orphan worker finishing its run and writing it into the workdir,
    which a re-invocation could then meet half-written or cache. Elsewhere a no-op."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return
    pr_set_pdeathsig = 1
    prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the call: nobody will signal
        os._exit(1)


def run_grid(
    base: Config,
    vs: list[Variant],
    seeds: int,
    workdir: Path,
    fault_seeds: int | None = None,
    jobs: int = 0,
    console=None,
    resume: bool = False,
    report_only: bool = False,
    title: str = "bench quality",
    first_seed: int = 0,
) -> dict[str, Any]:
    """Run every (variant, seed) in worker processes, seeds `first_seed` to `first_seed` +
    `seeds` - 1 (faults for the first `fault_seeds` of them only), reusing finished runs from
    `workdir` with `resume`. Returns {"runs": {name: [result]}, "seeds", "fault_seeds",
    "failures", "resumed", "missing", "seconds", "jobs", "threads"}."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    fault_seeds = seeds if fault_seeds is None else fault_seeds
    jobs = jobs or max(1, min(2, (os.cpu_count() or 1)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    resume = resume or report_only
    workdir.mkdir(parents=True, exist_ok=True)
    base_json = base.to_json()
    t_start = time.perf_counter()
    runs: dict[str, list[dict]] = {v.name: [] for v in vs}
    failures: dict[str, list[dict]] = {}
    resumed: list[str] = []
    missing: list[str] = []
    seed_list = list(range(first_seed, first_seed + seeds))
    todo = [(v, s) for s in seed_list for v in vs
            if v.group != "fault" or s < first_seed + fault_seeds]  # fmt: skip
    first = next((v for v in vs if v.kind == "federated" and v.group == "method"), vs[0])
    ctx = mp.get_context("spawn")
    with Progress(
        TextColumn(f"[bold]{title}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=False,
    ) as progress, cf.ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads, os.getpid())
    ) as pool:  # fmt: skip
        bar = progress.add_task("", total=len(todo))
        to_run = []
        for v, x in todo:  # --resume: runs that finished in an earlier invocation
            done_before = finished_result(base, v, x, workdir) if resume else None
            if done_before is None and report_only:
                missing.append(f"{v.name}/seed {x}")
            elif done_before is None:
                to_run.append((v, x))
            else:
                runs[v.name].append(done_before)
                resumed.append(f"{v.name}/seed {x}")
                progress.advance(bar)
        # a seed with two runs or more to do first computes the set-up they share
        # (shared_setup: pre-training, round-1 local fine-tuning); then all its runs are
        # queued with that memo, so no worker waits for another run
        pending: dict = {}
        setups: dict = {}
        setup_seconds = 0.0

        def submit(v: Variant, x: int, memo: dict) -> None:
            pending[pool.submit(run_variant, base_json, v, x, str(workdir), memo)] = (v, x)

        by_seed: dict[int, list[Variant]] = {}
        for v, x in to_run:
            by_seed.setdefault(x, []).append(v)
        for x, seed_vs in by_seed.items():
            if len(seed_vs) > 1:
                setups[pool.submit(shared_setup, base_json, first, x, str(workdir))] = x
            else:
                submit(seed_vs[0], x, {})
        while pending or setups:
            done, _ = cf.wait([*pending, *setups], return_when=cf.FIRST_COMPLETED)
            for fut in done:
                if fut in setups:
                    x, memo = setups.pop(fut), {}
                    try:
                        out = fut.result()
                        memo, setup_seconds = out["memo"], setup_seconds + out["seconds"]
                        progress.update(bar, description=f"seed {x}: set-up done")
                    except Exception as err:  # its runs then compute the set-up themselves
                        progress.update(bar, description=f"seed {x}: set-up FAILED ({err})")
                    for w in by_seed[x]:
                        submit(w, x, memo)
                    continue
                v, s = pending.pop(fut)
                try:
                    res = fut.result()
                    res.pop("memo")
                    runs[v.name].append(res)
                    progress.update(bar, description=f"seed {s}: {v.name} done")
                except Exception as err:  # one failed run must not lose the others
                    failures.setdefault(v.name, []).append(
                        {"seed": s, "error": f"{type(err).__name__}: {err}"}
                    )
                    progress.update(bar, description=f"seed {s}: {v.name} FAILED")
                progress.advance(bar)
    return {
        "runs": runs, "seeds": seed_list, "fault_seeds": seed_list[:fault_seeds],
        "failures": failures, "resumed": resumed, "missing": missing,
        "seconds": time.perf_counter() - t_start, "jobs": jobs, "threads": threads,
        # every run's own time, resumed ones included, and this invocation's shared
        # set-ups: what the report cost to compute
        "run_seconds": sum(r["seconds"] for rs in runs.values() for r in rs) + setup_seconds,
        "setup_seconds": setup_seconds,
    }  # fmt: skip


def summarise_grid(vs: list[Variant], grid: dict) -> dict[str, Any]:
    """{variant name: summary over its seeds} for the variants that have runs."""
    runs = grid["runs"]
    return {
        v.name: summarise(sorted(runs[v.name], key=lambda r: r["seed"]), v)
        for v in vs
        if runs[v.name]
    }


def grid_meta(config: Path, base: Config, grid: dict, command: str) -> dict:
    """What every report says about how it was produced (`grid`: `run_grid`'s answer)."""
    return {
        "config": str(config),
        "config_json": json.loads(base.to_json()),
        "seeds": grid["seeds"],
        "command": command,
        "jobs": grid["jobs"],
        "torch_threads_per_job": grid["threads"],
        "seconds": grid["seconds"],
        "run_seconds": grid["run_seconds"],
        # which code made the runs (older records without it: "unrecorded")
        "code": sorted({r.get("code", "unrecorded") for rs in grid["runs"].values() for r in rs}),
        "cpu_count": os.cpu_count(),
        "failures": grid["failures"],
        "resumed": grid["resumed"],
        "missing": grid["missing"],
        "families_by_client": base.families_by_client(),
    }


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
    base = load_config(config)
    vs = variants(base, names)
    fault_seeds = seeds if fault_seeds is None else fault_seeds
    if (resume or report_only) and workdir is None:
        raise ValueError("--resume needs --workdir: the directory of the run to resume")
    with _workdir(workdir) as wd:
        grid = run_grid(
            base, vs, seeds, wd, fault_seeds=fault_seeds, jobs=jobs, console=console,
            resume=resume, report_only=report_only,
        )  # fmt: skip
        add_kl_to_pooled(base, vs, grid, wd, console)
    results = summarise_grid(vs, grid)
    ours, pooled_em, _ = paired(results, "fl-minillm", "pooled")  # on the seeds both have
    results["_meta"] = {
        **grid_meta(config, base, grid, command),
        "fault_seeds": grid["fault_seeds"],
        "server_vs_pooled": (ours / pooled_em) if ours is not None and pooled_em else None,
        "workdir": str(workdir) if workdir is not None else None,
        "adversary": base.clients[-1].id,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(results, out_dir / "results.json")
    plot_results(results, out_dir / "results.png")
    write_markdown(results, out_dir / "results.md", "results.png")
    if tracking_uri:
        log_to_mlflow(results, grid["runs"], tracking_uri, base.tracking.experiment + "-quality")
    return results


@contextlib.contextmanager
def _workdir(workdir: Path | None):
    """The given workdir, or a temporary one removed afterwards."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="flminillm-bench-") as tmp:
        yield Path(tmp)


def write_json(results: dict, path: Path) -> None:
    from flminillm.store import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(results, indent=2, sort_keys=False) + "\n").encode())
