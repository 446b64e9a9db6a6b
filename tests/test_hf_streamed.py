"""The Hugging Face runtime over the stream store (engines.hf.streamed.StreamPolicyCache) on
SmolLM2: it holds exactly what the stream plan says after every step (pool blocks, window slots,
pending chunks, from the tensors), runs the block sizes the page plan refuses, and where both
stores keep the same tokens at the same precision (KIVI: nothing evicted, micro-pages of whole
key groups) it decodes the page store's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import POLICIES

from kvpolicy.engines.hf import load_model
from kvpolicy.engines.hf.cache import attend_through
from kvpolicy.engines.hf.paged import PagedPolicyCache
from kvpolicy.engines.hf.streamed import StreamPolicyCache
from kvpolicy.plan.pages import UnsupportedConfiguration

PROMPT = 700
STEPS = 6


@pytest.fixture(scope="module")
def smol():
    return load_model()


def greedy(model, cache, ids, check=None) -> list[int]:
    out = []
    with attend_through(model), torch.no_grad():
        logits = model(ids, past_key_values=cache).logits[:, -1]
        for _ in range(STEPS):
            if check:
                check(cache)
            token = logits.argmax(-1, keepdim=True)
            out.append(int(token))
            logits = model(token, past_key_values=cache).logits[:, -1]
    return out


def prompt_ids(tokenizer) -> torch.Tensor:
    from kvpolicy.eval.haystack import needle_sample
    from kvpolicy.engines.hf.generation import encode
    needle = needle_sample(tokenizer, PROMPT, 0.4, seed=3)
    return encode(tokenizer, needle.context + "\n" + needle.question)


def holds_the_plan(cache: StreamPolicyCache) -> None:
    held = cache.nbytes()
    want = cache.plan.request_bytes(cache.seen)
    assert held["pool"] == want.pool
    assert held["staging"] == want.window_staging + want.pending_staging
    assert held["pending_rows"] * 2 * cache.plan.head_dim * 2 == want.pending_staging


def test_kivi_decodes_the_page_stores_tokens_in_fewer_bytes(smol):
    model, tokenizer = smol
    ids = prompt_ids(tokenizer)
    streams = StreamPolicyCache(str(POLICIES / "kivi.kvp"), model, block_size=128,
                                max_len=2048)
    pages = PagedPolicyCache(str(POLICIES / "kivi.kvp"), model, block_size=128)
    assert greedy(model, streams, ids, holds_the_plan) == greedy(model, pages, ids)
    holds_the_plan(streams)
    assert streams.nbytes()["pool"] < pages.nbytes()["pool"]
    assert streams.sealed_blocks == pages.sealed_blocks


def test_a_block_size_the_page_plan_refuses_holds_the_stream_plan(smol):
    model, tokenizer = smol
    policy = str(POLICIES / "heads_8x_keep30.kvp")
    with pytest.raises(UnsupportedConfiguration, match="block size 16"):
        PagedPolicyCache(policy, model, block_size=16)
    cache = StreamPolicyCache(policy, model, block_size=16, max_len=1024)
    tokens = greedy(model, cache, prompt_ids(tokenizer), holds_the_plan)
    assert len(tokens) == STEPS
    holds_the_plan(cache)
    assert cache.nbytes()["pending_rows"] > 0 and min(cache.sealed_blocks) > 0


def test_a_block_size_off_the_staging_runs_is_refused(smol):
    model, _ = smol
    with pytest.raises(UnsupportedConfiguration, match="multiple of 16"):
        StreamPolicyCache(str(POLICIES / "kivi.kvp"), model, block_size=24, max_len=512)
