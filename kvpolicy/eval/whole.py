"""One sample through the whole-prompt runtime (kvpolicy.engines.hf.cache): the shared
full-precision prefill (`record_prefill`) and one policy's result on that record (`run_policy`:
compress, feed the query, generate greedily or score the continuation).

`kvpolicy eval --engine hf` (runner.py) runs these for every sample; `kvpolicy tune` generates
its finalists' answers with `run_policy`, so that they are scored exactly as eval scores them,
and records its calibration prompts, as `kvpolicy calibrate` does, with `record_prefill`."""

from __future__ import annotations

import math
import time

import torch

from kvpolicy.eval.prompts import EvalPolicy
from kvpolicy.eval.tasks import Sample, score
from kvpolicy.engines.hf.cache import PolicyCache, attend_through
from kvpolicy.lang.ir import Policy, Score


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
