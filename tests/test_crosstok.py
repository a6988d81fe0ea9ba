"""Across tokenizers: per-token rewards that sum exactly to the sequence log-ratio, and the
text form of the messages, validated on receipt."""

import random

import pytest
import torch

from flminillm.align import char_spans, project_logprobs, validate_text_message
from flminillm.messages import MessageError, pack_texts, unpack_texts
from flminillm.tokenizer import train_tokenizer

CORPUS_A = [
    f"the {w} ate {i} apples and {i + 1} pears." for i in range(200) for w in ("cat", "dog")
]
CORPUS_B = [f"What is {i}? It is {i * 3}, café naïve 日本 🙂." for i in range(300)]
ALPHABET = "abcdefghij klmnop 0123456789 .,?!é日本🙂ü"


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "bpe-300": train_tokenizer(CORPUS_A, 300),
        "bpe-600": train_tokenizer(CORPUS_B, 600),
        "bytes": train_tokenizer(["x"], 258),  # the byte alphabet alone: byte-level
    }


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(n)] + [
        "the cat ate 3 apples",
        "café 日本 🙂",
        "🙂🙂",
        "",
    ]


def test_projected_rewards_sum_to_the_sequence_log_ratio(tokenizers):
    g = torch.Generator().manual_seed(0)
    names = list(tokenizers)
    checked = 0
    for text in _texts(30, seed=1):
        for t_name in names:
            for s_name in names:
                teacher, student = tokenizers[t_name], tokenizers[s_name]
                t_spans = char_spans(teacher, text)
                s_ids = student.encode(text, add_special_tokens=False)
                s_spans = char_spans(student, text, s_ids)
                validate_text_message(text, t_spans, 10_000)
                t_logp = -torch.rand(len(t_spans), generator=g, dtype=torch.float64) * 5
                s_logp = -torch.rand(len(s_spans), generator=g, dtype=torch.float64) * 5
                rewards = project_logprobs(t_logp, t_spans, s_spans) - s_logp
                assert float(rewards.sum()) == pytest.approx(
                    float(t_logp.sum() - s_logp.sum()), abs=1e-5
                ), (t_name, s_name, text)
                checked += 1
    assert checked == 9 * 34
    # the tokenisations really differ: a naive token-by-token pairing would not do
    a = char_spans(tokenizers["bpe-300"], "the cat ate 3 apples")
    b = char_spans(tokenizers["bytes"], "the cat ate 3 apples")
    assert len(a) < len(b)


def test_a_worked_example():
    """Teacher tokens 'ab|c|d' onto student tokens 'a|bcd' (only the end is a shared
    boundary) and 'a|b|cd' (2 and 4 are): each shared segment's mass on its last token."""

    class Chars:  # a character-level tokenizer: one token per character
        def __init__(self, pieces):
            self.pieces = pieces

        def encode(self, text, add_special_tokens=False):
            return list(range(len(self.pieces)))

        def decode(self, ids):
            return "".join(self.pieces[i] for i in ids)

    teacher, student = Chars(["ab", "c", "d"]), Chars(["a", "bcd"])
    t_spans, s_spans = char_spans(teacher, "abcd"), char_spans(student, "abcd")
    assert t_spans == [(0, 2), (2, 3), (3, 4)] and s_spans == [(0, 1), (1, 4)]
    out = project_logprobs(torch.tensor([-1.0, -2.0, -4.0]), t_spans, s_spans)
    assert out.tolist() == [0.0, -7.0]  # only the end is shared
    three = Chars(["a", "b", "cd"])
    out = project_logprobs(torch.tensor([-1.0, -2.0, -4.0]), t_spans, char_spans(three, "abcd"))
    assert out.tolist() == [0.0, -1.0, -6.0]  # 'ab' ends at 2 for both


def test_text_messages_are_validated():
    data, off = pack_texts(["héllo", "", "🙂"])
    assert unpack_texts(data, off, "t") == ["héllo", "", "🙂"]
    bad = data.clone()
    bad[1] = 0xFF  # inside "é": not UTF-8 any more
    with pytest.raises(MessageError, match=r"t\[0\]: not valid UTF-8"):
        unpack_texts(bad, off, "t")
    with pytest.raises(MessageError, match="offsets must run from 0"):
        unpack_texts(data, off + 1, "t")
    with pytest.raises(MessageError, match="monotone"):
        unpack_texts(data, torch.tensor([0, 5, 3, data.numel()]), "t")
    with pytest.raises(ValueError, match="not inside the text"):
        validate_text_message("abc", [(0, 2), (2, 7)], 100)
    with pytest.raises(ValueError, match="contiguous"):
        validate_text_message("abc", [(0, 2), (1, 3)], 100)
    with pytest.raises(ValueError, match="not at the text's end"):
        validate_text_message("abc", [(0, 2)], 100)
    with pytest.raises(ValueError, match="more than the limit"):
        validate_text_message("abc" * 10, [(0, 30)], 10)


def test_a_teachers_message_projects_exactly_onto_the_students_tokens(tokenizers):
    """Through the real message path: a model with one tokenizer teaches a student with
    another; per rollout, the projected log-probs sum to the teacher's own sequence score."""
    from flminillm.config import ModelSpec
    from flminillm.crosstok import rollout_text_fields, teach_across, to_student_space
    from flminillm.generation import encode_prompts, sample_batched
    from flminillm.messages import validate_cross_teaching, validate_rollouts
    from flminillm.models import build_model
    from flminillm.tokenizer import QA_STYLE

    s_tok, t_tok = tokenizers["bpe-300"], tokenizers["bpe-600"]
    spec = ModelSpec(family="llama", hidden_size=32, num_layers=1, num_heads=2, max_positions=64)
    student = build_model(spec, len(s_tok), s_tok.pad_token_id, s_tok.eos_token_id, seed=0)
    teacher = build_model(spec, len(t_tok), t_tok.pad_token_id, t_tok.eos_token_id, seed=1)
    prompts = ["the cat ate", "What is 3?", "café 🙂"]
    ids, mask = encode_prompts(s_tok, [QA_STYLE.prompt(p) for p in prompts], 32)
    g = torch.Generator().manual_seed(0)
    r = sample_batched(student, ids, mask, 4, max_new_tokens=8, eos_id=s_tok.eos_token_id,
                       pad_id=s_tok.pad_token_id, top_k=3, generator=g)  # fmt: skip
    msg = {
        "prompt_ids": r.prompt_ids.int(), "prompt_mask": r.prompt_mask.to(torch.uint8),
        "response_ids": r.response_ids.int(), "response_mask": r.response_mask.to(torch.uint8),
        "support_ids": r.support_ids.int(),
        "ask_prompt_ids": ids[:2].int(), "ask_prompt_mask": mask[:2].to(torch.uint8),
        **rollout_text_fields(s_tok, prompts, r.response_ids, r.response_mask, prompts[:2]),
    }  # fmt: skip
    validate_rollouts(msg, len(s_tok))
    x = teach_across(teacher, t_tok, QA_STYLE, msg, max_prompt=32, batch_size=4,
                     sample_kw=dict(max_new_tokens=6, eos_id=t_tok.eos_token_id,
                                    pad_id=t_tok.pad_token_id, top_k=1, generator=g))  # fmt: skip
    validate_cross_teaching(x, msg)
    back = to_student_space(x, msg, s_tok)
    seq_teacher = (x["x_scores"] * x["x_score_mask"]).sum(1)
    seq_projected = (back["scores"][..., 0] * msg["response_mask"]).sum(1)
    assert torch.allclose(seq_projected.double(), seq_teacher.double(), atol=1e-4)
    # the teacher's answers, re-tokenised by the student, keep their sequence log-prob
    assert torch.allclose(
        back["own_logp"][..., 0].sum(1), (x["x_own_logp"] * x["x_own_mask"]).sum(1), atol=1e-4
    )
    assert back["own_response_ids"].max() < len(s_tok)


def test_a_federation_across_tokenizers(tiny_config):
    """The tiny federation with bob on a tokenizer of his own (BPE 300 instead of the shared
    400), in one process: the server and bob teach each other in text, alice in ids."""
    from flminillm.config import PartyTokenizer
    from flminillm.inprocess import run_federation
    from flminillm.ledger import round_records
    from flminillm.messages import CROSS_TEACHING_FIELDS, TEACHING_FIELDS
    from flminillm.store import open_store

    bob = tiny_config.clients[1]
    own = bob.model_copy(
        update={"model": bob.model.model_copy(update={"tokenizer": PartyTokenizer(vocab_size=300)})}
    )
    cfg = tiny_config.model_copy(update={"clients": [tiny_config.clients[0], own]})
    final = run_federation(cfg)[-1]
    assert final["vocab_sizes"] == {"server": 400, "alice": 400, "bob": 300}
    store = open_store(cfg.store.uri)
    fields = {
        r["party"]: set(store.scoped("exchange").get_tensors(r["outputs"]["teaching"]["digest"]))
        for r in round_records(store, cfg.federation_id(), 1) if r["step"] == "teach"
    }  # fmt: skip
    assert fields["server-to-bob"] == fields["bob-to-server"] == set(CROSS_TEACHING_FIELDS)
    assert fields["server-to-alice"] == set(TEACHING_FIELDS)
    assert set(final["eval"]["bob"]) == set(tiny_config.data.families)


@pytest.mark.slow
def test_a_federation_across_tokenizers_through_kfp(tmp_path, capsys):
    """configs/files-example.yaml with bob on a tokenizer of his own (BPE 300 instead of the
    shared 400), through the CLI and the KFP local runner (slow: the same federation runs in
    one process in the default suite)."""
    import json
    from pathlib import Path

    import yaml

    from flminillm.cli import main

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "configs" / "files-example.yaml").read_text())
    cfg["clients"][1]["model"]["tokenizer"] = {"vocab_size": 300}
    text = json.dumps(cfg).replace("configs/files-example/", f"{root}/configs/files-example/")
    cfg = json.loads(text.replace("runs/files-example", str(tmp_path)))
    path = tmp_path / "cross.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 0
    manifest = json.loads((tmp_path / "round_manifest.json").read_text())
    assert manifest["tokenizers"]["bob"] != manifest["tokenizers"]["server"]
    assert manifest["vocab_sizes"]["bob"] == 300
    results = json.loads((tmp_path / "results.json").read_text())["parties"]
    assert set(results["bob"]["after"]) == {"successor", "repeat", "first_letter"}

    from flminillm.config import load_config
    from flminillm.ledger import round_records
    from flminillm.messages import CROSS_TEACHING_FIELDS, TEACHING_FIELDS
    from flminillm.store import open_store

    store = open_store(cfg["store"]["uri"])
    records = round_records(store, load_config(path).federation_id(), 1)
    fields = {
        r["party"]: set(store.scoped("exchange").get_tensors(r["outputs"]["teaching"]["digest"]))
        for r in records if r["step"] == "teach"
    }  # fmt: skip
    assert fields["server-to-bob"] == set(CROSS_TEACHING_FIELDS)  # text and spans
    assert fields["bob-to-server"] == set(CROSS_TEACHING_FIELDS)
    assert fields["server-to-alice"] == set(TEACHING_FIELDS)  # the same tokenizer: token ids
