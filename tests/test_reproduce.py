"""`flminillm bench reproduce`: which reports in docs/ their own command reproduces here
(the report's recorded config and its config file give the same experiments), and which
only at their commit. Real configs, real variants and candidates, real digests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flminillm.bench.reproduce import audit, check_report, config_at, newest_commit
from flminillm.cli import main
from flminillm.config import LATE_OPTIONS, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "benchmark-tiny.yaml"


def _report(folder: Path, cfg: Path, recorded: dict, methods=("fl-minillm", "clean-undefended"),
            name: str = "results.json", code=("0000000",)) -> Path:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    body = {m: {"kind": "distill", "seeds": 1} for m in methods}
    body["_meta"] = {"config": str(cfg), "config_json": recorded, "seeds": [0], "code": list(code)}
    out.write_text(json.dumps(body))
    return out


def _tiny(tmp_path: Path) -> tuple[Path, dict]:
    cfg = tmp_path / "bench.yaml"
    shutil.copy(TINY, cfg)
    return cfg, json.loads(load_config(cfg).to_json())


def test_a_report_whose_config_file_gives_its_experiments_reproduces_here(tmp_path):
    cfg, recorded = _tiny(tmp_path)
    r = check_report(_report(tmp_path / "docs" / "a", cfg, recorded))
    assert r["same"] == ["fl-minillm", "clean-undefended"]
    assert r["differ"] == [] and r["unknown"] == [] and r["error"] is None
    assert audit(tmp_path / "docs")[0]["verdict"] == "here"


def test_a_report_measured_before_a_default_changed_reproduces_only_at_its_commit(tmp_path):
    cfg, recorded = _tiny(tmp_path)
    for k in LATE_OPTIONS["distill"]:  # a record from before every late option: old values
        recorded["distill"].pop(k, None)
    r = check_report(_report(tmp_path / "docs" / "old", cfg, recorded))
    # the defended method now runs today's defaults; the undefended one pins the old values
    assert "fl-minillm" in r["differ"]
    assert any(f.startswith("distill.contest_bar=") for f in r["fields"])
    [row] = audit(tmp_path / "docs")
    assert row["verdict"].startswith("at its commit only")


def test_renamed_methods_and_removed_options_are_reported_not_guessed(tmp_path):
    cfg, recorded = _tiny(tmp_path)
    r = check_report(_report(tmp_path / "docs" / "gone", cfg, recorded,
                             methods=("fl-minillm", "a-method-renamed-since")))  # fmt: skip
    assert r["same"] == ["fl-minillm"] and r["unknown"] == ["a-method-renamed-since"]
    recorded["distill"]["certainty_quantile"] = 0.01  # an option removed since
    r = check_report(_report(tmp_path / "docs" / "removed", cfg, recorded))
    assert "certainty_quantile" in r["error"] and r["same"] == r["differ"] == []


def test_tune_reports_compare_candidates_on_the_validation_split(tmp_path):
    from flminillm.bench.tune import on_validation

    cfg, _ = _tiny(tmp_path)
    recorded = json.loads(on_validation(load_config(cfg)).to_json())
    path = _report(tmp_path / "docs" / "t", cfg, recorded, name="tune.json",
                   methods=("contest-bar-default", "contest-bar-0.025"))  # fmt: skip
    assert check_report(path)["same"] == ["contest-bar-default", "contest-bar-0.025"]
    # recorded on the evaluation split: every candidate's experiment differs
    recorded = json.loads(load_config(cfg).to_json())
    path = _report(tmp_path / "docs" / "t2", cfg, recorded, name="tune.json",
                   methods=("contest-bar-default",))  # fmt: skip
    r = check_report(path)
    assert r["differ"] == ["contest-bar-default"]
    assert any(f.startswith("data.evaluate_on=") for f in r["fields"])


def test_json_files_that_are_not_reports_are_skipped(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "y.json").write_text("not json")
    assert check_report(tmp_path / "x.json") is None and check_report(tmp_path / "y.json") is None


def test_the_commit_to_reproduce_at_is_the_newest_recorded_and_its_config_name_there():
    import subprocess

    log = subprocess.run(["git", "-C", str(REPO), "log", "--format=%h", "-2"],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert newest_commit([log[1], log[0], "unrecorded"], REPO) == log[0]
    assert newest_commit(["not-a-commit"], REPO) is None
    assert config_at(log[0], "configs/benchmark.yaml", REPO) == "configs/benchmark.yaml"
    # before stop 44 (7e45c70) the temperature-1 configs were configs/benchmark*.yaml
    first = subprocess.run(["git", "-C", str(REPO), "rev-list", "--max-parents=0", "HEAD"],
                           capture_output=True, text=True, check=True).stdout.split()[0]  # fmt: skip
    assert config_at(first, "configs/benchmark-temperature-1.yaml", REPO) is None


def test_the_command_writes_the_table(tmp_path, capsys):
    cfg, recorded = _tiny(tmp_path)
    _report(tmp_path / "docs" / "a", cfg, recorded)
    out = tmp_path / "reproducing.md"
    assert main(["bench", "reproduce", "--docs", str(tmp_path / "docs"), "--out", str(out)]) == 0
    text = out.read_text()
    assert f"| {tmp_path / 'docs' / 'a'} | 0000000 | 2 | 0 | 0 |  | here |" in text
    assert main(["bench", "reproduce", "--docs", str(tmp_path / "empty"), "--out",
                 str(out)]) == 2  # fmt: skip
    assert "no reports" in capsys.readouterr().err


def test_docs_reproducing_md_is_what_the_command_writes_now(tmp_path, monkeypatch):
    """The committed table is current: a new report, or a default changed since, shows up
    here until `flminillm bench reproduce` is run again."""
    from flminillm.bench.reproduce import write_markdown

    monkeypatch.chdir(REPO)
    out = tmp_path / "reproducing.md"
    write_markdown(audit(Path("docs")), out, "flminillm bench reproduce --docs docs --out "
                   "docs/reproducing.md")  # fmt: skip
    assert out.read_text() == (REPO / "docs" / "reproducing.md").read_text(), (
        "docs/reproducing.md is stale: run `flminillm bench reproduce`"
    )
