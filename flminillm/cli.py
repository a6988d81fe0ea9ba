"""`flminillm run | compile | config-schema`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from pathlib import Path

from flminillm.config import ConfigError, ExperimentConfig, load_config


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # logs and CI: wide enough for the results table
        console = Console(highlight=False, width=120)
    return console


def expected_tasks(cfg: ExperimentConfig) -> int:
    """Leaf tasks of a federation run (for the progress bar)."""
    n = len(cfg.clients)
    c = min(n, max(cfg.sampling.min_clients, math.ceil(cfg.sampling.fraction * n)))
    setup = 3 + len(cfg.parties)  # prepare, list_parties, init x P, evaluate
    per_round = 4 + 5 * c  # sample, server generate, server distill, evaluate + 5 per client
    return setup + cfg.rounds * per_round + 1  # + track


class _TaskProgress(logging.Filter):
    """Turns kfp.local's task log lines into a progress bar. A filter on the root logger,
    because kfp.local replaces the root logger's handlers while a pipeline runs."""

    pattern = re.compile(r"Task .*?'([\w-]+)'.* finished with status .*?(SUCCESS|FAILURE)")

    def __init__(self, progress, task_id) -> None:
        super().__init__()
        self.progress, self.task_id = progress, task_id

    def emit(self, record: logging.LogRecord) -> None:
        msg = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())
        m = self.pattern.search(msg)
        if m and not m.group(1).startswith(("for-loop", "fl-minillm", "round-")):
            self.progress.update(
                self.task_id, advance=1, description=f"{m.group(1)} {m.group(2).lower()}"
            )


def cmd_run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flminillm.report import render_table, results_table
    from flminillm.steps import federation_id
    from flminillm.store import atomic_write_text, open_store
    from flminillm.tracking import round_chain
    from pipelines.local import run_local

    cfg = _load(args)
    console = _console()
    fbc = cfg.families_by_client()
    console.print(f"[bold]FL-MiniLLM[/] federation [cyan]{federation_id(cfg)}[/]: {cfg.rounds} rounds, "
                  f"server [cyan]{cfg.server.id}[/] ({cfg.server.model.family}), "
                  f"{len(cfg.clients)} clients")  # fmt: skip
    for c in cfg.clients:
        console.print(
            f"  client [cyan]{c.id}[/] ({c.model.family} {c.model.hidden_size}x{c.model.num_layers}) holds {fbc[c.id]}"
        )
    console.print(f"  store {cfg.store.uri}\n  tracking {cfg.tracking.uri}")
    started = time.time()
    with Progress(
        TextColumn("[progress.description]{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=False,
    ) as progress:  # fmt: skip
        task_id = progress.add_task("starting", total=expected_tasks(cfg))
        counter = _TaskProgress(progress, task_id)
        logging.getLogger().addFilter(counter)
        try:
            final = run_local(cfg, run_label=args.label or time.strftime("%Y%m%d-%H%M%S"))
        finally:
            logging.getLogger().removeFilter(counter)
    store = open_store(cfg.store.uri)
    chain = round_chain(store, final)
    results = results_table(cfg, chain[0], chain[-1])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "round_manifest.json", json.dumps(final, indent=1))
    console.print(render_table(results))
    console.print(f"finished in {time.time() - started:.0f} s")
    console.print(f"results: {out / 'results.json'}")
    console.print(f"round manifest: {out / 'round_manifest.json'} (sha256 {final['manifest']})")
    if cfg.tracking.enabled:
        console.print(f"lineage: mlflow ui --backend-store-uri {cfg.tracking.uri}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from kfp import compiler

    from pipelines.federation import build_federation_pipeline, build_round_pipeline

    cfg = _load(args)
    pipeline = build_round_pipeline(cfg) if args.round else build_federation_pipeline(cfg)
    compiler.Compiler().compile(pipeline, package_path=args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    print(json.dumps(ExperimentConfig.model_json_schema(), indent=1))
    return 0


def _load(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_config(args.config)
    updates = {}
    if getattr(args, "tracking_uri", None):
        updates["tracking"] = cfg.tracking.model_copy(update={"uri": args.tracking_uri})
    if getattr(args, "no_cache", False):
        updates["runner"] = cfg.runner.model_copy(update={"cache": False})
    return cfg.model_copy(update=updates) if updates else cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flminillm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a whole federation locally (kfp.local subprocess runner)")
    run.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (overrides the config)")
    run.add_argument("--no-cache", action="store_true", help="re-execute every step")
    run.add_argument("--label", help="name of this run in MLflow")
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compile", help="compile the pipeline to KFP YAML")
    comp.add_argument("--config", required=True)
    comp.add_argument("-o", "--output", default="pipeline.yaml")
    comp.add_argument("--round", action="store_true", help="compile a single round pipeline")
    comp.set_defaults(func=cmd_compile)

    schema = sub.add_parser("config-schema", help="print the JSON schema of experiment configs")
    schema.set_defaults(func=cmd_config_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
