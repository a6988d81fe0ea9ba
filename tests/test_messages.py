"""Tests for the validation of messages crossing party boundaries (flminillm.messages)."""

from __future__ import annotations

import pytest
import torch

from flminillm.messages import (
    ROLLOUT_FIELDS,
    TEACHING_FIELDS,
    MessageError,
    nbytes,
    validate_rollouts,
    validate_teaching,
)

VOCAB = 50
N, P, T, S = 3, 4, 5, 3
M, P2, T2 = 2, 3, 4


def _rollouts() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    response = torch.randint(0, VOCAB, (N, T), generator=g, dtype=torch.int32)
    support = torch.randint(0, VOCAB, (N, T, S), generator=g, dtype=torch.int32)
    support[..., 0] = response
    prompt_mask = torch.ones(N, P, dtype=torch.uint8)
    prompt_mask[1, :2] = 0
    response_mask = torch.ones(N, T, dtype=torch.uint8)
    response_mask[2, 3:] = 0
    return {
        "prompt_ids": torch.randint(0, VOCAB, (N, P), generator=g, dtype=torch.int32),
        "prompt_mask": prompt_mask,
        "response_ids": response,
        "response_mask": response_mask,
        "support_ids": support,
        "ask_prompt_ids": torch.randint(0, VOCAB, (M, P2), generator=g, dtype=torch.int32),
        "ask_prompt_mask": torch.ones(M, P2, dtype=torch.uint8),
    }


def _teaching() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    own_resp = torch.randint(0, VOCAB, (M, T2), generator=g, dtype=torch.int32)
    own_sup = torch.randint(0, VOCAB, (M, T2, S), generator=g, dtype=torch.int32)
    own_sup[..., 0] = own_resp
    return {
        "scores": -torch.rand(N, T, S, generator=g) * 5,
        "prompt_logp": -torch.rand(N, generator=g) * 20,
        "own_prompt_logp": -torch.rand(M, generator=g) * 20,
        "own_response_ids": own_resp,
        "own_response_mask": torch.ones(M, T2, dtype=torch.uint8),
        "own_support_ids": own_sup,
        "own_logp": -torch.rand(M, T2, S, generator=g) * 5,
    }


def test_valid_messages_pass():
    r = _rollouts()
    assert set(r) == set(ROLLOUT_FIELDS)
    validate_rollouts(r, VOCAB)
    t = _teaching()
    assert set(t) == set(TEACHING_FIELDS)
    validate_teaching(t, r, VOCAB)
    # zeros (masked scores) and an empty teacher-mixed share are fine
    t["scores"][2, 3:] = 0.0
    validate_teaching(t, r, VOCAB)
    r0 = dict(r, ask_prompt_ids=torch.zeros(0, P2, dtype=torch.int32))
    r0["ask_prompt_mask"] = torch.zeros(0, P2, dtype=torch.uint8)
    t0 = dict(
        t,
        own_prompt_logp=torch.zeros(0),
        own_response_ids=torch.zeros(0, 0, dtype=torch.int32),
        own_response_mask=torch.zeros(0, 0, dtype=torch.uint8),
        own_support_ids=torch.zeros(0, 0, S, dtype=torch.int32),
        own_logp=torch.zeros(0, 0, S),
    )
    validate_rollouts(r0, VOCAB)
    validate_teaching(t0, r0, VOCAB)
    assert nbytes(r) == N * P * 4 + N * P + N * T * 4 + N * T + N * T * S * 4 + M * P2 * 5


def _bad_rollouts(case: str) -> dict[str, torch.Tensor]:
    r = _rollouts()
    if case == "dtype":
        r["prompt_ids"] = r["prompt_ids"].long()
    elif case == "id_too_large":
        r["ask_prompt_ids"][1, 2] = VOCAB
    elif case == "id_negative":
        r["prompt_ids"][0, 0] = -1
    elif case == "support_id_too_large":
        r["support_ids"][0, 1, 2] = VOCAB + 7
    elif case == "missing":
        del r["prompt_mask"]
    elif case == "unexpected":
        r["student_logits"] = torch.zeros(N, T, VOCAB)
    elif case == "support_col0":
        r["support_ids"][1, 2, 0] = (r["response_ids"][1, 2] + 1) % VOCAB
    elif case == "mask_two":
        r["response_mask"][0, 1] = 2
    elif case == "prompt_mask_shape":
        r["prompt_mask"] = r["prompt_mask"][:, 1:]
    elif case == "support_shape":
        r["support_ids"] = r["support_ids"][:, :-1]
    return r


@pytest.mark.parametrize(
    ("case", "names"),
    [
        ("dtype", ["prompt_ids", "int32"]),
        ("id_too_large", ["ask_prompt_ids", f"[0, {VOCAB})"]),
        ("id_negative", ["prompt_ids", "-1"]),
        ("support_id_too_large", ["support_ids", str(VOCAB + 7)]),
        ("missing", ["missing", "prompt_mask"]),
        ("unexpected", ["unexpected", "student_logits"]),
        ("support_col0", ["support_ids[..., 0]", "response_ids"]),
        ("mask_two", ["response_mask", "0 or 1"]),
        ("prompt_mask_shape", ["prompt_mask", "shape"]),
        ("support_shape", ["support"]),
    ],
)
def test_bad_rollouts_are_refused(case, names):
    with pytest.raises(MessageError) as err:
        validate_rollouts(_bad_rollouts(case), VOCAB)
    text = str(err.value)
    assert text.startswith("RolloutMessage")
    for name in names:
        assert name in text, (name, text)


def _bad_teaching(case: str) -> dict[str, torch.Tensor]:
    t = _teaching()
    if case == "dtype":
        t["scores"] = t["scores"].double()
    elif case == "nan":
        t["scores"][0, 1, 2] = float("nan")
    elif case == "inf":
        t["own_logp"][1, 0, 0] = float("-inf")
    elif case == "positive":
        t["scores"][2, 0, 1] = 0.5
    elif case == "positive_prompt":
        t["prompt_logp"][0] = 3.0
    elif case == "scores_shape":
        t["scores"] = t["scores"][:, :, :2]
    elif case == "prompt_logp_shape":
        t["prompt_logp"] = t["prompt_logp"][:2]
    elif case == "own_logp_shape":
        t["own_logp"] = t["own_logp"][:, :, :2]
    elif case == "own_id":
        t["own_response_ids"][0, 0] = VOCAB
        t["own_support_ids"][0, 0, 0] = VOCAB
    elif case == "own_mask":
        t["own_response_mask"][1, 1] = 2
    elif case == "missing":
        del t["own_prompt_logp"]
    elif case == "unexpected":
        t["teacher_weights"] = torch.zeros(3)
    return t


@pytest.mark.parametrize(
    ("case", "names"),
    [
        ("dtype", ["scores", "float32"]),
        ("nan", ["scores", "NaN"]),
        ("inf", ["own_logp", "infinite"]),
        ("positive", ["scores", "<= 0"]),
        ("positive_prompt", ["prompt_logp", "<= 0"]),
        ("scores_shape", ["scores", "shape", str((N, T, S))]),
        ("prompt_logp_shape", ["prompt_logp", "shape"]),
        ("own_logp_shape", ["own_logp", "shape"]),
        ("own_id", ["own_response_ids", f"[0, {VOCAB})"]),
        ("own_mask", ["own_response_mask", "0 or 1"]),
        ("missing", ["missing", "own_prompt_logp"]),
        ("unexpected", ["unexpected", "teacher_weights"]),
    ],
)
def test_bad_teaching_is_refused(case, names):
    with pytest.raises(MessageError) as err:
        validate_teaching(_bad_teaching(case), _rollouts(), VOCAB)
    text = str(err.value)
    assert text.startswith("TeachingMessage")
    for name in names:
        assert name in text, (name, text)


def test_teaching_own_support_must_start_with_own_response():
    t = _teaching()
    t["own_support_ids"][1, 2, 0] = (t["own_response_ids"][1, 2] + 1) % VOCAB
    with pytest.raises(MessageError, match="own_support_ids"):
        validate_teaching(t, _rollouts(), VOCAB)


def test_message_error_is_value_error():
    assert issubclass(MessageError, ValueError)
