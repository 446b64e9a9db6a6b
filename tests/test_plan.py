"""The plan: token counts per region and exact bytes, checked against independent arithmetic."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import assume, given, strategies as st

from conftest import POLICIES, SHIPPED, assert_refused_elsewhere, calibrated_elsewhere
from strategies import policies
from kvpolicy.diagnostics import PolicyError, Source
from kvpolicy.lang.lower import check_source, load_policy
from kvpolicy.models import PRESETS, ModelShape
from kvpolicy.plan.planner import make_plan, needs_positions
from kvpolicy.plan.report import render_table, to_json

QWEN = PRESETS["qwen2.5-7b"]
SMOL = PRESETS["smollm2-135m"]


def policy_of(text: str):
    result = check_source(Source("t.kvp", text))
    assert not result.errors, [e.render() for e in result.errors]
    return result.policy


def test_kivi_on_smollm2_by_hand():
    # 1000 tokens: window 128, middle 872 = 27 whole groups of 32 (864) + 8 left over, which stay
    # in the window (136). Per layer and head (head_dim 64, 2-bit: 4 int32 words per token):
    #   window: 136 tokens * 64 * 2 bytes * (K and V)                    = 34,816
    #   key codes 864*16, key scale+zero (27 groups * 64 ch * 2 B * 2)     = 13,824 + 6,912
    #   value codes 864*16, value scale+zero (864 tok * 2 groups * 2 B * 2) = 13,824 + 6,912
    # = 76,288 per head, * 3 heads * 30 layers = 6,865,920; baseline 1000 * 23,040 = 23,040,000.
    plan = make_plan(load_policy(POLICIES / "kivi.kvp"), SMOL, 1000)
    layer = plan.layers[0]
    assert (layer.sinks, layer.window, layer.body_tokens, layer.guard_tokens, layer.evicted) == \
        (0, 136, 864, 0, 0)
    assert layer.bytes == 76_288 * 3
    assert plan.compressed_bytes == 6_865_920
    assert plan.baseline_bytes == 23_040_000
    assert plan.compression_ratio == pytest.approx(23_040_000 / 6_865_920)
    assert not any(t.name == "selected.positions" for t in layer.tensors)


def test_aggressive_acceptance_mean_retain_is_the_global_ratio():
    policy = load_policy(POLICIES / "aggressive.kvp")
    document = json.loads(json.dumps(to_json(make_plan(policy, QWEN, 32768))))
    for key in ("policy", "model", "context", "baseline_bytes", "compressed_bytes",
                "compression_ratio", "layers"):
        assert key in document
    retains = [layer["retain"] for layer in document["layers"]]
    assert sum(retains) / len(retains) == pytest.approx(0.18, abs=1e-12)
    for layer in document["layers"]:
        assert {"layer", "retain", "kept_tokens", "key_bits", "value_bits", "guard_tokens",
                "bytes"} <= layer.keys()
        assert layer["bytes"] == sum(t["bytes"] for t in layer["tensors"])
    assert document["compressed_bytes"] == sum(layer["bytes"] for layer in document["layers"])


def test_floor_and_budget_warnings():
    policy = load_policy(POLICIES / "aggressive.kvp")
    short = make_plan(policy, QWEN, 4096)
    assert any("effective retain of 50.1%" in w.message for w in short.warnings)
    assert all(layer.kept_tokens == 2052 for layer in short.layers)
    long = make_plan(policy, QWEN, 32768)
    assert any("26–27" in w.message for w in long.warnings)


def test_layer_overrides_apply_per_layer():
    policy = policy_of("""policy p {
        keep window 64; retain 50%; keys int2; values int2
        guard 25% of retained at int8
        layers 0..1, last { keys int4 }
        layers last { guard none }
    }""")
    plan = make_plan(policy, SMOL, 4096)
    assert [layer.keys.bits for layer in plan.layers] == [4, 4] + [2] * 27 + [4]
    assert plan.layers[-1].guard_tokens == 0 and plan.layers[0].guard_tokens > 0


def test_model_dependent_errors_are_located():
    policy = policy_of("policy p { retain 20%; retain layer 0 40%, layer 29 5% }")
    make_plan(policy, SMOL, 4096)  # 30 layers: fine
    with pytest.raises(PolicyError) as caught:
        make_plan(policy, QWEN, 4096)  # 28 layers
    (error,) = caught.value.errors
    assert error.span.line == 1 and "beyond qwen2.5-7b's last layer" in error.message
    with pytest.raises(PolicyError, match="does not divide"):
        make_plan(policy_of("policy p { values int2 group 128 per token }"), SMOL, 100)
    with pytest.raises(PolicyError, match="context must be"):
        make_plan(policy, SMOL, 0)


def test_anchor_at_last_and_its_index_collide():
    policy = policy_of("policy p { retain 20%; retain layer 27 5%, layer last 10% }")
    with pytest.raises(PolicyError, match="two anchors name layer 27"):
        make_plan(policy, QWEN, 1000)
    make_plan(policy, SMOL, 1000)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("context", [2048, 32768])
def test_shipped_policies_plan_and_render(path, context):
    policy = load_policy(path)
    if calibrated_elsewhere(policy, QWEN):  # head weights of another model: refused, located
        return assert_refused_elsewhere(policy, QWEN)
    plan = make_plan(policy, QWEN, context)
    table = render_table(plan)
    assert f"{context:,} tokens" in table and f"{plan.compression_ratio:.2f}x" in table
    assert 1.0 <= plan.compression_ratio


# ---- property: bytes equal an independent recomputation --------------------------------------

WIDTH_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def _block(keys, values, head_dim: int, positions: bool, tokens: int = 0) -> tuple[int, int]:
    """(tokens, bytes) of one block, from docs/format.md: sections in order key codes, value
    codes, positions, key scale, key zero, value scale, value zero, each 16-byte aligned.
    Guards use the body's block size (`tokens`)."""
    quantized = [f for f in (keys, values) if f.bits < 16]
    if not tokens:
        tokens = math.lcm(*[f.group if f.axis == "channel" else 1 for f in quantized], 1)
        if quantized:
            tokens = math.lcm(tokens, 16)
        else:  # 16-bit: the fewest tokens (of 1, 2, 4, 8, 16) that leave no padding
            per_token = 2 * head_dim * 2 + (4 if positions else 0)
            tokens = next((t for t in (1, 2, 4, 8, 16)
                           if head_dim * 2 * t % 16 == 0 and per_token * t % 16 == 0), 1)
    sections = [tokens * (math.ceil(head_dim / 32) * 4 * f.bits if f.bits < 16 else head_dim * 2)
                for f in (keys, values)]
    if positions:
        sections.append(tokens * 4)
    for f in quantized:
        groups = tokens // f.group * head_dim if f.axis == "channel" else \
            tokens * head_dim // f.group
        sections += [groups * WIDTH_BYTES[f.scale_dtype]] * (1 if f.symmetric else 2)
    offset = 0
    for size in sections:
        offset = -(-offset // 16) * 16 + size
    return tokens, -(-offset // 16) * 16


models = st.builds(
    lambda layers, kv, group, head_dim: ModelShape("m", layers, kv * group, kv, head_dim, 1 << 20),
    st.integers(1, 40), st.integers(1, 8), st.integers(1, 8), st.sampled_from([32, 64, 96, 128,
                                                                               80, 256]))


@given(policies(), models, st.integers(1, 200_000))
def test_plan_bytes_equal_independent_recomputation(text, model, context):
    result = check_source(Source("t.kvp", text))
    assume(not result.errors)
    policy = result.policy
    try:
        plan = make_plan(policy, model, context)
    except PolicyError:
        assume(False)
        return
    heads, head_dim = model.num_kv_heads, model.head_dim
    positions = needs_positions(policy)
    for layer in plan.layers:
        unit, body_block = _block(layer.keys, layer.values, head_dim, positions)
        assert layer.token_unit == unit
        assert layer.sinks + layer.window + layer.selected + layer.evicted == context
        assert layer.selected % unit == 0 and layer.guard_tokens % unit == 0
        assert layer.kept_tokens >= max(1, min(context, policy.sinks + policy.window))
        newest_only = layer.sinks + layer.selected == 0 and layer.window == 1  # docs/language.md
        assert layer.window - min(policy.window, context - layer.sinks) < unit or newest_only
        expected = 2 * (layer.sinks + layer.window) * head_dim * 2
        if layer.guard_tokens:
            bits = layer.guard.bits
            _, guard_block = _block(layer.keys.with_bits(bits), layer.values.with_bits(bits),
                                    head_dim, positions, unit)
            expected += layer.guard_tokens // unit * guard_block
        expected += layer.body_tokens // unit * body_block
        expected += layer.centroids * (2 * head_dim * 2 + 4)
        expected *= heads
        if policy.adapt is not None and policy.adapt.across_heads and layer.evicted:
            expected += 2 * heads * 4
        assert layer.bytes == expected
    assert plan.compressed_bytes == sum(layer.bytes for layer in plan.layers)
    assert plan.baseline_bytes == 2 * model.num_layers * heads * head_dim * 2 * context


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_policies_spend_no_byte_on_padding(path):
    # docs/format.md: blocks are sized so that no shipped policy pays for alignment on any preset
    # (16-bit blocks with positions hold 4 tokens: 4 x 260 bytes = 1,040, a multiple of 16)
    policy = load_policy(path)
    for model in PRESETS.values():
        if calibrated_elsewhere(policy, model):
            assert_refused_elsewhere(policy, model)
            continue
        for context in (1000, 4096, model.max_context):
            assert make_plan(policy, model, context).bytes_by_kind()["padding"] == 0


def test_guard_none_in_a_layers_block_is_no_guard_in_the_table_and_the_json():
    policy = policy_of("""policy p {
        keep window 64; retain 50%; keys int2; values int2
        guard 25% of retained at int8
        layers last { guard none }
    }""")
    plan = make_plan(policy, SMOL, 4096)
    document = to_json(plan)
    assert document["layers"][0]["guard_bits"] == 8
    assert document["layers"][-1]["guard_bits"] is None  # docs/plan-schema.md: null, not 16
    assert plan.layers[-1].guard is None and plan.layers[-1].guard_tokens == 0
    lines = render_table(plan).splitlines()
    header = next(line for line in lines if line.lstrip().startswith("layer"))
    assert header.split().count("guard") == 2 and "guard at" in header  # tokens, then storage
    assert lines[lines.index(header) + len(plan.layers)].split()[-2] == "-"
    assert lines[lines.index(header) + 1].split()[-2] == "int8"
