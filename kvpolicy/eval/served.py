"""`kvpolicy eval --engine paged|vllm`: the samples as a serving engine receives them.

Each sample's prompt (context, question, answer prefix: the question-aware split) is one request,
prefilled in one step; the answer is decoded greedily. "paged" runs it through the Hugging Face
model over kvpolicy's compressed store (engines/hf/paged.py); "vllm" through a vLLM engine with
kvpolicy's backend, one engine per configuration, every prompt in its first step (the step's token
budget is the sum of the prompts). Both run the same store, so their outputs agree sample for
sample; the baseline is the model's own uncompressed cache (transformers' for "paged", vLLM's own
attention and pages for "vllm").

Resumable: every line is appended to `samples.jsonl` as it is made ("paged": per prompt;
"vllm": per configuration, its engine's whole batch) with the engine, block size and seed that
made it; a rerun of the same command skips what is there for those settings.

Bytes: "paged" counts the pool blocks and staging slots the cache holds after the prompt's step,
from its tensors; vLLM does not expose one request's blocks, so "vllm" reports the page plan's
exact count for the same tokens (`PageFormat.held_bytes`; `bytes_source` says which).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from kvpolicy.eval.lines import append_line, load_lines, resume_lines
from kvpolicy.eval.prompts import BASELINE, hardware, line_key, split_prompt
from kvpolicy.eval.tasks import make_samples, score
from kvpolicy.models import DEFAULT_MODEL

SCORED = "generation tasks"


def _prompts(config, tokenizer):
    """[(context, task, index, sample, prompt ids)] for every sample of the run."""
    work = []
    for context in config.contexts:
        for task in config.tasks:
            for sample in make_samples(task, tokenizer, context, config.samples, config.seed):
                ids, _ = split_prompt(tokenizer, sample, question_aware=True)
                work.append((context, task, sample.index, sample, ids[0].tolist()))
    return work


def _answer(tokenizer, sample, token_ids: list[int]) -> tuple[str, list[int]]:
    tokens = []
    for token in token_ids[:sample.max_new_tokens]:
        tokens.append(token)
        if token == tokenizer.eos_token_id:
            break
    return tokenizer.decode(tokens, skip_special_tokens=True), tokens


@torch.no_grad()
def _paged_outputs(model, tokenizer, entry, work, config, shape, emit) -> None:
    from kvpolicy.engines.hf.generation import generate
    from kvpolicy.plan.planner import make_plan
    for context, task, index, sample, ids in work:
        started = time.perf_counter()
        prompt = torch.tensor([ids])
        baseline_bytes = make_plan(entry.policy, shape, len(ids)).baseline_bytes
        if entry.name == BASELINE:
            out = model.generate(prompt, max_new_tokens=sample.max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones_like(prompt))
            tokens = out[0, len(ids):].tolist()
            measured = planned = baseline_bytes
        else:
            generation = generate(model, tokenizer, prompt, entry.policy,
                                  max_new_tokens=sample.max_new_tokens,
                                  cache_dtype=config.cache_dtype, stop_at_eos=True,
                                  block_size=config.block_size)
            tokens = generation.token_ids
            measured = generation.timings["measured_bytes_after_compress"]
            planned = generation.cache.held_bytes(len(ids))
        emit(_line(config, tokenizer, entry, sample, context, task, index, tokens, measured,
                   planned, baseline_bytes, len(ids), time.perf_counter() - started,
                   "measured"))


def _vllm_outputs(tokenizer, entry, work, config, shape, model_dir, emit) -> None:
    from kvpolicy.engines.vllm import offline
    from kvpolicy.plan.planner import make_plan
    from kvpolicy.plan.streams import stream_plan
    from kvpolicy.prepare import compile_to
    prompts = [ids for *_, ids in work]
    most = max(len(ids) for ids in prompts)
    steps = max(sample.max_new_tokens for _, _, _, sample, _ in work)
    max_model_len = -(-(most + steps + 1) // config.block_size) * config.block_size
    with tempfile.TemporaryDirectory(prefix="kvpolicy-eval-") as folder:
        artifact = None
        if entry.name != BASELINE:
            artifact = Path(folder) / "artifact"
            compile_to(entry.policy, shape, artifact)
        started = time.perf_counter()
        run = offline.generate(
            prompts, model_dir, artifact, max_tokens=steps, dtype="float32",
            block_size=config.block_size,
            max_model_len=max_model_len,
            max_num_seqs=len(prompts), max_num_batched_tokens=max(sum(map(len, prompts)), most),
            kv_cache_memory_bytes=4 << 30, timeout=3600)
        seconds = (time.perf_counter() - started) / len(prompts)
    # one worker: vLLM's backend holds the stream layout (engines.vllm.settings.LAYOUT_ENV)
    streams = None if artifact is None else stream_plan(entry.policy, shape, config.block_size,
                                                         max_model_len)
    for (context, task, index, sample, ids), tokens in zip(work, run.token_ids):
        baseline_bytes = make_plan(entry.policy, shape, len(ids)).baseline_bytes
        held = baseline_bytes if streams is None else streams.held_bytes(len(ids))
        emit(_line(config, tokenizer, entry, sample, context, task, index, tokens, held, held,
                   baseline_bytes, len(ids), seconds, "stream plan"))


def _line(config, tokenizer, entry, sample, context, task, index, tokens, measured, planned,
          baseline_bytes, prompt_tokens, seconds, source) -> dict:
    output, kept = _answer(tokenizer, sample, tokens)
    return {"policy": entry.name, "policy_sha256": entry.sha256, "task": task,
            "context": context, "sample": index, "engine": config.engine,
            "block_size": config.block_size, "seed": config.seed,
            "expected": list(sample.answers),
            "output": output, "token_ids": kept, "score": score(sample, output),
            "measured_bytes": measured, "planned_bytes": planned,
            "baseline_bytes": baseline_bytes, "bytes_source": source,
            "compression_ratio": baseline_bytes / measured, "prompt_tokens": prompt_tokens,
            "query_tokens": 0, "prefill_s": seconds, "compress_s": 0.0, "ttft_s": None,
            "tpot_s": None}


def run_served(config, model, tokenizer, shape, progress: bool = True) -> Path:
    from kvpolicy.eval.report import write_outputs
    from kvpolicy.engines.hf.model import model_directory
    if "ppl" in config.tasks:
        raise ValueError(f"--engine {config.engine} scores {SCORED} only, not ppl")
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
    path = config.out / "samples.jsonl"
    settings = {"engine": config.engine, "block_size": config.block_size, "seed": config.seed}
    lines = resume_lines(path,  # what an earlier run of these settings made, whole lines only
                         lambda line: all(line.get(k) == v for k, v in settings.items()))
    done = {line_key(line) for line in lines}
    work = _prompts(config, tokenizer)
    wanted = set()

    def emit(line: dict) -> None:
        append_line(path, line)

    for entry in config.policies:
        keys = [(entry.sha256, task, context, index) for context, task, index, *_ in work]
        wanted.update(keys)
        todo = [item for item, key in zip(work, keys) if key not in done]
        if progress:
            print(f"kvpolicy eval: {entry.name} on {config.engine} ({len(todo)} of "
                  f"{len(work)} prompts to run)", flush=True)
        if not todo:
            continue
        if config.engine == "paged":
            _paged_outputs(model, tokenizer, entry, todo, config, shape, emit)
        else:
            _vllm_outputs(tokenizer, entry, todo, config, shape,
                          str(model_directory(config.model)), emit)
    lines = [line for line in load_lines(path) if line_key(line) in wanted]
    write_outputs(config, lines, shape, hardware(config.engine),
                  model_name=config.model or DEFAULT_MODEL)
    return config.out
