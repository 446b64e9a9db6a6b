"""`score reconstruct`: the context re-read by the model, KVzip-style (Kim et al., 2025).

After the prompt's full-precision prefill, the model reads a repeat instruction followed by the
context again, in passes of `chunk` context tokens, each pass over the whole prefilled context
(positions right after it) and causally over itself; nothing of a pass stays in the cache. A
context token's importance is the largest attention weight it receives from any re-reading query
(`kernels.reference.reconstruct_attention`; reduced over each KV group and pooled per the policy
by `reference.reconstruct_importance`). A token the model needs to reproduce the context is one a
later question about it is likely to need, whatever the question: the score is
question-agnostic.

Cost: one extra forward over the context (plus the instruction once per pass) whose attention
spans the whole context, so about one more prefill; extra memory is bounded by one pass's
attention weights (query heads x (chunk + instruction) x (context + chunk + instruction) fp32).

    records = ...                       # the prefill's PrefillLayers (recorded by a PolicyCache)
    seconds = record(model, instruction_ids(tokenizer), context_ids, records, chunk=512,
                     skip=special_ids(tokenizer))
    # records[l].received[512] now holds [b, Hq, N]: what compress's importance reads

Only the whole-prompt runtime can run it: it needs the whole context before it ranks a token,
and the paged store ranks each block as it seals (plan.pages refuses such a policy).
"""

from __future__ import annotations

import time

import torch
from transformers.cache_utils import Cache

from kvpolicy.engines.hf.cache import (RoutedLayer, attend_through, model_shape, route_to,
                                      window_attention, window_tail)
from kvpolicy.kernels import reference as R
from kvpolicy.store.whole.compress import PrefillLayer

# What the model reads before each re-read chunk: plain text, so any tokenizer and any model,
# chat-tuned or not, reads it the same way.
REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly.\n\n"


class ReconstructLayer(RoutedLayer):
    """One layer during the reconstruction passes: the prefill's keys and values, read-only,
    with each pass's own appended for that pass only; the largest weight each context token has
    received so far."""

    reconstructing = True  # what kvpolicy_attention dispatches on

    def __init__(self, owner: "ReconstructCache", index: int, record: PrefillLayer,
                 window: int = 0):
        super().__init__(owner, index)
        self.record = record
        self.window = window  # a sliding-window layer's width (0: full attention): not scored
        self.received: torch.Tensor | None = None  # [b, Hq, N]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held_keys, held_values = self.record.keys, self.record.values
        if self.window:  # only the keys its window can reach
            held_keys = window_tail(held_keys, self.window)
            held_values = window_tail(held_values, self.window)
        keys = torch.cat([held_keys, key_states.to(held_keys.dtype)], dim=2)
        values = torch.cat([held_values, value_states.to(held_values.dtype)], dim=2)
        return keys, values

    def attend(self, query, key, value, scaling: float) -> torch.Tensor:
        """query [b, Hq, m, D] → attention output [b, m, Hq, D] (the model's layout)."""
        if self.window:
            n, m = self.get_seq_length(), query.shape[2]
            return window_attention(query, key, value, scaling, n,
                                    n - (key.shape[2] - m), self.window)
        out, received = R.reconstruct_attention(query, key, value, scaling,
                                                first=self.owner.instruction_tokens)
        self.received = received if self.received is None else torch.maximum(self.received,
                                                                             received)
        return out.transpose(1, 2).contiguous()

    def get_seq_length(self) -> int:
        return self.record.keys.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class ReconstructCache(Cache):
    """A transformers Cache for the reconstruction passes over a recorded prefill."""

    def __init__(self, records: list[PrefillLayer], instruction_tokens: int,
                 windows: list[int] | None = None):
        """windows: per layer, its sliding window (0: full attention; default all 0)."""
        self.instruction_tokens = instruction_tokens
        windows = windows or [0] * len(records)
        super().__init__(layers=[ReconstructLayer(self, i, r, w)
                                 for i, (r, w) in enumerate(zip(records, windows))])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        route_to(self.layers[layer_idx])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def instruction_ids(tokenizer) -> torch.Tensor:
    """[1, k]: the repeat instruction's tokens."""
    return tokenizer(REPEAT_INSTRUCTION, return_tensors="pt",
                     add_special_tokens=False)["input_ids"]


@torch.no_grad()
def record(model, instruction: torch.Tensor, context_ids: torch.Tensor,
           records: list[PrefillLayer], chunk: int, skip: frozenset[int] = frozenset()) -> float:
    """Runs the reconstruction passes of `context_ids` [b, N] (the prompt `records` were recorded
    from), each the `instruction` ids [1, k] (`instruction_ids(tokenizer)`) and then the next
    `chunk` context tokens, and stores each layer's received weights in
    `records[l].received[chunk]`. Tokens whose id is in `skip` (`special_ids(tokenizer)`: chat
    template markers) are not re-read — a pass that starts with them derails the copy — but are
    scored like every other context token. Returns the seconds it took."""
    started = time.perf_counter()
    n = context_ids.shape[1]
    if records[0].keys.shape[2] != n:
        raise ValueError(f"the records hold {records[0].keys.shape[2]} tokens, the context {n}")
    reread = context_ids
    if skip:
        kept = ~torch.isin(context_ids, torch.tensor(sorted(skip), device=context_ids.device))
        counts = kept.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError("the sequences of a batch hold different numbers of skipped tokens")
        reread = context_ids[kept].reshape(context_ids.shape[0], -1)
    instruction = instruction.to(context_ids.device).expand(context_ids.shape[0], -1)
    shape = model_shape(model)
    if len(records) != shape.model_layers:
        raise ValueError(f"the records hold {len(records)} layers, the model has "
                         f"{shape.model_layers}")
    sliding = set(shape.window_layers)
    cache = ReconstructCache(records, instruction.shape[1],
                             [shape.sliding_window if i in sliding else 0
                              for i in range(len(records))])
    with attend_through(model):
        for start in range(0, reread.shape[1], chunk):
            ids = torch.cat([instruction, reread[:, start:start + chunk]], dim=1)
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    for layer, prefill in zip(cache.layers, records):
        if not layer.window:  # sliding-window layers are not scored: no policy governs them
            prefill.received[chunk] = layer.received
    return time.perf_counter() - started


def special_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's special tokens (chat template markers, BOS/EOS): not re-read."""
    return frozenset(getattr(tokenizer, "all_special_ids", ()) or ())


def chunks_needed(policies) -> set[int]:
    """The chunk sizes of the reconstruction passes these policies' scores read."""
    return {p.score.chunk for p in policies if p.score.needs_context_pass}
