"""`flminillm bench average`: what `distill.server_average` K would have reported for runs
already in a `bench quality` (or `bench tune`) workdir, without running them again.

The option averages the server's weights over its last K rounds in the evaluate step of
the final round only; every round before, and every other party, is unchanged by it (the
seeds do not depend on the config's digest). So a run with K = 1 holds everything a run
with K > 1 would compute: this command takes its server's models of the last K rounds from
the store, averages them with the evaluate step's own function
(`flminillm.artifacts.average_models`), scores the final server again on the run's
evaluation sets (its validation sets for `--tune` runs) as the evaluate step does, and
reports the server's EM per family, seed and K. tests/test_quality.py checks that a run
with K = 2 reports what this command gives for its K = 1 twin.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from flminillm.config import Config, load_config


def _run(base: Config, name: str, seed: int, workdir: Path, tune: bool) -> tuple[Config, dict]:
    """(config, final manifest) of a finished run: a bench quality variant, or (tune) a
    bench tune candidate on the validation split."""
    from flminillm.bench.paired import final_manifest, final_state

    if not tune:
        return final_state(base, name, seed, workdir)
    from flminillm.bench.tune import candidates, on_validation
    from flminillm.bench.variants import variant_config

    vb = on_validation(base)
    (v,) = candidates(vb, [name])
    cfg = variant_config(vb, v, seed, workdir)
    return cfg, final_manifest(cfg, f"{name} seed {seed}: no finished bench tune run in {workdir}")


def averaged_server(cfg: Config, state: dict, k: int) -> str:
    """The digest of the final server averaged over its last `k` rounds, as the evaluate
    step with `distill.server_average` k computes it (saved into the run's store)."""
    from flminillm.artifacts import average_models, last_rounds_models, open_store_for

    if cfg.distill.server_average != 1:
        raise ValueError("the run already averages its server (distill.server_average != 1)")
    store = open_store_for(cfg)
    server = cfg.server.id
    prev = store.get_json(state["history"][-1]) if state.get("history") else {}
    tail = last_rounds_models(store, prev, server, state["models"][server], cfg.rounds, k)
    return average_models(store, server, [d for _, d in tail], cfg.engine)


def server_em_averaged(cfg: Config, state: dict, k: int) -> dict[str, float]:
    """The final server averaged over its last `k` rounds (`averaged_server`), its EM (%)
    per evaluated family, scored as the evaluate step scores it."""
    from flminillm.artifacts import PUBLIC, load_examples, open_store_for
    from flminillm.bench.paired import server_correct

    store = open_store_for(cfg)
    server = cfg.server.id
    digest = averaged_server(cfg, state, k)
    fams = list(state["data"]["eval"])
    ok = server_correct(cfg, {**state, "models": {**state["models"], server: digest}}, fams)
    per = {}
    i = 0
    for f in fams:
        n = len(load_examples(store, PUBLIC, state["data"]["eval"][f]))
        per[f] = 100 * sum(ok[i : i + n]) / n
        i += n
    return per


def run_average(
    config: Path, workdir: Path, names: list[str], seeds: int, ks: list[int], tune: bool = False
) -> list[dict]:
    """Rows {variant, seed, k, families: {family: EM}, all, honest} for every finished run
    of `names` (honest: the families of the clients none of `names` has as an adversary,
    `honest_clients`: the same families in every row, so rows compare)."""
    from flminillm.bench.variants import honest_clients

    base = load_config(config)
    fbc = base.families_by_client()
    honest = [f for c in honest_clients(base, names) for f in fbc[c.id]]
    rows = []
    for name in names:
        for seed in range(seeds):
            cfg, state = _run(base, name, seed, workdir, tune)
            for k in ks:
                per = server_em_averaged(cfg, state, k)
                rows.append({
                    "variant": name, "seed": seed, "k": k, "families": per,
                    "all": statistics.mean(per.values()),
                    "honest": statistics.mean(per[f] for f in honest if f in per),
                })  # fmt: skip
    return rows


def markdown(rows: list[dict], reference: str | None) -> str:
    """Per variant and K: server EM on all and on the honest families (mean ± std over
    seeds, per seed), and against `reference` at the same K and seed."""
    ref = {(r["seed"], r["k"]): r for r in rows if r["variant"] == reference}
    lines = [
        "| variant | K | server EM all (per seed) | honest families (per seed) | vs "
        f"{reference or '-'}, same K: all / honest (per seed) |",
        "|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r["variant"], r["k"]) for r in rows)

    def ms(xs: list[float]) -> str:
        sd = f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else ""
        return f"{statistics.mean(xs):.1f}{sd} ({', '.join(f'{x:.1f}' for x in xs)})"

    for v, k in keys:
        rs = [r for r in rows if r["variant"] == v and r["k"] == k]
        diff = ""
        if reference and v != reference and all((r["seed"], k) in ref for r in rs):
            da = [r["all"] - ref[(r["seed"], k)]["all"] for r in rs]
            dh = [r["honest"] - ref[(r["seed"], k)]["honest"] for r in rs]
            diff = (f"{statistics.mean(da):+.1f} ({', '.join(f'{x:+.1f}' for x in da)}) / "
                    f"{statistics.mean(dh):+.1f} ({', '.join(f'{x:+.1f}' for x in dh)})")  # fmt: skip
        lines.append(
            f"| {v} | {k} | {ms([r['all'] for r in rs])} | {ms([r['honest'] for r in rs])} "
            f"| {diff} |"
        )
    return "\n".join(lines)


def choose_k(rows: list[dict]) -> dict:
    """The K whose mean server EM on all families, over every variant (method) and seed
    given, is highest; a tie goes to the fewer rounds. {"k", "mean": {k: mean}}."""
    ks = sorted({r["k"] for r in rows})
    means = {k: statistics.mean(r["all"] for r in rows if r["k"] == k) for k in ks}
    best = max(ks, key=lambda k: (round(means[k], 9), -k))
    return {"k": best, "mean": means}
