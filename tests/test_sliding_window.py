"""Models with sliding-window layers (Gemma 3): the policy governs the full-attention layers; the
sliding-window layers hold their last `sliding_window - 1` tokens as the model's own cache does.

A tiny random Gemma 3 (built here, no weights downloaded) checks the runtime against
transformers' own cache; the embedded Gemma 3 270M (slow) checks the real model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import DynamicCache

from conftest import POLICIES, run_cli
from kvpolicy import load_policy, make_plan
from kvpolicy.diagnostics import Source
from kvpolicy.engines.hf import PolicyCache, attend_through, reconstruct
from kvpolicy.engines.hf.cache import WindowLayer, model_shape
from kvpolicy.lang.lower import check_source
from kvpolicy.models import ModelError, PRESETS, model_from_json, shape_from_config
from kvpolicy.plan.pages import UnsupportedConfiguration, page_format

WINDOW = 8
TYPES = ["sliding_attention", "sliding_attention", "full_attention",
         "sliding_attention", "full_attention"]


def policy_of(text: str):
    result = check_source(Source("test.kvp", text))
    assert not result.errors, [e.render() for e in result.errors]
    return result.policy


FULL = policy_of("policy full { retain 100% }")
EVICT = policy_of("""policy evict {
    keep sinks 2
    keep window 16
    retain 50%
    keys int4 group 16 per channel
    values int4 group 16 per token
}""")


@pytest.fixture(scope="module")
def tiny_gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=len(TYPES), num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                              layer_types=TYPES, max_position_embeddings=256,
                              query_pre_attn_scalar=16)
    return Gemma3ForCausalLM(config).eval()


def test_the_shape_plans_the_full_attention_layers_and_counts_the_windows():
    config = {"num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "sliding_window": WINDOW, "layer_types": TYPES}
    shape = shape_from_config(config, name="t", source="t", kv_dtype="bfloat16")
    assert (shape.num_layers, shape.window_layers, shape.model_layers) == (2, (0, 1, 3), 5)
    assert shape.policy_layers() == [None, None, 0, None, 1]
    assert model_from_json(shape.to_json()) == shape
    # the window layers hold min(context, W - 1) tokens, 16-bit, in the baseline and the plan
    plan = make_plan(FULL, shape, 100)
    window = 2 * 3 * 2 * 16 * 2 * (WINDOW - 1)
    assert plan.window_bytes == window
    assert plan.baseline_bytes == 2 * 2 * 2 * 16 * 2 * 100 + window
    assert make_plan(FULL, shape, 3).window_bytes == 2 * 3 * 2 * 16 * 2 * 3
    # models without such layers hash as before: no new keys in their JSON
    assert "window_layers" not in PRESETS["smollm2-135m"].to_json()


@pytest.mark.parametrize("config, message", [
    ({"layer_types": ["full_attention"] * 4}, "one attention kind for each of the 5 layers"),
    ({"layer_types": TYPES[:4] + ["chunked_attention"]}, "layer 4 is 'chunked_attention'"),
    ({"layer_types": ["sliding_attention"] * 5, "sliding_window": 8}, "no growing cache"),
    ({"layer_types": TYPES, "sliding_window": None}, "'sliding_window' must be a positive"),
])
def test_bad_layer_kinds_are_refused_with_the_reason(config, message):
    base = {"num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16}
    with pytest.raises(ModelError, match=message):
        shape_from_config({**base, **config}, name="t", source="config.json")


def test_a_manifest_with_bad_window_layers_is_refused():
    data = {**PRESETS["gemma3-270m"].to_json(), "window_layers": [3, 1]}
    with pytest.raises(ModelError, match="increasing layer indices"):
        model_from_json(data)


@torch.no_grad()
def run_policy(model, policy, ids, tokens):
    cache = PolicyCache(policy, model, cache_dtype="float32", backend="torch")
    logits = []
    with attend_through(model):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.compress()
        logits.append(out.logits[0, -1])
        for token in tokens[:-1]:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1])
    return torch.stack(logits), cache


@torch.no_grad()
def test_a_full_policy_decodes_exactly_like_the_models_own_cache(tiny_gemma):
    """Prompt and decode steps well past the window: the sliding layers see only their window,
    the full layers everything, as in transformers' own (sliding) DynamicCache."""
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, 5 * WINDOW))
    tokens = torch.randint(3, 128, (12,)).tolist()
    ours, cache = run_policy(tiny_gemma, FULL, ids, tokens)
    dynamic = DynamicCache(config=tiny_gemma.config)
    out = tiny_gemma(input_ids=ids, past_key_values=dynamic, use_cache=True, logits_to_keep=1)
    reference = [out.logits[0, -1]]
    for token in tokens[:-1]:
        out = tiny_gemma(input_ids=torch.tensor([[token]]), past_key_values=dynamic,
                         use_cache=True)
        reference.append(out.logits[0, -1])
    torch.testing.assert_close(ours, torch.stack(reference), rtol=1e-4, atol=1e-4)
    # the sliding layers hold what the model's cache holds
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, WindowLayer):
            torch.testing.assert_close(layer.keys, dynamic.layers[index].keys)
            assert layer.keys.shape[2] == WINDOW - 1


@torch.no_grad()
def test_a_full_policy_differs_from_ignoring_the_window(tiny_gemma):
    """The check above can fail: treating every layer as full attention changes the logits."""
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (1, 5 * WINDOW))
    ours, _ = run_policy(tiny_gemma, FULL, ids, [5])
    unwindowed = copy.deepcopy(tiny_gemma)
    unwindowed.config.layer_types = ["full_attention"] * len(TYPES)
    for layer in unwindowed.model.layers:
        layer.self_attn.sliding_window = None
        layer.self_attn.is_sliding = False
    other, _ = run_policy(unwindowed, FULL, ids, [5])
    assert (ours - other).abs().max() > 1e-3


@torch.no_grad()
def test_an_evicting_policy_measures_the_planned_bytes_windows_included(tiny_gemma):
    torch.manual_seed(2)
    ids = torch.randint(3, 128, (1, 64))
    _, cache = run_policy(tiny_gemma, EVICT, ids, [7])
    shape = model_shape(tiny_gemma, "float32")
    plan = make_plan(EVICT, shape, 64)
    measured = cache.nbytes()
    assert measured["total"] == plan.compressed_bytes
    windows = sum(b for b, layer in zip(measured["layers"], cache.layers)
                  if isinstance(layer, WindowLayer))
    assert windows == plan.window_bytes == 3 * 2 * 2 * 16 * 4 * (WINDOW - 1)
    assert len(cache.plan.layers) == 2  # the policy planned the two full-attention layers


@torch.no_grad()
def test_reconstruction_passes_see_each_layers_window(tiny_gemma):
    """A re-read pass through the records gives the logits the model gives with its own cache
    after the context (the pass's positions follow the context); only full layers are scored."""
    torch.manual_seed(3)
    context = torch.randint(3, 128, (1, 6 * WINDOW))
    chunk = torch.randint(3, 128, (1, 10))
    recorder = PolicyCache(policy_of("policy r { retain 100% }"), tiny_gemma,
                           cache_dtype="float32", backend="torch")
    with attend_through(tiny_gemma):
        tiny_gemma(input_ids=context, past_key_values=recorder, use_cache=True,
                   logits_to_keep=1)
    records = [layer.prefill for layer in recorder.layers]
    cache = reconstruct.ReconstructCache(records, 0, [WINDOW if t == "sliding_attention" else 0
                                                      for t in TYPES])
    with attend_through(tiny_gemma):
        ours = tiny_gemma(input_ids=chunk, past_key_values=cache, use_cache=True).logits
    dynamic = DynamicCache(config=tiny_gemma.config)
    tiny_gemma(input_ids=context, past_key_values=dynamic, use_cache=True)
    reference = tiny_gemma(input_ids=chunk, past_key_values=dynamic, use_cache=True).logits
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    reconstruct.record(tiny_gemma, chunk[:, :2], context, records, chunk=16)
    scored = [bool(r.received) for r in records]
    assert scored == [t == "full_attention" for t in TYPES]


def test_paged_engines_refuse_sliding_window_models():
    with pytest.raises(UnsupportedConfiguration, match="sliding-window layers"):
        page_format(load_policy(POLICIES / "kivi.kvp"), PRESETS["gemma3-270m"], 32)


def test_plan_says_what_the_windows_hold(tmp_path):
    result = run_cli("plan", str(POLICIES / "aggressive.kvp"), "--model", "gemma3-270m",
                     "--context", "8192", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["window_bytes"] == 15 * 2 * 256 * 2 * 511
    assert len(plan["layers"]) == 3
    text = run_cli("plan", str(POLICIES / "aggressive.kvp"), "--model", "gemma3-270m",
                   "--context", "8192").stdout
    assert "15 sliding-window layers" in text and "not governed by the policy" in text


def test_eval_reports_say_what_the_policies_govern():
    from kvpolicy.eval.report import _layers
    assert _layers(PRESETS["smollm2-135m"].to_json()) == "30 layers"
    text = _layers(PRESETS["gemma3-270m"].to_json())
    assert text.startswith("3 full-attention layers") and "15 sliding-window layers of 512" in text
