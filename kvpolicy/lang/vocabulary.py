"""The words the language knows, and "did you mean" for the ones it does not."""

from __future__ import annotations

import difflib
import unicodedata
from typing import Iterable

from kvpolicy.dtypes import LONG_NAMES

# Bit-width words: the number of bits per stored value; 16 is the model's own 16-bit dtype.
WIDTHS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8, "fp16": 16}
WIDTH_ALIASES = {"int16": "fp16", "bf16": "fp16", "float16": "fp16", "half": "fp16",
                 "fp8": "int8", "int1": "int2", "int5": "int4", "int6": "int8", "int7": "int8"}
AXES = ("channel", "token")
SCALE_DTYPES = tuple(LONG_NAMES)  # fp16, bf16, fp32
INTERPOLATIONS = ("linear", "step", "pyramid", "uniform")
# score method → the arguments it takes
SCORE_METHODS: dict[str, tuple[str, ...]] = {
    "snapkv": ("observe", "pool", "gqa"),
    "keynorm": (),
    "recent": (),
    "reconstruct": ("chunk", "pool", "gqa"),
    "expected": ("observe", "future", "pool", "gqa"),
}
POOLINGS = ("max", "avg", "none")
GQA_REDUCTIONS = ("mean", "max", "sum")
ADAPT_SCOPES = ("layers", "heads")


def ascii_folded(word: str) -> str:
    """`word` with accents removed (`rétain` → `retain`); other non-ASCII letters are dropped."""
    decomposed = unicodedata.normalize("NFKD", word)
    return decomposed.encode("ascii", "ignore").decode("ascii")


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice `word` most likely misspells (accents ignored), or None."""
    choices = list(choices)
    lowered = word.lower()
    folded = ascii_folded(lowered)
    if folded != lowered and folded in choices:
        return folded
    close = difflib.get_close_matches(lowered, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def non_ascii_note(word: str) -> str:
    """" ('é' is not an ASCII letter; kvp words are ASCII)" for a word with such a letter."""
    strange = next((c for c in word if not c.isascii()), None)
    if strange is None:
        return ""
    shown = f"U+{ord(strange):04X}" if unicodedata.combining(strange) else f"'{strange}'"
    return f" ({shown} is not an ASCII letter; kvp words are ASCII)"


def suggest(word: str, choices: Iterable[str], aliases: dict[str, str] | None = None) -> str:
    """'; did you mean 'x'?' for the closest choice, or ''."""
    if aliases and word.lower() in aliases:
        return f"; did you mean '{aliases[word.lower()]}'?"
    close = closest(word, choices)
    return f"; did you mean '{close}'?" if close else ""


def one_of(choices: Iterable[str]) -> str:
    """'a, b or c'."""
    items = [str(c) for c in choices]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]
