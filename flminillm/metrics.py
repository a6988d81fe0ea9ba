"""Answer-level metrics: exact match on normalised strings and Rouge-L F-measure."""

from __future__ import annotations

import re

from rouge_score import rouge_scorer

_SCORER: rouge_scorer.RougeScorer | None = None
_WS = re.compile(r"\s+")


def _scorer() -> rouge_scorer.RougeScorer:
    """Build the Rouge-L scorer once, lazily (construction is not free)."""
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rougeL"])
    return _SCORER


def normalize_answer(s: str) -> str:
    """Canonical form of a short answer: first line, single spaces, no trailing .!?, casefolded.

    Generation may run past the answer onto a new line; only the first line counts.
    """
    s = s.strip().split("\n", 1)[0]
    s = _WS.sub(" ", s).strip()
    s = s.rstrip(".!?").rstrip()
    return s.casefold()


def exact_match(pred: str, ref: str) -> float:
    """1.0 if the normalised prediction equals the normalised reference, else 0.0."""
    return 1.0 if normalize_answer(pred) == normalize_answer(ref) else 0.0


def rouge_l(pred: str, ref: str) -> float:
    """Rouge-L F-measure between prediction and reference (rouge_score's tokenisation)."""
    return float(_scorer().score(ref, pred)["rougeL"].fmeasure)


def score_predictions(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Mean exact match and Rouge-L over paired predictions/references, plus the count ``n``."""
    if not preds:
        raise ValueError("score_predictions needs at least one prediction")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    n = len(preds)
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(preds, refs, strict=True)) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(preds, refs, strict=True)) / n,
        "n": n,
    }
