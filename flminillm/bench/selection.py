"""`flminillm bench selection`: whose answers the server kept, per round and per family, in
one run of a `bench quality` workdir.

The distill step records which teacher's answer it kept for every teacher-share prompt
(`ask_choice`, the server's replay buffer keeps it with the round's rollouts); the server
cannot tell a prompt's family, the benchmark can (`flminillm.data.family_of_prompt`). Per
round and family: how many prompts each teacher won and how many kept no fresh answer
(`-`: below `min_claim`, left to an absent teacher's replayed answers, or ruled out by the
invariance check). Where a family's prompts go to a client that does not hold it, rank
selection has handed them to a teacher sure of a neighbouring family (docs/results.md).
Reads the store only; runs nothing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from flminillm.bench.paired import final_state
from flminillm.config import load_config


def kept_by_family(config: Path, workdir: Path, variant: str, seed: int) -> dict:
    """{"families": [...], "holders": {family: client}, "rounds": {round: {family:
    {client or "-": prompts}}}} of (variant, seed) in workdir."""
    from flminillm.artifacts import open_store_for
    from flminillm.data import family_of_prompt
    from flminillm.steps import _party_tokenizer

    base = load_config(config)
    cfg, state = final_state(base, variant, seed, workdir)
    store = open_store_for(cfg)
    exchange, server = store.scoped("exchange"), cfg.server.id
    tok, _ = _party_tokenizer(cfg, store, state, server)
    by_round: dict[int, dict] = {}
    for client, entries in sorted(state.get("stale", {}).items()):
        for e in entries if isinstance(entries, list) else [entries]:
            r = by_round.setdefault(int(e["round"]), {"names": {}})
            r["names"][int(e["index"])] = client
            r["choice"], r["rollouts"] = e["choice"], e["rollouts"]
    if not by_round:
        raise ValueError(
            f"{variant} seed {seed}: the run kept no record of its selections (a method "
            "without teachers' answers on the server, e.g. local-only, fedavg or pooled)"
        )
    out: dict[int, dict[str, Counter]] = {}
    for rnd, r in sorted(by_round.items()):
        rollouts = exchange.get_tensors(r["rollouts"])
        choice = store.scoped(server).get_tensors(r["choice"])["choice"].tolist()
        counts: dict[str, Counter] = {}
        for ids, mask, c in zip(rollouts["ask_prompt_ids"], rollouts["ask_prompt_mask"],
                                choice, strict=True):  # fmt: skip
            fam = family_of_prompt(tok.decode(ids[mask > 0])) or "?"
            counts.setdefault(fam, Counter())[r["names"].get(int(c), "-")] += 1
        out[rnd] = counts
    holders = {f: c for c, fs in cfg.families_by_client().items() for f in fs}
    families = [f for f in cfg.data.families if any(f in c for c in out.values())]
    return {"families": families, "holders": holders, "rounds": out}


def markdown(result: dict) -> str:
    """One row per round, one column per family (its holder in the header): the teachers
    whose answers were kept, most first, the holder's share marked."""
    fams, holders = result["families"], result["holders"]
    lines = [
        "| round | " + " | ".join(f"{f} ({holders.get(f, '?')})" for f in fams) + " |",
        "|---" * (len(fams) + 1) + "|",
    ]
    for rnd, counts in result["rounds"].items():
        cells = []
        for f in fams:
            c = counts.get(f, Counter())
            total = sum(c.values())
            own = c.get(holders.get(f), 0)
            parts = ", ".join(f"{k} {v}" for k, v in c.most_common())
            cells.append(f"{parts} ({100 * own / total:.0f}% holder)" if total else "")
        lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
