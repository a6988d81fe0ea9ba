"""Greedy-decoding evaluation of a model on held-out sets: exact match and Rouge-L."""

from __future__ import annotations

from collections.abc import Sequence

from flminillm.data import Example
from flminillm.generation import decode_responses, encode_prompts, sample_batched
from flminillm.metrics import score_predictions
from flminillm.tokenizer import QA_STYLE, PromptStyle


def predict(
    model, tokenizer, prompts: Sequence[str], *, batch_size: int, max_new_tokens: int,
    style: PromptStyle = QA_STYLE,
) -> list[str]:  # fmt: skip
    """Greedy answers to `prompts` (raw prompts, formatted here)."""
    max_prompt = _context(model) - max_new_tokens
    ids, mask = encode_prompts(tokenizer, [style.prompt(p) for p in prompts], max_prompt)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    r = sample_batched(
        model, ids, mask, batch_size, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id, top_k=1, greedy=True,
    )  # fmt: skip
    return decode_responses(tokenizer, r)


def _context(model) -> int:
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 1024)


def evaluate_model(
    model, tokenizer, eval_sets: dict[str, list[Example]], *, batch_size: int, max_new_tokens: int,
    style: PromptStyle = QA_STYLE,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """{family: {"exact_match", "rouge_l", "n"}} over every family's held-out set."""
    flat = [(fam, ex) for fam, exs in eval_sets.items() for ex in exs]
    preds = predict(
        model,
        tokenizer,
        [ex.prompt for _, ex in flat],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        style=style,
    )
    out = {}
    for fam in eval_sets:
        pairs = [(p, ex.answer) for p, (f, ex) in zip(preds, flat, strict=True) if f == fam]
        out[fam] = score_predictions([p for p, _ in pairs], [a for _, a in pairs])
    return out
