"""`kvpolicy tune`: find the policy that keeps the most at a target compression ratio, by
measurement on calibration samples — two rungs of successive halving.

0. **Head weights**, when the space has static head budgets (`heads*` scorers): each
   calibration prompt is prefilled and re-read, and each (layer, KV head)'s share of the most
   re-read tokens is measured as `kvpolicy calibrate` measures it; the mean over the prompts is
   written as a head-weights file per keep (`heads-keep30.json`, ...) in the output directory.
1. **Space** (`tune/space.py`): every scorer × key/value bit-width combination, `retain` solved
   so that each plan reaches the target ratio at every calibration prompt's length and at every
   length from `min_prompt` (default 3/4 of the context) to a little past the longest.
2. **Rung 1, the proxy, every candidate**: each calibration prompt is prefilled once in full
   precision (and re-read once, when a candidate scores by `reconstruct`); every candidate
   compresses that record and is scored by the negative log-likelihood of the expected answer
   fed after the question (teacher forcing: one forward, no generation).
3. **Rung 2, the survivors**: the `finalists` candidates with the lowest mean NLL generate their
   answers greedily on the same prompts, scored as `kvpolicy eval` scores them.
4. **The choice**: the finalist with the highest mean accuracy (then the lowest NLL) among those
   whose *measured* ratio reaches the target on every prompt; written as a formatted .kvp.

Every measurement is a line of `lines.jsonl`, written as it is made: an interrupted run resumes
where it stopped. Calibration samples come from the task generators with their own seed
(default 1000; `kvpolicy eval` defaults to 0), so what tune chooses on is never what eval
reports (tests/test_tune.py checks the default seeds' samples do not share a needle or a
question). Nothing here knows the evaluation samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

import torch

from kvpolicy.engines.hf import reconstruct
from kvpolicy.eval.lines import append_line, resume_lines
from kvpolicy.eval.progress import progress_bar
from kvpolicy.eval.prompts import EvalPolicy, baseline_policy, split_prompt
from kvpolicy.eval.tasks import make_samples
from kvpolicy.eval.whole import record_prefill, run_policy
from kvpolicy.models import DEFAULT_MODEL
from kvpolicy.models import shape_from_config
from kvpolicy.tune.calibrate import (CalibrateConfig, governed_layers, prompt_shares,
                                     write_head_weights)
from kvpolicy.tune.config import TuneConfig
from kvpolicy.tune.front import ACCURACY, HEADS, PROXY, RECORDS, means, write_front
from kvpolicy.tune.proxy import answer_nll
from kvpolicy.tune.space import (Candidate, candidates, checked_lengths, heads_file_name,
                                 heads_keeps, record_needs)


@dataclass
class Prompt:
    task: str
    index: int
    sample: object
    context_ids: torch.Tensor
    query_ids: torch.Tensor
    answer_ids: torch.Tensor

    @property
    def key(self) -> tuple[str, int]:
        return self.task, self.index


def calibration_prompts(tokenizer, config: TuneConfig) -> list[Prompt]:
    samples = {task: make_samples(task, tokenizer, config.context, config.samples, config.seed)
               for task in config.tasks}  # each task's samples drawn once
    prompts = []
    for index in range(config.samples):  # sample-major, as eval
        for task in config.tasks:
            sample = samples[task][index]
            context_ids, query_ids = split_prompt(tokenizer, sample, question_aware=False)
            answer = " " + ", ".join(sample.answers if task == "niah_multivalue"
                                     else sample.answers[:1])
            answer_ids = tokenizer(answer, return_tensors="pt",
                                   add_special_tokens=False)["input_ids"]
            prompts.append(Prompt(task, index, sample, context_ids, query_ids, answer_ids))
    return prompts


def _line_key(line: dict) -> tuple:
    return line["stage"], line["sha256"], line["task"], line["sample"]


def finalists(entries: list[EvalPolicy], nll: dict[str, float], count: int) -> list[EvalPolicy]:
    """The `count` candidates with the lowest mean proxy NLL (ties: by name)."""
    ranked = sorted((e for e in entries if e.sha256 in nll), key=lambda e: (nll[e.sha256], e.name))
    return ranked[:count]


class NoCandidates(Exception):
    """The space has no candidate that reaches the target at every checked length."""


def tune(config: TuneConfig, model, tokenizer, progress: bool = True) -> dict:
    """Runs (or resumes) the search; writes config.json, lines.jsonl, the head-weights files,
    front.json, front.png and best.kvp under `config.out`; returns front.json's content."""
    shape = shape_from_config(model.config.to_dict(), name=config.model or DEFAULT_MODEL,
                              source="transformers", kv_dtype=config.cache_dtype)
    prompts = calibration_prompts(tokenizer, config)
    lengths = sorted({int(p.context_ids.shape[1]) for p in prompts})
    checked = checked_lengths(lengths, config.context, config.min_prompt)
    keeps = heads_keeps(config.space)
    config.out.mkdir(parents=True, exist_ok=True)
    lines_path = config.out / "lines.jsonl"
    every = resume_lines(lines_path)  # drops a half-written last line
    keys = {p.key for p in prompts}  # a resumed run may have measured more samples before
    lines = [line for line in every if (line["task"], line["sample"]) in keys]
    done = {_line_key(line) for line in lines if line["stage"] != RECORDS}

    def write(line: dict) -> None:
        lines.append(line)  # and to the file, as it is made
        append_line(lines_path, line)

    observe, chunks = record_needs(config.space)
    records: dict[tuple, tuple] = {}  # kept between the stages: the prefill is the cost

    def record(prompt: Prompt):
        if prompt.key not in records:
            prefill, last_logits, prefill_s = record_prefill(model, prompt.context_ids, observe)
            passes = {chunk: reconstruct.record(model, reconstruct.instruction_ids(tokenizer),
                                                prompt.context_ids, prefill, chunk,
                                                reconstruct.special_ids(tokenizer))
                      for chunk in sorted(chunks)}
            write({"stage": RECORDS, "sha256": "", "task": prompt.task, "sample": prompt.index,
                   "prompt_tokens": int(prompt.context_ids.shape[1]), "prefill_s": prefill_s,
                   "reconstruct_s": sum(passes.values())})
            records[prompt.key] = (prefill, last_logits)
        return records[prompt.key]

    heads_files = {}
    if keeps:  # stage 0: the head weights, from the same records the candidates compress
        heads_files = head_weights(config, shape, prompts, keeps, record, write, done, lines,
                                   progress)
    space = candidates(shape, checked, config.target, config.space, config.servable_only,
                       calibration=lengths, heads_files=heads_files, directory=config.out)
    if not space:
        raise NoCandidates(f"no candidate of the {config.space} space reaches "
                           f"{config.target:g}x at every prompt length from {checked[0]:,} to "
                           f"{checked[-1]:,} tokens (at the shortest, sinks and window alone "
                           "keep too much); raise --min-prompt or lower --target-ratio")
    by_name: dict[str, Candidate] = {c.name: c for c in space}
    entries = [baseline_policy()] + [EvalPolicy(c.name, c.policy, "") for c in space]
    assert max(e.policy.score.observe for e in entries) <= observe  # record_needs' promise
    (config.out / "config.json").write_text(json.dumps(
        {**config.to_json(), "prompt_tokens": lengths,
         "candidates": {c.name: c.text for c in space}}, indent=2) + "\n")

    def pending(stage: str, chosen: list[EvalPolicy], prompt: Prompt) -> list[EvalPolicy]:
        return [e for e in chosen if (stage, e.sha256, prompt.task, prompt.index) not in done]

    bar = progress_bar(len(prompts) * (len(entries) + min(config.finalists, len(space)) + 1),
                       sum(1 for key in done if key[0] == PROXY), progress, "kvpolicy tune")
    for prompt in prompts:  # rung 1: the proxy, every candidate
        for entry in pending(PROXY, entries, prompt):
            prefill, last_logits = record(prompt)
            started = time.perf_counter()
            result = answer_nll(model, entry, prefill, last_logits, prompt.query_ids,
                                prompt.answer_ids, config.cache_dtype)
            write({"stage": PROXY, "name": entry.name, "sha256": entry.sha256,
                   "task": prompt.task, "sample": prompt.index, **result,
                   "seconds": time.perf_counter() - started})
            done.add((PROXY, entry.sha256, prompt.task, prompt.index))
            bar.update(1)
    proxy = means(lines, PROXY, "nll")
    chosen = [entries[0]] + finalists(entries[1:], proxy, config.finalists)
    bar.update(sum(1 for key in done if key[0] == ACCURACY
                   and key[1] in {e.sha256 for e in chosen}))  # resumed survivors
    for prompt in prompts:  # rung 2: the survivors generate
        for entry in pending(ACCURACY, chosen, prompt):
            prefill, last_logits = record(prompt)
            started = time.perf_counter()
            result = run_policy(model, tokenizer, entry, prompt.sample, prefill, last_logits,
                                prompt.query_ids, config.cache_dtype)
            write({"stage": ACCURACY, "name": entry.name, "sha256": entry.sha256,
                   "task": prompt.task, "sample": prompt.index,
                   **{k: result[k] for k in ("score", "output", "measured_bytes",
                                             "compression_ratio")},
                   "seconds": time.perf_counter() - started})
            done.add((ACCURACY, entry.sha256, prompt.task, prompt.index))
            bar.update(1)
        records.pop(prompt.key, None)
    bar.close()
    return write_front(config, entries, by_name, lines, {e.name for e in chosen})


def head_weights(config: TuneConfig, shape, prompts: list[Prompt], keeps: dict[str, float],
                 record, write, done: set, lines: list[dict],
                 progress: bool = True) -> dict[str, str]:
    """Stage 0: each prompt's head shares at every keep (a `heads` line per prompt, resumable),
    their mean written as a head-weights file per keep in `config.out`; returns each heads
    scorer's file name (relative to `config.out`)."""
    governed = governed_layers(shape)
    settings = CalibrateConfig(out=config.out, tasks=config.tasks, samples=config.samples,
                               seed=config.seed, context=config.context,
                               model=config.model or DEFAULT_MODEL, command=config.command)
    bar = progress_bar(len(prompts), sum(1 for key in done if key[0] == HEADS), progress,
                       "kvpolicy tune: head weights")
    for prompt in prompts:
        if (HEADS, "", prompt.task, prompt.index) in done:
            continue
        prefill, _ = record(prompt)
        shares = prompt_shares(prefill, governed, shape.num_kv_heads, sorted(set(keeps.values())),
                               settings)
        write({"stage": HEADS, "sha256": "", "task": prompt.task, "sample": prompt.index,
               "shares": {f"{keep:g}": value.tolist() for keep, value in shares.items()}})
        done.add((HEADS, "", prompt.task, prompt.index))
        bar.update(1)
    bar.close()
    measured = [line for line in lines if line["stage"] == HEADS]
    lengths = sorted(int(p.context_ids.shape[1]) for p in prompts)
    files = {}
    for scorer, keep in keeps.items():
        total = torch.stack([torch.tensor(line["shares"][f"{keep:g}"], dtype=torch.float64)
                             for line in measured])
        name = heads_file_name(keep)
        write_head_weights(replace(settings, out=config.out / name, keep=keep),
                           total.mean(0).tolist(), shape.num_kv_heads, lengths)
        files[scorer] = name
    return files
