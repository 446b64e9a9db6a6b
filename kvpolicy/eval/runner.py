"""`kvpolicy eval`: the baseline and every policy on the same samples, measured, resumable.

For each context length, task and sample: the context is prefilled once in full precision (the
prompt's keys, values and last queries are recorded; for `score reconstruct` policies, the
model's re-reading passes of the context too, engines/hf/reconstruct.py, whose time is counted in
those policies' TTFT); then, for the baseline (a policy that keeps
everything) and each policy, the record is compressed per the policy's plan, the query (the
question, or the continuation to score) is fed through the compressed cache, and the answer is
generated greedily. Every (policy, sample) result is appended to `samples.jsonl` as it is made,
so an interrupted run continues where it stopped; `results.json`, `report.md` and `pareto.png`
are written from those lines at the end.

Question-agnostic by default (the context is compressed before the question arrives);
`question_aware=True` compresses context and question together.

Engines (`EvalConfig.engine`):
- "hf": the whole-prompt runtime above (engines/hf/cache.py: selection over the whole prompt, adapt,
  centroids);
- "paged": the Hugging Face model over kvpolicy's compressed store (engines/hf/paged.py), each prompt
  (context and question) in one step, as a serving engine receives it;
- "vllm": the same prompts through vLLM with kvpolicy's backend (the baseline: vLLM's own
  attention), one engine per configuration, every prompt prefilled in one step.
"paged" and "vllm" run the same store, so they keep the same tokens and agree sample for sample;
they score generation tasks only (no perplexity), and they are question-aware by construction.

`run` is the one entry point: it checks the policies against the model and hands the served
engines to served.py; the rest of this module is the "hf" run. What both runs share is in
prompts.py (the policies, the prompt split, the line key, the hardware) and lines.py (the
resumable lines); one sample through the whole-prompt runtime, which `kvpolicy tune` runs too, is
in whole.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kvpolicy.diagnostics import PolicyError
from kvpolicy.eval.lines import append_line, load_lines, resume_lines
from kvpolicy.eval.progress import progress_bar
from kvpolicy.eval.prompts import EvalPolicy, hardware, line_key, split_prompt
from kvpolicy.eval.tasks import make_samples
from kvpolicy.eval.whole import record_prefill, run_policy
from kvpolicy.engines.hf import reconstruct
from kvpolicy.models import DEFAULT_MODEL
from kvpolicy.models import shape_from_config
from kvpolicy.plan.pages import paged_refusals
from kvpolicy.plan.planner import make_plan


@dataclass
class EvalConfig:
    policies: list[EvalPolicy]
    tasks: list[str]
    contexts: list[int]
    samples: int
    seed: int = 0
    question_aware: bool = False
    cache_dtype: str = "bfloat16"
    model: str | None = None  # None: the embedded default
    engine: str = "hf"  # "hf", "paged" or "vllm" (module docstring)
    block_size: int = 64  # tokens per block, for the paged engines
    out: Path = Path("results/eval")
    extra: dict = field(default_factory=dict)  # recorded as-is (e.g. the ablation's target)

    def to_json(self) -> dict:
        return {"policies": [{"name": p.name, "file": p.source, "sha256": p.sha256,
                              **({"paged_refusals": refusals}
                                 if (refusals := paged_refusals(p.policy)) else {})}
                             for p in self.policies],
                "tasks": self.tasks, "contexts": self.contexts, "samples_per_task": self.samples,
                "seed": self.seed,
                "setting": "question-aware" if self.question_aware else "question-agnostic",
                "cache_dtype": self.cache_dtype, "engine": self.engine,
                **({"block_size": self.block_size} if self.engine != "hf" else {}),
                **self.extra}


SERVED_ENGINES = ("paged", "vllm")


# ---- the run --------------------------------------------------------------------------------

def fit_problems(policies: list[EvalPolicy], shape, contexts: list[int]) -> list:
    """Every diagnostic of planning each policy for the model at each context (and at the
    model's maximum): checked before the first prefill, so a policy that does not fit the model
    fails the run at once instead of every sample."""
    problems = []
    for entry in policies:
        for context in sorted({*contexts, shape.max_context}):
            try:
                make_plan(entry.policy, shape, min(context, shape.max_context))
            except PolicyError as exc:
                problems.extend(d for d in exc.diagnostics if d not in problems)
                break
    return problems


def run(config: EvalConfig, model=None, tokenizer=None, progress: bool = True) -> Path:
    from kvpolicy.eval.report import write_outputs
    from kvpolicy.engines.hf.model import load_model
    if model is None:
        model, tokenizer = load_model(config.model)
    shape = shape_from_config(model.config.to_dict(), name=config.model or DEFAULT_MODEL,
                              source="transformers", kv_dtype=config.cache_dtype)
    problems = fit_problems(config.policies, shape, config.contexts)
    if problems:
        raise PolicyError(problems)
    if config.engine in SERVED_ENGINES:
        from kvpolicy.eval.served import run_served
        return run_served(config, model, tokenizer, shape, progress)
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
    lines_path = config.out / "samples.jsonl"
    lines = resume_lines(lines_path)  # drops a half-written last line
    done = {line_key(line) for line in lines}
    observe = max(p.policy.score.observe for p in config.policies)
    # sample-major: a run stopped part-way has covered every task about equally
    work = [(context, task, index) for context in config.contexts
            for index in range(config.samples) for task in config.tasks]
    wanted = {(p.sha256, t, c, i) for p in config.policies for c, t, i in work}
    bar = progress_bar(len(wanted), len(done & wanted), progress)
    samples_cache: dict = {}
    for context, task, index in work:
        pending = [p for p in config.policies
                   if (p.sha256, task, context, index) not in done]
        if not pending:
            continue
        key = (task, context)
        if key not in samples_cache:
            samples_cache[key] = make_samples(task, tokenizer, context, config.samples,
                                              config.seed)
        sample = samples_cache[key][index]
        context_ids, query_ids = split_prompt(tokenizer, sample, config.question_aware)
        prefill, last_logits, prefill_s = record_prefill(model, context_ids, observe)
        reconstruct_s = {chunk: reconstruct.record(model, reconstruct.instruction_ids(tokenizer),
                                                   context_ids, prefill, chunk,
                                                   reconstruct.special_ids(tokenizer))
                         for chunk in reconstruct.chunks_needed(p.policy for p in pending)}
        for entry in pending:
            line = {"policy": entry.name, "policy_sha256": entry.sha256, "task": task,
                    "context": context, "sample": index, "seed": config.seed,
                    "expected": list(sample.answers), "prefill_s": prefill_s}
            try:
                make_plan(entry.policy, shape, context_ids.shape[1])
                line.update(run_policy(model, tokenizer, entry, sample, prefill, last_logits,
                                       query_ids, config.cache_dtype))
                line["ttft_s"] = prefill_s + line["compress_s"] + line["query_s"]
                if entry.policy.score.needs_context_pass:  # the passes are this policy's cost
                    line["reconstruct_s"] = reconstruct_s[entry.policy.score.chunk]
                    line["ttft_s"] += line["reconstruct_s"]
            except PolicyError as exc:
                line["error"] = exc.render()
            append_line(lines_path, line)
            bar.update(1)
    bar.close()
    lines = load_lines(lines_path)
    lines = [line for line in lines if line_key(line) in wanted]
    write_outputs(config, lines, shape, hardware(config.engine),
                  model_name=config.model or DEFAULT_MODEL)
    return config.out
