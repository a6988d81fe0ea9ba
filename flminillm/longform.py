"""Long-form task families: a one-sentence answer that states a few facts about the subject.

Every answer states each of its family's three facts exactly once, in any order, each fact as
one clause in one of a few phrasings, after a lead that names the subject:

    LEAD " " CLAUSE J1 CLAUSE J2 CLAUSE "."        J1 in {", ", "; "}, J2 in {", ", " and "}

e.g. "France is a country: its money is the Euro; it lies in Europe and its country code is FR."
A prompt thus has 2 leads x 3! orders x 3^3 phrasings x 2 x 2 joints = 1296 right answers of
15-30 words, so a mode-seeking (reverse-KL) and a mass-covering (forward-KL) student can differ.

The checker (`LongFormFamily.is_valid`) reads a response as `metrics.normalize_answer` does:
the first line only, whitespace runs as one space, case-insensitive, the final "." optional
(trailing ".!?" are dropped). The rest is exact: one of the prompt's two leads (its subjects
in the prompt's order) and one space, the joints as written (no space before "," or ";"),
every clause word for word with the prompt's own fact values, nothing before or after.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from rouge_score.tokenizers import DefaultTokenizer

from flminillm.metrics import normalize_answer
from flminillm.vocab import COUNTRIES, CURRENCIES, WORDS

JOINTS_1: tuple[str, ...] = (", ", "; ")  # every joint but the last
JOINTS_2: tuple[str, ...] = (", ", " and ")  # before the last clause
_JOINT_RE = re.compile(r"(, |; | and )")
_T = TypeVar("_T", str, tuple[int, ...])

# --------------------------------------------------------------------------------------------
# Fact tables
# --------------------------------------------------------------------------------------------

# Country code -> (currency code, region). Regions are continents (the Caribbean counts as
# North America).
_COUNTRY_FACTS: dict[str, tuple[str, str]] = {
    "FR": ("EUR", "Europe"), "DE": ("EUR", "Europe"), "JP": ("JPY", "Asia"),
    "IT": ("EUR", "Europe"), "ES": ("EUR", "Europe"), "CA": ("CAD", "North America"),
    "BR": ("BRL", "South America"), "IN": ("INR", "Asia"), "CN": ("CNY", "Asia"),
    "MX": ("MXN", "North America"), "AU": ("AUD", "Oceania"), "EG": ("EGP", "Africa"),
    "KE": ("KES", "Africa"), "PE": ("PEN", "South America"), "CL": ("CLP", "South America"),
    "AR": ("ARS", "South America"), "SE": ("SEK", "Europe"), "NO": ("NOK", "Europe"),
    "FI": ("EUR", "Europe"), "DK": ("DKK", "Europe"), "PL": ("PLN", "Europe"),
    "GR": ("EUR", "Europe"), "PT": ("EUR", "Europe"), "IE": ("EUR", "Europe"),
    "NL": ("EUR", "Europe"), "CH": ("CHF", "Europe"), "AT": ("EUR", "Europe"),
    "BE": ("EUR", "Europe"), "HU": ("HUF", "Europe"), "NG": ("NGN", "Africa"),
    "GH": ("GHS", "Africa"), "MA": ("MAD", "Africa"), "TH": ("THB", "Asia"),
    "ID": ("IDR", "Asia"), "CU": ("CUP", "North America"), "IS": ("ISK", "Europe"),
    "UA": ("UAH", "Europe"), "NP": ("NPR", "Asia"), "CO": ("COP", "South America"),
    "JM": ("JMD", "North America"),
}  # fmt: skip

# Short real names of the currencies above that data.CURRENCIES lacks (pycountry: "Yuan
# Renminbi", "Moroccan Dirham"); the others use data.CURRENCIES' names.
EXTRA_CURRENCY_NAMES: dict[str, str] = {"CNY": "Yuan", "MAD": "Moroccan Dirham"}

# Currency code -> (home, region): the country or area that issues it, and that area's region
# (Russia and Turkey as in the UN M49 scheme: Europe and Asia). Homes in data.COUNTRIES are
# spelled as there.
_CURRENCY_FACTS: dict[str, tuple[str, str]] = {
    "JPY": ("Japan", "Asia"), "USD": ("the United States", "North America"),
    "EUR": ("the Eurozone", "Europe"), "GBP": ("the United Kingdom", "Europe"),
    "CHF": ("Switzerland", "Europe"), "INR": ("India", "Asia"),
    "MXN": ("Mexico", "North America"), "BRL": ("Brazil", "South America"),
    "CAD": ("Canada", "North America"), "AUD": ("Australia", "Oceania"),
    "SEK": ("Sweden", "Europe"), "NOK": ("Norway", "Europe"), "DKK": ("Denmark", "Europe"),
    "PLN": ("Poland", "Europe"), "HUF": ("Hungary", "Europe"), "EGP": ("Egypt", "Africa"),
    "KES": ("Kenya", "Africa"), "NGN": ("Nigeria", "Africa"), "GHS": ("Ghana", "Africa"),
    "THB": ("Thailand", "Asia"), "IDR": ("Indonesia", "Asia"),
    "CUP": ("Cuba", "North America"), "ISK": ("Iceland", "Europe"),
    "UAH": ("Ukraine", "Europe"), "NPR": ("Nepal", "Asia"),
    "COP": ("Colombia", "South America"), "PKR": ("Pakistan", "Asia"),
    "JMD": ("Jamaica", "North America"), "MNT": ("Mongolia", "Asia"),
    "ZAR": ("South Africa", "Africa"), "RUB": ("Russia", "Europe"),
    "KRW": ("South Korea", "Asia"), "TRY": ("Turkey", "Asia"), "VND": ("Vietnam", "Asia"),
    "PHP": ("the Philippines", "Asia"), "CZK": ("Czechia", "Europe"),
    "RON": ("Romania", "Europe"), "ARS": ("Argentina", "South America"),
    "CLP": ("Chile", "South America"), "PEN": ("Peru", "South America"),
}  # fmt: skip

CURRENCY_NAMES: dict[str, str] = dict(CURRENCIES) | EXTRA_CURRENCY_NAMES
_COUNTRY_BY_NAME: dict[str, str] = dict(COUNTRIES)


def country_facts(name: str) -> dict[str, str]:
    """{"code", "currency", "region"} of a country of data.COUNTRIES, by name."""
    code = _COUNTRY_BY_NAME.get(name)
    if code is None:
        raise ValueError(f"unknown country {name!r}")
    currency, region = _COUNTRY_FACTS[code]
    return {"code": code, "currency": CURRENCY_NAMES[currency], "region": region}


def currency_facts(code: str) -> dict[str, str]:
    """{"name", "home", "region"} of a currency of data.CURRENCIES, by code."""
    if code not in _CURRENCY_FACTS:
        raise ValueError(f"unknown currency code {code!r}")
    home, region = _CURRENCY_FACTS[code]
    return {"name": CURRENCY_NAMES[code], "home": home, "region": region}


def _number(s: str, lo: int, hi: int) -> int:
    """`s` as an int in [lo, hi], written without leading zeros, else ValueError."""
    if not re.fullmatch(r"0|[1-9][0-9]*", s) or not lo <= int(s) <= hi:
        raise ValueError(f"{s!r} is not a number in {lo}-{hi}")
    return int(s)


def _word(s: str) -> str:
    if s not in WORDS:
        raise ValueError(f"{s!r} is not a word of data.WORDS")
    return s


def _number_facts(f: dict[str, str]) -> dict[str, str]:
    n = _number(f["n"], 1, 98)
    return {"next": str(n + 1), "previous": str(n - 1), "parity": "odd" if n % 2 else "even"}


def _word_facts(f: dict[str, str]) -> dict[str, str]:
    w = _word(f["w"])
    return {"first": w[0], "last": w[-1], "length": str(len(w))}


def _pair_facts(f: dict[str, str]) -> dict[str, str]:
    a, b = _number(f["a"], 0, 99), _number(f["b"], 0, 99)
    if a == b:
        raise ValueError(f"the two numbers must differ, got {a} twice")
    return {"larger": str(max(a, b)), "smaller": str(min(a, b)), "difference": str(abs(a - b))}


def _word_pair_facts(f: dict[str, str]) -> dict[str, str]:
    a, b = _word(f["a"]), _word(f["b"])
    if len(a) == len(b):
        raise ValueError(f"the two words must differ in length, got {a!r} and {b!r}")
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    return {"longer": longer, "shorter": shorter, "total": str(len(a) + len(b))}


def _draw_word_pair(rng: random.Random) -> dict[str, str]:
    while True:
        a, b = rng.sample(WORDS, 2)
        if len(a) != len(b):
            return {"a": a, "b": b}


def _draw_pair(rng: random.Random) -> dict[str, str]:
    a, b = rng.sample(range(100), 2)
    return {"a": str(a), "b": str(b)}


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    """One fact of a family: its key, the kind of its value (see `pretraining_sentences`) and
    its phrasings, each a format string over the value `{v}`."""

    fact: str
    kind: str
    phrasings: tuple[str, ...]


@dataclass(frozen=True)
class _Grammar:
    """The answer grammar of one subject: its leads and its clauses with values filled in."""

    leads: tuple[str, ...]
    clauses: tuple[tuple[str, ...], ...]  # per fact, in family order
    norm_leads: tuple[str, ...]
    lookup: dict[str, int]  # casefolded clause -> fact index


@dataclass(frozen=True)
class LongFormFamily:
    """A long-form task family: prompt paraphrases over a subject (the template slots), the
    subject's facts, and the grammar of answers that state them (see the module docstring).

    ``generative`` families are rules over a large subject space, the others fact tables, as
    for data.Family.
    """

    name: str
    templates: tuple[str, ...]
    slots: tuple[tuple[str, str], ...]  # (template field, regex of its value)
    leads: tuple[str, ...]  # subject phrases, format strings over the slots
    clauses: tuple[Clause, ...]
    draw: Callable[[random.Random], dict[str, str]]  # a random subject's slot values
    derive: Callable[[dict[str, str]], dict[str, str]]  # slot values -> facts, or ValueError
    generative: bool
    description: str = ""

    @functools.cached_property
    def _patterns(self) -> tuple[re.Pattern[str], ...]:
        slots = dict(self.slots)
        out = []
        for t in self.templates:
            parts = []
            for text, field, _, _ in string.Formatter().parse(t):
                parts.append(re.escape(text))
                if field is not None:
                    parts.append(f"(?P<{field}>{slots[field]})")
            out.append(re.compile("".join(parts)))
        return tuple(out)

    def subject(self, prompt: str) -> dict[str, str]:
        """The template slot values of `prompt`; ValueError naming the prompt if it matches no
        template or names a subject outside the family."""
        for pattern in self._patterns:
            m = pattern.fullmatch(prompt.strip())
            if m:
                fields = m.groupdict()
                try:
                    self.derive(fields)
                except ValueError as e:
                    raise ValueError(f"{self.name} prompt {prompt!r}: {e}") from None
                return fields
        raise ValueError(f"prompt {prompt!r} matches no template of long-form family {self.name}")

    def facts(self, prompt: str) -> dict[str, str]:
        """The facts a right answer to `prompt` states, {fact: value} in family order."""
        return self.derive(self.subject(prompt))

    def _grammar(self, prompt: str) -> _Grammar:
        return _grammar(self, _key(self.subject(prompt)))

    def generate(self, rng: random.Random) -> tuple[str, str]:
        """(prompt, answer): a random subject and template, and an answer drawn uniformly from
        the valid ones (lead, order, phrasings and joints each uniform); uses only `rng`."""
        fields = self.draw(rng)
        prompt = rng.choice(self.templates).format(**fields)
        g = _grammar(self, _key(fields))
        lead = rng.choice(g.leads)
        order = rng.sample(range(len(g.clauses)), len(g.clauses))
        parts = [rng.choice(g.clauses[i]) for i in order]
        joints = [rng.choice(JOINTS_1) for _ in order[2:]] + [rng.choice(JOINTS_2)]
        return prompt, _compose(lead, parts, joints)

    def references(self, prompt: str) -> list[str]:
        """Every valid answer to `prompt` (each once, the final "." written)."""
        return list(_references(self, _key(self.subject(prompt))))

    def is_valid(self, prompt: str, response: str) -> bool:
        """Whether `response` is a valid answer to `prompt` (exact; see the module docstring).
        ValueError if `prompt` is not one of this family's."""
        g = self._grammar(prompt)
        text = normalize_answer(response)
        k = len(g.clauses)
        for lead in g.norm_leads:
            if not text.startswith(lead + " "):
                continue
            # No clause contains a joint (checked in _grammar), so the split is the parse.
            parts = _JOINT_RE.split(text[len(lead) + 1 :])
            if len(parts) != 2 * k - 1:
                continue
            joints = parts[1::2]
            if any(j not in JOINTS_1 for j in joints[:-1]) or joints[-1] not in JOINTS_2:
                continue
            seen = {g.lookup.get(c) for c in parts[0::2]}
            if None not in seen and len(seen) == k:
                return True
        return False


def _key(fields: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(fields.items()))


def _compose(lead: str, parts: list[str] | tuple[str, ...], joints: list[str]) -> str:
    out = [lead, " ", parts[0]]
    for joint, part in zip(joints, parts[1:], strict=True):
        out += [joint, part]
    return "".join(out) + "."


@functools.lru_cache(maxsize=4096)
def _grammar(fam: LongFormFamily, key: tuple[tuple[str, str], ...]) -> _Grammar:
    fields = dict(key)
    facts = fam.derive(fields)
    leads = tuple(lead.format(**fields) for lead in fam.leads)
    clauses = tuple(tuple(p.format(v=facts[c.fact]) for p in c.phrasings) for c in fam.clauses)
    lookup: dict[str, int] = {}
    for i, phrasings in enumerate(clauses):
        for p in phrasings:
            if _JOINT_RE.search(p) or ";" in p or p.casefold() in lookup:
                raise RuntimeError(f"{fam.name}: clause {p!r} makes the grammar ambiguous")
            lookup[p.casefold()] = i
    norm_leads = tuple(normalize_answer(lead) for lead in leads)
    return _Grammar(leads, clauses, norm_leads, lookup)


def _expand(g: _Grammar, piece: Callable[[str], _T], lead_sep: _T, end: _T) -> list[_T]:
    """Every valid answer, each built by `+` from `piece(text)` of its lead, clauses and joints
    (strings, or token-id tuples for Rouge-L), a prefix shared by all answers built once."""
    k = len(g.clauses)
    bodies = []
    for order in itertools.permutations(range(k)):
        level = [piece(p) for p in g.clauses[order[0]]]
        for pos, i in enumerate(order[1:], start=1):
            joints = [piece(j) for j in (JOINTS_2 if pos == k - 1 else JOINTS_1)]
            parts = [piece(p) for p in g.clauses[i]]
            level = [b + j + p for b in level for j in joints for p in parts]
        bodies += level
    return [piece(lead) + lead_sep + b + end for lead in g.leads for b in bodies]


@functools.lru_cache(maxsize=256)
def _references(fam: LongFormFamily, key: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_expand(_grammar(fam, key), str, " ", ".")))


def _clause(fact: str, kind: str, *phrasings: str) -> Clause:
    return Clause(fact, kind, phrasings)


_COUNTRY = "|".join(re.escape(n) for n, _ in sorted(COUNTRIES, key=lambda c: -len(c[0])))

# fmt: off
LONG_FORM: dict[str, LongFormFamily] = {f.name: f for f in (
    LongFormFamily(
        "country_profile",
        templates=(
            "Describe {country} in one sentence: its code, its currency and its region.",
            "Tell me about the country {country}.",
            "Give a short profile of {country}.",
            "What are the code, the currency and the region of {country}?",
            "Write one sentence about {country} with its code, currency and region.",
        ),
        slots=(("country", _COUNTRY),),
        leads=("{country}:", "{country} is a country:"),
        clauses=(
            _clause("code", "country_code", "its country code is {v}",
                    "its two-letter code is {v}", "it has the country code {v}"),
            _clause("currency", "currency", "its currency is the {v}", "it pays with the {v}",
                    "its money is the {v}"),
            _clause("region", "region", "it lies in {v}", "it is in {v}", "its region is {v}"),
        ),
        draw=lambda rng: {"country": rng.choice(COUNTRIES)[0]},
        derive=lambda f: country_facts(f["country"]),
        generative=False,
        description="A country's two-letter code, currency and continent (fact table).",
    ),
    LongFormFamily(
        "currency_profile",
        templates=(
            "Describe the currency {code} in one sentence: its name, its home and its region.",
            "Tell me about the currency code {code}.",
            "Give a short profile of the currency {code}.",
            "What are the name, the home and the region of the currency {code}?",
            "Write one sentence about the currency {code}.",
        ),
        slots=(("code", "[A-Z]{3}"),),
        leads=("{code}:", "{code} is a currency code:"),
        clauses=(
            _clause("name", "currency", "its name is the {v}", "it is called the {v}",
                    "it is known as the {v}"),
            _clause("home", "place", "it comes from {v}", "it is the money of {v}",
                    "people in {v} pay with it"),
            _clause("region", "region", "it is used in {v}", "it is found in {v}",
                    "its home region is {v}"),
        ),
        draw=lambda rng: {"code": rng.choice(CURRENCIES)[0]},
        derive=lambda f: currency_facts(f["code"]),
        generative=False,
        description="A currency's name, home country or area and its region (fact table).",
    ),
    LongFormFamily(
        "number_profile",
        templates=(
            "Describe the number {n} in one sentence.",
            "Tell me about the number {n}.",
            "Give the next number, the previous number and the parity of {n}.",
            "What comes after and before {n}, and is it even or odd?",
            "Write one sentence about the number {n}.",
        ),
        slots=(("n", "[0-9]+"),),
        leads=("The number {n}:", "{n} is a number:"),
        clauses=(
            _clause("next", "number", "the next number is {v}", "the number after it is {v}",
                    "it is followed by {v}"),
            _clause("previous", "number", "the previous number is {v}",
                    "the number before it is {v}", "it comes right after {v}"),
            _clause("parity", "parity", "it is an {v} number", "the number itself is {v}",
                    "its parity is {v}"),
        ),
        draw=lambda rng: {"n": str(rng.randint(1, 98))},
        derive=_number_facts,
        generative=True,
        description="n + 1, n - 1 and the parity of n, for n in 1-98.",
    ),
    LongFormFamily(
        "word_profile",
        templates=(
            "Describe the word {w} in one sentence.",
            "Tell me about the word {w}.",
            "Give the first letter, the last letter and the length of {w}.",
            "How does the word {w} begin and end, and how long is it?",
            "Write one sentence about the word {w}.",
        ),
        slots=(("w", "[a-z]+"),),
        leads=("The word {w}:", "About the word {w}:"),
        clauses=(
            _clause("first", "letter", "its first letter is {v}", "it starts with the letter {v}",
                    "it begins with the letter {v}"),
            _clause("last", "letter", "its last letter is {v}", "it ends with the letter {v}",
                    "the letter {v} comes last"),
            _clause("length", "number", "it has {v} letters", "it is {v} letters long",
                    "its length is {v} letters"),
        ),
        draw=lambda rng: {"w": rng.choice(WORDS)},
        derive=_word_facts,
        generative=True,
        description="The first letter, last letter and length of a word of data.WORDS.",
    ),
    LongFormFamily(
        "pair_profile",
        templates=(
            "Describe the numbers {a} and {b} in one sentence.",
            "Tell me about the numbers {a} and {b}.",
            "Compare {a} and {b}: the larger, the smaller and the difference.",
            "Which of {a} and {b} is larger, which is smaller, and how far apart are they?",
            "Write one sentence comparing {a} and {b}.",
        ),
        slots=(("a", "[0-9]+"), ("b", "[0-9]+")),
        leads=("{a} and {b}:", "The numbers {a} and {b}:"),
        clauses=(
            _clause("larger", "number", "the larger one is {v}", "the bigger number is {v}",
                    "{v} is the larger one"),
            _clause("smaller", "number", "the smaller one is {v}", "the smaller number is {v}",
                    "{v} is the smaller one"),
            _clause("difference", "number", "the difference is {v}", "they differ by {v}",
                    "the gap between them is {v}"),
        ),
        draw=_draw_pair,
        derive=_pair_facts,
        generative=True,
        description="The larger, the smaller and the difference of two numbers in 0-99.",
    ),
    LongFormFamily(
        "word_pair_profile",
        templates=(
            "Describe the words {a} and {b} in one sentence.",
            "Tell me about the words {a} and {b}.",
            "Compare the words {a} and {b}: the longer, the shorter and the total letters.",
            "Which of {a} and {b} is longer, and how many letters do they have together?",
            "Write one sentence comparing the words {a} and {b}.",
        ),
        slots=(("a", "[a-z]+"), ("b", "[a-z]+")),
        leads=("The words {a} and {b}:", "About the words {a} and {b}:"),
        clauses=(
            _clause("longer", "word", "the longer word is {v}", "{v} is the longer word",
                    "the longer one is {v}"),
            _clause("shorter", "word", "the shorter word is {v}", "{v} is the shorter word",
                    "the shorter one is {v}"),
            _clause("total", "number", "together they have {v} letters",
                    "they have {v} letters in total", "their letters add up to {v}"),
        ),
        draw=_draw_word_pair,
        derive=_word_pair_facts,
        generative=True,
        description="The longer and the shorter of two words of different lengths, and their "
        "total number of letters.",
    ),
)}
# fmt: on


def _family(name: str) -> LongFormFamily:
    try:
        return LONG_FORM[name]
    except KeyError:
        raise ValueError(
            f"unknown long-form family {name!r}; allowed: {sorted(LONG_FORM)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Rouge-L against the best valid reference
# --------------------------------------------------------------------------------------------

# metrics.rouge_l's tokenisation (rouge_score's default: lowercase, runs of [a-z0-9]).
_TOKENIZER = DefaultTokenizer(use_stemmer=False)


@dataclass(frozen=True)
class _RougeIndex:
    """One subject's references as bit masks, for Hyyro's bit-parallel LCS over all at once."""

    rows: dict[str, int]  # token -> row of `masks`
    masks: np.ndarray  # (V, R) uint64: bit i of masks[t, r] set iff reference r's token i is t
    lengths: np.ndarray  # (R,) tokens per reference (< 64)
    full: np.ndarray  # (R,) uint64 with the low `lengths` bits set


@functools.lru_cache(maxsize=1024)
def _rouge_index(fam: LongFormFamily, key: tuple[tuple[str, str], ...]) -> _RougeIndex:
    g = _grammar(fam, key)
    rows: dict[str, int] = {}

    @functools.cache
    def ids(text: str) -> tuple[int, ...]:
        return tuple(rows.setdefault(t, len(rows)) for t in _TOKENIZER.tokenize(text))

    # Pieces meet at spaces or punctuation, so an answer's tokens are its pieces' tokens.
    seq_list = list(dict.fromkeys(_expand(g, ids, (), ())))
    n_refs, width = len(seq_list), max(map(len, seq_list))
    if width >= 64:
        raise RuntimeError(f"{fam.name}: a reference of {width} tokens does not fit 63 bits")
    table = np.array([s + (-1,) * (width - len(s)) for s in seq_list], dtype=np.int64)
    masks = np.zeros((len(rows), n_refs), dtype=np.uint64)
    for i in range(width):
        (refs,) = np.nonzero(table[:, i] >= 0)
        masks[table[refs, i], refs] |= np.uint64(1 << i)
    lengths = (table >= 0).sum(axis=1)
    full = (np.uint64(1) << lengths.astype(np.uint64)) - np.uint64(1)
    return _RougeIndex(rows, masks, lengths, full)


def best_rouge_l(prompt: str, response: str, family: str) -> float:
    """The largest Rouge-L F of the response's first line (what the checker reads) against any
    valid answer to `prompt`: 1.0 for a valid answer, exactly max(metrics.rouge_l) otherwise.

    Rouge-L ignores case and punctuation, so an answer invalid only in those scores 1.0 too.
    References are cached per subject: ~3 ms for a new one, ~0.1 ms a response after that.
    """
    fam = _family(family)
    index = _rouge_index(fam, _key(fam.subject(prompt)))
    tokens = _TOKENIZER.tokenize(response.strip().split("\n", 1)[0])
    if not tokens:
        return 0.0
    # Bit-parallel LCS (Crochemore et al. 2001; Hyyro 2004): bit i of v is 0 iff the LCS of
    # the reference's first i + 1 tokens and the tokens read so far grew at i.
    v = index.full.copy()
    for t in tokens:
        row = index.rows.get(t)
        if row is None:
            continue
        u = v & index.masks[row]
        v = ((v + u) | (v - u)) & index.full
    lcs = index.lengths - np.bitwise_count(v)
    # rouge_score's arithmetic, in its order, so that the value is the same float.
    precision, recall = lcs / len(tokens), lcs / index.lengths
    total = precision + recall
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(total > 0, 2 * precision * recall / total, 0.0)
    return float(f.max())


# --------------------------------------------------------------------------------------------
# Pre-training sentences
# --------------------------------------------------------------------------------------------

_REGIONS = tuple(sorted({r for _, r in [*_COUNTRY_FACTS.values(), *_CURRENCY_FACTS.values()]}))
_PLACES = tuple(dict.fromkeys([n for n, _ in COUNTRIES] + [h for h, _ in _CURRENCY_FACTS.values()]))

# Value kind -> (its values, neutral sentence bodies over {v} that state no fact). The bodies
# use no article "a" and no word of data.WORDS, so that every value in a document is visible.
_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "place": (
        _PLACES,
        ("people live in {v}", "{v} has many towns", "many people travel to {v}",
         "we read about {v}"),
    ),
    "region": (
        _REGIONS,
        ("{v} is one of the regions of the world", "many countries lie in {v}",
         "people travel across {v}", "{v} is big"),
    ),
    "country_code": (
        tuple(c for _, c in COUNTRIES),
        ("{v} is one two-letter code", "the code {v} has two letters",
         "{v} is written in capitals", "we saw the code {v}"),
    ),
    "currency_code": (
        tuple(c for c, _ in CURRENCIES),
        ("{v} is one currency code", "the code {v} has three letters",
         "{v} is written in capitals", "we saw the code {v}"),
    ),
    "currency": (
        tuple(dict.fromkeys(CURRENCY_NAMES.values())),
        ("the {v} is money", "you can pay with the {v}", "people save the {v}",
         "prices can be in the {v}"),
    ),
    "number": (
        tuple(map(str, range(100))),
        ("{v} is one number", "we can count to {v}", "she wrote down {v}", "the answer was {v}"),
    ),
    "parity": (
        ("even", "odd"),
        ("some numbers are {v}", "half of all numbers are {v}", "{v} is one kind of number"),
    ),
    "word": (
        WORDS,
        ("the word {v} is common", "{v} is one short word", "she wrote the word {v}",
         "we can spell {v}"),
    ),
    "letter": (
        tuple(string.ascii_lowercase),
        ("the letter {v} is in the alphabet", "she wrote the letter {v}",
         "we can say the letter {v}"),
    ),
}  # fmt: skip


@functools.cache
def _clause_bodies(kind: str) -> tuple[str, ...]:
    """Every clause phrasing, of any family, whose value is of `kind`."""
    fams = LONG_FORM.values()
    return tuple(
        dict.fromkeys(p for f in fams for c in f.clauses if c.kind == kind for p in c.phrasings)
    )


def pretraining_sentences(rng: random.Random) -> str:
    """One pre-training document (1-4 sentences) in the long-form vocabulary; uses only `rng`.

    No-leak rule: a document names exactly ONE value (a country, a region, a code, a currency
    name, a number, a parity, a word or a letter) and no lead, so it relates nothing to
    anything: no subject with its fact, no two facts together. Its sentences are either all
    neutral ("Europe is one of the regions of the world.") or all bare clauses of the answer
    grammar with that value ("Its region is Europe."), never both, so a clause never reads as
    a fact about a subject named before it.
    """
    kind = rng.choice(tuple(_KINDS))
    values, neutral = _KINDS[kind]
    clauses = _clause_bodies(kind)
    bodies = neutral if not clauses or rng.random() < 0.5 else clauses
    v = rng.choice(values)
    picked = [b.format(v=v) for b in rng.sample(bodies, rng.randint(1, min(4, len(bodies))))]
    sentences = []
    while picked:
        s = picked.pop()
        if picked and rng.random() < 0.3:  # two bodies in one sentence, as clauses are joined
            s += rng.choice(JOINTS_1 + JOINTS_2) + picked.pop()
        sentences.append(s[:1].upper() + s[1:] + ".")
    return " ".join(sentences)
