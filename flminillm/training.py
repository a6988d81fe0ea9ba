"""Supervised building blocks: token batches, the LM training loop, the optimizer."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from flminillm.data import Example
from flminillm.devices import to_device
from flminillm.engine import make_engine
from flminillm.ranks import rank_world
from flminillm.tokenizer import QA_STYLE, PromptStyle

if TYPE_CHECKING:
    from flminillm.config import EngineConfig


def encode_examples(
    tokenizer,
    examples: Sequence[Example],
    max_len: int,
    prompt_loss: bool = False,
    style: PromptStyle = QA_STYLE,
    counts: dict[str, int] | None = None,
) -> list[tuple[list[int], int]]:
    """Token ids of prompt + answer + EOS, and where the loss starts (answer, or all).
    An example longer than `max_len` keeps its last `max_len` tokens (the answer and the
    end of the prompt); `counts["truncated"]` counts them."""
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        p = tokenizer.encode(style.prompt(ex.prompt), add_special_tokens=False)
        a = tokenizer.encode(style.target(ex.answer), add_special_tokens=False) + [eos]
        if counts is not None and len(p) + len(a) > max_len:
            counts["truncated"] = counts.get("truncated", 0) + 1
        ids = (p + a)[-max_len:]
        out.append((ids, 0 if prompt_loss else max(len(ids) - len(a), 0)))
    return out


def encode_docs(tokenizer, docs: Sequence[str], max_len: int) -> list[tuple[list[int], int]]:
    """Pre-training documents: loss on every token."""
    eos = tokenizer.eos_token_id
    return [((tokenizer.encode(d) + [eos])[:max_len], 0) for d in docs]


def collate(rows: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and a loss mask on the target tokens."""
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, start) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        loss_mask[i, max(start, 1) : len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def batches(
    rows: Sequence[tuple[list[int], int]], batch_size: int, pad_id: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled mini-batches (a new permutation each epoch)."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for i in range(
            0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size
        ):
            yield collate([rows[j] for j in order[i : i + batch_size]], pad_id)


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy on the loss-masked positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return (ce * mask).sum() / mask.sum().clamp(min=1.0)


def lr_schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%: a multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_lm(
    model,
    rows: Sequence[tuple[list[int], int]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    seed: int,
    warmup_steps: int = 10,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    progress: str | None = None,
    engine: EngineConfig | None = None,
) -> dict[str, float]:
    """Supervised LM training for `steps` optimizer steps; returns first/last loss and tokens.

    `engine` picks plain torch (None or kind torch) or DeepSpeed; with gradient accumulation
    an optimizer step takes that many mini-batches. The model is trained in place."""
    if steps == 0 or not rows:
        return {"loss_first": float("nan"), "loss_last": float("nan"), "tokens": 0.0}
    torch.manual_seed(seed)
    model.train()
    eng = make_engine(
        model, lr, weight_decay, max_grad_norm, engine,
        lr_lambda=lambda s: lr_schedule(s, steps, warmup_steps),
    )  # fmt: skip
    accum = eng.gradient_accumulation_steps
    it = batches(rows, batch_size, pad_id, seed)
    rank, world = rank_world()  # under the launcher: rank r takes micro-batches r, r+N, ...
    first = last = float("nan")
    tokens = 0
    from tqdm import tqdm

    device = next(model.parameters()).device  # placed by the step (flminillm.devices)
    bar = tqdm(range(steps), desc=progress, disable=progress is None, mininterval=2.0)
    last_t = None
    for step in bar:
        total = torch.zeros((), dtype=torch.float64, device=device)  # read every 20 steps
        for _micro in range(accum):
            host = [next(it) for _ in range(world)][rank]
            batch = to_device(host, device)
            with eng.autocast():
                loss = causal_lm_loss(eng.model, batch)
            eng.backward(loss)
            eng.step()
            tokens += int(host["attention_mask"].sum())
            total = total + loss.detach().double()
        last_t = total / accum
        if step == 0:
            first = float(last_t)
        if step % 20 == 0 and progress is not None:
            bar.set_postfix(loss=f"{float(last_t):.3f}")
    last = float(last_t) if last_t is not None else last
    model.eval()
    return {"loss_first": first, "loss_last": last, "tokens": float(tokens)}
