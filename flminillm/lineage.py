"""Read a federation's lineage back from MLflow; helpers for `flminillm rerun`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from flminillm.config import Config, config_from_json


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _children(client, run) -> list:
    return client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
        max_results=5000,
    )


def _federation_run(client, run_id: str):
    from flminillm.tracking import mark_dead_runs

    run = client.get_run(run_id)
    if run.info.status == "RUNNING" and mark_dead_runs(client, run.info.experiment_id):
        run = client.get_run(run_id)  # it was killed: it says so now
    if run.data.tags.get("flminillm.kind") != "federation":
        raise ValueError(
            f"MLflow run {run_id} is not a federation run (kind="
            f"{run.data.tags.get('flminillm.kind')!r}); give the parent run's id"
        )
    return run


def lineage(uri: str, run_id: str) -> dict:
    """{run, rounds: [{run, steps: [run...]}]} of a federation run, in order."""
    client = _client(uri)
    fed = _federation_run(client, run_id)
    rounds = sorted(_children(client, fed), key=lambda r: int(r.data.params.get("round", 0)))
    return {
        "run": fed,
        "rounds": [
            {"run": r, "steps": sorted(_children(client, r), key=lambda s: s.info.start_time)}
            for r in rounds
        ],
    }


def lineage_tree(uri: str, run_id: str, show_io: bool = True, show_uris: bool = False):
    """A rich Tree: federation > round > step (status, duration, cache hit) > inputs/outputs."""
    from rich.tree import Tree

    lin = lineage(uri, run_id)
    fed = lin["run"]
    t = fed.data.tags
    status = fed.info.status
    colour = {"FINISHED": "green", "RUNNING": "yellow"}.get(status, "red")
    root = Tree(
        f"[bold]{fed.info.run_name}[/] [{colour}]{status}[/] federation {t.get('flminillm.federation')}"
        + (f" (rerun of {t['flminillm.rerun_of']})" if t.get("flminillm.rerun_of") else "")
    )
    if t.get("flminillm.error"):
        root.add(f"[red]error: {t['flminillm.error']}[/]")
    for rnd in lin["rounds"]:
        r = rnd["run"]
        dropped = json.loads(r.data.tags.get("flminillm.dropped", "{}") or "{}")
        rs = r.info.status
        label = f"{r.info.run_name} [{'green' if rs == 'FINISHED' else 'red'}]{rs}[/]"
        if dropped:
            label += f" [yellow]dropped: {', '.join(dropped)}[/]"
        node = root.add(label)
        for s in rnd["steps"]:
            st = s.data.tags
            ok = st.get("flminillm.status") == "succeeded"
            cached = st.get("flminillm.cache_hit") == "true"
            dur = s.data.metrics.get("duration_s", 0.0)
            text = (
                f"{s.info.run_name} [{'green' if ok else 'red'}]{st.get('flminillm.status')}[/] "
                f"{dur:.1f}s" + (" [cyan]cache hit[/]" if cached else "")
            )
            leaf = node.add(text)
            kept = selection_line(s.data.metrics)
            if kept:
                leaf.add(kept)
            if st.get("flminillm.error"):
                leaf.add(f"[red]{st['flminillm.error']}[/]")
            if show_io:
                uris = _uris(uri, s) if show_uris else {}
                for key in sorted(st):
                    direction, _, name = key.partition(".")
                    if direction in ("in", "out") and st[key].startswith("sha256:"):
                        arrow = "<-" if direction == "in" else "->"
                        where = f" {uris.get(key, '')}" if show_uris else ""
                        leaf.add(f"{arrow} {name} {st[key][:23]}{where}")
    return root


def selection_line(metrics: dict[str, float]) -> str:
    """A distill step's selection per teacher (flminillm.aggregate.selection_stats), e.g.
    'answers kept: alice 41%, carol 3% (certain of 100%)'; '' for other steps."""
    from flminillm.aggregate import MIN_COHERENCE

    names = sorted({k.split(".", 1)[1] for k in metrics if k.startswith(("selected.", "certain."))})
    if not names:
        return ""
    parts = []
    for n in names:
        text = f"{n} {metrics.get(f'selected.{n}', 0.0):.0%}"
        certain = metrics.get(f"certain.{n}", 0.0)
        coherent = metrics.get(f"coherent.{n}", 1.0)
        if coherent < MIN_COHERENCE:  # its claims contradict its own support: quarantined
            text += f" [red](quarantined: claims in order at {coherent:.0%})[/]"
        elif certain >= 0.5:  # claims p >= 0.99 on most of its answers: flag it
            text += f" [yellow](certain of {certain:.0%})[/]"
        if metrics.get(f"implausible.{n}", 0.0) > 0:  # distill.plausibility_margin
            gap = -metrics.get(f"plausibility.{n}", 0.0)
            text += f" [red](implausible: answers {gap:.1f} nats/token below random tokens)[/]"
        if metrics.get(f"overclaimed.{n}", 0.0) > 0:  # distill.max_claim_sum
            total = metrics.get(f"claim_sum.{n}", 0.0)
            text += f" [red](barred: its claims on one prompt sum to {total:.2f})[/]"
        if metrics.get(f"overclaimed_prompts.{n}", 0.0) > 0:  # distill.max_prompt_claim_sum
            total = metrics.get(f"prompt_claim_sum.{n}", 0.0)
            text += f" [red](barred: its claims on the round's prompts sum to {total:.1f})[/]"
        if metrics.get(f"contest_barred.{n}", 0.0) > 0:  # distill.contest_bar
            pooled = metrics.get(f"contest_pooled.{n}")  # distill.contest_bar_rounds
            since = f"; pooled over rounds: {pooled:.0%} of its wins" if pooled else ""
            text += f" [red](barred: its peers contest its answers{since})[/]"
        if metrics.get(f"dependence_barred.{n}", 0.0) > 0:  # distill.dependence_bar
            dep = metrics.get(f"dependence.{n}", 0.0)
            text += (f" [red](barred: its answers no likelier after their own prompts than "
                     f"after others ({dep:+.2f} nats/token))[/]")  # fmt: skip
        contested = metrics.get(f"contested_by.{n}", 0.0)
        if contested > 0:  # distill.contest_quantile: it found kept answers unlikely
            text += f" (contests {contested:.0%})"
        invariant = metrics.get(f"invariant.{n}", 0.0)
        if invariant > 0:  # distill.invariance_share: one answer to prompts told apart
            text += f" [red](ruled out {invariant:.0%}: one answer to many prompts)[/]"
        parts.append(text)
    rejected = metrics.get("rejected", 0.0)
    if rejected > 0:  # distill.min_claim: prompts no teacher present knew
        parts.append(f"[yellow]rejected {rejected:.0%} (below min_claim)[/]")
    ruled_out = metrics.get("invariant", 0.0)
    if ruled_out > 0:  # every answer ruled out by the invariance check
        parts.append(f"[yellow]left out {ruled_out:.0%} (every answer ruled out)[/]")
    implausible = metrics.get("implausible", 0.0)
    if implausible > 0:  # won by a teacher the student's LM barred
        parts.append(f"[yellow]left out {implausible:.0%} (a barred teacher's)[/]")
    contested = metrics.get("contested", 0.0)
    if contested > 0:  # a teacher sure of the prompt found the kept answer unlikely
        parts.append(f"[yellow]left out {contested:.0%} (contested)[/]")
    by_claim = metrics.get("by_claim", 0.0)
    if by_claim > 0:  # distill.joint_quantile: among the sure, the surer claim won
        parts.append(f"{by_claim:.0%} by claim among the sure")
    reserved = metrics.get("reserved", 0.0)
    if reserved > 0:  # left out for absent teachers (aggregate.imputed_quantile, unknown_domain)
        parts.append(f"reserved {reserved:.0%} (an absent teacher's domain)")
    return "answers kept: " + ", ".join(parts)


def _uris(uri: str, step_run) -> dict[str, str]:
    """{"in.<name>" | "out.<name>": store URI} from a step run's lineage.json artifact."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=step_run.info.run_id, artifact_path="lineage.json", dst_path=tmp,
            tracking_uri=uri,
        )  # fmt: skip
        rec = json.loads(Path(path).read_text())
    return {
        f"{short}.{name}": ref["uri"]
        for direction, short in (("inputs", "in"), ("outputs", "out"))
        for name, ref in rec.get(direction, {}).items()
        if isinstance(ref, dict)
    }


def config_of_run(uri: str, run_id: str) -> Config:
    """The experiment config a federation run used (its config.json artifact)."""
    client = _client(uri)
    _federation_run(client, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "config.json", tmp)
        return config_from_json(Path(path).read_text())
