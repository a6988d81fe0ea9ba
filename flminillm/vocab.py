"""The little language's vocabulary, shared by the short (flminillm.data) and long-form
(flminillm.longform) task families: countries, currencies and words."""

from __future__ import annotations

import pycountry

# Fixed, deterministic subset of countries with short common names (names come from pycountry).
COUNTRY_CODES: tuple[str, ...] = (
    "FR", "DE", "JP", "IT", "ES", "CA", "BR", "IN", "CN", "MX",
    "AU", "EG", "KE", "PE", "CL", "AR", "SE", "NO", "FI", "DK",
    "PL", "GR", "PT", "IE", "NL", "CH", "AT", "BE", "HU", "NG",
    "GH", "MA", "TH", "ID", "CU", "IS", "UA", "NP", "CO", "JM",
)  # fmt: skip

# Fixed subset of ISO 4217 currencies with short (1-2 word) names.
CURRENCY_CODES: tuple[str, ...] = (
    "JPY", "USD", "EUR", "GBP", "CHF", "INR", "MXN", "BRL", "CAD", "AUD",
    "SEK", "NOK", "DKK", "PLN", "HUF", "EGP", "KES", "NGN", "GHS", "THB",
    "IDR", "CUP", "ISK", "UAH", "NPR", "COP", "PKR", "JMD", "MNT", "ZAR",
    "RUB", "KRW", "TRY", "VND", "PHP", "CZK", "RON", "ARS", "CLP", "PEN",
)  # fmt: skip

# ~100 common short English words (lowercase letters only).
WORDS: tuple[str, ...] = (
    "apple", "ball", "banana", "bell", "bird", "boat", "book", "bread", "bus", "cake",
    "car", "cat", "chair", "cloud", "coat", "corn", "cup", "desk", "dog", "door",
    "duck", "egg", "elbow", "farm", "fish", "flag", "fox", "frog", "game", "gift",
    "glove", "goat", "gold", "grass", "hand", "hat", "hill", "horse", "house", "ice",
    "igloo", "ink", "jam", "jar", "jet", "juice", "key", "king", "kite", "lamp",
    "leaf", "lion", "milk", "moon", "mouse", "nest", "net", "nose", "nut", "oak",
    "ocean", "owl", "pen", "pie", "pig", "plum", "queen", "quilt", "rain", "ring",
    "river", "road", "rock", "rose", "salt", "sand", "ship", "shoe", "sock", "star",
    "stone", "sun", "table", "tent", "tiger", "toy", "tree", "uncle", "unit", "van",
    "vase", "violin", "wall", "water", "whale", "wind", "wolf", "yak", "yarn", "zebra",
)  # fmt: skip


def _country_table() -> tuple[tuple[str, str], ...]:
    """(name, alpha-2 code) pairs for COUNTRY_CODES, names taken from pycountry."""
    rows = []
    for code in COUNTRY_CODES:
        c = pycountry.countries.get(alpha_2=code)
        if c is None:
            raise RuntimeError(f"pycountry does not know country code {code}")
        rows.append((str(getattr(c, "common_name", None) or c.name), code))
    return tuple(rows)


def _currency_table() -> tuple[tuple[str, str], ...]:
    """(alpha-3 code, name) pairs for CURRENCY_CODES, names taken from pycountry."""
    rows = []
    for code in CURRENCY_CODES:
        c = pycountry.currencies.get(alpha_3=code)
        if c is None:
            raise RuntimeError(f"pycountry does not know currency code {code}")
        rows.append((code, str(c.name)))
    return tuple(rows)


COUNTRIES: tuple[tuple[str, str], ...] = _country_table()
CURRENCIES: tuple[tuple[str, str], ...] = _currency_table()
