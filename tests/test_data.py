"""Tests for the procedurally generated benchmark (flminillm.data)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pycountry
import pytest

from flminillm.data import (
    COUNTRIES,
    CURRENCIES,
    DISTRACTORS,
    FAMILIES,
    PROMPT_FORMAT,
    WORDS,
    Benchmark,
    Example,
    build_benchmark,
    format_prompt,
    format_target,
    load_jsonl,
    make_examples,
    partition_families,
    pretraining_corpus,
    save_jsonl,
)

REQUIRED = ["country_code", "currency", "compare", "successor", "repeat", "first_letter"]
GENERATIVE = ["compare", "successor", "repeat", "first_letter"]


def _small_benchmark(fbc: dict[str, list[str]], seed: int = 0) -> Benchmark:
    return build_benchmark(
        fbc, n_train=120, n_test=25, n_public_per_family=16, n_eval=30, seed=seed
    )


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    fbc = partition_families(list(FAMILIES), ["a", "b", "c"], seed=0)
    return _small_benchmark(fbc)


# ------------------------------------------------------------------ formats and records


def test_prompt_format_and_target() -> None:
    assert PROMPT_FORMAT == "Q: {prompt}\nA:"
    assert format_prompt("Say hi.") == "Q: Say hi.\nA:"
    assert format_target("hi") == " hi"


def test_example_dict_round_trip_and_missing_key() -> None:
    ex = Example("successor", "What number comes after 41?", "42")
    assert Example.from_dict(ex.to_dict()) == ex
    with pytest.raises(ValueError, match="answer"):
        Example.from_dict({"family": "x", "prompt": "p"})


# ------------------------------------------------------------------ families


def test_registry_has_required_families_with_paraphrases() -> None:
    assert set(REQUIRED) <= set(FAMILIES)
    for name, fam in FAMILIES.items():
        assert fam.name == name
        assert len(set(fam.templates)) >= 3, name


@pytest.mark.parametrize("family", REQUIRED)
def test_answers_short_and_paraphrases_used(family: str) -> None:
    exs = make_examples(family, 300, seed=1)
    assert all(e.family == family for e in exs)
    assert all(1 <= len(e.answer.split()) <= 3 for e in exs)
    # at least 3 distinct templates appear: compare prompts with the slot values removed
    slots = [r"\d+", *WORDS, *(n for n, _ in COUNTRIES), *(c for c, _ in CURRENCIES)]
    pattern = re.compile(r"\b(" + "|".join(slots) + r")\b")
    shapes = {pattern.sub("#", e.prompt) for e in exs}
    assert len(shapes) >= 3


def test_successor_and_compare_answers() -> None:
    succ = make_examples("successor", 500, seed=0)
    for e in succ:
        (n,) = re.findall(r"\d+", e.prompt)
        assert int(e.answer) == int(n) + 1
        assert 0 <= int(n) <= 98
    assert any("41" in e.prompt and e.answer == "42" for e in succ)
    for e in make_examples("compare", 300, seed=0):
        a, b = (int(x) for x in re.findall(r"\d+", e.prompt))
        assert a != b and 0 <= min(a, b) and max(a, b) <= 99
        assert e.answer == str(max(a, b))


def test_fact_families_match_pycountry() -> None:
    assert 35 <= len(COUNTRIES) <= 50 and 35 <= len(CURRENCIES) <= 50
    cc = make_examples("country_code", 400, seed=0)
    for e in cc:
        (name,) = [n for n, _ in COUNTRIES if n in e.prompt]
        assert pycountry.countries.lookup(name).alpha_2 == e.answer
    assert any("France" in e.prompt and e.answer == "FR" for e in cc)
    cur = make_examples("currency", 400, seed=0)
    for e in cur:
        (code,) = re.findall(r"\b[A-Z]{3}\b", e.prompt)
        assert pycountry.currencies.get(alpha_3=code).name == e.answer
    assert any("JPY" in e.prompt and e.answer == "Yen" for e in cur)


def test_word_families_answers() -> None:
    assert 90 <= len(WORDS) == len(set(WORDS))
    assert all(w.isalpha() and w.islower() for w in WORDS)
    for e in make_examples("repeat", 200, seed=3):
        w = e.answer.split()[0]
        assert e.answer == f"{w} {w}" and re.search(rf"\b{w}\b", e.prompt)
    for e in make_examples("first_letter", 200, seed=3):
        (w,) = [w for w in WORDS if re.search(rf"\b{w}\b", e.prompt)]
        assert e.answer == w[0]
    hand = [e for e in make_examples("first_letter", 500, seed=0) if "banana" in e.prompt]
    assert hand and all(e.answer == "b" for e in hand)


def test_make_examples_deterministic_and_seed_dependent() -> None:
    assert make_examples("compare", 50, seed=7) == make_examples("compare", 50, seed=7)
    assert make_examples("compare", 50, seed=7) != make_examples("compare", 50, seed=8)


def test_make_examples_unknown_family_lists_allowed() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        make_examples("nope", 3, seed=0)
    for name in REQUIRED:
        assert name in str(info.value)


# ------------------------------------------------------------------ partition


def test_partition_disjoint_covering_balanced_deterministic() -> None:
    fams = list(FAMILIES)
    for k in range(1, len(fams) + 1):
        clients = [f"c{i}" for i in range(k)]
        part = partition_families(fams, clients, seed=3)
        assert list(part) == clients
        flat = [f for fs in part.values() for f in fs]
        assert sorted(flat) == sorted(fams)  # covering and disjoint
        sizes = [len(fs) for fs in part.values()]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert part == partition_families(fams, clients, seed=3)
    parts = {
        tuple(map(tuple, partition_families(fams, ["a", "b", "c"], seed=s).values()))
        for s in range(10)
    }
    assert len(parts) > 1  # the seed matters


def test_partition_rejects_too_few_families() -> None:
    with pytest.raises(ValueError, match="at least"):
        partition_families(["compare", "repeat"], ["a", "b", "c"], seed=0)


# ------------------------------------------------------------------ benchmark


def test_benchmark_shapes(bench: Benchmark) -> None:
    held = sorted(f for fs in bench.families_by_client.values() for f in fs)
    assert held == sorted(FAMILIES)
    assert sorted(bench.eval_sets) == held
    for cid, fams in bench.families_by_client.items():
        assert Counter(e.family for e in bench.client_train[cid]) == {f: 120 for f in fams}
        assert Counter(e.family for e in bench.client_test[cid]) == {f: 25 for f in fams}
    assert all(len(v) == 30 for v in bench.eval_sets.values())


def test_client_families_disjoint(bench: Benchmark) -> None:
    seen: set[str] = set()
    for cid, fams in bench.families_by_client.items():
        assert fams and not (seen & set(fams))
        seen |= set(fams)
        assert {e.family for e in bench.client_train[cid]} == set(fams)


def test_train_test_prompts_disjoint_per_client(bench: Benchmark) -> None:
    for cid in bench.client_train:
        train = {e.prompt for e in bench.client_train[cid]}
        test = {e.prompt for e in bench.client_test[cid]}
        assert train and test and not (train & test)


def test_large_train_sets_keep_test_unique_and_disjoint() -> None:
    fams = ["country_code", "currency", "successor", "repeat"]
    b = build_benchmark(
        {"a": fams}, n_train=1000, n_test=40, n_public_per_family=4, n_eval=30, seed=2
    )
    for fam in fams:
        train = {e.prompt for e in b.client_train["a"] if e.family == fam}
        test = [e.prompt for e in b.client_test["a"] if e.family == fam]
        assert len(test) == len(set(test)) == 40
        assert not (train & set(test))
    # every fact of the tables is still taught by the train set
    cc_answers = {e.answer for e in b.client_train["a"] if e.family == "country_code"}
    assert cc_answers == {code for _, code in COUNTRIES}


def test_generative_eval_disjoint_from_train_and_unique(bench: Benchmark) -> None:
    train = {e.prompt for exs in bench.client_train.values() for e in exs}
    test = {e.prompt for exs in bench.client_test.values() for e in exs}
    public = {e.prompt for e in bench.public_prompts}
    for fam in GENERATIVE:
        ev = [e.prompt for e in bench.eval_sets[fam]]
        assert len(set(ev)) == len(ev)
        assert not (set(ev) & train) and not (set(ev) & test) and not (set(ev) & public)


def test_public_prompts_unlabelled_and_balanced(bench: Benchmark) -> None:
    assert all(e.answer == "" for e in bench.public_prompts)
    assert Counter(e.family for e in bench.public_prompts) == {f: 16 for f in FAMILIES}
    # shuffled across families, not one block per family
    fams = [e.family for e in bench.public_prompts]
    assert sum(a != b for a, b in zip(fams, fams[1:], strict=False)) > len(FAMILIES)


def test_public_prompts_cover_only_held_families() -> None:
    b = _small_benchmark({"x": ["successor"], "y": ["currency", "repeat"]})
    assert Counter(e.family for e in b.public_prompts) == {
        "successor": 16,
        "currency": 16,
        "repeat": 16,
    }
    assert sorted(b.eval_sets) == ["currency", "repeat", "successor"]
    assert b.families == ["currency", "successor", "repeat"]


def test_benchmark_deterministic_and_seed_dependent(bench: Benchmark) -> None:
    fbc = bench.families_by_client
    assert _small_benchmark(fbc, seed=0) == bench
    other = _small_benchmark(fbc, seed=1)
    assert other.client_train != bench.client_train
    assert other.eval_sets != bench.eval_sets


def test_adding_a_client_keeps_other_clients_data() -> None:
    base = _small_benchmark({"a": ["country_code", "compare"], "b": ["successor"]})
    more = _small_benchmark({"a": ["country_code", "compare"], "b": ["successor"], "c": ["repeat"]})
    for cid in ("a", "b"):
        assert more.client_train[cid] == base.client_train[cid]
        assert more.client_test[cid] == base.client_test[cid]
    for fam in ("country_code", "compare", "successor"):
        assert more.eval_sets[fam] == base.eval_sets[fam]


def test_benchmark_rejects_shared_or_unknown_families() -> None:
    with pytest.raises(ValueError, match="disjoint"):
        _small_benchmark({"a": ["compare"], "b": ["compare"]})
    with pytest.raises(ValueError, match="allowed"):
        _small_benchmark({"a": ["compare", "bogus"]})


def test_benchmark_identical_in_fresh_process() -> None:
    code = (
        "import json;from flminillm.data import build_benchmark as b;"
        "x=b({'a':['compare','currency'],'b':['repeat']},20,5,4,6,seed=11);"
        "print(json.dumps([[e.to_dict() for e in x.public_prompts],"
        "{k:[e.to_dict() for e in v] for k,v in x.client_train.items()}]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=root
    ).stdout
    x = build_benchmark({"a": ["compare", "currency"], "b": ["repeat"]}, 20, 5, 4, 6, seed=11)
    assert json.loads(out) == [
        [e.to_dict() for e in x.public_prompts],
        {k: [e.to_dict() for e in v] for k, v in x.client_train.items()},
    ]


# ------------------------------------------------------------------ pre-training corpus


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return pretraining_corpus(1500, seed=0)


def test_corpus_deterministic_and_mixed(corpus: list[str]) -> None:
    assert len(corpus) == 1500
    assert pretraining_corpus(1500, seed=0) == corpus
    assert pretraining_corpus(1500, seed=1) != corpus
    qa = [d for d in corpus if d.startswith("Q: ")]
    assert 0.3 * len(corpus) < len(qa) < 0.7 * len(corpus)
    for d in qa:
        m = re.fullmatch(r"Q: (.+)\nA: (.+)", d)
        assert m, d
        assert d == format_prompt(m.group(1)) + format_target(m.group(2))
        assert 1 <= len(m.group(2).split()) <= 3
    assert not set(DISTRACTORS) & set(FAMILIES)


def test_corpus_does_not_leak_benchmark(corpus: list[str], bench: Benchmark) -> None:
    blob = "\n\x00".join(corpus)
    examples = [e for exs in bench.client_train.values() for e in exs]
    examples += [e for exs in bench.eval_sets.values() for e in exs]
    examples += [e for fam in FAMILIES for e in make_examples(fam, 300, seed=5)]
    for e in examples:
        assert e.prompt not in blob, e.prompt
        assert format_prompt(e.prompt) + format_target(e.answer) not in blob
    # Fact tables never co-occur in a document: no country name with its code,
    # no currency code with its name.
    for doc in corpus:
        for name, code in COUNTRIES:
            assert not (name in doc and re.search(rf"\b{code}\b", doc)), doc
        for code, name in CURRENCIES:
            assert not (code in doc and name in doc), doc


def test_corpus_shares_the_vocabulary(corpus: list[str]) -> None:
    blob = " ".join(corpus)
    assert sum(name in blob for name, _ in COUNTRIES) >= 30
    assert sum(re.search(rf"\b{code}\b", blob) is not None for code, _ in CURRENCIES) >= 30
    assert sum(re.search(rf"\b{w}\b", blob) is not None for w in WORDS) >= 80


# ------------------------------------------------------------------ JSONL I/O


def test_save_load_round_trip_atomic(tmp_path: Path) -> None:
    exs = make_examples("currency", 10, seed=0) + [Example("x", "ünï\ncode", "")]
    path = tmp_path / "sub" / "data.jsonl"
    save_jsonl(path, exs)
    assert load_jsonl(path) == exs
    save_jsonl(path, exs[:3])  # overwrite in place
    assert load_jsonl(path) == exs[:3]
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.jsonl"]


def test_load_dolly_records(tmp_path: Path) -> None:
    path = tmp_path / "dolly.jsonl"
    rows = [
        {"instruction": "Name a fruit.", "context": "", "response": "Apple", "category": "qa"},
        {"instruction": "Summarise.", "context": "Cats sleep.", "response": "Sleepy cats."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_jsonl(path) == [
        Example("qa", "Name a fruit.", "Apple"),
        Example("dolly", "Summarise.\nCats sleep.", "Sleepy cats."),
    ]


def test_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"family": "f", "prompt": "p", "answer": "a"})
    path.write_text(good + "\n" + json.dumps({"instruction": "hi"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*response"):
        load_jsonl(path)
    path.write_text(good + "\n" + good + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        load_jsonl(path)
    path.write_text(json.dumps({"family": "f", "prompt": "p"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*answer"):
        load_jsonl(path)


# ------------------------------------------------------------------ the validation split


def test_validation_split_disjoint_from_eval_and_training() -> None:
    """Validation sets never repeat an evaluation prompt; generative families keep their
    training, test and public prompts off them; without validation nothing changes."""
    fbc = partition_families(REQUIRED, ["a", "b", "c"], seed=0)
    plain = _small_benchmark(fbc)
    with_val = build_benchmark(
        fbc, n_train=120, n_test=25, n_public_per_family=16, n_eval=30, seed=0, n_val=30
    )
    assert plain.val_sets == {}
    assert with_val.eval_sets == plain.eval_sets  # the reported split does not move
    assert set(with_val.val_sets) == set(with_val.eval_sets)
    for fam, val in with_val.val_sets.items():
        assert len(val) == 30 and all(e.family == fam and e.answer for e in val)
        val_prompts = {e.prompt for e in val}
        assert len(val_prompts) == 30, fam  # unique
        assert not val_prompts & {e.prompt for e in with_val.eval_sets[fam]}, fam
        if FAMILIES[fam].generative:
            seen = {
                e.prompt for c in fbc for e in with_val.client_train[c] + with_val.client_test[c]
            }
            seen |= {e.prompt for e in with_val.public_prompts}
            assert not val_prompts & seen, fam
    assert (
        build_benchmark(
            fbc, n_train=120, n_test=25, n_public_per_family=16, n_eval=30, seed=0, n_val=30
        ).val_sets
        == with_val.val_sets
    )  # deterministic
