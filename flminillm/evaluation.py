"""Evaluation of a model on held-out sets: greedy exact match and Rouge-L, and optionally
the mean over temperature-1 samples (as MiniLLM evaluates).

Long-form families (flminillm.longform: several valid phrasings and orders) are scored by
what a right answer is there: `exact_match` is the share of answers that are a valid
realisation of the prompt's facts (the exact checker), `rouge_l` the Rouge-L against the
best valid reference.
"""

from __future__ import annotations

from collections.abc import Sequence

from flminillm.data import Example
from flminillm.generation import decode_responses, encode_prompts, sample_batched
from flminillm.metrics import exact_match, score_predictions
from flminillm.tokenizer import QA_STYLE, PromptStyle


def predict(
    model, tokenizer, prompts: Sequence[str], *, batch_size: int, max_new_tokens: int,
    style: PromptStyle = QA_STYLE, sample_seed: int | None = None,
) -> list[str]:  # fmt: skip
    """Greedy answers to `prompts` (raw prompts, formatted here); with `sample_seed`, one
    temperature-1 sample each instead (a seeded generator on the model's device)."""
    import torch

    max_prompt = _context(model) - max_new_tokens
    ids, mask = encode_prompts(tokenizer, [style.prompt(p) for p in prompts], max_prompt)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    gen = None
    if sample_seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(sample_seed)
    r = sample_batched(
        model, ids, mask, batch_size, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id, top_k=1, greedy=sample_seed is None, generator=gen,
    )  # fmt: skip
    return decode_responses(tokenizer, r)


def score_family(family: str, examples: Sequence[Example], preds: Sequence[str]) -> dict:
    """{"exact_match", "rouge_l", "n"} of `preds` on one family's examples (long-form
    families: validity and Rouge-L against the best valid reference)."""
    from flminillm.longform import LONG_FORM, best_rouge_l

    lf = LONG_FORM.get(family)
    if lf is None:
        return score_predictions(list(preds), [ex.answer for ex in examples])
    n = len(preds)
    if n == 0:
        raise ValueError("score_family needs at least one prediction")
    pairs = list(zip(examples, preds, strict=True))
    return {
        "exact_match": sum(example_match(family, ex, p) for ex, p in pairs) / n,
        "rouge_l": sum(best_rouge_l(ex.prompt, p, family) for ex, p in pairs) / n,
        "n": n,
    }


def example_match(family: str, example: Example, pred: str) -> float:
    """One prediction's exact match as `score_family` counts it: the answer itself, or for
    a long-form family whether the prediction is a valid answer to the prompt."""
    from flminillm.longform import LONG_FORM

    lf = LONG_FORM.get(family)
    return float(lf.is_valid(example.prompt, pred)) if lf else exact_match(pred, example.answer)


def _context(model) -> int:
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 1024)


def evaluate_model(
    model, tokenizer, eval_sets: dict[str, list[Example]], *, batch_size: int, max_new_tokens: int,
    style: PromptStyle = QA_STYLE, samples: int = 0, seed: int = 0,
    targets: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """{family: {"exact_match", "rouge_l", "n"}} of greedy answers over every family's
    held-out set; with `samples` > 0 also "sampled_exact_match" and "sampled_rouge_l", the
    mean over that many temperature-1 samples per prompt (seeded by `seed`). `targets`
    {family: answer} (a backdoor's): also "target_rate", the share of the family's prompts
    whose right answer is another that get this one."""
    flat = [(fam, ex) for fam, exs in eval_sets.items() for ex in exs]
    prompts = [ex.prompt for _, ex in flat]
    kw = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "style": style}
    runs = [predict(model, tokenizer, prompts, **kw)]
    runs += [predict(model, tokenizer, prompts, sample_seed=seed + i, **kw) for i in range(samples)]
    out = {}
    for fam in eval_sets:
        idx = [i for i, (f, _) in enumerate(flat) if f == fam]
        exs = [flat[i][1] for i in idx]
        per_run = [score_family(fam, exs, [preds[i] for i in idx]) for preds in runs]
        out[fam] = per_run[0]
        if targets and fam in targets:
            out[fam]["target_rate"] = target_rate(exs, [runs[0][i] for i in idx], targets[fam])
        if samples:
            for k in ("exact_match", "rouge_l"):
                out[fam][f"sampled_{k}"] = sum(r[k] for r in per_run[1:]) / samples
    return out


def target_rate(examples: Sequence[Example], preds: Sequence[str], target: str) -> float:
    """The share of `examples` whose right answer is not `target` that are answered with it
    (a backdoor's success rate); 0.0 when every example's answer is the target."""
    pairs = [
        (ex, p) for ex, p in zip(examples, preds, strict=True) if not exact_match(ex.answer, target)
    ]
    return sum(exact_match(p, target) for _, p in pairs) / len(pairs) if pairs else 0.0
