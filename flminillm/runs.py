"""A federation run on this machine, as `flminillm run` and `flminillm rerun` show it: a
short header, one line per finished task (round, step, party, time, or cache hit), the
results table; the tasks' own output and the libraries' warnings go to a log file beside
the run (`--verbose` streams them instead). The MLflow federation run is opened before the
first task and every step logs itself under it as it finishes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from flminillm.config import Config


class FederationFailed(RuntimeError):
    """The federation stopped at a failed step (the console said which, and what to do)."""


def make_console(file=None):
    from rich.console import Console

    # soft wrap: a long path or command stays on one line (a terminal wraps it, copyable)
    console = Console(highlight=False, file=file, soft_wrap=True)
    if not console.is_terminal:  # logs and CI: wide enough for the results table
        console = Console(highlight=False, width=120, file=file, soft_wrap=True)
    return console


def expected_tasks(cfg: Config) -> int:
    """Leaf tasks of a federation run (for the progress count)."""
    from flminillm.rounds import setup_tasks, tasks_per_round

    n = len(cfg.clients)
    c = min(n, max(cfg.sampling.min_clients, math.ceil(cfg.sampling.fraction * n)))
    return setup_tasks(len(cfg.parties)) + cfg.rounds * tasks_per_round(c) + 1  # + track


def failure_summary(cfg: Config, since: float) -> str:
    """The errors of the steps that failed since `since`, from the store's ledger."""
    from flminillm.artifacts import open_store_for
    from flminillm.ledger import ledger

    failed = [
        rec
        for recs in ledger(open_store_for(cfg), cfg.federation_id()).values()
        for rec in recs
        if rec.get("status") == "failed" and rec["started"] >= since
    ]
    return "; ".join(
        f"{r['step']}.{r['party']} (round {r['round']}): {r.get('error', '')}" for r in failed
    )


QUIET_LOGGERS = ("mlflow", "alembic", "kfp", "urllib3", "botocore", "DeepSpeed")


_REDIRECTED: set[Path] = set()  # the logs that output_to sends this process's output to now


@contextlib.contextmanager
def output_to(log_path: Path, verbose: bool) -> Iterator[None]:
    """Everything the run prints (the tasks' output through kfp.local, warnings, library
    logs) goes to `log_path`, unless `verbose`. Inside a block that already sends it there
    (a task observer logging to MLflow during the run), nothing changes: sys.stdout is the
    whole process's, and kfp.local's threads print their tasks' output to it all along; a
    second file put there and closed under them failed a task's thread with "write to
    closed file" (the federation with it: CI at stop 41)."""
    key = Path(log_path).resolve()
    if verbose or key in _REDIRECTED:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with open(log_path, "a", buffering=1) as log:
        for name in QUIET_LOGGERS:  # their handlers hold the terminal: quiet them instead
            logging.getLogger(name).setLevel(logging.WARNING)
        _REDIRECTED.add(key)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            _REDIRECTED.discard(key)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _model_name(spec) -> str:
    if spec.name_or_path:
        return spec.name_or_path.rsplit("/", 1)[-1]
    return spec.family


def run_federation(
    cfg: Config,
    label: str,
    extra_tags: dict[str, str] | None = None,
    verbose: bool = False,
    console=None,
) -> dict:
    """Run the federation under the local runner with a readable console; returns the final
    round manifest. Raises FederationFailed (after saying why) when a step fails."""
    from flminillm.artifacts import open_store_for
    from flminillm.invoke import RUNNER_LOGS_ENV, env_set
    from flminillm.report import render_table, results_table
    from flminillm.steps import STEPS
    from flminillm.store import atomic_write_text
    from flminillm.tracking import RUN_ENV, finish_federation, round_chain, start_federation
    from pipelines.local import TaskEvent, observing_tasks, run_local

    console = console or make_console(sys.stdout)
    fbc = cfg.families_by_client()
    parties = ", ".join(
        f"{p.id} ({_model_name(p.model)}{', holds ' + '+'.join(fbc[p.id]) if p.id in fbc else ''})"
        for p in cfg.parties
    )
    console.print(f"[bold]FL-MiniLLM[/] federation [cyan]{cfg.federation_id()}[/]: "
                  f"{cfg.rounds} round(s); {parties}")  # fmt: skip
    log_path = Path(cfg.output_dir) / "logs" / f"{label}.log"
    console.print(f"store {cfg.store.uri}; full log {log_path}")
    started = time.time()
    run_id = None
    if cfg.tracking.enabled:
        tags = {"flminillm.runner": "local", **(extra_tags or {})}
        with output_to(log_path, verbose):
            run_id = start_federation(cfg, label, started, tags, owner_pid=os.getpid())
        console.print(f"MLflow run {run_id} at {cfg.tracking.uri} (steps appear as they finish)")

    total, done, lock = expected_tasks(cfg), [0], threading.Lock()
    logged: set[tuple] = set()
    store = open_store_for(cfg)

    def log_finished_steps(round_index: int | None = None) -> None:
        """Each step record this run wrote and has not logged yet, to MLflow (as it happens:
        called when a task finishes, reading the records of that task's round only, so that
        a long federation does not read its whole ledger after every task)."""
        from flminillm.ledger import ledger
        from flminillm.tracking import log_step

        for recs in ledger(store, cfg.federation_id(), round_index).values():
            for rec in sorted(recs, key=lambda r: r.get("started", 0)):
                key = (rec["round"], rec["step"], rec["party"], rec.get("started"))
                if key in logged or rec.get("started", 0) < started:
                    continue
                logged.add(key)
                try:
                    with output_to(log_path, verbose):
                        log_step(cfg, store, run_id, rec)
                except Exception as e:  # noqa: BLE001 - a log never fails the federation
                    console.print(f"warning: could not log {rec['step']}.{rec['party']} to "
                                  f"MLflow: {type(e).__name__}: {e}")  # fmt: skip

    def on_task(ev: TaskEvent) -> None:
        with lock:
            if run_id and not ev.cached:
                log_finished_steps(ev.round)
            done[0] += 1
            where = f"round {ev.round}" if ev.round is not None else ""
            how = (
                "[dim]cache hit[/]"
                if ev.cached
                else f"{ev.seconds:5.1f} s"
                + ("" if ev.status == "SUCCESS" else f" [red]{ev.status.lower()}[/]")
            )
            step = STEPS[ev.step].settings_name if ev.step in STEPS else ev.step
            console.print(f"[{done[0]:>3}/{total}] {where:<8} {step:<14} {ev.party:<16} {how}")

    try:
        with (
            env_set(RUN_ENV, run_id),
            env_set(RUNNER_LOGS_ENV, "1" if run_id else None),
            observing_tasks(on_task),
            output_to(log_path, verbose),
        ):
            final = run_local(cfg, run_label=label, run_started=started, extra_tags=extra_tags)
    except Exception as err:
        if run_id:  # whatever a task wrote that the per-round reads did not reach
            with lock:
                log_finished_steps()
        error = failure_summary(cfg, started) or f"{type(err).__name__}: {err}"
        console.print(f"[red]federation failed[/]: {error}")
        console.print(f"full log: {log_path}")
        if run_id:
            with output_to(log_path, verbose):
                finish_federation(cfg, open_store_for(cfg), run_id, started, "FAILED", error)
            console.print(f"`flminillm lineage {run_id}` shows what happened, "
                          f"`flminillm rerun {run_id}` finishes it")  # fmt: skip
        raise FederationFailed(error) from err
    if run_id:
        with lock:
            log_finished_steps()
    store = open_store_for(cfg)
    chain = round_chain(store, final)
    results = results_table(cfg, chain[0], chain[-1])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "round_manifest.json", json.dumps(final, indent=1))
    console.print(render_table(results))
    console.print(f"finished in {time.time() - started:.0f} s; results {out / 'results.json'}")
    console.print(f"round manifest {out / 'round_manifest.json'} (sha256 {final['manifest']})")
    if run_id:
        console.print(f"lineage: `flminillm lineage {run_id}` or "
                      f"`mlflow ui --backend-store-uri {cfg.tracking.uri}`")  # fmt: skip
    return final
