"""The results table: every party's scores before and after the federation."""

from __future__ import annotations

from statistics import mean

from flminillm.config import ExperimentConfig

METRICS = ("exact_match", "rouge_l")


def _scores(fams: dict[str, dict]) -> dict[str, dict[str, float]]:
    return {f: {k: float(m[k]) for k in METRICS} for f, m in fams.items()}


def results_table(cfg: ExperimentConfig, before: dict, after: dict) -> dict:
    """`{"parties": {party: {"held": [...], "before": {fam: {...}}, "after": {...}}}}`."""
    held = after.get("families_by_client", {})
    parties = {}
    for p in cfg.parties:
        parties[p.id] = {
            "held": list(held.get(p.id, [])),
            "before": _scores(before["eval"][p.id]),
            "after": _scores(after["eval"][p.id]),
        }
    return {
        "federation": after.get("federation"),
        "rounds": after.get("round"),
        "round_manifest": after.get("manifest"),
        "parties": parties,
    }


def group_means(scores: dict[str, dict[str, float]], families: list[str]) -> dict[str, float]:
    if not families:
        return {}
    return {k: mean(scores[f][k] for f in families) for k in METRICS}


def party_summary(manifest: dict) -> dict[str, dict[str, float]]:
    """Mean scores over held, unseen and all families for each party in `manifest`."""
    out = {}
    for party, fams in manifest.get("eval", {}).items():
        scores = _scores(fams)
        held = manifest.get("families_by_client", {}).get(party, [])
        groups = {
            "all": list(scores),
            "held": [f for f in scores if f in held],
            "unseen": [f for f in scores if f not in held],
        }
        out[party] = {
            f"{g}.{k}": v for g, fs in groups.items() for k, v in group_means(scores, fs).items()
        }
    return out


def render_table(results: dict):
    """A rich Table: per party and family, EM and Rouge-L before -> after."""
    from rich.table import Table

    table = Table(title=f"FL-MiniLLM results ({results.get('rounds')} rounds)")
    for col in (
        "party",
        "family",
        "held",
        "EM before",
        "EM after",
        "Rouge-L before",
        "Rouge-L after",
    ):
        table.add_column(col, justify="right" if "EM" in col or "Rouge" in col else "left")
    for party, r in results["parties"].items():
        for i, fam in enumerate(r["after"]):
            b, a = r["before"][fam], r["after"][fam]

            def fmt(x: float, y: float) -> str:
                style = "green" if y > x else ("red" if y < x else "")
                return f"[{style}]{y:.3f}[/]" if style else f"{y:.3f}"

            table.add_row(
                party if i == 0 else "",
                fam,
                "yes" if fam in r["held"] else "no",
                f"{b['exact_match']:.3f}",
                fmt(b["exact_match"], a["exact_match"]),
                f"{b['rouge_l']:.3f}",
                fmt(b["rouge_l"], a["rouge_l"]),
            )
        table.add_section()
    return table
