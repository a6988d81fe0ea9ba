"""What crosses a party boundary, and its validation.

Two messages per direction and round (docs/messages.md lists fields, dtypes and sizes):

RolloutMessage, student -> teacher (no weights, no private text, no student scores):
  prompt_ids       int32 [N, P]   public prompts, left-padded
  prompt_mask      uint8 [N, P]
  response_ids     int32 [N, T]   the student's sampled responses, right-padded
  response_mask    uint8 [N, T]
  support_ids      int32 [N, T, S] sampled token + the student's top-k others
  ask_prompt_ids   int32 [M, P']  prompts the teacher answers itself (teacher-mixed share)
  ask_prompt_mask  uint8 [M, P']

TeachingMessage, teacher -> student:
  scores           float32 [N, T, S]   log p_teacher(v | y_<t, x) on the student's support
  prompt_logp      float32 [N]         log p_teacher(x) of each prompt (domain weight)
  own_response_ids int32 [M, T']       the teacher's responses to ask_prompt_ids
  own_response_mask uint8 [M, T']
  own_support_ids  int32 [M, T', S]    teacher-sampled token + the teacher's top-k others
  own_logp         float32 [M, T', S]  the teacher's log-probs on that support
  own_prompt_logp  float32 [M]         log p_teacher(x) of each ask prompt
"""

from __future__ import annotations

import torch

ROLLOUT_FIELDS = {
    "prompt_ids": (torch.int32, 2),
    "prompt_mask": (torch.uint8, 2),
    "response_ids": (torch.int32, 2),
    "response_mask": (torch.uint8, 2),
    "support_ids": (torch.int32, 3),
    "ask_prompt_ids": (torch.int32, 2),
    "ask_prompt_mask": (torch.uint8, 2),
}
TEACHING_FIELDS = {
    "scores": (torch.float32, 3),
    "prompt_logp": (torch.float32, 1),
    "own_prompt_logp": (torch.float32, 1),
    "own_response_ids": (torch.int32, 2),
    "own_response_mask": (torch.uint8, 2),
    "own_support_ids": (torch.int32, 3),
    "own_logp": (torch.float32, 3),
}
MAX_ELEMENTS = 200_000_000  # refuse absurdly large messages before allocating on them


class MessageError(ValueError):
    """A message from another party is malformed; it is refused, not repaired."""


def _check_fields(kind: str, msg: dict[str, torch.Tensor], spec: dict) -> None:
    missing = sorted(set(spec) - set(msg))
    extra = sorted(set(msg) - set(spec))
    if missing or extra:
        raise MessageError(f"{kind}: missing fields {missing}, unexpected fields {extra}")
    for name, (dtype, ndim) in spec.items():
        t = msg[name]
        if t.dtype != dtype or t.dim() != ndim:
            raise MessageError(
                f"{kind}.{name}: expected {dtype} with {ndim} dims, got {t.dtype} {tuple(t.shape)}"
            )
        if t.numel() > MAX_ELEMENTS:
            raise MessageError(f"{kind}.{name}: {t.numel()} elements exceed {MAX_ELEMENTS}")


def _check_ids(kind: str, name: str, t: torch.Tensor, vocab: int) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise MessageError(
            f"{kind}.{name}: token ids must lie in [0, {vocab}); got [{int(t.min())}, {int(t.max())}]"
        )


def _check_mask(kind: str, name: str, t: torch.Tensor) -> None:
    if t.numel() and int(t.max()) > 1:
        raise MessageError(f"{kind}.{name}: mask values must be 0 or 1")


def _check_logp(kind: str, name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise MessageError(f"{kind}.{name}: contains NaN or infinite values")
    if t.numel() and float(t.max()) > 1e-4:
        raise MessageError(
            f"{kind}.{name}: log-probabilities must be <= 0, max is {float(t.max())}"
        )


def validate_rollouts(msg: dict[str, torch.Tensor], vocab_size: int) -> None:
    kind = "RolloutMessage"
    _check_fields(kind, msg, ROLLOUT_FIELDS)
    n, p = msg["prompt_ids"].shape
    if msg["prompt_mask"].shape != (n, p):
        raise MessageError(
            f"{kind}.prompt_mask: shape {tuple(msg['prompt_mask'].shape)} != {(n, p)}"
        )
    n2, t = msg["response_ids"].shape
    if n2 != n or msg["response_mask"].shape != (n, t) or msg["support_ids"].shape[:2] != (n, t):
        raise MessageError(f"{kind}: response fields must be [N={n}, T] and support [N, T, S]")
    if msg["ask_prompt_ids"].shape != msg["ask_prompt_mask"].shape:
        raise MessageError(f"{kind}.ask_prompt_mask: shape differs from ask_prompt_ids")
    if not torch.equal(msg["support_ids"][..., 0], msg["response_ids"]):
        raise MessageError(f"{kind}.support_ids[..., 0] must equal response_ids")
    for name in ("prompt_ids", "response_ids", "support_ids", "ask_prompt_ids"):
        _check_ids(kind, name, msg[name], vocab_size)
    for name in ("prompt_mask", "response_mask", "ask_prompt_mask"):
        _check_mask(kind, name, msg[name])


def validate_teaching(
    msg: dict[str, torch.Tensor], rollouts: dict[str, torch.Tensor], vocab_size: int
) -> None:
    kind = "TeachingMessage"
    _check_fields(kind, msg, TEACHING_FIELDS)
    if msg["scores"].shape != rollouts["support_ids"].shape:
        raise MessageError(
            f"{kind}.scores: shape {tuple(msg['scores'].shape)} must equal the rollouts' support "
            f"{tuple(rollouts['support_ids'].shape)}"
        )
    if msg["prompt_logp"].shape != (rollouts["prompt_ids"].shape[0],):
        raise MessageError(
            f"{kind}.prompt_logp: shape {tuple(msg['prompt_logp'].shape)} must be [N]"
        )
    m = rollouts["ask_prompt_ids"].shape[0]
    if msg["own_prompt_logp"].shape != (m,):
        raise MessageError(
            f"{kind}.own_prompt_logp: shape {tuple(msg['own_prompt_logp'].shape)} must be [M={m}]"
        )
    t = msg["own_response_ids"].shape[1]
    s = msg["own_support_ids"].shape[-1] if msg["own_support_ids"].dim() == 3 else 0
    for name, shape in (
        ("own_response_ids", (m, t)),
        ("own_response_mask", (m, t)),
        ("own_support_ids", (m, t, s)),
        ("own_logp", (m, t, s)),
    ):
        if tuple(msg[name].shape) != shape:
            raise MessageError(f"{kind}.{name}: shape {tuple(msg[name].shape)} != {shape}")
    _check_logp(kind, "scores", msg["scores"])
    _check_logp(kind, "own_logp", msg["own_logp"])
    _check_logp(kind, "prompt_logp", msg["prompt_logp"])
    _check_logp(kind, "own_prompt_logp", msg["own_prompt_logp"])
    if not torch.equal(msg["own_support_ids"][..., 0], msg["own_response_ids"]):
        raise MessageError(f"{kind}.own_support_ids[..., 0] must equal own_response_ids")
    _check_ids(kind, "own_response_ids", msg["own_response_ids"], vocab_size)
    _check_ids(kind, "own_support_ids", msg["own_support_ids"], vocab_size)
    _check_mask(kind, "own_response_mask", msg["own_response_mask"])


def nbytes(msg: dict[str, torch.Tensor]) -> int:
    """Payload size of a message: the bytes of its tensors."""
    return sum(t.numel() * t.element_size() for t in msg.values())
