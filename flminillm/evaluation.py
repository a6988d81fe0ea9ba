"""Greedy-decoding evaluation of a model on held-out sets: exact match and Rouge-L."""

from __future__ import annotations

from collections.abc import Sequence

from flminillm.data import Example, format_prompt
from flminillm.generation import decode_responses, encode_prompts, sample_batched
from flminillm.metrics import score_predictions


def predict(
    model, tokenizer, prompts: Sequence[str], *, batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy answers to `prompts` (raw prompts, formatted here)."""
    max_prompt = model.config.max_position_embeddings - max_new_tokens
    ids, mask = encode_prompts(tokenizer, [format_prompt(p) for p in prompts], max_prompt)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    r = sample_batched(
        model, ids, mask, batch_size, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id, top_k=1, greedy=True,
    )  # fmt: skip
    return decode_responses(tokenizer, r)


def evaluate_model(
    model, tokenizer, eval_sets: dict[str, list[Example]], *, batch_size: int, max_new_tokens: int
) -> dict[str, dict[str, float]]:
    """{family: {"exact_match", "rouge_l", "n"}} over every family's held-out set."""
    flat = [(fam, ex) for fam, exs in eval_sets.items() for ex in exs]
    preds = predict(
        model,
        tokenizer,
        [ex.prompt for _, ex in flat],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    out = {}
    for fam in eval_sets:
        pairs = [(p, ex.answer) for p, (f, ex) in zip(preds, flat, strict=True) if f == fam]
        out[fam] = score_predictions([p for p, _ in pairs], [a for _, a in pairs])
    return out
