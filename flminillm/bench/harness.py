"""Shared pieces of the benchmarks: a figure (ours against a baseline measured in the same
run), interleaved best-of timing, models and inputs of given shapes, and small helpers."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from flminillm.invoke import THREADS_ENV

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Figure:
    section: str
    name: str
    ours: float
    baseline: float
    unit: str
    ours_label: str
    baseline_label: str
    goal: str = ""
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")

    @property
    def met(self) -> str:
        if not self.goal:
            return ""
        op, value = self.goal.split()
        target = float(value.rstrip("x%")) / (100 if value.endswith("%") else 1)
        ok = self.ratio >= target if op == ">=" else self.ratio <= target
        return "yes" if ok else "no"


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def tiny_model(family: str, hidden: int, layers: int, heads: int, vocab: int = 1024, seed: int = 0):
    """A causal LM of `family` built from these shapes (random weights)."""
    from flminillm.config import ModelSpec
    from flminillm.models import build_model

    spec = ModelSpec(
        family=family, hidden_size=hidden, num_layers=layers, num_heads=heads, max_positions=64
    )
    return build_model(spec, vocab_size=vocab, pad_id=0, eos_id=1, seed=seed)


def random_prompts(n: int, width: int, vocab: int, seed: int = 0):
    """Left-padded random prompts of lengths width/2 .. width."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(width // 2, width + 1, (1,), generator=g))
        ids[i, width - k :] = torch.randint(3, vocab, (k,), generator=g)
        mask[i, width - k :] = 1
    return ids, mask


def best_times(fns: list, repeats: int) -> list[float]:
    """Best (minimum) seconds of each function over `repeats` interleaved runs, after one
    warm-up call each: other work on a shared machine only ever adds time, and interleaving
    spreads what it adds over all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [min(ts) for ts in times]


def synthetic_distill_batch(n: int, prompt_len: int, t: int, k: int, vocab: int, seed: int = 0):
    """An assembled distill batch (flminillm.aggregate.assemble_batch) of random tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pids, pmask = random_prompts(n, prompt_len, vocab, seed)
    rids = torch.randint(3, vocab, (n, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (n,), generator=g)
    rmask = (torch.arange(t)[None] < lengths[:, None]).long()
    others = torch.randint(3, vocab, (n, t, k), generator=g)
    sup = torch.cat([rids[..., None], others], -1)
    tlogp = torch.log_softmax(torch.randn(n, t, vocab, generator=g), -1).gather(-1, sup)
    return {
        "prompt_ids": pids, "prompt_mask": pmask, "response_ids": rids, "response_mask": rmask,
        "support_ids": sup, "teacher_logp": tlogp * rmask[..., None],
        "from_teacher": torch.zeros(n, dtype=torch.bool),
    }  # fmt: skip


def torch_threads_state() -> tuple[int, str | None]:
    """This process's torch threads and its per-step thread budget (to restore later)."""
    import torch

    return torch.get_num_threads(), os.environ.get(THREADS_ENV)


def restore_threads(threads: int, env: str | None) -> None:
    """The steps set the per-task thread budget in this process too: put it back."""
    import torch

    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop(THREADS_ENV, None)
    else:
        os.environ[THREADS_ENV] = env


def has_module(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
