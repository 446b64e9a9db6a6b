"""One semantics, two engines: for every shipped policy, vLLM with kvpolicy's backend and the
Hugging Face runtime's stream cache (both over kvpolicy.store.streamed, the stream layout vLLM
runs for one worker) decode the same greedy tokens on SmolLM2 from needle prompts long enough
that blocks leave the policy's window, seal and evict (650-930 tokens past the window, the seed
policies' 2,048-token window only the longest: ~3k tokens; under 1.1k for KIVI's), and they seal the same
blocks; the HF cache holds exactly the stream plan's bytes. Each policy runs at one of the block
sizes 16, 32 and 64 (in turn, by name), so every size is run by a third of them. A shipped
policy that no paged engine can run (`paged_refusals`: it ranks by `score reconstruct`) is
refused by both, for the reason the reports print.

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
from kvpolicy.engines.hf.streamed import StreamPolicyCache  # noqa: E402
from kvpolicy.engines.hf.model import default_model_dir  # noqa: E402
from kvpolicy.engines.vllm import offline  # noqa: E402
from kvpolicy.models import resolve_model  # noqa: E402
from kvpolicy.plan.pages import UnsupportedConfiguration, paged_refusals  # noqa: E402
from kvpolicy.plan.streams import stream_plan  # noqa: E402

SHIPPED = sorted(p.stem for p in POLICIES.glob("*.kvp"))
BLOCKS = (16, 32, 64)  # policy i runs at BLOCKS[i % 3]
MAX_LEN = 3072
STEPS = 12
PAST_WINDOW = ((650, 0.3), (800, 0.6), (930, 0.85))  # tokens beyond the window, needle depth
# a 2,048-token window (the seed's policies) makes each prompt ~3k tokens, three times the cost
# of the others': they run the longest only
LONG_WINDOW = 2048


@pytest.fixture(scope="module")
def smol():
    return load_model()


def needle_prompts(tokenizer, window: int) -> list[list[int]]:
    from kvpolicy.eval.haystack import needle_sample
    from kvpolicy.engines.hf.generation import encode
    out = []
    for i, (tokens, depth) in enumerate(PAST_WINDOW):
        if window >= LONG_WINDOW and i < len(PAST_WINDOW) - 1:
            continue
        needle = needle_sample(tokenizer, window + tokens, depth, seed=i)
        out.append(encode(tokenizer, needle.context + "\n" + needle.question)[0].tolist())
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_vllm_and_the_hf_runtime_keep_and_decode_the_same(name, smol, tmp_path):
    model, tokenizer = smol
    shape = resolve_model("smollm2-135m")  # pages keep 16-bit regions in bfloat16
    policy = load_policy(POLICIES / f"{name}.kvp")
    block = BLOCKS[SHIPPED.index(name) % len(BLOCKS)]
    if refusals := paged_refusals(policy):
        # vLLM's start-up (engines.vllm.settings) and the HF stream cache both ask stream_plan
        with pytest.raises(UnsupportedConfiguration) as vllm_refused:
            stream_plan(policy, shape, block, MAX_LEN)
        with pytest.raises(UnsupportedConfiguration) as hf_refused:
            StreamPolicyCache(policy, model, block_size=block, max_len=MAX_LEN)
        assert vllm_refused.value.reasons == hf_refused.value.reasons
        assert set(refusals) <= set(hf_refused.value.reasons)
        return
    prompts = needle_prompts(tokenizer, policy.window)
    artifact = tmp_path / name
    compile_policy(policy, shape, artifact)
    plan = stream_plan(policy, shape, block, MAX_LEN)  # what vLLM's backend lays out
    served = offline.generate(prompts, default_model_dir(), artifact, max_tokens=STEPS,
                              dtype="float32", block_size=block, max_model_len=MAX_LEN,
                              max_num_batched_tokens=8192, max_num_seqs=3,
                              kv_cache_memory_bytes=768 << 20)
    assert {rank["layout"] for rank in served.ranks} == {"streams"}
    sealed = [0] * shape.num_layers
    for ids, got in zip(prompts, served.token_ids):
        hf = generate(model, tokenizer, torch.tensor([ids]), policy=str(artifact),
                      max_new_tokens=STEPS, cache_dtype="bfloat16", stop_at_eos=False,
                      block_size=block, max_len=MAX_LEN)
        assert got == hf.token_ids, (name, len(ids), got, hf.token_ids)
        held = len(ids) + STEPS - 1  # the last token is not fed back
        assert hf.cache.nbytes()["total"] == plan.held_bytes(held)
        assert hf.cache.seen == held
        sealed = [a + b for a, b in zip(sealed, hf.cache.sealed_blocks)]
        if policy.evicts:  # sealed blocks dropped tokens
            events = plan.events(held)
            middle = max(0, events * block - plan.sinks)
            assert sum(plan.kept[events]) < plan.layers * plan.kv_heads * middle
    assert served.sealed_blocks == sealed
    assert min(sealed) >= 3 * len(prompts)  # every prompt sealed blocks in every layer
