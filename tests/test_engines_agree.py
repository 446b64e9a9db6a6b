"""One semantics, two engines: for every shipped policy, vLLM with kvpolicy's backend and the
Hugging Face runtime's paged cache (both over kvpolicy.store) decode the same greedy tokens on
SmolLM2 from needle prompts long enough that 128-token blocks leave the policy's window, seal and
evict (650-930 tokens past the window: 2.7k-3k for the seed policies' 2,048-token window, under
1.1k for KIVI's), and they seal the same blocks; the HF cache holds exactly the page plan's
bytes. A shipped policy that no paged engine can run (`paged_refusals`: it ranks by
`score reconstruct`) is refused by both, for the reason the reports print.

Skipped when vLLM is not installed, unless KVPOLICY_REQUIRE_VLLM=1 (CI sets it)."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import POLICIES

if os.environ.get("KVPOLICY_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

from kvpolicy import load_policy  # noqa: E402
from kvpolicy.compiler.artifact import compile_policy  # noqa: E402
from kvpolicy.engines.hf import generate, load_model  # noqa: E402
from kvpolicy.engines.hf.paged import PagedPolicyCache  # noqa: E402
from kvpolicy.engines.hf.model import default_model_dir  # noqa: E402
from kvpolicy.engines.vllm import offline  # noqa: E402
from kvpolicy.models import resolve_model  # noqa: E402
from kvpolicy.plan.pages import (UnsupportedConfiguration, page_format,  # noqa: E402
                                 paged_refusals)

SHIPPED = sorted(p.stem for p in POLICIES.glob("*.kvp"))
BLOCK = 128  # a multiple of every format unit; extreme's unit (64) keeps 64 of 128: it evicts
STEPS = 12
PAST_WINDOW = ((650, 0.3), (800, 0.6), (930, 0.85))  # tokens beyond the window, needle depth
# a 2,048-token window (the seed's policies) makes each prompt ~3k tokens, three times the cost
# of the others': they run the shortest and the longest (two lengths, batched together)
LONG_WINDOW = 2048


@pytest.fixture(scope="module")
def smol():
    return load_model()


def needle_prompts(tokenizer, window: int) -> list[list[int]]:
    from kvpolicy.eval.haystack import needle_sample
    from kvpolicy.engines.hf.generation import encode
    out = []
    for i, (tokens, depth) in enumerate(PAST_WINDOW):
        if window >= LONG_WINDOW and i == 1:
            continue
        needle = needle_sample(tokenizer, window + tokens, depth, seed=i)
        out.append(encode(tokenizer, needle.context + "\n" + needle.question)[0].tolist())
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_vllm_and_the_hf_runtime_keep_and_decode_the_same(name, smol, tmp_path):
    model, tokenizer = smol
    shape = resolve_model("smollm2-135m")  # pages keep 16-bit regions in bfloat16
    policy = load_policy(POLICIES / f"{name}.kvp")
    if refusals := paged_refusals(policy):
        # vLLM's start-up (engines.vllm.settings) and the HF paged cache both ask page_format
        with pytest.raises(UnsupportedConfiguration) as vllm_refused:
            page_format(policy, shape, BLOCK, dtype_bytes=4)
        with pytest.raises(UnsupportedConfiguration) as hf_refused:
            PagedPolicyCache(policy, model, block_size=BLOCK)
        assert vllm_refused.value.reasons == hf_refused.value.reasons
        assert set(refusals) <= set(hf_refused.value.reasons)
        return
    prompts = needle_prompts(tokenizer, policy.window)
    artifact = tmp_path / name
    compile_policy(policy, shape, artifact)
    fmt = page_format(policy, shape, BLOCK, dtype_bytes=4)  # the engines run in float32
    served = offline.generate(prompts, default_model_dir(), artifact, max_tokens=STEPS,
                              dtype="float32", block_size=BLOCK, max_model_len=3072,
                              max_num_batched_tokens=8192, max_num_seqs=3,
                              kv_cache_memory_bytes=768 << 20)
    sealed = [0] * shape.num_layers
    evicting = min(fmt.kept_tokens()) < BLOCK
    for ids, got in zip(prompts, served.token_ids):
        hf = generate(model, tokenizer, torch.tensor([ids]), policy=str(artifact),
                      max_new_tokens=STEPS, cache_dtype="bfloat16", stop_at_eos=False,
                      block_size=BLOCK)
        assert got == hf.token_ids, (name, len(ids), got, hf.token_ids)
        held = len(ids) + STEPS - 1  # the last token is not fed back
        assert hf.cache.nbytes()["total"] == fmt.held_bytes(held)
        assert hf.cache.seen == held
        sealed = [a + b for a, b in zip(sealed, hf.cache.sealed_blocks)]
    assert served.sealed_blocks == sealed
    assert min(sealed) >= 3 * len(prompts)  # every prompt sealed blocks in every layer
    if policy.evicts:
        assert evicting  # and sealed blocks dropped tokens
