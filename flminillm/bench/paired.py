"""`flminillm bench paired`: two variants of a `bench quality` workdir compared seed by seed
on the same evaluation examples, with the standard error of the difference.

A seed's difference in EM between two runs (a fault and its clean run) is measured on a
sample of evaluation prompts (`data.n_eval_per_family` per family): part of it is which
prompts were drawn. The paired standard error, sqrt(var(a_i - b_i) / n) over the n
examples' 0/1 exact matches, says how large that part is; a per-seed bar smaller than it
cannot separate the runs. Reads the final round's server of each run from the workdir's
store (the models and evaluation sets by digest) and answers the prompts again, greedily,
as the evaluate step does; runs nothing else.
"""

from __future__ import annotations

import math
from pathlib import Path

from flminillm.config import Config, load_config


def final_state(base: Config, variant: str, seed: int, workdir: Path) -> tuple[Config, dict]:
    """(the run's config, its last round's manifest) of (variant, seed) in workdir."""
    from flminillm.bench.variants import variant_config, variants

    (v,) = variants(base, [variant])
    cfg = variant_config(base, v, seed, workdir)
    return cfg, final_manifest(
        cfg, f"{variant} seed {seed}: no finished run in {workdir} (run `flminillm bench "
        f"quality --workdir {workdir} --methods {variant}` with this config first)",
    )  # fmt: skip


def final_manifest(cfg: Config, missing: str) -> dict:
    """The last round's manifest of the run `cfg` names, from its store (ValueError
    `missing` where that run did not finish)."""
    from flminillm.artifacts import open_store_for

    store = open_store_for(cfg)
    recs = store.list_records(f"{cfg.federation_id()}/round-{cfg.rounds:04d}/evaluate.all.json")
    if not recs:
        raise ValueError(missing)
    return store.get_json(recs[0]["outputs"]["round_manifest"]["digest"])


def server_correct(cfg: Config, state: dict, families: list[str]) -> list[float]:
    """The final server's greedy exact match (0/1, as the evaluate step counts it:
    `example_match`) on every evaluation example of `families`, in the manifest's order."""
    from flminillm.artifacts import PUBLIC, load_examples, load_model, open_store_for
    from flminillm.devices import autocast
    from flminillm.evaluation import example_match, predict
    from flminillm.steps import _party_tokenizer

    store = open_store_for(cfg)
    exs = [
        (f, ex) for f in families for ex in load_examples(store, PUBLIC, state["data"]["eval"][f])
    ]
    server = cfg.server.id
    model = load_model(store, server, state["models"][server], cfg.engine)
    tok, style = _party_tokenizer(cfg, store, state, server)
    with autocast(cfg.engine, next(model.parameters()).device):  # as the evaluate step
        preds = predict(
            model, tok, [ex.prompt for _, ex in exs], batch_size=cfg.generation.batch_size,
            max_new_tokens=cfg.generation.eval_max_new_tokens, style=style,
        )  # fmt: skip
    return [example_match(f, ex, p) for p, (f, ex) in zip(preds, exs, strict=True)]


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """EM of a and b, their difference (points) and its paired standard error over the
    examples, and how many examples only one of them gets right."""
    n = len(a)
    if n != len(b) or n < 2:
        raise ValueError(f"paired comparison needs the same >= 2 examples, got {n} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    return {"n": n, "em_a": 100 * sum(a) / n, "em_b": 100 * sum(b) / n, "diff": 100 * mean,
            "se": 100 * se, "discordant": sum(1 for x in d if x)}  # fmt: skip


def run_paired(
    config: Path, workdir: Path, a: str, b: str, seeds: int, families: str = "honest"
) -> list[dict]:
    """Per seed, `a` against `b` on the server: `families` "honest" (every client's but
    those either variant keeps out, `kept_out`, as `bench quality` reads them; where neither
    keeps one out, every client's but the last, the benchmark's adversary) or "all"."""
    from flminillm.bench.variants import honest_clients

    base = load_config(config)
    fbc = base.families_by_client()
    clients = base.clients if families == "all" else honest_clients(base, [a, b])
    fams = [f for c in clients for f in fbc[c.id]]
    rows = []
    for seed in range(seeds):
        ca, sa = final_state(base, a, seed, workdir)
        cb, sb = final_state(base, b, seed, workdir)
        if sa["data"]["eval"] != sb["data"]["eval"]:
            raise ValueError(f"seed {seed}: {a} and {b} were evaluated on different sets")
        row = paired_difference(server_correct(ca, sa, fams), server_correct(cb, sb, fams))
        rows.append({"seed": seed, **row})
    return rows
