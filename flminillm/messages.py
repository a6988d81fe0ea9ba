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
  own_support_ids  int32 [M, T', S]    teacher-sampled token + the teacher's top-k others,
                                       those in descending order of its log-probs
  own_logp         float32 [M, T', S]  the teacher's log-probs on that support (so columns
                                       1.. never increase: flminillm.aggregate.coherence)
  own_prompt_logp  float32 [M]         log p_teacher(x) of each ask prompt

Across tokenizers (flminillm.crosstok) the RolloutMessage also carries its text, and the
teacher answers with a CrossTeachingMessage of its own tokens' log-probs and their spans:
  text_prompts / text_prompt_offsets      uint8 [L] / int64 [N+1]   raw prompts, UTF-8
  text_responses / text_response_offsets  uint8 [L] / int64 [N+1]   responses (no EOS)
  text_done                               uint8 [N]   1 if the response ended with EOS
  text_ask / text_ask_offsets             uint8 [L] / int64 [M+1]   teacher-share prompts
CrossTeachingMessage:
  x_scores / x_score_mask   float32 / uint8 [N, T'']   log p_teacher of its own tokens of
                                                       each response (+ EOS when done)
  x_score_spans             int32 [N, T'', 2]         their character spans (EOS: (L, L))
  prompt_logp, own_prompt_logp                        as above
  x_own_text / x_own_offsets  uint8 / int64 [M+1]     the teacher's answers as text
  x_own_logp / x_own_mask     float32 / uint8 [M, T'] log-probs of its sampled tokens
  x_own_spans                 int32 [M, T', 2]        their character spans
  x_own_done                  uint8 [M]
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
TEXT_FIELDS = {
    "text_prompts": (torch.uint8, 1),
    "text_prompt_offsets": (torch.int64, 1),
    "text_responses": (torch.uint8, 1),
    "text_response_offsets": (torch.int64, 1),
    "text_done": (torch.uint8, 1),
    "text_ask": (torch.uint8, 1),
    "text_ask_offsets": (torch.int64, 1),
}
CROSS_TEACHING_FIELDS = {
    "x_scores": (torch.float32, 2),
    "x_score_mask": (torch.uint8, 2),
    "x_score_spans": (torch.int32, 3),
    "prompt_logp": (torch.float32, 1),
    "own_prompt_logp": (torch.float32, 1),
    "x_own_text": (torch.uint8, 1),
    "x_own_offsets": (torch.int64, 1),
    "x_own_logp": (torch.float32, 2),
    "x_own_mask": (torch.uint8, 2),
    "x_own_spans": (torch.int32, 3),
    "x_own_done": (torch.uint8, 1),
}
MAX_TEXT_BYTES = 1 << 16  # per prompt or response
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


def pack_texts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes of all texts [L] uint8 and their offsets [N + 1] int64."""
    raw = [t.encode("utf-8") for t in texts]
    offsets = [0]
    for r in raw:
        offsets.append(offsets[-1] + len(r))
    data = torch.tensor(list(b"".join(raw)), dtype=torch.uint8)
    return data, torch.tensor(offsets, dtype=torch.int64)


def unpack_texts(data: torch.Tensor, offsets: torch.Tensor, field: str) -> list[str]:
    """The texts of `pack_texts`, validated: offsets from 0 to the byte count, monotone,
    each text valid UTF-8 and at most MAX_TEXT_BYTES long."""
    off = offsets.tolist()
    if not off or off[0] != 0 or off[-1] != data.numel():
        raise MessageError(f"{field}: offsets must run from 0 to the byte count {data.numel()}, "
                           f"got {off[:1]}..{off[-1:]}")  # fmt: skip
    raw = bytes(data.tolist())
    out = []
    for i, (a, b) in enumerate(zip(off, off[1:], strict=False)):
        if b < a or b - a > MAX_TEXT_BYTES:
            raise MessageError(f"{field}[{i}]: offsets must be monotone and a text at most "
                               f"{MAX_TEXT_BYTES} bytes; got {a}..{b}")  # fmt: skip
        try:
            out.append(raw[a:b].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise MessageError(f"{field}[{i}]: not valid UTF-8 ({e.reason})") from None
    return out


def _check_text(kind: str, msg: dict, data: str, offsets: str, n: int) -> list[str]:
    texts = unpack_texts(msg[data], msg[offsets], f"{kind}.{data}")
    if len(texts) != n:
        raise MessageError(f"{kind}.{data}: {len(texts)} texts for {n} rows")
    return texts


def validate_rollouts(msg: dict[str, torch.Tensor], vocab_size: int) -> None:
    kind = "RolloutMessage"
    text = any(k in msg for k in TEXT_FIELDS)
    _check_fields(kind, msg, {**ROLLOUT_FIELDS, **(TEXT_FIELDS if text else {})})
    if text:
        n, m = msg["prompt_ids"].shape[0], msg["ask_prompt_ids"].shape[0]
        _check_text(kind, msg, "text_prompts", "text_prompt_offsets", n)
        _check_text(kind, msg, "text_responses", "text_response_offsets", n)
        _check_text(kind, msg, "text_ask", "text_ask_offsets", m)
        if msg["text_done"].shape != (n,):
            raise MessageError(f"{kind}.text_done: must be [N={n}]")
        _check_mask(kind, "text_done", msg["text_done"])
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


def validate_cross_teaching(msg: dict[str, torch.Tensor], rollouts: dict[str, torch.Tensor]):
    """A teacher with another tokenizer: shapes, finite log-probs <= 0, texts and spans."""
    kind = "CrossTeachingMessage"
    _check_fields(kind, msg, CROSS_TEACHING_FIELDS)
    n, m = rollouts["prompt_ids"].shape[0], rollouts["ask_prompt_ids"].shape[0]
    t = msg["x_scores"].shape[1]
    for name, shape in (("x_scores", (n, t)), ("x_score_mask", (n, t)),
                        ("x_score_spans", (n, t, 2)), ("prompt_logp", (n,)),
                        ("own_prompt_logp", (m,)), ("x_own_done", (m,))):  # fmt: skip
        if tuple(msg[name].shape) != shape:
            raise MessageError(f"{kind}.{name}: shape {tuple(msg[name].shape)} != {shape}")
    ta = msg["x_own_logp"].shape[1]
    for name, shape in (("x_own_mask", (m, ta)), ("x_own_spans", (m, ta, 2))):
        if tuple(msg[name].shape) != shape or msg["x_own_logp"].shape[0] != m:
            raise MessageError(f"{kind}.{name}: shape {tuple(msg[name].shape)} != {shape}")
    _check_text(kind, msg, "x_own_text", "x_own_offsets", m)
    for name in ("x_scores", "x_own_logp", "prompt_logp", "own_prompt_logp"):
        _check_logp(kind, name, msg[name])
    for name in ("x_score_mask", "x_own_mask", "x_own_done"):
        _check_mask(kind, name, msg[name])


def nbytes(msg: dict[str, torch.Tensor]) -> int:
    """Payload size of a message: the bytes of its tensors."""
    return sum(t.numel() * t.element_size() for t in msg.values())
