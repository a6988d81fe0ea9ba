"""`flminillm bench reproduce`: can a report in docs/ be reproduced by its own command at
this checkout, or only at the commit that measured it?

Every report records its command, its config file's name, the code commits of its runs
and the config its runs were given (`_meta.config_json`). A run's experiment (what its
federation id hashes) comes from that config and the method's variant: this module builds
it both ways, from the recorded config and from the config file the command names as it
reads now, for every method of the report, and compares the digests. Equal: the command
runs the report's experiments here (the results can still differ where the code changed
what an option does; the commits say which code ran). Different: defaults or the config
file changed since (the fields that differ are listed), and the report reproduces at its
own commit, with the config named there. Writes docs/reproducing.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flminillm.bench.quality import git_output
from flminillm.config import Config, load_config, restore_late_options
from flminillm.store import atomic_write_text

_WORKDIR = Path("/nonexistent-workdir")  # the store is not hashed: any path compares alike


def _experiment_fields(a: Config, b: Config) -> list[str]:
    """'section.field=old->new' for every experiment field where a and b differ."""
    ea, eb = json.loads(a.experiment_json()), json.loads(b.experiment_json())
    out = []
    for sec in sorted(set(ea) | set(eb)):
        x, y = ea.get(sec), eb.get(sec)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            out += [
                f"{sec}.{k}={x.get(k)!r}->{y.get(k)!r}"
                for k in sorted(set(x) | set(y))
                if x.get(k) != y.get(k)
            ]
        else:
            out.append(sec)
    return out


def _methods(kind: str, base: Config, names: list[str]):
    """The report's methods as variants of `base` as the code reads them now; unknown
    names (methods renamed or removed since) are returned apart."""
    if kind == "tune":
        from flminillm.bench.tune import candidates as make
    else:
        from flminillm.bench.variants import variants as make
    known = {v.name: v for v in make(base)}
    return [known[n] for n in names if n in known], [n for n in names if n not in known]


def newest_commit(codes: list[str], repo: Path = Path(".")) -> str | None:
    """The newest of the commits a report's runs recorded (later runs of a resumed report
    ran there); None without any that this checkout knows."""
    dated = []
    for c in codes:
        t = git_output(repo, "log", "-1", "--format=%ct", c, "--") if c.isalnum() else None
        if t:
            dated.append((int(t), c))
    return max(dated)[1] if dated else None


def config_at(commit: str, path: str, repo: Path = Path(".")) -> str | None:
    """The name `path` had at `commit`: itself where it exists there, else the name
    before stop 44's `-temperature-1` copies (those configs pin what benchmark*.yaml was
    before the teachers' temperature moved to 0.7); None where neither exists there."""
    for name in (path, path.replace("-temperature-1.yaml", ".yaml")):
        if git_output(repo, "cat-file", "-e", f"{commit}:{name}") is not None:
            return name
    return None


def check_report(path: Path) -> dict[str, Any] | None:
    """One report (results.json or tune.json): {"report", "file", "kind", "config", "code",
    "same", "differ", "unknown", "fields", "error"}; None for a JSON file that is not a
    report (no `_meta.config_json`)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    meta = d.get("_meta") if isinstance(d, dict) else None
    if not isinstance(meta, dict) or "config_json" not in meta:
        return None
    kind = "tune" if path.name == "tune.json" else "quality"
    code = meta.get("code") or []
    out: dict[str, Any] = {
        "report": str(path.parent), "file": str(path), "kind": kind, "config": meta.get("config"),
        "code": [code] if isinstance(code, str) else list(code), "same": [], "differ": [],
        "unknown": [], "fields": [], "error": None,
    }  # fmt: skip
    recorded = meta["config_json"]
    recorded = json.loads(recorded) if isinstance(recorded, str) else recorded
    try:
        old = Config.model_validate(restore_late_options(recorded))
    except ValueError as err:  # an option removed since: only its commit reads it
        out["error"] = f"its config does not validate here ({str(err).splitlines()[1:2]})"
        return out
    try:
        new = load_config(out["config"])
    except (OSError, ValueError) as err:
        out["error"] = f"{out['config']} does not load here ({type(err).__name__})"
        return out
    if kind == "tune":
        from flminillm.bench.tune import on_validation

        new = on_validation(new)
    old = old.model_copy(update={"name": new.name})
    names = [k for k, v in d.items() if not k.startswith("_") and isinstance(v, dict)]
    vs, out["unknown"] = _methods(kind, new, names)
    from flminillm.bench.variants import variant_config

    seed = int((meta.get("seeds") or [0])[0])
    for v in vs:
        try:
            a = variant_config(old, v, seed, _WORKDIR).digest()
            b = variant_config(new, v, seed, _WORKDIR).digest()
        except ValueError:  # a method whose settings today's rules refuse with one base
            out["unknown"].append(v.name)
            continue
        out["same" if a == b else "differ"].append(v.name)
    out["fields"] = _experiment_fields(old, new)
    return out


def verdict(r: dict[str, Any], repo: Path = Path(".")) -> str:
    """How to reproduce the report, in a sentence."""
    if not (r["error"] or r["unknown"] or r["differ"]):
        return "here"
    last = newest_commit(r["code"], repo)
    if last is None:
        return (f"at its commit only, which it does not record (older than the record): "
                f"`git log --follow -- {r['file']}`")  # fmt: skip
    named = config_at(last, r["config"], repo) if r["config"] else None
    return (f"at its commit only: `git worktree add ../at-{last} {last}`, then its command"
            + (f" with `{named}`" if named else ""))  # fmt: skip


def audit(docs: Path, repo: Path = Path(".")) -> list[dict[str, Any]]:
    """Every report under `docs`, checked, in path order, each with its `verdict`."""
    rows = []
    for f in sorted(docs.rglob("*.json")):
        r = check_report(f)
        if r is not None:
            rows.append({**r, "verdict": verdict(r, repo)})
    return rows


def write_markdown(rows: list[dict[str, Any]], path: Path, command: str) -> None:
    lines = [
        "# Reproducing the reports in docs/",
        "",
        f"Produced by `{command}`. For each report: its methods' experiments built from "
        "the config its runs were given (recorded in its JSON) and from the config file its "
        "command names, as this checkout reads it (today's defaults fill what the file does "
        "not set), compared by digest (what a run's federation id hashes). *same*: the "
        "command runs the report's experiments here (the code that ran them is in *code*; "
        "where later code changed what an option does, the numbers can still move). "
        "*differ*: defaults or the file changed since; the base config's fields that differ are listed, "
        "and the report reproduces at its own commit, with the config as it was named "
        "there (before stop 44 the `-temperature-1` configs were `configs/benchmark*.yaml`). "
        "*unknown*: methods renamed or removed since, or whose settings the config checks "
        "of this checkout refuse.",
        "",
        "| report | code | same | differ | unknown | base fields that differ | reproduce |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shown = r["fields"] if r["differ"] or r["unknown"] else []
        fields = ", ".join(f"`{f}`" for f in shown[:4])
        if len(shown) > 4:
            fields += f" and {len(shown) - 4} more"
        if r["error"]:
            fields = r["error"]
        lines.append(
            f"| {r['report']} | {', '.join(r['code']) or 'not recorded'} | {len(r['same'])} | "
            f"{len(r['differ'])} | {len(r['unknown'])} | {fields} | {r['verdict']} |"
        )
    atomic_write_text(path, "\n".join(lines) + "\n")
