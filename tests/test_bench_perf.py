"""`flminillm bench perf --quick` through the CLI: the report, the plot and its ratios."""

import re

from flminillm.cli import main


def test_bench_perf_quick_writes_report_and_plot(tmp_path, capsys):
    md, png = tmp_path / "performance.md", tmp_path / "performance.png"
    assert main(["bench", "perf", "--quick", "--output", str(md), "--plot", str(png)]) == 0
    text = md.read_text()
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    rows = [
        r
        for r in text.splitlines()
        if r.startswith("| generation")
        or r.startswith("| communication")
        or r.startswith("| distill step")
        or r.startswith("| memory")
    ]
    sections = {r.split("|")[1].strip() for r in rows}
    assert {"generation", "communication", "memory"} <= sections
    for row in rows:  # every figure: ours, baseline and a finite ratio (x or %)
        ratio = row.split("|")[5].strip()
        assert re.fullmatch(r"[0-9.,]+(x|%)", ratio), row
    assert "not measured in this run" in text  # quick: rounds and orchestration skipped
    assert re.search(r"Time per section: generation \d+ s", text)
    assert "ratios: ours / baseline" in capsys.readouterr().out
