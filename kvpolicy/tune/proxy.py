"""`kvpolicy tune`'s ranking proxy (rung 1 of search.py): a candidate's teacher-forced negative
log-likelihood of the expected answer, through its compressed cache, in the whole-prompt runtime
(kvpolicy.engines.hf.cache). One forward per candidate and prompt instead of a greedy
generation."""

from __future__ import annotations

import torch

from kvpolicy.engines.hf.cache import PolicyCache, attend_through
from kvpolicy.eval.prompts import EvalPolicy


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
