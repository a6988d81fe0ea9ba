"""Procedurally generated instruction benchmark for federated distillation.

Every task family is a small, deterministic "little language" task with natural-language
prompt paraphrases and a short answer, sized so that a ~1M-parameter transformer can learn it
from a few hundred examples. Data for each (split, family) comes from its own seed stream, so
re-partitioning the families over clients never changes the data of a family.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PROMPT_FORMAT = "Q: {prompt}\nA:"


def format_prompt(prompt: str) -> str:
    """Wrap a bare instruction in the benchmark's Q/A prompt format."""
    return PROMPT_FORMAT.format(prompt=prompt)


def format_target(answer: str) -> str:
    """Return the completion that follows a formatted prompt (EOS is added by training code)."""
    return " " + answer


@dataclass(frozen=True)
class Example:
    """One instruction example; ``answer`` is "" for public (unlabelled) prompts."""

    family: str
    prompt: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        """Serialise to a plain JSON-able dict."""
        return {"family": self.family, "prompt": self.prompt, "answer": self.answer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Example:
        """Build from a dict with string keys ``family``, ``prompt``, ``answer``."""
        missing = [k for k in ("family", "prompt", "answer") if k not in d]
        if missing:
            raise ValueError(f"example record is missing keys {missing}")
        bad = [k for k in ("family", "prompt", "answer") if not isinstance(d[k], str)]
        if bad:
            raise ValueError(f"example fields {bad} must be strings")
        return cls(family=d["family"], prompt=d["prompt"], answer=d["answer"])


# --------------------------------------------------------------------------------------------
# Vocabulary of the little language
# --------------------------------------------------------------------------------------------

from flminillm.vocab import COUNTRIES, COUNTRY_CODES, CURRENCIES, CURRENCY_CODES, WORDS  # noqa: E402,F401

# --------------------------------------------------------------------------------------------
# Task families
# --------------------------------------------------------------------------------------------

Draw = Callable[[random.Random], tuple[dict[str, str], str]]


@dataclass(frozen=True)
class Family:
    """A task family: prompt paraphrases plus a sampler of (template fields, answer).

    ``generative`` families are rules over a large input space (held-out prompts test
    generalisation); non-generative ones are fact tables that must be memorised.
    """

    name: str
    templates: tuple[str, ...]
    draw: Draw
    generative: bool
    description: str = ""

    def generate(self, rng: random.Random) -> Example:
        """Sample one example using only ``rng`` (deterministic for a given rng state)."""
        fields, answer = self.draw(rng)
        template = rng.choice(self.templates)
        return Example(self.name, template.format(**fields), answer)


def _draw_country(rng: random.Random) -> tuple[dict[str, str], str]:
    name, code = rng.choice(COUNTRIES)
    return {"country": name}, code


def _draw_currency(rng: random.Random) -> tuple[dict[str, str], str]:
    code, name = rng.choice(CURRENCIES)
    return {"code": code}, name


def _draw_compare(rng: random.Random) -> tuple[dict[str, str], str]:
    a, b = rng.sample(range(100), 2)
    return {"a": str(a), "b": str(b)}, str(max(a, b))


def _draw_successor(rng: random.Random) -> tuple[dict[str, str], str]:
    n = rng.randint(0, 98)
    return {"n": str(n)}, str(n + 1)


def _draw_repeat(rng: random.Random) -> tuple[dict[str, str], str]:
    w = rng.choice(WORDS)
    return {"w": w}, f"{w} {w}"


def _draw_first_letter(rng: random.Random) -> tuple[dict[str, str], str]:
    w = rng.choice(WORDS)
    return {"w": w}, w[0]


def _draw_last_letter(rng: random.Random) -> tuple[dict[str, str], str]:
    w = rng.choice(WORDS)
    return {"w": w}, w[-1]


def _draw_predecessor(rng: random.Random) -> tuple[dict[str, str], str]:
    n = rng.randint(1, 99)
    return {"n": str(n)}, str(n - 1)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "country_code",
            (
                "What is the two-letter country code of {country}?",
                "Give the two-letter code for {country}.",
                "What is the ISO code of {country}?",
                "Which two-letter code stands for {country}?",
                "What is the country code for {country}?",
                "What two letters stand for {country}?",
            ),
            _draw_country,
            generative=False,
            description="ISO 3166 alpha-2 code of a country (fact table).",
        ),
        Family(
            "currency",
            (
                "Which currency has the code {code}?",
                "What currency does the code {code} stand for?",
                "Name the currency with the code {code}.",
                "What is the name of the currency {code}?",
                "The currency code {code} stands for which currency?",
                "What is the currency called that has the code {code}?",
            ),
            _draw_currency,
            generative=False,
            description="Name of an ISO 4217 currency from its code (fact table).",
        ),
        Family(
            "compare",
            (
                "Which is larger, {a} or {b}?",
                "Which number is bigger: {a} or {b}?",
                "What is the larger of {a} and {b}?",
                "Of {a} and {b}, which is greater?",
            ),
            _draw_compare,
            generative=True,
            description="The larger of two numbers in 0-99.",
        ),
        Family(
            "successor",
            (
                "What number comes after {n}?",
                "Which number follows {n}?",
                "What is the next number after {n}?",
                "What number is one more than {n}?",
            ),
            _draw_successor,
            generative=True,
            description="n + 1 for n in 0-98.",
        ),
        Family(
            "repeat",
            (
                "Say the word {w} twice.",
                "Repeat the word {w} two times.",
                "Write {w} two times.",
                "Please say {w} twice.",
            ),
            _draw_repeat,
            generative=True,
            description="A word said twice.",
        ),
        Family(
            "first_letter",
            (
                "What is the first letter of the word {w}?",
                "Which letter does {w} start with?",
                "What letter does the word {w} begin with?",
                "Give the first letter of {w}.",
            ),
            _draw_first_letter,
            generative=True,
            description="The first letter of a word.",
        ),
        Family(
            "last_letter",
            (
                "What is the last letter of the word {w}?",
                "Which letter does {w} end with?",
                "What letter does the word {w} end in?",
                "Give the last letter of {w}.",
            ),
            _draw_last_letter,
            generative=True,
            description="The last letter of a word (not in the default benchmark).",
        ),
        Family(
            "predecessor",
            (
                "What number comes before {n}?",
                "Which number precedes {n}?",
                "What is the number just before {n}?",
                "What number is one less than {n}?",
            ),
            _draw_predecessor,
            generative=True,
            description="n - 1 for n in 1-99 (not in the default benchmark).",
        ),
    )
}


def _family(name: str) -> Family:
    """Look up a family, raising a helpful ValueError for unknown names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; allowed: {sorted(FAMILIES)}") from None


def _stream(seed: int, split: str, family: str) -> random.Random:
    """Independent RNG for one (seed, split, family), stable across Python processes."""
    digest = hashlib.sha256(f"{seed}/{split}/{family}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@functools.cache
def _template_patterns() -> list[tuple[re.Pattern[str], str]]:
    pats = []
    for name, fam in FAMILIES.items():
        for t in fam.templates:
            parts = re.split(r"\{\w+\}", t)
            literal = sum(map(len, parts))
            pats.append((literal, re.compile("(?:.+?)".join(re.escape(x) for x in parts)), name))
    # the most specific template first: "a profile of the currency {c}" before "a profile of {c}"
    return [(p, name) for _, p, name in sorted(pats, key=lambda x: -x[0])]


def family_of_prompt(text: str) -> str | None:
    """The family whose template the prompt (bare, or formatted for a model) follows, or
    None: what a teacher can tell from a public prompt alone."""
    for pat, name in _template_patterns():
        if pat.search(text):
            return name
    return None


def make_examples(family: str, n: int, seed: int) -> list[Example]:
    """Generate ``n`` i.i.d. examples of ``family``, deterministically per ``seed``."""
    fam = _family(family)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = _stream(seed, "examples", family)
    return [fam.generate(rng) for _ in range(n)]


def _sample(
    fam: Family,
    n: int,
    rng: random.Random,
    *,
    forbid: frozenset[str] | set[str] = frozenset(),
    avoid: frozenset[str] | set[str] = frozenset(),
    unique: bool = False,
    what: str = "",
) -> list[Example]:
    """Rejection-sample ``n`` examples.

    ``forbid`` prompts are never used (a hard constraint: ValueError if the space is exhausted);
    ``avoid`` prompts and within-sample duplicates (``unique``) are skipped only while the prompt
    space allows it, i.e. until an attempt budget is spent.
    """
    budget = 200 * n + 2000
    out: list[Example] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        ex = fam.generate(rng)
        if ex.prompt in forbid:
            if attempts > 2 * budget:
                raise ValueError(
                    f"cannot draw {n} {what} examples of family {fam.name!r} disjoint from "
                    f"{len(forbid)} reserved prompts: prompt space too small; lower the sizes"
                )
            continue
        if attempts <= budget and (ex.prompt in avoid or (unique and ex.prompt in seen)):
            continue
        out.append(ex)
        seen.add(ex.prompt)
    return out


def partition_families(
    families: list[str], client_ids: list[str], seed: int
) -> dict[str, list[str]]:
    """Split families over clients: disjoint, non-empty, covering, sizes differ by <= 1.

    Deterministic for the same inputs and seed; each client's list keeps the input order.
    """
    if not client_ids:
        raise ValueError("need at least one client")
    if len(set(client_ids)) != len(client_ids):
        raise ValueError(f"client ids must be unique, got {client_ids}")
    if len(set(families)) != len(families):
        raise ValueError(f"families must not repeat, got {families}")
    for f in families:
        _family(f)
    if len(families) < len(client_ids):
        raise ValueError(
            f"{len(client_ids)} clients need at least as many families, got {len(families)}"
        )
    order = list(families)
    _stream(seed, "partition", ",".join(families)).shuffle(order)
    k = len(client_ids)
    out: dict[str, list[str]] = {}
    for i, cid in enumerate(client_ids):
        mine = set(order[i::k])
        out[cid] = [f for f in families if f in mine]
    return out


@dataclass
class Benchmark:
    """All data of one federated run.

    ``public_prompts`` carry no answers; ``eval_sets`` are held out for the evaluator only;
    ``val_sets`` (validation, disjoint from the evaluation prompts) are the sets on which
    hyper-parameters are chosen (`flminillm bench tune`), never the reported ones.
    """

    client_train: dict[str, list[Example]]
    client_test: dict[str, list[Example]]
    public_prompts: list[Example]
    eval_sets: dict[str, list[Example]]
    families_by_client: dict[str, list[str]] = field(default_factory=dict)
    val_sets: dict[str, list[Example]] = field(default_factory=dict)

    @property
    def families(self) -> list[str]:
        """Families held by any client, in registry order."""
        held = {f for fs in self.families_by_client.values() for f in fs}
        return [f for f in FAMILIES if f in held]


def build_benchmark(
    families_by_client: dict[str, list[str]],
    n_train: int,
    n_test: int,
    n_public_per_family: int,
    n_eval: int,
    seed: int,
    iid_mix: float = 0.0,
    n_val: int = 0,
) -> Benchmark:
    """Generate clients' private train/test data, public prompts and held-out eval sets.

    Sizes are per family. Each (split, family) uses its own seed stream, so a family's data does
    not depend on which client holds it nor on the other families. Per family: the eval set is
    drawn first, then the test set (both unique prompts where possible), then train, which never
    uses a test prompt. For generative families test, train and public prompts avoid eval prompts
    where the space allows; fact families (a table to memorise) may repeat eval prompts.

    `n_val` > 0 adds a validation set per family, drawn after the eval set from its own
    stream: its prompts never repeat an eval prompt (unique where the space allows), and for
    generative families test, train and public prompts avoid them too. With `n_val` = 0
    nothing else changes (the same data as before validation sets existed).

    `iid_mix` sets how non-IID the split is: a client's training set keeps its size, but that
    share of it is drawn from every held family's pool (other clients' included) instead of
    its own families. 0 (default) is the disjoint split, 1 gives every client the same
    distribution over all families. A client's "held" families stay the ones it was given.
    """
    if not 0.0 <= iid_mix <= 1.0:
        raise ValueError(f"iid_mix must be in [0, 1], got {iid_mix}")
    for name, value in (
        ("n_train", n_train),
        ("n_test", n_test),
        ("n_public_per_family", n_public_per_family),
        ("n_eval", n_eval),
        ("n_val", n_val),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    owner: dict[str, str] = {}
    for cid, fams in families_by_client.items():
        if not fams:
            raise ValueError(f"client {cid!r} holds no family")
        for f in fams:
            _family(f)
            if f in owner:
                raise ValueError(
                    f"family {f!r} is held by both {owner[f]!r} and {cid!r}; "
                    "client families must be disjoint"
                )
            owner[f] = cid
    held = [f for f in FAMILIES if f in owner]

    eval_sets: dict[str, list[Example]] = {}
    val_sets: dict[str, list[Example]] = {}
    train: dict[str, list[Example]] = {}
    test: dict[str, list[Example]] = {}
    public: list[Example] = []
    for f in held:
        fam = FAMILIES[f]
        ev = _sample(fam, n_eval, _stream(seed, "eval", f), unique=True, what="eval")
        va = _sample(
            fam, n_val, _stream(seed, "validation", f), forbid={e.prompt for e in ev},
            unique=True, what="validation",
        ) if n_val else []  # fmt: skip
        ev_prompts = {e.prompt for e in ev + va} if fam.generative else set()
        # Test first (unique prompts), then train from the rest: test never shares a prompt
        # with train, and train is i.i.d. over the remaining space, so both scale to any size.
        te = _sample(
            fam, n_test, _stream(seed, "test", f), avoid=ev_prompts, unique=True, what="test"
        )
        tr = _sample(
            fam,
            n_train,
            _stream(seed, "train", f),
            forbid={e.prompt for e in te},
            avoid=ev_prompts,
            what="train",
        )
        pub = _sample(
            fam, n_public_per_family, _stream(seed, "public", f), avoid=ev_prompts, what="public"
        )
        eval_sets[f], train[f], test[f] = ev, tr, te
        if n_val:
            val_sets[f] = va
        public.extend(Example(f, e.prompt, "") for e in pub)
    _stream(seed, "public", "order").shuffle(public)

    client_train = {c: [e for f in fs for e in train[f]] for c, fs in families_by_client.items()}
    if iid_mix > 0:
        pool = [e for f in held for e in train[f]]
        for c, own in client_train.items():
            rng = _stream(seed, "iid_mix", c)
            k = round(iid_mix * len(own))
            keep = rng.sample(own, len(own) - k)
            client_train[c] = keep + [pool[rng.randrange(len(pool))] for _ in range(k)]
            rng.shuffle(client_train[c])
    return Benchmark(
        client_train=client_train,
        client_test={c: [e for f in fs for e in test[f]] for c, fs in families_by_client.items()},
        public_prompts=public,
        eval_sets=eval_sets,
        families_by_client={c: list(fs) for c, fs in families_by_client.items()},
        val_sets=val_sets,
    )


def generate_benchmark(cfg) -> tuple[Benchmark, list[str]]:
    """The benchmark and pre-training corpus an experiment config (data.source: benchmark)
    generates: the one place that maps the config's data section onto build_benchmark."""
    d = cfg.data
    bench = build_benchmark(
        cfg.families_by_client(), d.n_train_per_family, d.n_test_per_family,
        d.n_public_per_family, d.n_eval_per_family, seed=cfg.seed, iid_mix=d.iid_mix,
        n_val=d.n_val_per_family,
    )  # fmt: skip
    long_form = any(isinstance(FAMILIES[f], LongForm) for f in d.families)
    return bench, pretraining_corpus(d.pretrain_docs, seed=cfg.seed, long_form=long_form)


# --------------------------------------------------------------------------------------------
# Pre-training corpus: fluent little language + distractor Q/A, no benchmark answers
# --------------------------------------------------------------------------------------------

_COLORS = (
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
    ("a tomato", "red"), ("a lemon", "yellow"), ("milk", "white"), ("a crow", "black"),
    ("blood", "red"), ("the sea", "blue"), ("a carrot", "orange"), ("a frog", "green"),
)  # fmt: skip
_LEGS = (
    ("dog", "four"), ("cat", "four"), ("bird", "two"), ("spider", "eight"), ("ant", "six"),
    ("horse", "four"), ("duck", "two"), ("snake", "zero"), ("bee", "six"), ("cow", "four"),
    ("chicken", "two"), ("octopus", "eight"), ("fish", "zero"), ("goat", "four"),
)  # fmt: skip
_OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
    ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("wet", "dry"), ("left", "right"),
    ("early", "late"), ("full", "empty"), ("hard", "soft"), ("yes", "no"), ("black", "white"),
)  # fmt: skip
_SOUNDS = (
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
    ("owl", "hoot"), ("pig", "oink"), ("lion", "roar"), ("snake", "hiss"), ("bee", "buzz"),
)  # fmt: skip
_CITIES = (
    "Paris", "London", "Tokyo", "Rome", "Berlin", "Madrid", "Cairo", "Lima", "Oslo", "Delhi",
    "Sydney", "Toronto",
)  # fmt: skip


def _qa_color(rng: random.Random) -> tuple[str, str]:
    thing, color = rng.choice(_COLORS)
    t = rng.choice(("What color is {x}?", "What is the color of {x}?", "Tell me the color of {x}."))
    return t.format(x=thing), color


def _qa_legs(rng: random.Random) -> tuple[str, str]:
    animal, legs = rng.choice(_LEGS)
    t = rng.choice(
        ("How many legs does a {x} have?", "A {x} has how many legs?", "Count the legs of a {x}.")
    )
    return t.format(x=animal), legs


def _qa_opposite(rng: random.Random) -> tuple[str, str]:
    a, b = rng.choice(_OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    t = rng.choice(
        ("What is the opposite of {x}?", "Give the opposite of {x}.", "What word means not {x}?")
    )
    return t.format(x=a), b


def _qa_sound(rng: random.Random) -> tuple[str, str]:
    animal, sound = rng.choice(_SOUNDS)
    t = rng.choice(
        ("What sound does a {x} make?", "Which sound does a {x} make?", "A {x} says what?")
    )
    return t.format(x=animal), sound


def _qa_parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 99)
    t = rng.choice(
        ("Is {x} even or odd?", "Is the number {x} odd or even?", "Tell me if {x} is even or odd.")
    )
    return t.format(x=n), "even" if n % 2 == 0 else "odd"


def _qa_length(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    t = rng.choice(
        (
            "How many letters are in the word {x}?",
            "How long is the word {x}?",
            "Count the letters in {x}.",
        )
    )
    return t.format(x=w), str(len(w))


def _qa_place(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        x, kind = rng.choice(COUNTRIES)[0], "country"
    else:
        x, kind = rng.choice(_CITIES), "city"
    t = rng.choice(("Is {x} a country or a city?", "Is {x} a city or a country?"))
    return t.format(x=x), kind


# Distractor Q/A families: teach the Q/A format and short answers, none is in FAMILIES.
DISTRACTORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "color": _qa_color,
    "legs": _qa_legs,
    "opposite": _qa_opposite,
    "sound": _qa_sound,
    "parity": _qa_parity,
    "length": _qa_length,
    "place": _qa_place,
}


def _s_country(rng: random.Random) -> str:
    name = rng.choice(COUNTRIES)[0]
    return rng.choice(
        (
            f"{name} is a country in the world.",
            f"People live in {name}.",
            f"I would like to visit {name}.",
            f"{name} has many towns.",
        )
    )


def _s_number(rng: random.Random) -> str:
    n = rng.randint(0, 99)
    parity = "even" if n % 2 == 0 else "odd"
    return rng.choice(
        (
            f"The number {n} is {parity}.",
            f"{n} is a number.",
            f"My house is number {n}.",
            f"We wrote the number {n} on the wall.",
        )
    )


def _s_word(rng: random.Random) -> str:
    w = rng.choice(WORDS)
    return rng.choice(
        (
            f"{w} is a short word.",
            f"The word {w} is common.",
            f"I like the word {w}.",
            f"She wrote {w} in her book.",
        )
    )


def _s_country_code(rng: random.Random) -> str:
    code = rng.choice(COUNTRIES)[1]
    return rng.choice((f"{code} is a two-letter code.", f"The code {code} has two letters."))


def _s_currency_code(rng: random.Random) -> str:
    code = rng.choice(CURRENCIES)[0]
    return rng.choice((f"{code} is a currency code.", f"The code {code} has three letters."))


def _s_currency_name(rng: random.Random) -> str:
    name = rng.choice(CURRENCIES)[1]
    return rng.choice((f"The {name} is a kind of money.", f"You can pay with the {name}."))


# Each document draws all its sentences from ONE topic, so a country name never shares a
# document with a country code (nor a currency code with a currency name): no fact leaks.
_TOPICS: tuple[Callable[[random.Random], str], ...] = (
    _s_country,
    _s_number,
    _s_word,
    _s_country_code,
    _s_currency_code,
    _s_currency_name,
)


def pretraining_corpus(n_docs: int, seed: int, long_form: bool = False) -> list[str]:
    """Build ``n_docs`` documents: half fluent sentences, half distractor Q/A pairs.

    Makes a base model fluent in the little language and in the Q/A format without teaching
    any benchmark answer. Deterministic per ``seed``. With `long_form` (a benchmark with
    long-form families) a quarter of the documents are instead long-form vocabulary and
    clause shapes without any fact (flminillm.longform.pretraining_sentences).
    """
    if long_form:
        from flminillm.longform import pretraining_sentences

        n_lf = n_docs // 4
        rng = _stream(seed, "pretrain", "long_form")
        return pretraining_corpus(n_docs - n_lf, seed) + [
            pretraining_sentences(rng) for _ in range(n_lf)
        ]
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    rng = _stream(seed, "pretrain", "corpus")
    distractors = list(DISTRACTORS.values())
    docs: list[str] = []
    for _ in range(n_docs):
        if rng.random() < 0.5:
            topic = rng.choice(_TOPICS)
            docs.append(" ".join(topic(rng) for _ in range(rng.randint(1, 3))))
        else:
            p, a = rng.choice(distractors)(rng)
            docs.append(format_prompt(p) + format_target(a))
    return docs


# --------------------------------------------------------------------------------------------
# JSONL I/O
# --------------------------------------------------------------------------------------------


def save_jsonl(path: str | os.PathLike[str], examples: Iterable[Example]) -> None:
    """Write examples as JSON lines atomically (readers never see a partial file)."""
    from flminillm.store import atomic_write_text

    lines = "".join(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in examples)
    atomic_write_text(path, lines)


def _record_to_example(rec: dict[str, Any]) -> Example:
    """Convert a native or Dolly-style record; raises ValueError saying what is missing."""
    if "instruction" in rec or "response" in rec:
        missing = [k for k in ("instruction", "response") if not isinstance(rec.get(k), str)]
        if missing:
            raise ValueError(f"Dolly record needs string fields {missing}")
        context = rec.get("context") or ""
        if not isinstance(context, str):
            raise ValueError("Dolly field 'context' must be a string")
        prompt = rec["instruction"] + ("\n" + context if context.strip() else "")
        family = rec.get("category") or "dolly"
        return Example(family=str(family), prompt=prompt, answer=rec["response"])
    return Example.from_dict(rec)


def load_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read examples from JSON lines; accepts native records and Dolly-style records.

    Blank lines are skipped. A malformed line raises ValueError naming file and line number.
    """
    out: list[Example] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
                )
            try:
                out.append(_record_to_example(rec))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return out


def format_examples(examples: Sequence[Example]) -> list[str]:
    """Full training texts ``format_prompt(prompt) + format_target(answer)`` for examples."""
    return [format_prompt(e.prompt) + format_target(e.answer) for e in examples]


# --------------------------------------------------------------------------------------------
# Long-form families (flminillm.longform): answers of 20-40 tokens, many valid phrasings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LongForm:
    """A flminillm.longform family in the registry: the same interface as Family."""

    family: Any  # flminillm.longform.LongFormFamily

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def generative(self) -> bool:
        return self.family.generative

    @property
    def templates(self) -> tuple[str, ...]:
        return self.family.templates

    @property
    def description(self) -> str:
        return self.family.description

    def generate(self, rng: random.Random) -> Example:
        prompt, answer = self.family.generate(rng)
        return Example(self.name, prompt, answer)


def _register_long_form() -> None:
    from flminillm.longform import LONG_FORM

    for name, fam in LONG_FORM.items():
        FAMILIES[name] = LongForm(fam)  # type: ignore[assignment]


_register_long_form()
