"""`flminillm run | compile | submit | config-schema | bench`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from flminillm.config import Config, ConfigError, load_config


def _console():
    from flminillm.runs import make_console

    return make_console(sys.stdout)


def cmd_run(args: argparse.Namespace) -> int:
    from flminillm.runs import FederationFailed, run_federation

    cfg = _load(args)
    try:
        run_federation(cfg, args.label or time.strftime("%Y%m%d-%H%M%S"), verbose=args.verbose)
    except FederationFailed:
        return 1
    return 0


def _tracking_uri(args: argparse.Namespace) -> str:
    import os

    if args.tracking_uri:
        return args.tracking_uri
    if getattr(args, "config", None):
        return load_config(args.config).tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    raise ConfigError("give --tracking-uri or --config (or set MLFLOW_TRACKING_URI)")


def cmd_lineage(args: argparse.Namespace) -> int:
    from flminillm.lineage import lineage_tree

    tree = lineage_tree(
        _tracking_uri(args), args.run_id, show_io=not args.brief, show_uris=args.uris
    )
    _console().print(tree)
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    """Finish a failed or killed federation: succeeded steps come from the cache."""
    from flminillm.lineage import config_of_run
    from flminillm.runs import FederationFailed, run_federation
    from pipelines.local import dropped_out, forget_cached

    uri = _tracking_uri(args)
    cfg = config_of_run(uri, args.run_id)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": uri})})
    purged = forget_cached(cfg.runner.pipeline_root, dropped_out)
    if purged:
        print(f"cleared {purged} cached client drop-out(s), so those steps run again")
    try:
        run_federation(
            cfg, f"rerun-{args.run_id[:8]}", extra_tags={"flminillm.rerun_of": args.run_id},
            verbose=args.verbose,
        )  # fmt: skip
    except FederationFailed:
        return 1
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    """Check every object of a store against its key and every materialised copy against
    its tree; with --repair drop what is corrupt and the cached tasks that produced it."""
    from flminillm.store import open_store

    if bool(args.config) == bool(args.store):
        raise ConfigError("give one of --config FILE or --store URI")
    cfg = load_config(args.config) if args.config else None
    uri = cfg.store.uri if cfg else args.store
    if "://" not in uri and not Path(uri).is_dir():
        raise ConfigError(f"no store at {uri}: check store.uri (or --store)")
    if cfg is not None:
        from flminillm.artifacts import open_store_for

        store = open_store_for(cfg)
    else:
        store = open_store(uri)
    report = store.verify(repair=args.repair)
    for key in report.corrupt_objects:
        print(f"corrupt object: {key}" + (" (dropped)" if args.repair else ""))
    for copy in report.corrupt_copies:
        print(f"corrupt copy: {copy}" + (" (dropped)" if args.repair else ""))
    forgotten = 0
    if args.repair and report.affected and cfg is not None:
        from pipelines.local import forget_cached, mentions_any

        forgotten = forget_cached(cfg.runner.pipeline_root, mentions_any(report.affected))
    bad = len(report.corrupt_objects) + len(report.corrupt_copies)
    print(f"checked {report.checked} objects and copies in {store.uri}: {bad} corrupt" + (
        f"; dropped them and forgot {forgotten} cached task(s) that produced them: the next "
        "run makes them again" if args.repair and bad else ""))  # fmt: skip
    if bad and not args.repair:
        print("run again with --repair to drop them (the steps that made them run again)")
        return 1
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.cluster import compile_pipeline

    cfg = load_config(args.config)
    try:
        path = compile_pipeline(
            cfg, args.output, round_only=args.round, caching=False if args.no_cache else None
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = "round" if args.round else f"federation ({cfg.rounds} rounds)"
    print(f"wrote {path}: {what}, image {cfg.cluster.image}, root {cfg.cluster.pipeline_root}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.submit import read_manifest, submit

    cfg = load_config(args.config)
    if args.round is not None and not args.from_manifest:
        print("error: --round needs --from-manifest", file=sys.stderr)
        return 2
    try:
        manifest = read_manifest(args.from_manifest, cfg) if args.from_manifest else None
        done = submit(
            cfg,
            args.host,
            run_name=args.run_name,
            caching=not args.no_cache,
            manifest=manifest,
            round_index=args.round,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run {done.run_id}: {done.url}")
    return 0


def cmd_data_export(args: argparse.Namespace) -> int:
    import yaml

    from flminillm.config import load_config
    from flminillm.datafiles import export_benchmark
    from flminillm.store import atomic_write_text

    cfg = load_config(args.config)
    if cfg.data.source != "benchmark":
        raise SystemExit(f"{args.config}: data.source is {cfg.data.source}; export needs a "
                         "config that generates the benchmark")  # fmt: skip
    done = export_benchmark(cfg, args.out)
    target = Path(args.config_out or Path(args.out) / "config.yaml")
    atomic_write_text(target, yaml.safe_dump(done["config"], sort_keys=False))
    for name, path in done["files"].items():
        print(f"{name:>14}  {path}")
    print(f"config reading them: {target} (flminillm run --config {target})")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    print(json.dumps(Config.model_json_schema(), indent=1))
    return 0


def _load(args: argparse.Namespace) -> Config:
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
    run.add_argument(
        "--verbose", action="store_true",
        help="stream every task's output and library warnings (default: to the run's log file)",
    )  # fmt: skip
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser(
        "compile", help="compile the pipeline to KFP YAML with the config's cluster settings"
    )
    comp.add_argument("--config", required=True)
    comp.add_argument("-o", "--output", default="pipeline.yaml")
    comp.add_argument("--round", action="store_true", help="compile a single round pipeline")
    comp.add_argument("--no-cache", action="store_true", help="compile with caching off")
    comp.set_defaults(func=cmd_compile)

    subm = sub.add_parser("submit", help="submit to Kubeflow Pipelines (see docs/cluster.md)")
    subm.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    subm.add_argument("--config", required=True)
    subm.add_argument("--run-name", help="name of the run (default: <config name>-<time>)")
    subm.add_argument(
        "--no-cache", action="store_true", help="re-run every step (caching is on by default)"
    )
    subm.add_argument(
        "--from-manifest",
        metavar="URI",
        help="run one round from this round manifest: a JSON file or sha256:<digest> in the store",
    )
    subm.add_argument(
        "--round",
        type=int,
        help="with --from-manifest: the round to run (default: the manifest's round + 1)",
    )
    subm.set_defaults(func=cmd_submit)

    lin = sub.add_parser("lineage", help="print a federation's round > step tree from MLflow")
    lin.add_argument("run_id", help="the federation's MLflow run id")
    lin.add_argument("--tracking-uri", help="MLflow tracking URI")
    lin.add_argument("--config", help="take the tracking URI from this experiment config")
    lin.add_argument("--brief", action="store_true", help="leave out inputs and outputs")
    lin.add_argument("--uris", action="store_true", help="show where each input/output is stored")
    lin.set_defaults(func=cmd_lineage)

    rer = sub.add_parser("rerun", help="finish a failed federation; succeeded steps are cached")
    rer.add_argument("run_id", help="the failed federation's MLflow run id")
    rer.add_argument("--tracking-uri", help="MLflow tracking URI")
    rer.add_argument("--config", help="take the tracking URI from this experiment config")
    rer.add_argument("--verbose", action="store_true", help="stream every task's output")
    rer.set_defaults(func=cmd_rerun)

    store = sub.add_parser("store", help="the artifact store")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    verify = store_sub.add_parser(
        "verify", help="check every object against its sha256 and every materialised copy"
    )
    verify.add_argument("--config", help="the experiment config whose store to check")
    verify.add_argument("--store", help="a store URI (local path or s3://bucket/prefix)")
    verify.add_argument(
        "--repair", action="store_true",
        help="drop corrupt objects and copies, and forget the cached tasks that produced them",
    )  # fmt: skip
    verify.set_defaults(func=cmd_store_verify)

    data = sub.add_parser("data", help="data sets as files")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    export = data_sub.add_parser(
        "export",
        help="write a config's generated benchmark as JSONL files, and a config that reads them",
    )
    export.add_argument(
        "--config", required=True, help="a benchmark config (data.source: benchmark)"
    )
    export.add_argument("--out", required=True, help="directory for the JSONL files")
    export.add_argument(
        "--config-out",
        default=None,
        help="where to write the files config (default: OUT/config.yaml)",
    )
    export.set_defaults(func=cmd_data_export)
    schema = sub.add_parser("config-schema", help="print the JSON schema of experiment configs")
    schema.set_defaults(func=cmd_config_schema)

    bench = sub.add_parser("bench", help="benchmarks (see docs/performance.md)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    perf = bench_sub.add_parser(
        "perf", help="generation, communication, distill-step and round figures as ratios"
    )
    perf.add_argument("--config", default="configs/demo.yaml", help="shapes of the messages")
    perf.add_argument("--output", default="docs/performance.md", help="markdown report")
    perf.add_argument("--plot", default="docs/performance.png", help="PNG plot of the ratios")
    perf.add_argument("--quick", action="store_true", help="smaller sizes; no DeepSpeed, no rounds")
    perf.add_argument("--no-deepspeed", action="store_true", help="torch engine only")
    perf.add_argument("--no-rounds", action="store_true", help="skip the 2/4/8 clients figure")
    perf.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    perf.set_defaults(func=cmd_bench_perf)
    gpu = bench_sub.add_parser(
        "gpu", help="GPU figures: tokens/s, MFU, peak memory, ZeRO-2, LoRA, TRL (on a GPU)"
    )
    gpu.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    gpu.add_argument("--out", default="docs/gpu.json", help="results (bench perf reads them)")
    gpu.add_argument("--tiny", action="store_true", help="toy sizes (checks the script on a CPU)")
    gpu.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 peak, for MFU")
    gpu.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    gpu.add_argument("--no-deepspeed", action="store_true", help="skip the ZeRO-2 figure")
    gpu.set_defaults(func=cmd_bench_gpu)
    central = bench_sub.add_parser(
        "central", help="one teacher, one student: SFT, SeqKD, KD, GKD, MiniLLM, the federated "
        "step and TRL for the same budget (docs/central.md)",
    )  # fmt: skip
    central.add_argument("--config", default="configs/benchmark.yaml", help="models, data, budget")
    central.add_argument("--families", default="", help="comma-separated (default: data.families)")
    central.add_argument("--student", default="", help="the client whose model is the student "
                         "(default: the first of the server's model family); the teacher is the "
                         "server's model")  # fmt: skip
    central.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    central.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every method")
    central.add_argument("--steps", type=int, default=0, help="optimizer steps per method "
                         "(default: one round of the distill step)")  # fmt: skip
    central.add_argument("--warm-steps", type=int, default=-1, help="the student's SFT warm "
                         "start in steps (default: local_sft.steps / 4)")  # fmt: skip
    central.add_argument("--out", default="docs", help="where central.{md,json,png} go")
    central.add_argument("--workdir", default=None, help="models and results (default: temp)")
    central.add_argument("--resume", action="store_true", help="reuse what --workdir holds")
    central.set_defaults(func=cmd_bench_central)
    quality = bench_sub.add_parser(
        "quality", help="FL-MiniLLM vs baselines, ablations and faults (docs/results.md)"
    )
    quality.add_argument("--config", default="configs/benchmark.yaml", help="the benchmark")
    quality.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every method")
    quality.add_argument(
        "--fault-seeds",
        type=int,
        default=1,
        help="seeds for the fault and attack runs (default: 1, seed 0; each is compared with "
        "the clean run of the same seed)",
    )
    quality.add_argument(
        "--methods", default="", help="comma-separated subset (default: all variants)"
    )
    quality.add_argument(
        "--out", default="runs/quality/report",
        help="where results.{md,json,png} go (replaced there; the published reports under "
        "docs/ each name theirs: docs/results.md is written by hand and is not a default)",
    )  # fmt: skip
    quality.add_argument("--workdir", default=None, help="store of the runs (default: a temp dir)")
    quality.add_argument("--jobs", type=int, default=0, help="worker processes (default: 2)")
    quality.add_argument(
        "--resume", action="store_true",
        help="reuse the runs that finished in --workdir (an interrupted or failed benchmark); "
        "run only the rest",
    )  # fmt: skip
    quality.add_argument(
        "--tracking-uri", default=None,
        help="MLflow tracking URI (default: sqlite:///runs/quality/mlflow.db); "
        "'none' to skip MLflow",
    )  # fmt: skip
    quality.add_argument(
        "--report-only", action="store_true",
        help="with --workdir: tables, plots and MLflow from the runs there; run nothing",
    )  # fmt: skip
    quality.set_defaults(func=cmd_bench_quality)
    tune = bench_sub.add_parser(
        "tune", help="choose distill hyper-parameters on the validation split (docs/tune.md)"
    )
    tune.add_argument("--config", default="configs/benchmark.yaml", help="the benchmark")
    tune.add_argument("--seeds", type=int, default=1, help="N seeds for every candidate")
    tune.add_argument(
        "--first-seed", type=int, default=0,
        help="the first of the N seeds (default 0): a validation run trains the same "
        "federation as the evaluation run of its seed, so choose on seeds the reports never "
        "used (e.g. 100) where a candidate came from what their runs did",
    )  # fmt: skip
    tune.add_argument("--candidates", default="", help="comma-separated subset (default: all)")
    tune.add_argument("--out", default="docs", help="where tune.{md,json} go")
    tune.add_argument("--workdir", default=None, help="store of the runs (default: a temp dir)")
    tune.add_argument("--jobs", type=int, default=0, help="worker processes (default: 2)")
    tune.add_argument("--resume", action="store_true", help="reuse finished runs in --workdir")
    tune.set_defaults(func=cmd_bench_tune)

    paired = bench_sub.add_parser(
        "paired", help="two variants of a bench quality workdir, seed by seed, on the same "
        "evaluation examples, with the difference's standard error",
    )  # fmt: skip
    paired.add_argument("a", help="a variant, e.g. backdoor")
    paired.add_argument("b", nargs="?", default="fl-minillm", help="compared with (fl-minillm)")
    paired.add_argument("--config", default="configs/benchmark.yaml", help="the benchmark")
    paired.add_argument("--workdir", required=True, help="the bench quality workdir of the runs")
    paired.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    paired.add_argument(
        "--families", choices=("honest", "all"), default="honest",
        help="the server's EM on the families of the clients neither variant keeps out (an "
        "adversary or an absent client; with none, every client's but the last's), or on all",
    )  # fmt: skip
    paired.set_defaults(func=cmd_bench_paired)

    sel = bench_sub.add_parser(
        "selection", help="whose answers the server kept, per round and family, in one run "
        "of a bench quality workdir",
    )  # fmt: skip
    sel.add_argument("variant", nargs="?", default="fl-minillm", help="the run's variant")
    sel.add_argument("--config", default="configs/benchmark.yaml", help="the benchmark")
    sel.add_argument("--workdir", required=True, help="the bench quality workdir of the run")
    sel.add_argument("--seed", type=int, default=0, help="the run's seed")
    sel.set_defaults(func=cmd_bench_selection)

    avg = bench_sub.add_parser(
        "average", help="what distill.server_average K would report for finished runs of a "
        "bench quality (or --tune: bench tune) workdir, without running them again",
    )  # fmt: skip
    avg.add_argument("variants", help="comma-separated variants (or tune candidates)")
    avg.add_argument("--config", default="configs/benchmark.yaml", help="the benchmark")
    avg.add_argument("--workdir", required=True, help="the workdir of the runs")
    avg.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    avg.add_argument("--k", default="1,2,3", help="comma-separated K (rounds averaged)")
    avg.add_argument("--tune", action="store_true", help="bench tune candidates (validation)")
    avg.add_argument("--reference", default=None, help="compare every variant with this one")
    avg.add_argument("--out", default=None, help="write average.{md,json} into this folder")
    avg.set_defaults(func=cmd_bench_average)

    rep = bench_sub.add_parser(
        "reproduce", help="which reports in docs/ their own command reproduces at this "
        "checkout, and which only at the commit that measured them",
    )  # fmt: skip
    rep.add_argument("--docs", default="docs", help="the folder of reports")
    rep.add_argument("--out", default="docs/reproducing.md", help="the table")
    rep.set_defaults(func=cmd_bench_reproduce)
    return parser


def cmd_bench_average(args: argparse.Namespace) -> int:
    from flminillm.bench.average import choose_k, markdown, run_average
    from flminillm.bench.quality import write_json
    from flminillm.store import atomic_write_text

    try:
        try:
            ks = [int(k) for k in args.k.split(",") if k.strip()]
        except ValueError:
            ks = []
        if not ks or min(ks) < 1:
            raise ValueError(
                f"--k: comma-separated positive integers, e.g. --k 1,3; got {args.k!r}"
            )
        rows = run_average(Path(args.config), Path(args.workdir), args.variants.split(","),
                           args.seeds, ks, args.tune)  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = markdown(rows, args.reference)
    chosen = None
    if args.tune:  # one K for every method given, on validation
        chosen = choose_k(rows)
        table += (
            "\n\nValidation split. Mean over the variants and seeds, per K: "
            + ", ".join(f"K={k}: {m:.2f}" for k, m in chosen["mean"].items())
            + f". **Chosen: K = {chosen['k']}** (the highest; a tie goes to fewer rounds)."
        )
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "flminillm bench average " + " ".join(sys.argv[3:])
        atomic_write_text(
            out / "average.md",
            "# The server averaged over its last K rounds\n\n"
            f"Produced by `{command}`. Server EM in %, final round.\n\n{table}\n",
        )
        write_json({"command": command, "rows": rows, "chosen": chosen}, out / "average.json")
    return 0


def cmd_bench_selection(args: argparse.Namespace) -> int:
    from flminillm.bench.selection import kept_by_family, markdown

    try:
        result = kept_by_family(Path(args.config), Path(args.workdir), args.variant, args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 0


def cmd_bench_paired(args: argparse.Namespace) -> int:
    from rich.table import Table

    from flminillm.bench.paired import run_paired

    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    try:
        rows = run_paired(
            Path(args.config), Path(args.workdir), args.a, args.b, args.seeds, args.families
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = Table(title=f"server EM on {args.families} families: {args.a} vs {args.b}")
    for col in ("seed", "n", args.a, args.b, "difference", "paired SE", "only one right"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["seed"]), str(r["n"]), f"{r['em_a']:.1f}", f"{r['em_b']:.1f}",
            f"{r['diff']:+.1f}", f"{r['se']:.1f}", str(r["discordant"]),
        )  # fmt: skip
    _console().print(table)
    return 0


def cmd_bench_reproduce(args: argparse.Namespace) -> int:
    from rich.table import Table

    from flminillm.bench.reproduce import audit, write_markdown

    rows = audit(Path(args.docs))
    if not rows:
        print(f"error: no reports (results.json or tune.json with _meta) under {args.docs}",
              file=sys.stderr)  # fmt: skip
        return 2
    write_markdown(rows, Path(args.out), f"flminillm bench reproduce --docs {args.docs} "
                   f"--out {args.out}")  # fmt: skip
    table = Table(title=f"{len(rows)} reports: written to {args.out}")
    for col in ("report", "same", "differ", "unknown", "reproduce"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["report"], str(len(r["same"])), str(len(r["differ"])),
                      str(len(r["unknown"])), r["verdict"])  # fmt: skip
    _console().print(table)
    return 0


def cmd_bench_tune(args: argparse.Namespace) -> int:
    from flminillm.bench.tune import run_tune

    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.first_seed < 0:
        print("error: --first-seed must be >= 0", file=sys.stderr)
        return 2
    console = _console()
    command = "flminillm bench tune " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else [])
    try:
        results = run_tune(
            Path(args.config), seeds=args.seeds,
            names=[m for m in args.candidates.split(",") if m] or None,
            workdir=Path(args.workdir) if args.workdir else None, out_dir=Path(args.out),
            jobs=args.jobs, console=console, command=command.strip(), resume=args.resume,
            first_seed=args.first_seed,
        )  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console.print(Path(args.out, "tune.md").read_text())
    for name, fails in results["_meta"]["failures"].items():
        for f in fails:
            console.print(f"[red]FAILED[/] {name} seed {f['seed']}: {f['error']}")
    return 1 if results["_meta"]["failures"] else 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from flminillm.bench.quality import run_quality
    from flminillm.bench.quality_report import print_tables

    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    uri = args.tracking_uri
    if uri is None:
        db = Path("runs/quality")
        db.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db.resolve()}/mlflow.db"
    elif uri.lower() == "none":
        uri = None
    console = _console()
    command = "flminillm bench quality " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else [])
    try:
        results = run_quality(
            Path(args.config), seeds=args.seeds, fault_seeds=args.fault_seeds,
            names=[m for m in args.methods.split(",") if m] or None,
            workdir=Path(args.workdir) if args.workdir else None, out_dir=Path(args.out),
            jobs=args.jobs, tracking_uri=uri, console=console, command=command.strip(),
            resume=args.resume, report_only=args.report_only,
        )  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_tables(results, console)
    for name, fails in results["_meta"]["failures"].items():
        for f in fails:
            console.print(f"[red]FAILED[/] {name} seed {f['seed']}: {f['error']}")
    ratio = results["_meta"].get("server_vs_pooled")
    if ratio is not None:
        console.print(f"FL-MiniLLM server / pooled server, EM on all families: {ratio:.1%}")
    console.print(f"wrote {args.out}/results.md, results.json, results.png; MLflow: {uri}")
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    import json

    from flminillm.bench.gpu import markdown, run_gpu_bench

    result = run_gpu_bench(
        args.device, tiny=args.tiny, peak_tflops=args.peak_tflops, with_trl=not args.no_trl,
        with_deepspeed=not args.no_deepspeed,
    )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print("\n".join(markdown(result)))
    print(f"wrote {out}")
    return 0


def cmd_bench_central(args: argparse.Namespace) -> int:
    from flminillm.bench.central import run_central

    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    console = _console()
    try:
        run_central(
            Path(args.config), families=[f for f in args.families.split(",") if f] or None,
            student=args.student or None, seeds=args.seeds,
            methods=[m for m in args.methods.split(",") if m] or None, steps=args.steps,
            warm_steps=args.warm_steps, out_dir=Path(args.out),
            workdir=Path(args.workdir) if args.workdir else None, resume=args.resume,
            console=console, command="flminillm bench central " + " ".join(sys.argv[3:]),
        )  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    console.print(Path(args.out, "central.md").read_text())
    return 0


def cmd_bench_perf(args: argparse.Namespace) -> int:
    from flminillm.bench.perf import run_perf

    run_perf(
        Path(args.output),
        Path(args.plot),
        Path(args.config),
        quick=args.quick,
        deepspeed=not args.no_deepspeed,
        rounds=not args.no_rounds,
        trl=not args.no_trl,
        console=_console(),
    )
    return 0


# quiet third-party progress bars and advice in step logs (the tasks inherit these); our own
# progress is shown instead. Set by the command line, not by importing the library.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def main(argv: list[str] | None = None) -> int:
    import os

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not getattr(args, "verbose", False):  # also when mlflow was imported before
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the errors a user can act on get one line, not a traceback
        message = user_error(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def user_error(err: Exception) -> str | None:
    """One line for an error a user can fix (an unknown run id, an unreachable tracking
    server or store), or None for a bug (then the traceback is what helps)."""
    from flminillm.store import StoreError

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, StoreError | FileNotFoundError):
        return text
    if type(err).__name__ == "MlflowException":
        if "not found" in text.lower() or "RESOURCE_DOES_NOT_EXIST" in str(err):
            return f"{text}. Check the run id (`mlflow ui` lists the runs of a tracking store)"
        return f"the tracking server answered: {text}"
    if isinstance(err, ConnectionError | OSError) or "Connection" in type(err).__name__:
        return f"cannot reach it: {text}"
    return None


if __name__ == "__main__":
    sys.exit(main())
