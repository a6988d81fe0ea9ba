"""`flminillm bench perf`: performance figures, each a ratio against a baseline measured in
the same run (absolute numbers depend on the machine; ratios much less so): generation,
communication, the distill step (flminillm.bench.micro), round compute and orchestration
(flminillm.bench.rounds), TRL's DistillationTrainer (flminillm.bench.trl_compare). Every
measurement uses models built from config (random weights: speed and sizes do not depend
on what the model learned). Results go to a rich table, docs/performance.md and
docs/performance.png.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

from flminillm.bench.harness import Figure, Report, has_module, restore_threads, torch_threads_state
from flminillm.bench.micro import bench_communication, bench_distill, bench_generation
from flminillm.bench.rounds import (
    bench_model_size,
    bench_orchestration,
    bench_pipeline_rounds,
    bench_round,
)


def _fmt(v: float, unit: str) -> str:
    if unit == "bytes":
        for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if v >= s:
                return f"{v / s:.2f} {u}"
        return f"{v:.0f} B"
    return f"{v:,.1f} {unit}" if v < 1e4 else f"{v:,.0f} {unit}"


def _ratio(f: Figure) -> str:
    if f.unit == "bytes":
        return f"{100 * f.ratio:.3f}%"
    return f"{f.ratio:.2f}x"


def print_table(report: Report, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="flminillm bench perf (ratios: ours / baseline, same run)")
    for col in ("section", "figure", "ours", "baseline", "ratio", "goal", "met"):
        table.add_column(col)
    for f in report.figures:
        table.add_row(
            f.section, f.name, _fmt(f.ours, f.unit), _fmt(f.baseline, f.unit), _ratio(f),
            f.goal, f.met,
        )  # fmt: skip
    console.print(table)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = [f for f in report.figures if f.unit != "bytes"]
    comm = [f for f in report.figures if f.unit == "bytes"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    ax = axes[0]
    labels = [f"{f.section}: {f.name}" for f in figs]
    ax.barh(range(len(figs)), [f.ratio for f in figs], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(figs)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio ours / baseline (same run)")
    ax = axes[1]
    ax.bar(range(len(comm)), [100 * f.ratio for f in comm], color="tab:green")
    ax.set_xticks(range(len(comm)), [f.name.split("(")[1].split(",")[0] for f in comm], fontsize=7)
    ax.set_yscale("log")
    ax.axhline(1.0, color="r", lw=0.8, ls="--", label="goal 1%")
    ax.set_ylabel("FL-MiniLLM bytes / FedAvg bytes (%)")
    ax.legend(fontsize=7)
    fig.suptitle("FL-MiniLLM performance (CPU, 2 cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


DEVICES_TEXT = [
    "## Devices, memory, LoRA",
    "",
    "`engine.device` (auto | cpu | cuda) places every step's model and tensors: sampling with",
    "the KV cache, teacher scoring, the losses, the update and evaluation; statistics stay on",
    "the device and are read once per step. On a GPU the forward passes run under bf16",
    "autocast with fp32 weights (fp32 master weights for the optimizer), or in bf16 weights",
    "under DeepSpeed's bf16; on the CPU nothing changes (the tiny federation's digests are the",
    "same as before devices existed). Behaviour log-probs and teacher scoring go",
    "`generation.batch_size` sequences at a time; `engine.gradient_checkpointing: true`",
    "recomputes activations in backward (same gradients within 1e-6, `tests/test_devices.py`);",
    "`engine.offload: cpu` with DeepSpeed ZeRO 1-3 keeps the optimizer state (and at stage 3",
    "the parameters) in CPU memory, for a student that does not fit one GPU (the config is",
    "tested; the offload itself needs a GPU and was not run here).",
    "",
    "`model.lora: {r, alpha, dropout, target_modules}` trains LoRA adapters (peft) instead of",
    "every weight in local_sft and distill. A round's checkpoint is the adapters and the",
    "digest of their base model, which the store holds once: for SmolLM2-135M at r=8",
    "(all linear layers) 2.4M of 137M parameters train and a checkpoint is 9.8 MB against",
    "538 MB for the full model (1.8%; `make test-slow`, tests/test_lora.py).",
    "",
]


def device_section(gpu_json: Path) -> list[str]:
    from flminillm.bench.gpu import load_result, markdown

    return DEVICES_TEXT + markdown(load_result(gpu_json))


def write_markdown(report: Report, path: Path, png: Path, command: str) -> None:
    import torch

    lines = [
        "# Performance",
        "",
        "Generated by `flminillm bench perf`; every figure is a ratio against a baseline",
        "measured in the same run on the same machine, so the ratios carry over better than",
        "the absolute numbers.",
        "",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads).",
        "- **No GPU on this machine: GPU figures (bf16, NCCL, several GPUs per step) were not "
        "measured here.**",
        f"- Bench wall time: {report.extra.get('wall_s', float('nan')):.0f} s; 1-minute load "
        f"average {report.extra.get('load_before', float('nan')):.2f} before, "
        f"{report.extra.get('load_after', float('nan')):.2f} after (the bench's own load included)"
        + (
            " (**other work was running: the timings are noisy**)."
            if report.extra.get("load_before", 0) > 0.5 * (os.cpu_count() or 1)
            or report.extra.get("load_after", 0) > (os.cpu_count() or 1) + 1
            else "."
        ),
        "",
        "Reproduce:",
        "",
        "```bash",
        command,
        "flminillm bench perf --quick      # smaller: no DeepSpeed, rounds or TRL",
        "pip install trl==1.16.0           # optional: adds the TRL comparison",
        ".venv/bin/python -m pytest -q tests/test_engine.py   # engine equivalence",
        "```",
        "",
        "## Training engine",
        "",
        "`train_lm` (pre-training, local SFT) and the distill step train through",
        "`flminillm.engine`: plain torch AdamW by default (bit-identical to the loop before the",
        "engine existed), or DeepSpeed with a ZeRO stage. The config's `engine` block picks it",
        "for every training step (pre-training, local SFT and distill):",
        "",
        "```yaml",
        "engine: {kind: deepspeed, zero_stage: 2, gradient_accumulation_steps: 1}",
        "# bf16: empty = on with a GPU, fp32 on CPU",
        "# gpus_per_step: N > 1 runs local_sft and distill under the DeepSpeed launcher (ZeRO 0-2)",
        "```",
        "",
        "With `gpus_per_step: N` the step starts `python -m deepspeed.launcher.runner --num_gpus N",
        "--module flminillm.invoke rank ...`; each rank trains on its share of every global batch and",
        "DeepSpeed averages the gradients, so N ranks take the same optimizer steps as one process",
        "with N-step gradient accumulation. `tests/test_launch.py` runs local_sft and distill on",
        "2 ranks (gloo processes on this CPU machine) and checks the weights against one process",
        "with gradient accumulation 2 (equal within 1e-5); rank 0 alone writes the step's record",
        "and output. On GPUs the ranks use NCCL; that path was not run here.",
        "",
        "A GPU-sized federation, `configs/cluster/gpu-large.yaml` (Llama server of 367M parameters,",
        "GPT-2 / Llama / Qwen2 clients of 110M / 80M / 68M, ZeRO-2, bf16), is checked for shape on",
        "the meta device and compiled for a cluster in `tests/test_gpu_config.py`; no GPU was",
        "available to run it, so there are no tokens/s, MFU or GPU-memory figures for it.",
        "",
        "On CPU DeepSpeed runs as one gloo process with the torch AdamW (its fused Adam needs",
        "CUDA ops); `tests/test_engine.py` checks that ZeRO-0 and ZeRO-2 give the plain loop's",
        "loss at step 0 (within 1e-6) and the same losses after.",
        "",
        *device_section(path.parent / "gpu.json"),
        "## Local runner",
        "",
        "Under kfp.local every task is its own Python process. Importing torch, transformers",
        "and DeepSpeed cost each of them 2-4 s of CPU, which was most of a small step and",
        "made a demo round twice as slow under the runner as in one process. `flminillm run`",
        "now starts one warm step server per run (`flminillm/stepserver.py`): it imports",
        "those once and forks a child per step call; the task sends the call with its",
        "environment, working directory and stdout/stderr and gets back the result or the",
        "error. The figures below compare it with a cold process per step (`runner.warm_steps:",
        "false`) and with the same steps called in one process. On a cluster there is no",
        "step server: each pod runs its step itself.",
        "",
        "## Results",
        "",
        "| section | figure | ours | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in report.figures:
        lines.append(
            f"| {f.section} | {f.name} | {_fmt(f.ours, f.unit)} ({f.ours_label}) | "
            f"{_fmt(f.baseline, f.unit)} ({f.baseline_label}) | {_ratio(f)} | {f.goal} | "
            f"{f.met} |"
        )
    lines += ["", f"![ratios]({png.name})", "", "## What each figure covers", ""]
    for f in report.figures:
        if f.note:
            lines.append(f"- **{f.section}, {f.name}**: {f.note}.")
    runs = report.extra.get("distill_runs")
    if runs:
        lines += [
            "",
            "Distill step details (per engine, one subprocess each):",
            "",
            "| engine (fastest of the runs) | tokens/s | median update s | engine start-up s | RSS before MiB | "
            "peak RSS MiB | loss first -> last |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in runs.items():
            lines.append(
                f"| {name} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['init_s']:.2f} | "
                f"{r['rss_before_mb']:.0f} | {r['rss_peak_mb']:.0f} | "
                f"{r['loss_first']:.4f} -> {r['loss_last']:.4f} |"
            )
    lines += ["", *report.extra.get("notes", []), ""]
    if report.extra.get("section_s"):
        lines += [
            "Time per section: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in report.extra["section_s"].items())
            + ".",
            "",
        ]
    path.write_text("\n".join(lines))


def run_perf(
    out_md: Path,
    out_png: Path,
    config: Path,
    quick: bool = False,
    deepspeed: bool = True,
    rounds: bool = True,
    trl: bool = True,
    console=None,
) -> Report:
    from rich.console import Console

    console = console or Console()
    t0 = time.perf_counter()
    report = Report()
    report.extra["load_before"] = os.getloadavg()[0]
    sections: dict[str, float] = {}
    report.extra["section_s"] = sections

    @contextlib.contextmanager
    def timed(name: str):
        console.print(f"[bold]{name}[/] ...")
        t = time.perf_counter()
        try:
            yield
        finally:
            sections[name] = time.perf_counter() - t

    with timed("generation"):
        report.figures += bench_generation(
            n=32 if quick else 64, new_tokens=8 if quick else 16, repeats=2 if quick else 15
        )
    with timed("communication"):
        report.figures += bench_communication(config)
    with timed("distill step"):
        figs, runs = bench_distill(
            updates=2 if quick else 20,
            deepspeed=deepspeed and not quick and has_module("deepspeed"),
            repeats=1 if quick else 2,
        )
        report.figures += figs
        report.extra["distill_runs"] = runs
    notes = []
    if rounds and not quick:
        with timed("round compute"):
            report.figures += bench_round()
        with timed("round time as models grow"):
            report.figures += bench_model_size()
        with timed("pipeline rounds, 2/4/8 clients"):
            threads, env = torch_threads_state()
            try:
                report.figures += bench_pipeline_rounds()
            finally:
                restore_threads(threads, env)
        with timed("orchestration overhead"):
            threads, env = torch_threads_state()
            try:  # the steps set the per-task thread budget in this process too
                report.figures += bench_orchestration(Path(config))
            finally:
                restore_threads(threads, env)
    else:
        notes.append("Round compute and time for 2, 4, 8 clients: not measured in this run.")
        notes.append("Orchestration overhead: not measured in this run.")
    if trl and not quick and has_module("trl"):
        with timed("TRL DistillationTrainer"):
            # in a fresh process, like the distill-step runs: nothing the benches before it
            # left in this process (threads, KFP's log streaming, allocator state) can skew it
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(1) as pool:
                from flminillm.bench.trl_compare import bench_trl

                report.figures += pool.apply(bench_trl)[0]
    elif not has_module("trl"):
        notes.append("TRL comparison: not run (`pip install trl==1.16.0` to include it).")
    notes += [
        "DeepSpeed on CPU: the first use on a fresh machine JIT-compiles DeepSpeed's shared-memory "
        "communication op (about a minute, cached under ~/.cache/torch_extensions); the "
        "start-up times above are with that cache warm.",
    ]
    report.extra["notes"] = notes
    report.extra["wall_s"] = time.perf_counter() - t0
    report.extra["load_after"] = os.getloadavg()[0]
    print_table(report, console)
    plot(report, out_png)
    cmd = "flminillm bench perf" + (" --quick" if quick else "")
    write_markdown(report, out_md, out_png, cmd)
    console.print(f"wrote {out_md} and {out_png}")
    return report
