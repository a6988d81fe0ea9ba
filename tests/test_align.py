"""Cross-tokenizer alignment: character spans, shared boundaries and the exact projection of
a teacher's log-probs onto a student's tokens, checked against a byte-level oracle on real
tokenizers (two byte-level BPEs and a character-level one); message validation; the shared
support of two vocabularies."""

import random
from bisect import bisect_left

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from flminillm.align import (
    bucket_logprobs,
    char_spans,
    project_logprobs,
    shared_boundaries,
    support_overlap,
    validate_text_message,
)
from flminillm.tokenizer import train_tokenizer

CORPUS_A = [
    f"the {w} ate {i} apples, and {i + 1} pears!" for i in range(150) for w in ("cat", "dog")
]
CORPUS_B = [f"What is {i}? It is {i * 3}: café, naïve, 日本 🙂." for i in range(200)]
ALPHABET = "abcdefghij klmnop 0123456789 .,?!:'é日本🙂ü"
CHARS = "".join(sorted(set(ALPHABET + "abcdefghijklmnopqrstuvwxyz")))  # the character vocabulary
FIXED = ["the cat ate 3 apples", "café 日本 🙂", "🙂🙂", "日本", "é", "a🙂b", " ", ""]


def _char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character (🙂 included), ids 0 and 1 for unk and eos."""
    vocab = {"<unk>": 0, "<|endoftext|>": 1}
    for c in sorted(set(alphabet)):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def toks():
    return {
        "bpe-300": train_tokenizer(CORPUS_A, 300),
        "bpe-600": train_tokenizer(CORPUS_B, 600),
        "chars": _char_tokenizer(CHARS),
    }


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30))) for _ in range(n)
    ] + FIXED


def _byte_map() -> dict[str, int]:
    """GPT-2's byte <-> printable character table (what ByteLevel tokens are written in)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


BYTE_OF = _byte_map()


def _byte_ends(name: str, tok, text: str) -> tuple[list[int], list[int]]:
    """Oracle: the ids of `text` and each token's end in UTF-8 bytes, read from the tokens'
    own strings (not from decoding)."""
    ids = tok.encode(text, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    raw = [p.encode() if name == "chars" else bytes(BYTE_OF[c] for c in p) for p in pieces]
    assert b"".join(raw) == text.encode()
    ends, n = [], 0
    for r in raw:
        n += len(r)
        ends.append(n)
    return ids, ends


def _oracle(text: str, t_ends: list[int], s_ends: list[int], t_logp: torch.Tensor):
    """The projection done in bytes: segments between byte offsets where both tokenisations
    end a token on a character boundary; each token in the first segment that ends at or
    after its last byte; a segment's teacher mass on its last student token."""
    chars = {len(text[:i].encode()) for i in range(1, len(text) + 1)}
    shared = sorted(set(t_ends) & set(s_ends) & chars)
    last = {bisect_left(shared, e): i for i, e in enumerate(s_ends)}
    out = torch.zeros(len(s_ends), dtype=t_logp.dtype)
    for j, e in enumerate(t_ends):
        out[last[bisect_left(shared, e)]] += t_logp[j]
    shared_chars = [len(text.encode()[:b].decode()) for b in shared]
    return out, shared_chars


def test_the_byte_table_is_the_tokenizers_own(toks):
    tok = toks["bpe-300"]
    assert len(set(BYTE_OF.values())) == 256
    ids = tok.encode("é日🙂 x", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert b"".join(bytes(BYTE_OF[c] for c in p) for p in pieces) == "é日🙂 x".encode()


def test_rewards_sum_to_the_sequence_log_ratio_for_every_pair(toks):
    """Every pair of tokenizers (both ways, and each with itself), every text: the projected
    teacher log-probs match the byte-level oracle, and the rewards sum to the log-ratio."""
    g = torch.Generator().manual_seed(0)
    checked, naive_off, split = 0, 0, 0
    for text in _texts(30, seed=1):
        for t_name, teacher in toks.items():
            for s_name, student in toks.items():
                t_ids, t_ends = _byte_ends(t_name, teacher, text)
                s_ids, s_ends = _byte_ends(s_name, student, text)
                t_spans = char_spans(teacher, text, t_ids)
                s_spans = char_spans(student, text, s_ids)
                assert char_spans(teacher, text) == t_spans
                assert validate_text_message(text.encode(), t_spans, 1000) == text
                validate_text_message(text, torch.tensor(s_spans).reshape(-1, 2), 1000)
                t_logp = -torch.rand(len(t_ids), generator=g, dtype=torch.float64) * 5
                s_logp = -torch.rand(len(s_ids), generator=g, dtype=torch.float64) * 5

                shared = shared_boundaries(t_spans, s_spans)
                expected, oracle_shared = _oracle(text, t_ends, s_ends, t_logp)
                assert shared == oracle_shared, (t_name, s_name, text)
                assert all(0 < b <= len(text) for b in shared)
                assert shared == sorted(set(shared))
                assert (shared[-1] == len(text)) if text else shared == []

                projected = project_logprobs(t_logp, t_spans, s_spans)
                assert projected.shape == (len(s_ids),)
                assert torch.allclose(projected, expected, atol=1e-12), (t_name, s_name, text)
                rewards = projected - s_logp
                log_ratio = float(t_logp.sum() - s_logp.sum())
                assert float(rewards.sum()) == pytest.approx(log_ratio, abs=1e-5)
                # pairing token t with token t, dropping the longer one's tail, is not exact
                n = min(len(t_ids), len(s_ids))
                naive = float((t_logp[:n] - s_logp[:n]).sum())
                naive_off += abs(naive - log_ratio) > 1e-3
                split += any(e == s for s, e in t_spans)
                checked += 1
    assert checked == 9 * 38
    assert naive_off > 100  # the tokenisations really differ
    assert split > 20  # and byte-level tokens really end inside characters


def test_a_hand_worked_example():
    """Byte pieces of 'a🙂' (🙂 = F0 9F 99 82): a token ending inside 🙂 has an empty span,
    and its log-prob goes with the token that finishes 🙂, not with the 'a' before it."""

    class Pieces:  # a tokenizer that cuts a text into fixed byte pieces
        def __init__(self, pieces: list[bytes]):
            self.pieces = pieces

        def encode(self, text, add_special_tokens=False):
            return list(range(len(self.pieces)))

        def decode(self, ids):
            return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    text = "a🙂"
    teacher = Pieces([b"a\xf0\x9f", b"\x99\x82"])  # 'a' + half of 🙂 | the other half
    student = Pieces([b"a", b"\xf0\x9f\x99", b"\x82"])
    t_spans, s_spans = char_spans(teacher, text), char_spans(student, text)
    assert t_spans == [(0, 0), (0, 2)]  # no boundary after 'a' on the teacher's side
    assert s_spans == [(0, 1), (1, 1), (1, 2)]
    assert shared_boundaries(t_spans, s_spans) == [2]
    out = project_logprobs(torch.tensor([-1.0, -2.0]), t_spans, s_spans)
    assert out.tolist() == [0.0, 0.0, -3.0]

    teacher = Pieces([b"a", b"\xf0\x9f", b"\x99\x82"])  # 'a' | half | half: 1 is shared now
    t_spans = char_spans(teacher, text)
    assert t_spans == [(0, 1), (1, 1), (1, 2)]
    assert shared_boundaries(t_spans, s_spans) == [1, 2]
    out = project_logprobs(torch.tensor([-1.0, -2.0, -4.0]), t_spans, s_spans)
    assert out.tolist() == [-1.0, 0.0, -6.0]  # the first half of 🙂 does not go to 'a'
    rewards = out - torch.tensor([-0.5, -0.25, -0.125])
    assert rewards.tolist() == [-0.5, 0.25, -5.875]
    assert float(rewards.sum()) == -7.0 + 0.875

    # whole characters: 'ab|c|d' onto 'a|bcd' (only the end is shared) and 'a|b|cd' (2 and 4)
    t_spans = char_spans(Pieces([b"ab", b"c", b"d"]), "abcd")
    assert t_spans == [(0, 2), (2, 3), (3, 4)]
    logp = torch.tensor([-1.0, -2.0, -4.0])
    assert project_logprobs(logp, t_spans, [(0, 1), (1, 4)]).tolist() == [0.0, -7.0]
    assert project_logprobs(logp, t_spans, [(0, 1), (1, 2), (2, 4)]).tolist() == [0.0, -1.0, -6.0]


def test_spans_of_split_characters_on_real_tokenizers(toks):
    """The byte alphabet alone cuts every multi-byte character; a text holding U+FFFD itself
    is not mistaken for an unfinished character; the character tokenizer ends everywhere."""
    bytes_tok = train_tokenizer(["x"], 258)
    assert char_spans(bytes_tok, "a🙂b") == [(0, 1), (1, 1), (1, 1), (1, 1), (1, 2), (2, 3)]
    assert char_spans(bytes_tok, "x\ufffdy") == [(0, 1), (1, 1), (1, 1), (1, 2), (2, 3)]
    assert char_spans(toks["chars"], "日本 🙂") == [(0, 1), (1, 2), (2, 3), (3, 4)]
    # the character tokenizer shares every boundary of the other: shared == its real ends
    bpe = char_spans(toks["bpe-300"], "café 日本 🙂")
    assert shared_boundaries(bpe, char_spans(toks["chars"], "café 日本 🙂")) == sorted(
        {e for s, e in bpe if e > s}
    )


def test_ids_that_do_not_round_trip_are_refused(toks):
    with pytest.raises(ValueError, match="token_ids: they decode to .*round-trip"):
        char_spans(toks["chars"], "XYZ")  # not in the character vocabulary: <unk>
    tok = toks["bpe-300"]
    with pytest.raises(ValueError, match="token_ids: they decode to"):
        char_spans(tok, "the cat", tok.encode("the dog", add_special_tokens=False))
    with pytest.raises(ValueError, match="teacher_logp: shape"):
        project_logprobs(torch.zeros(3), [(0, 1), (1, 2)], [(0, 2)])
    with pytest.raises(ValueError, match="same text"):
        project_logprobs(torch.zeros(2), [(0, 1), (1, 2)], [(0, 3)])


@pytest.mark.parametrize(
    ("text", "spans", "match"),
    [
        (b"ab\xff", [(0, 3)], r"text: not valid UTF-8 \(invalid start byte at byte 2\)"),
        ("caf\u00e9".encode()[:-1], [(0, 4)], r"text: not valid UTF-8"),
        ("abc", [(0, 2), (2, 7)], r"spans\[1\]: \(2, 7\) is not inside the text of 3"),
        ("abc", [(0, 2), (-1, 3)], r"spans\[1\]: \(-1, 3\) is not inside the text"),
        ("abc", [(0, 2), (2, 1), (1, 3)], r"spans\[1\]: \(2, 1\) ends before it starts.*monotone"),
        (
            "abc",
            [(0, 2), (1, 3)],
            r"spans\[1\]: starts at 1 and overlaps the previous span.*contiguous",
        ),
        ("abc", [(0, 1), (2, 3)], r"spans\[1\]: starts at 2 and leaves a gap"),
        ("abc", [(1, 3)], r"spans\[0\]: starts at 1 .*the first from 0"),
        ("abc", [(0, 2)], r"spans: end at 2, not at the text's end 3"),
        ("abc", [], r"spans: empty, but a non-empty text"),
        ("abc", [(0, 1, 2)], r"spans\[0\]: expected a pair of integers"),
        ("abc", [(0, 1.5)], r"spans\[0\]: expected a pair of integers"),
        ("abc" * 10, [(0, 30)], r"text: 30 characters, more than the limit 10"),
        (b"x" * 41, [(0, 41)], r"text: 41 bytes, more than the limit of 10 characters"),
        (123, [], r"text: expected str or UTF-8 bytes"),
    ],
)
def test_text_messages_are_validated(text, spans, match):
    with pytest.raises(ValueError, match=match):
        validate_text_message(text, spans, 10 if "limit" in match else 100)


def test_valid_text_messages_pass():
    assert validate_text_message("", [], 5) == ""
    assert validate_text_message("日🙂".encode(), [(0, 1), (1, 1), (1, 2)], 2) == "日🙂"
    assert validate_text_message("ab", torch.tensor([[0, 2], [2, 2]], dtype=torch.int32), 2) == "ab"


def test_the_support_both_vocabularies_contain(toks):
    """Student id -> teacher id for tokens of the same string, one-to-one, no special or
    partial-byte token; distributions over it plus a tail bucket keep all their mass."""
    s_tok, t_tok = toks["bpe-300"], toks["bpe-600"]
    s_ids, t_ids = support_overlap(s_tok, t_tok)
    assert s_ids.dtype == t_ids.dtype == torch.long and s_ids.shape == t_ids.shape
    assert s_ids.tolist() == sorted(set(s_ids.tolist())) and len(set(t_ids.tolist())) == len(t_ids)
    for i, j in zip(s_ids.tolist(), t_ids.tolist(), strict=True):
        assert s_tok.decode([i]) == t_tok.decode([j]) != ""
    strings = {s_tok.decode([i]) for i in s_ids.tolist()}
    assert {"a", " ", "1"} <= strings
    assert "\ufffd" not in "".join(strings) and "<|endoftext|>" not in strings
    assert 0 not in s_ids.tolist() and 1 not in s_ids.tolist()  # pad, eos
    assert 40 < len(s_ids) < 300  # ASCII bytes and some merges, not the partial bytes

    c_ids, b_ids = support_overlap(toks["chars"], t_tok)  # 日, é, 🙂 if bpe-600 merged them
    pairs = {
        toks["chars"].decode([i]): t_tok.decode([j])
        for i, j in zip(c_ids.tolist(), b_ids.tolist(), strict=True)
    }
    assert all(k == v for k, v in pairs.items()) and "a" in pairs and "<unk>" not in pairs
    assert set(pairs) == {c for c in CHARS if len(t_tok.encode(c, add_special_tokens=False)) == 1}

    g = torch.Generator().manual_seed(0)
    logq = torch.log_softmax(torch.randn(2, 3, len(s_tok), generator=g), -1)
    logp = torch.log_softmax(torch.randn(2, 3, len(t_tok), generator=g), -1)
    q, p = bucket_logprobs(logq, s_ids), bucket_logprobs(logp, t_ids)
    assert q.shape == p.shape == (2, 3, len(s_ids) + 1)
    assert torch.allclose(q.logsumexp(-1), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(p.logsumexp(-1), torch.zeros(2, 3), atol=1e-5)
    assert torch.equal(q[..., :-1], logq[..., s_ids])
    kl = (p.exp() * (p - q)).sum(-1)  # forward KL over the shared support + tail
    assert (kl > 0).all() and torch.isfinite(kl).all()
    full = torch.log_softmax(torch.randn(4), -1)
    assert bucket_logprobs(full, torch.arange(4))[-1] == float("-inf")
