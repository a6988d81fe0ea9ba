"""The summaries and the report of `flminillm bench quality`: scores per run and per
variant (mean and std over seeds), tables, plot, markdown, MLflow."""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flminillm.bench.variants import DEFENCE_SUFFIXES
from flminillm.tracking import log_chunked

if TYPE_CHECKING:
    from collections.abc import Iterable

    from flminillm.bench.variants import Variant


# --------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------
def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def party_scores(ev: dict, fams: list[str], held: list[str]) -> dict[str, float | None]:
    unseen = [f for f in fams if f not in held]
    out: dict[str, float | None] = {}
    pairs = [("em", "exact_match"), ("rouge_l", "rouge_l")]
    if all("sampled_rouge_l" in ev[f] for f in fams):  # generation.eval_samples > 0
        pairs += [("sampled_em", "sampled_exact_match"), ("sampled_rouge_l", "sampled_rouge_l")]
    for metric, key in pairs:
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
    # one seed has no spread: std None (printed without ±), not a claimed 0
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None}


def honest_families(families_by_client: dict[str, list[str]], kept: Iterable[str]) -> list[str]:
    """The families held by a client not in `kept` (the adversaries or absent clients of a
    variant, `kept_out`), sorted: what a report reads as the honest clients' families."""
    kept = set(kept)
    return sorted({f for c, fs in families_by_client.items() if c not in kept for f in fs})


def attack_scores(runs: list[dict], v: Variant) -> dict[str, Any]:
    """For a variant with adversaries or absent clients (`kept_out`): who they are, the
    server's EM on the honest clients' families (those held by a client not kept out) and,
    for a backdoor, the server's rate of answering its family with the backdoor's answer
    (last round)."""
    from flminillm.bench.variants import kept_out

    adv = kept_out(v)
    if not adv:
        return {}
    out: dict[str, Any] = {"adversaries": adv}
    honest, rates = [], []
    for r in runs:
        ev = r["rounds"][max(r["rounds"], key=int)]["eval"][r["server"]]
        fams = honest_families(r["families_by_client"], adv)
        honest.append(_mean([ev[f]["exact_match"] for f in fams]))
        rates += [ev[f]["target_rate"] for f in ev if "target_rate" in ev[f]]
    out["server_em_honest"] = _stat(honest)
    if rates:
        out["server_target_rate"] = _stat(rates)
    return out


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
    # per seed, so that two methods are compared on the seeds both have (`paired`); the
    # server's em_all is the mean of these (party_scores)
    out["server_families_em_by_seed"] = {
        str(r["seed"]): s["families"] for r, s in zip(runs, scores, strict=True)
    }
    rounds = sorted({int(k) for r in runs for k in r["rounds"]})
    # every run's scores after each round it has, computed once for the curve's series
    by_round = [[run_scores(r, str(k)) for r in runs if str(k) in r["rounds"]] for k in rounds]
    out["curve"] = {"rounds": rounds} | {
        f"{who}_{key}": [_stat([x[who][key] for x in xs])["mean"] for xs in by_round]
        for who, key in (("server", "em_all"), ("clients", "em_all"), ("clients", "em_unseen"))
    }
    out.update(attack_scores(runs, v))
    out["seconds"] = _stat([r["seconds"] for r in runs])["mean"]
    kls = [r["kl_pooled"] for r in runs if r.get("kl_pooled")]
    if kls:  # flminillm.bench.divergence: per answer token, nats
        out["kl_pooled"] = {
            f"{d}_{how}": _stat([k[d][how] for k in kls if how in k[d]])
            for d in ("reverse", "forward") for how in ("greedy", "sampled")
        }  # fmt: skip
        out["kl_pooled"]["seeds"] = [r["seed"] for r in runs if r.get("kl_pooled")]
    out["dropped_per_round"] = _stat(
        [_mean([len(x["dropped"]) for k, x in r["rounds"].items() if k != "0"]) for r in runs]
    )["mean"]
    return out


def _pm(s: dict | None, scale: float = 100.0) -> str:
    if not s or s.get("mean") is None:
        return "–"
    m = s["mean"] * scale
    if s.get("std") is None:
        return f"{m:.1f}"
    return f"{m:.1f} ± {s['std'] * scale:.1f}"


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
        if r["group"] == "method" or n in ("adversary", "adversary-undefended"):
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


def paired(results: dict, a: str, b: str, families: list[str] | None = None) -> tuple:
    """(a's mean, b's mean, the seeds) of the server's EM (on all families, or the mean
    over `families`) over the seeds both a and b have: means over different seeds would
    compare seeds as much as methods. (None, None, []) when they share none; the plain
    means, seeds None, for results written before per-seed scores."""
    key = "server_families_em_by_seed"
    ra, rb = results.get(a) or {}, results.get(b) or {}
    if key not in ra or key not in rb:
        return _server_em(results, a, families), _server_em(results, b, families), None

    def score(r: dict, seed: str) -> float | None:
        x = r[key][seed]
        return _mean([x[f] for f in (families or sorted(x)) if x.get(f) is not None])

    seeds = sorted(set(ra[key]) & set(rb[key]), key=int)
    xa, xb = {k: score(ra, k) for k in seeds}, {k: score(rb, k) for k in seeds}
    seeds = [k for k in seeds if xa[k] is not None and xb[k] is not None]
    if not seeds:
        return None, None, []
    return _mean([xa[k] for k in seeds]), _mean([xb[k] for k in seeds]), [int(k) for k in seeds]


def _all_seeds(results: dict, name: str, seeds: list[int] | None) -> bool:
    """Whether a comparison on `seeds` (None: written before per-seed scores, all of them)
    uses every seed of `name`."""
    return seeds is None or len(results[name].get("seeds", [])) == len(seeds)


def _on(seeds: list[int] | None, results: dict, *names: str) -> str:
    """ " on seeds [..]" where the comparison leaves out some of either's seeds."""
    if all(_all_seeds(results, n, seeds) for n in names):
        return ""
    return f" on seeds {seeds}, those both have"


def _spread(results: dict, name: str, seeds: list[int] | None) -> str:
    """ " ± std" of name's server EM (all families) where the comparison uses all of its
    seeds (the std over fewer seeds is not stored)."""
    std = results[name]["server"]["em_all"].get("std")
    if std is None or not _all_seeds(results, name, seeds):
        return ""
    return f" ± {100 * std:.1f}"


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
    if _server_em(results, "fl-minillm") is None:
        return out
    out.append("## Headline")
    out.append("")
    for other in ("pooled", "forward-kl", "local-only", "fedavg"):
        ours, theirs, seeds = paired(results, "fl-minillm", other)
        if ours is None or theirs is None:
            continue
        out.append(
            f"- server EM (all families){_on(seeds, results, 'fl-minillm', other)}: "
            f"fl-minillm {100 * ours:.1f}{_spread(results, 'fl-minillm', seeds)} vs {other} "
            f"{100 * theirs:.1f}{_spread(results, other, seeds)} "
            f"({100 * (ours - theirs):+.1f} points"
            + (
                f"; {100 * ours / theirs:.1f}% of it, target >= 90%)"
                if other == "pooled" and theirs
                else ")"
            )
        )
    fbc = meta.get("families_by_client", {})
    for name, r in results.items():
        # attacks (with the honest clients' families), drop-out and the defence's price
        plain = name in {f"clean{s}" for s in DEFENCE_SUFFIXES} or name.startswith("dropout")
        if name.startswith("_") or ("server_em_honest" not in r and not plain):
            continue
        # a fault under another defence (undefended, without the invariance check) against the
        # clean run under that defence, where there is one
        clean = next(
            (f"clean{s}" for s in DEFENCE_SUFFIXES
             if name.endswith(s) and name != f"clean{s}" and f"clean{s}" in results),
            "fl-minillm",
        )  # fmt: skip
        a, ca, seeds = paired(results, name, clean)
        if a is None or ca is None:
            continue
        on = _on(seeds, results, name, clean)
        if "server_em_honest" not in r:
            out.append(f"- {name}: server EM {100 * a:.1f} on all families "
                       f"({100 * (a - ca):+.1f} vs {clean}{on})")  # fmt: skip
            continue
        honest = honest_families(fbc, r["adversaries"])
        h, ch, _ = paired(results, name, clean, honest)
        who = ", ".join(f"{p}: {m}" for p, m in r["adversaries"].items())
        line = (
            f"- {name} ({who}): server EM {100 * a:.1f} on all families ({100 * (a - ca):+.1f} "
            f"vs {clean}{on}), {100 * h:.1f} on the honest clients' families "
            f"({100 * (h - ch):+.1f} vs {clean}'s {100 * ch:.1f})"
        )
        if "server_target_rate" in r:
            line += f"; backdoor success {100 * r['server_target_rate']['mean']:.1f}%"
        out.append(line)
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
        f"(the runs' own time, resumed ones included: {meta.get('run_seconds', meta['seconds']) / 60:.1f} min) "
        f"({meta['jobs']} worker processes, {meta['torch_threads_per_job']} torch thread(s) each). "
        f"Config: `{meta['config']}`; seeds {meta['seeds']} (faults: {meta['fault_seeds']}); "
        f"code: {', '.join(meta.get('code') or ['unrecorded'])}. "
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
            f"{100 * meta['server_vs_pooled']:.1f}%** (target: >= 90%).",
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
    lines += sampled_section(results, names)
    lines += kl_section(results, names)
    fams = list(next(iter(results[n] for n in names))["server_families_em"])
    lines += ["## Server EM per family (%)", "",
              "| method | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]  # fmt: skip
    for n in names:
        f = results[n]["server_families_em"]
        lines.append(f"| {n} | " + " | ".join(f"{100 * (f[x] or 0):.1f}" for x in fams) + " |")
    lines += ["", f"![results]({png})", ""]
    atomic_write_bytes(path, "\n".join(lines).encode())


def sampled_section(results: dict, names: list[str]) -> list[str]:
    """Scores of temperature-1 samples (generation.eval_samples > 0, as MiniLLM evaluates:
    the mean over the samples), or nothing where the runs have none."""
    have = [n for n in names if (results[n]["server"].get("sampled_rouge_l_all") or {}).get("mean")
            is not None]  # fmt: skip
    if not have:
        return []
    lines = [
        "## Sampled answers (temperature 1)",
        "",
        "The last round's evaluation also scores temperature-1 samples (generation.eval_samples "
        "per prompt; the mean over them): EM is validity on long-form families.",
        "",
        "| method | server EM all | server Rouge-L all | clients EM held | clients EM unseen "
        "| clients Rouge-L held | clients Rouge-L unseen | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for n in have:
        s, c = results[n]["server"], results[n]["clients"]
        cells = [_pm(s["sampled_em_all"]), _pm(s["sampled_rouge_l_all"]), _pm(c["sampled_em_held"]),
                 _pm(c["sampled_em_unseen"]), _pm(c["sampled_rouge_l_held"]),
                 _pm(c["sampled_rouge_l_unseen"])]  # fmt: skip
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {len(results[n]['seeds'])} |")
    return [*lines, ""]


def _kl(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s.get("std") is not None else "")


def kl_section(results: dict, names: list[str]) -> list[str]:
    """The table of each method's server's distance to the pooled server of its seed
    (flminillm.bench.divergence), or nothing where no run has one."""
    have = [n for n in names if results[n].get("kl_pooled")]
    if not have:
        return []
    lines = [
        "## Distance to the pooled server",
        "",
        "KL between the server's and the pooled server's next-token distributions on the "
        "evaluation prompts, per answer token (nats; lower is closer; exact over the "
        "vocabulary at every position): reverse KL(server ‖ pooled) along the server's own "
        "answers, forward KL(pooled ‖ server) along the pooled server's; greedy answers, and "
        "the mean over temperature-1 samples (flminillm/bench/divergence.py).",
        "",
        "| method | reverse, sampled | reverse, greedy | forward, sampled | forward, greedy | seeds |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for n in have:
        k = results[n]["kl_pooled"]
        cells = [_kl(k[c]) for c in
                 ("reverse_sampled", "reverse_greedy", "forward_sampled", "forward_greedy")]  # fmt: skip
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {len(k['seeds'])} |")
    return [*lines, ""]


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
            log_chunked(client, cid, metrics, params)
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
