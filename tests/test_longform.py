"""Tests for the long-form task families (flminillm.longform)."""

from __future__ import annotations

import itertools
import math
import random
import re
import string
from collections import Counter
from pathlib import Path

import pycountry
import pytest

from flminillm import longform
from flminillm.data import COUNTRIES, CURRENCIES, FAMILIES, WORDS
from flminillm.longform import (
    JOINTS_1,
    JOINTS_2,
    LONG_FORM,
    LongFormFamily,
    best_rouge_l,
    pretraining_sentences,
)
from flminillm.metrics import rouge_l

NAMES = sorted(LONG_FORM)
REGIONS = {"Africa", "Asia", "Europe", "North America", "Oceania", "South America"}


def expected_facts(name: str, s: dict[str, str]) -> dict[str, str]:
    """The facts of a subject, computed here independently of the module's rules."""
    if name == "number_profile":
        n = int(s["n"])
        return {"next": str(n + 1), "previous": str(n - 1), "parity": ("even", "odd")[n % 2]}
    if name == "word_profile":
        return {"first": s["w"][0], "last": s["w"][-1], "length": str(len(s["w"]))}
    if name == "pair_profile":
        a, b = int(s["a"]), int(s["b"])
        return {"larger": str(max(a, b)), "smaller": str(min(a, b)), "difference": str(abs(a - b))}
    if name == "word_pair_profile":
        a, b = sorted((s["a"], s["b"]), key=len)
        return {"longer": b, "shorter": a, "total": str(len(a) + len(b))}
    if name == "country_profile":
        return longform.country_facts(s["country"])
    return longform.currency_facts(s["code"])


def build(
    fam: LongFormFamily,
    s: dict[str, str],
    order: tuple[int, ...],
    phrasing: tuple[int, ...],
    joints: tuple[str, str],
    lead: int = 0,
) -> str:
    """An answer written from the documented grammar (not from the module's composer)."""
    facts = expected_facts(fam.name, s)
    parts = [clause(fam, s, i, j, facts) for i, j in zip(order, phrasing, strict=True)]
    return f"{fam.leads[lead].format(**s)} {parts[0]}{joints[0]}{parts[1]}{joints[1]}{parts[2]}."


def clause(fam: LongFormFamily, s: dict[str, str], i: int, j: int, facts=None) -> str:
    facts = facts or expected_facts(fam.name, s)
    c = fam.clauses[i]
    return c.phrasings[j].format(v=facts[c.fact])


def random_case(fam: LongFormFamily, rng: random.Random) -> tuple[dict[str, str], str, list]:
    """A subject, a prompt for it and a random (order, phrasing, joints, lead) of its answer."""
    s = fam.draw(rng)
    order = tuple(rng.sample(range(3), 3))
    phrasing = tuple(rng.randrange(len(fam.clauses[i].phrasings)) for i in order)
    joints = (rng.choice(JOINTS_1), rng.choice(JOINTS_2))
    return s, rng.choice(fam.templates).format(**s), [order, phrasing, joints, rng.randrange(2)]


# ------------------------------------------------------------------ registry and tables


def test_registry_shape() -> None:
    assert len(NAMES) == 6 and all(n.endswith("_profile") for n in NAMES)
    assert all(FAMILIES[n].family is LONG_FORM[n] for n in NAMES)  # registered in data
    gen = {n for n, f in LONG_FORM.items() if f.generative}
    assert gen == {"number_profile", "word_profile", "pair_profile", "word_pair_profile"}
    for f in LONG_FORM.values():
        assert 4 <= len(f.templates) <= 6 and len(set(f.templates)) == len(f.templates)
        slots = {k for k, _ in f.slots}
        for t in f.templates:
            assert len(t.split()) <= 20, t
            assert {x[1] for x in string.Formatter().parse(t) if x[1]} == slots, t
        assert len(f.clauses) == 3 and f.description
        assert all(2 <= len(c.phrasings) <= 4 for c in f.clauses)


def test_tables_consistent_with_data() -> None:
    cur_names = dict(CURRENCIES)
    assert set(longform.CURRENCY_NAMES) == set(cur_names) | set(longform.EXTRA_CURRENCY_NAMES)
    for code, short in longform.EXTRA_CURRENCY_NAMES.items():
        assert code not in cur_names and short in pycountry.currencies.get(alpha_3=code).name
    country_names = {n for n, _ in COUNTRIES}
    by_currency_name = {name: code for code, name in longform.CURRENCY_NAMES.items()}
    for name, code in COUNTRIES:
        f = longform.country_facts(name)
        assert f["code"] == code and f["region"] in REGIONS
        cur = by_currency_name[f["currency"]]  # a known currency, named as in data.CURRENCIES
        if cur in cur_names:
            assert f["currency"] == cur_names[cur]
            # A country's region is its currency's region (the Euro's countries lie in Europe).
            assert longform.currency_facts(cur)["region"] == f["region"], name
    for code, name in CURRENCIES:
        f = longform.currency_facts(code)
        assert f["name"] == name and f["region"] in REGIONS
        if f["home"] in country_names:  # the home country pays with it, in the same region
            assert longform.country_facts(f["home"])["currency"] == name
            assert longform.country_facts(f["home"])["region"] == f["region"]
    assert longform.country_facts("France") == {
        "code": "FR",
        "currency": "Euro",
        "region": "Europe",
    }
    assert longform.country_facts("China")["currency"] == "Yuan"
    assert longform.country_facts("Brazil")["region"] == "South America"
    assert longform.currency_facts("USD") == {
        "name": "US Dollar", "home": "the United States", "region": "North America",
    }  # fmt: skip
    assert longform.currency_facts("JPY")["home"] == "Japan"


# ------------------------------------------------------------------ answers and references


@pytest.mark.parametrize("name", NAMES)
def test_generated_answers_are_valid_references(name: str) -> None:
    fam = LONG_FORM[name]
    rng = random.Random(7)
    for _ in range(200):
        prompt, answer = fam.generate(rng)
        assert answer.endswith(".")
        assert fam.is_valid(prompt, answer), answer
        assert answer in fam.references(prompt)


@pytest.mark.parametrize("name", NAMES)
def test_references_are_the_documented_grammar(name: str) -> None:
    """references() is exactly the grammar enumerated here, every answer valid and distinct."""
    fam = LONG_FORM[name]
    rng = random.Random(3)
    for _ in range(3):
        s, prompt, _ = random_case(fam, rng)
        refs = fam.references(prompt)
        mine = {
            build(fam, s, order, phr, joints, lead)
            for lead in range(len(fam.leads))
            for order in itertools.permutations(range(3))
            for phr in itertools.product(*(range(len(fam.clauses[i].phrasings)) for i in order))
            for joints in itertools.product(JOINTS_1, JOINTS_2)
        }
        assert len(refs) == len(set(refs)) == len(mine) <= 2000
        assert set(refs) == mine
        assert all(fam.is_valid(prompt, r) for r in refs)


@pytest.mark.parametrize("name", NAMES)
def test_answers_have_15_to_30_words(name: str) -> None:
    fam = LONG_FORM[name]
    if fam.generative:
        rng = random.Random(5)
        prompts = [fam.templates[0].format(**fam.draw(rng)) for _ in range(30)]
    else:  # every subject of a fact table
        slot = fam.slots[0][0]
        values = [n for n, _ in COUNTRIES] if slot == "country" else [c for c, _ in CURRENCIES]
        prompts = [fam.templates[0].format(**{slot: v}) for v in values]
    counts = Counter(len(r.split()) for p in prompts for r in fam.references(p))
    assert 15 <= min(counts) and max(counts) <= 30, counts


@pytest.mark.parametrize("name", NAMES)
def test_corrupted_answers_are_invalid(name: str) -> None:
    fam = LONG_FORM[name]
    others = [f for f in LONG_FORM.values() if f.name != name]
    rng = random.Random(11)
    for _ in range(15):
        s, prompt, (order, phr, joints, lead) = random_case(fam, rng)
        good = build(fam, s, order, phr, joints, lead)
        assert fam.is_valid(prompt, good)
        facts = expected_facts(name, s)
        lead_text = fam.leads[lead].format(**s)
        parts = [clause(fam, s, i, j, facts) for i, j in zip(order, phr, strict=True)]

        def answer(ps: list[str], js: tuple[str, ...] = joints, lt: str = lead_text) -> str:
            out = lt + " " + ps[0]
            for j, p in zip(js, ps[1:], strict=True):
                out += j + p
            return out + "."

        bad = []  # each changes the words (so Rouge-L < 1 too)
        for k, i in enumerate(order):  # a wrong value in each position
            while (other := fam.draw(rng)) and expected_facts(name, other)[fam.clauses[i].fact] == (
                facts[fam.clauses[i].fact]
            ):
                pass
            wrong = list(parts)
            wrong[k] = clause(fam, other, i, phr[k])
            bad.append(answer(wrong))
        bad.append(answer(parts[:2], (" and ",)))  # a fact missing
        bad.append(answer(parts[1:], (" and ",)))
        again = (phr[0] + 1) % len(fam.clauses[order[0]].phrasings)
        bad.append(answer([parts[0], parts[1], clause(fam, s, order[0], again)]))  # a fact twice
        bad.append(answer([*parts, parts[0]], (", ", ", ", " and ")))
        foreign = rng.choice(others)
        foreign_clause = clause(foreign, foreign.draw(rng), rng.randrange(3), 0)
        bad.append(answer([parts[0], parts[1], foreign_clause]))  # another family's clause
        bad.append(answer([*parts, foreign_clause], (", ", ", ", " and ")))
        words = good[:-1].split()
        for cut in range(1, len(parts[2].split()) + 1):  # truncated inside the last clause
            bad.append(" ".join(words[:-cut]))
            bad.append(" ".join(words[:-cut]) + ".")
        bad += [good[:-1] + " too.", good + " Yes.", good[:-1] + " and more."]  # extra words
        bad += ["Answer: " + good, good[len(lead_text) + 1 :]]  # words before, no lead
        bad.append(answer(parts, (" and ", joints[1])))  # "and" only before the last clause
        if "b" in s:  # the lead names the subjects in the prompt's order
            swapped = fam.leads[lead].format(a=s["b"], b=s["a"])
            bad.append(swapped + good[len(lead_text) :])
        for b in bad:
            assert not fam.is_valid(prompt, b), b
            assert best_rouge_l(prompt, b, name) < 1.0, b
        # Invalid only in punctuation: Rouge-L (which ignores it) cannot tell.
        for b in (
            answer(parts, (" ,", joints[1])),
            answer(parts, (" ", joints[1])),
            answer(parts, (joints[0], "; ")),
            lead_text[:-1] + " " + good[len(lead_text) :],
            good.replace(":", "", 1),
        ):
            assert not fam.is_valid(prompt, b), b
            assert best_rouge_l(prompt, b, name) == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_case_and_whitespace_variants_are_valid(name: str) -> None:
    fam = LONG_FORM[name]
    rng = random.Random(13)
    for _ in range(10):
        prompt, good = fam.generate(rng)
        for v in (
            good.upper(),
            good.lower(),
            "  \n" + good.replace(" ", " \t  ") + "  ",
            good[:-1],
            good[:-1] + "!",
            good + "\nQ: What comes next?\nA: 42",
        ):
            assert fam.is_valid(prompt, v), v
            assert best_rouge_l(prompt, v, name) == 1.0


def test_generate_is_uniform_over_the_grammar() -> None:
    """Leads, orders, phrasings and joints each come up about equally often."""
    fam = LONG_FORM["number_profile"]
    rng = random.Random(17)
    tally: Counter = Counter()
    n = 3000
    for _ in range(n):
        prompt, answer = fam.generate(rng)
        s = fam.subject(prompt)
        facts = expected_facts(fam.name, s)
        lead = next(i for i, x in enumerate(fam.leads) if answer.startswith(x.format(**s) + " "))
        body = answer[len(fam.leads[lead].format(**s)) + 1 : -1]
        parts = re.split(r"(, |; | and )", body)
        found = [
            (i, j)
            for p in parts[0::2]
            for i, c in enumerate(fam.clauses)
            for j, ph in enumerate(c.phrasings)
            if ph.format(v=facts[c.fact]) == p
        ]
        assert len(found) == 3
        tally.update([("lead", lead), ("order", tuple(i for i, _ in found))])
        tally.update(("joint", k, j) for k, j in enumerate(parts[1::2]))
        tally.update(("phrasing", i, j) for i, j in found)
    groups: dict = {}
    for key, count in tally.items():
        groups.setdefault(key[:-1] if key[0] != "order" else ("order",), []).append(count)
    assert len(groups[("order",)]) == 6 and len(groups[("lead",)]) == 2
    for counts in groups.values():
        expected = sum(counts) / len(counts)
        assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts), counts


# ------------------------------------------------------------------ prompts


@pytest.mark.parametrize("name", NAMES)
def test_facts_round_trip_every_template(name: str) -> None:
    fam = LONG_FORM[name]
    rng = random.Random(19)
    for t in fam.templates:
        for _ in range(10):
            s = fam.draw(rng)
            prompt = t.format(**s)
            assert fam.subject(prompt) == s
            assert fam.facts(prompt) == expected_facts(name, s)
            assert fam.facts("  " + prompt + "\n") == expected_facts(name, s)
    other = LONG_FORM["word_profile" if name != "word_profile" else "number_profile"]
    for prompt in (other.generate(rng)[0], "What number comes after 5?", ""):
        with pytest.raises(ValueError, match=re.escape(repr(prompt))):
            fam.facts(prompt)


@pytest.mark.parametrize(
    ("name", "prompt"),
    [
        ("number_profile", "Tell me about the number 99."),
        ("number_profile", "Tell me about the number 0."),
        ("number_profile", "Tell me about the number 07."),
        ("word_profile", "Tell me about the word xylophone."),
        ("pair_profile", "Tell me about the numbers 5 and 5."),
        ("pair_profile", "Tell me about the numbers 5 and 100."),
        ("word_pair_profile", "Tell me about the words cat and dog."),
        ("country_profile", "Tell me about the country Atlantis."),
        ("currency_profile", "Tell me about the currency code XYZ."),
    ],
)
def test_prompt_outside_the_family_is_refused(name: str, prompt: str) -> None:
    fam = LONG_FORM[name]
    with pytest.raises(ValueError, match=re.escape(repr(prompt))):
        fam.facts(prompt)
    with pytest.raises(ValueError):
        fam.is_valid(prompt, "anything")


def test_the_fact_tables_cover_every_subject() -> None:
    for name, code in COUNTRIES:
        prompt = f"Tell me about the country {name}."
        assert LONG_FORM["country_profile"].facts(prompt)["code"] == code
    for code, cname in CURRENCIES:
        prompt = f"Tell me about the currency code {code}."
        assert LONG_FORM["currency_profile"].facts(prompt)["name"] == cname


# ------------------------------------------------------------------ Rouge-L


@pytest.mark.parametrize("name", NAMES)
def test_best_rouge_l_is_the_max_of_metrics_rouge_l(name: str) -> None:
    fam = LONG_FORM[name]
    rng = random.Random(23)
    prompt, good = fam.generate(rng)
    refs = fam.references(prompt)
    # Rouge-L ignores punctuation: references differing only in "," or ";" score the same.
    distinct = list({r.replace(";", ","): r for r in refs}.values())
    vocab = sorted({w for r in refs[::50] for w in r.lower().replace(",", "").split()})
    # Some longer than 64 tokens (the references' bit masks are 64 bits, responses are not).
    soup = " ".join(rng.choice(vocab) for _ in range(66 if name < "p" else 30))
    s = fam.subject(prompt)
    wrong = good.replace(fam.leads[0].format(**s), "So:").replace(" is ", " was ", 1)
    for response, first_line in ((soup + "\nmore words", soup), (wrong, wrong)):
        want = max(rouge_l(first_line, r) for r in distinct)
        assert 0.0 < want < 1.0
        assert best_rouge_l(prompt, response, name) == want
    assert best_rouge_l(prompt, "", name) == 0.0
    assert best_rouge_l(prompt, "?!", name) == 0.0


def test_best_rouge_l_unknown_family() -> None:
    with pytest.raises(ValueError, match="unknown long-form family"):
        best_rouge_l("Tell me about the number 5.", "x", "successor")


# ------------------------------------------------------------------ determinism


def test_generation_is_deterministic_per_seed() -> None:
    for fam in LONG_FORM.values():
        runs = [[fam.generate(random.Random(seed)) for _ in range(20)] for seed in (1, 1, 2)]
        assert runs[0] == runs[1] != runs[2]
    docs = [[pretraining_sentences(random.Random(seed)) for _ in range(20)] for seed in (1, 1, 2)]
    assert docs[0] == docs[1] != docs[2]


# ------------------------------------------------------------------ pre-training text


def _mentions(doc: str) -> set[str]:
    """Every value a document names: places, regions, codes, currency names, numbers, words,
    parities and letters (the pre-training sentences use no article "a")."""
    names = (
        {n for n, _ in COUNTRIES} | {c for _, c in COUNTRIES} | set(dict(CURRENCIES))
        | set(longform.CURRENCY_NAMES.values()) | REGIONS
        | {longform.currency_facts(c)["home"] for c, _ in CURRENCIES}
    )  # fmt: skip
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    found = set(re.findall(rf"(?<![A-Za-z])(?:{alt})(?![A-Za-z])", doc))
    rest = re.sub(rf"(?<![A-Za-z])(?:{alt})(?![A-Za-z])", " ", doc)
    found |= set(re.findall(r"[0-9]+", rest))
    small = set(WORDS) | {"even", "odd"} | set(string.ascii_lowercase)
    return found | {w for w in re.findall(r"[a-z]+", rest.lower()) if w in small}


def test_mentions_detector_sees_a_leak() -> None:
    assert _mentions("France: its code is FR.") == {"France", "FR"}
    assert _mentions("The word apple starts with the letter a.") == {"apple", "a"}
    assert _mentions("The Ghana Cedi is money. 7 is odd.") == {"Ghana Cedi", "7", "odd"}


def test_pretraining_sentences_leak_no_fact() -> None:
    rng = random.Random(29)
    docs = [pretraining_sentences(rng) for _ in range(3000)]
    all_values = Counter()
    for doc in docs:
        found = _mentions(doc)
        assert len(found) == 1, (doc, found)
        assert ":" not in doc and doc.endswith(".")
        all_values.update(found)
    assert len(all_values) > 300  # many values of every kind
    text = "\n".join(docs).lower()
    for fam in LONG_FORM.values():  # every clause shape is taught
        for c in fam.clauses:
            for p in c.phrasings:
                shape = re.escape(p.lower()).replace(r"\{v\}", ".+?")
                assert re.search(shape, text), p
    for j in JOINTS_1 + JOINTS_2:
        assert j in text


def test_evaluation_scores_long_form_by_validity_and_best_reference() -> None:
    """The evaluator's EM on a long-form family is the checker's validity, its Rouge-L the
    best valid reference; short families keep string EM."""
    from flminillm.data import Example, make_examples
    from flminillm.evaluation import score_family

    exs = make_examples("word_profile", 4, seed=3)
    other = LONG_FORM["word_profile"].generate(random.Random(99))[1]  # another word's answer
    preds = [
        exs[0].answer,  # the reference itself
        LONG_FORM["word_profile"].references(exs[1].prompt)[-1],  # another valid phrasing
        exs[2].answer.rsplit(",", 1)[0],  # a fact missing
        other,
    ]
    m = score_family("word_profile", exs, preds)
    assert m["n"] == 4
    assert (
        m["exact_match"] == (2 + int(LONG_FORM["word_profile"].is_valid(exs[3].prompt, other))) / 4
    )
    assert m["rouge_l"] < 1.0 and m["rouge_l"] >= 0.5
    short = [Example("successor", "What number comes after 3?", "4")]
    assert score_family("successor", short, ["4"])["exact_match"] == 1.0


def test_a_long_form_federation_runs_and_reports_validity_and_samples(tmp_path) -> None:
    """A tiny federation on long-form families: the corpus carries the long-form vocabulary,
    the answers are long, and the last round's evaluation has validity, best-reference
    Rouge-L and the sampled metrics (first rounds greedy only)."""
    import yaml

    from flminillm.config import load_config
    from flminillm.data import generate_benchmark
    from flminillm.inprocess import run_federation

    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "configs" / "tiny.yaml").read_text())
    data["data"]["families"] = ["word_profile", "number_profile", "pair_profile"]
    data["rounds"] = 1
    for p in [data["server"], *data["clients"]]:
        p["model"]["max_positions"] = 96
    data["generation"].update(max_new_tokens=44, eval_max_new_tokens=44, eval_samples=2)
    data["store"] = {"uri": str(tmp_path / "store")}
    data["tracking"] = {"enabled": False}
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    bench, corpus = generate_benchmark(cfg)
    assert any("letter" in d and ":" not in d for d in corpus)  # long-form vocabulary
    fam = "word_profile"
    ex = bench.eval_sets[fam][0]
    assert LONG_FORM[fam].is_valid(ex.prompt, ex.answer) and len(ex.answer.split()) >= 15
    states = run_federation(cfg)
    first, last = states[0]["eval"]["server"][fam], states[-1]["eval"]["server"][fam]
    assert "sampled_rouge_l" not in first
    for m in states[-1]["eval"].values():
        for v in m.values():
            assert 0.0 <= v["exact_match"] <= 1.0 and 0.0 <= v["sampled_rouge_l"] <= 1.0
    assert last["n"] == cfg.data.n_eval_per_family
