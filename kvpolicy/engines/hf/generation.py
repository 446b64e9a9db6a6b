"""Greedy generation with a policy-compressed cache, with measured bytes and timings.

    from kvpolicy.engines.hf import generate, load_model
    model, tokenizer = load_model()                       # the embedded SmolLM2-135M-Instruct
    result = generate(model, tokenizer, "…", policy="policies/aggressive.kvp")
    print(result.text, result.measured_bytes_after_compress, result.planned_bytes)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvpolicy.engines.hf.cache import PolicyCache, attend_through


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    cache: PolicyCache  # or a StreamPolicyCache / PagedPolicyCache (`paged`)
    # seconds: prefill, reconstruct (score reconstruct's passes), compress, decode (total)
    timings: dict = field(default_factory=dict)

    @property
    def paged(self) -> bool:
        """Did the paged store (`block_size`) hold the cache, rather than the whole-prompt
        runtime?"""
        return not isinstance(self.cache, PolicyCache)

    @property
    def plan(self):
        """The whole-prompt runtime's Plan for the prompt; None for a paged run, whose bytes its
        layout's plan gives (`cache.held_bytes`, `planned_bytes`)."""
        return None if self.paged else self.cache.plan

    @property
    def planned_bytes(self) -> int:
        """What the cache was planned to hold after the prompt: the Plan's compressed bytes, or
        for a paged run its layout's plan's (`held_bytes` of the prompt)."""
        if self.paged:
            return self.cache.held_bytes(self.prompt_tokens)
        return self.cache.plan.compressed_bytes

    @property
    def measured_bytes_after_compress(self) -> int:
        return self.timings["measured_bytes_after_compress"]


def encode(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """[1, n] token ids; an instruct model's chat template is applied when it has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, return_tensors="pt")
        return encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, prompt: str | torch.Tensor, policy, max_new_tokens: int = 64,
             cache_dtype: str = "bfloat16", backend: str = "auto", chat: bool = True,
             stop_at_eos: bool = True, block_size: int | None = None, layout: str = "streams",
             max_len: int | None = None) -> Generation:
    """Prefill in full precision, compress per the policy, decode greedily over the compressed
    cache. `prompt`: text, or token ids [1, n]. With `block_size`, the cache is kvpolicy's paged
    engine store with blocks of that many tokens, in `layout` as vLLM's backend runs it:
    "streams" (hf/streamed.py, laid out for `max_len` tokens, by default the prompt's and the
    new tokens') or "pages" (hf/paged.py); without, the whole-prompt runtime (hf/cache.py)."""
    ids = prompt if isinstance(prompt, torch.Tensor) else encode(tokenizer, prompt, chat)
    ids = ids.to(next(model.parameters()).device)
    if block_size is not None and layout == "streams":
        from kvpolicy.engines.hf.streamed import StreamPolicyCache
        cache = StreamPolicyCache(policy, model, block_size=block_size, cache_dtype=cache_dtype,
                                  backend=backend,
                                  max_len=max_len or ids.shape[1] + max_new_tokens)
    elif block_size is not None:
        from kvpolicy.engines.hf.paged import PagedPolicyCache
        cache = PagedPolicyCache(policy, model, block_size=block_size, cache_dtype=cache_dtype,
                                 backend=backend)
    else:
        cache = PolicyCache(policy, model, cache_dtype=cache_dtype, backend=backend)
    timings = {}
    tokens: list[int] = []
    eos = tokenizer.eos_token_id
    with attend_through(model):
        started = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        timings["prefill"] = time.perf_counter() - started
        if block_size is None and cache.policy.score.needs_context_pass:
            from kvpolicy.engines.hf import reconstruct
            records = [layer.prefill for layer in cache.layers]
            timings["reconstruct"] = reconstruct.record(
                model, reconstruct.instruction_ids(tokenizer), ids, records,
                cache.policy.score.chunk, reconstruct.special_ids(tokenizer))
        started = time.perf_counter()
        if block_size is None:
            cache.compress()
        timings["compress"] = time.perf_counter() - started
        timings["measured_bytes_after_compress"] = cache.nbytes()["total"]
        started = time.perf_counter()
        for step in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if (stop_at_eos and token == eos) or step == max_new_tokens - 1:
                break  # the last token is not fed back (as a serving engine does)
            out = model(input_ids=torch.tensor([[token]], device=ids.device),
                        past_key_values=cache, use_cache=True)
        timings["decode"] = time.perf_counter() - started
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return Generation(text, tokens, ids.shape[1], cache, timings)
