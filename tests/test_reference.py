"""The PyTorch reference (the format's living spec): round trips, error bounds, the byte layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kvpolicy import load_policy, make_plan, resolve_model
from kvpolicy.format import block_layout, block_tokens, words_per_token
from kvpolicy.lang.ir import QuantFormat
from kvpolicy.kernels import reference as R
from conftest import POLICIES
from random_layers import random_layer

BITS = (2, 3, 4, 8)
formats = st.builds(QuantFormat, bits=st.sampled_from(BITS), group=st.sampled_from([8, 16, 32, 64]),
                    axis=st.sampled_from(["channel", "token"]), symmetric=st.booleans(),
                    scale_dtype=st.sampled_from(["fp16", "bf16", "fp32"]))


@given(bits=st.sampled_from(BITS), head_dim=st.sampled_from([32, 64, 80, 96, 128, 256]),
       rows=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_pack_then_unpack_is_the_identity(bits, head_dim, rows, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, head_dim), generator=generator, dtype=torch.int32)
    words = R.pack_codes(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (rows, words_per_token(bits, head_dim))
    assert torch.equal(R.unpack_codes(words, bits, head_dim), codes)


def test_bit_planes_are_as_documented():
    # 3-bit channel c = low 2 bits in word c // 16 at bit 2*(c % 16), high bit in word
    # 2*ceil(D/32) + c // 32 at bit c % 32 (docs/format.md).
    codes = torch.zeros(1, 64, dtype=torch.int32)
    codes[0, 17] = 0b101
    words = R.pack_codes(codes, 3)[0].tolist()
    assert words == [0, 1 << 2, 0, 0, 1 << 17, 0]
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, 31] = 3
    assert R.pack_codes(codes, 2)[0].tolist() == [0, (3 << 30) - (1 << 32)]  # int32 words


@given(fmt=formats, head_dim=st.sampled_from([64, 128]), groups=st.integers(1, 3),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31))
@settings(deadline=None)
def test_dequantized_values_lie_within_half_a_step(fmt, head_dim, groups, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = fmt.group * groups if fmt.axis == "channel" else groups
    x = torch.randn(tokens, head_dim, generator=generator) * scale
    codes, stored_scale, stored_zero = R.quantize(x, fmt)
    assert int(codes.min()) >= 0 and int(codes.max()) < (1 << fmt.bits)
    values = R.dequantize(codes, stored_scale, stored_zero, fmt)
    grouped, dim = R._grouped(x, fmt)
    lo, hi = grouped.amin(dim), grouped.amax(dim)
    step = R.load_scale(stored_scale, fmt.scale_dtype)
    if fmt.symmetric:
        half = (1 << (fmt.bits - 1)) - 1
        exact_step = torch.maximum(lo.abs(), hi.abs()) / half
        rounding = half * (step - exact_step).abs()  # the scale's own rounding, at full range
    else:
        exact_step = (hi - lo) / ((1 << fmt.bits) - 1)
        zero = R.load_scale(stored_zero, fmt.scale_dtype)
        rounding = (zero - lo).abs() + ((1 << fmt.bits) - 1) * (step - exact_step).abs()
    bound = step / 2 + rounding + 1e-6 * scale
    error, _ = R._grouped((values - x).abs(), fmt)
    assert bool((error.amax(dim) <= bound * 1.0001).all())


def test_symmetric_zero_group_and_constant_group():
    fmt = QuantFormat(2, 8, "token", symmetric=True)
    x = torch.zeros(2, 16)
    x[1, 8:] = 3.0
    codes, scale, zero = R.quantize(x, fmt)
    assert zero is None
    assert torch.equal(R.dequantize(codes, scale, None, fmt), x)


@pytest.mark.parametrize("keys, values", [
    (QuantFormat(2, 32, "channel"), QuantFormat(2, 32, "token")),
    (QuantFormat(3, 64, "channel", scale_dtype="bf16"), QuantFormat(4, 16, "token", True)),
    (QuantFormat(8, 8, "token", scale_dtype="fp32"), QuantFormat()),
    (QuantFormat(), QuantFormat()),
])
@pytest.mark.parametrize("tokens", [1, 31, 64, 70])
def test_blocks_round_trip_and_follow_the_padding_rule(keys, values, tokens):
    layout = block_layout(keys, values, 64, "bfloat16", positions=True)
    k, v = torch.randn(tokens, 64), torch.randn(tokens, 64)
    positions = torch.arange(tokens) * 7
    blocks = R.pack_blocks(k.to(torch.bfloat16), v.to(torch.bfloat16), positions, layout)
    assert blocks.shape == (math.ceil(tokens / layout.tokens), layout.nbytes)
    got_k, got_v, got_positions = R.unpack_blocks(blocks, layout, tokens)
    assert torch.equal(got_positions, positions.to(torch.int32))
    for got, original, fmt in ((got_k, k, keys), (got_v, v, values)):
        if not fmt.quantized:
            assert torch.equal(got, original.to(torch.bfloat16).float())
        else:
            assert (got - original).abs().max() < 2.5 * original.abs().max() / ((1 << fmt.bits) - 1)
    # padding slots of the last block: position -1, codes 0
    every = R.unpack_blocks(blocks, layout, blocks.shape[0] * layout.tokens)[2]
    assert torch.equal(every[tokens:], torch.full((len(every) - tokens,), -1, dtype=torch.int32))


def test_block_sections_are_aligned_and_sum_to_the_plan():
    model = resolve_model("qwen2.5-7b")
    plan = make_plan(load_policy(POLICIES / "aggressive.kvp"), model, 32768)
    layout = plan.layers[0].body_layout
    assert [(s.name, s.offset, s.nbytes) for s in layout.sections] == [
        ("key.codes", 0, 1024), ("value.codes", 1024, 1024), ("positions", 2048, 128),
        ("key.scale", 2176, 256), ("key.zero", 2432, 256), ("value.scale", 2688, 256),
        ("value.zero", 2944, 256)]
    assert layout.nbytes == 3200 and all(s.offset % 16 == 0 for s in layout.sections)
    blocks = R.pack_blocks(torch.randn(32, 128), torch.randn(32, 128), torch.arange(32), layout)
    assert blocks.numel() == layout.nbytes  # what the plan counts is what is stored


def test_block_size_is_whole_groups_and_at_least_16_tokens_when_quantized():
    assert block_tokens(QuantFormat(2, 64, "channel"), QuantFormat(2, 32, "token"), 64,
                        "bfloat16", True) == 64
    assert block_tokens(QuantFormat(4, 8, "token"), QuantFormat(4, 8, "token"), 64, "bfloat16",
                        True) == 16
    assert block_tokens(QuantFormat(), QuantFormat(), 64, "bfloat16", positions=False) == 1
    # 16-bit with positions: 260 bytes a token; 4 tokens fill 1,040 bytes, no padding
    for head_dim in (64, 80, 128, 65):
        tokens = block_tokens(QuantFormat(), QuantFormat(), head_dim, "bfloat16", True)
        layout = block_layout(QuantFormat(), QuantFormat(), head_dim, "bfloat16", True, tokens)
        assert layout.bytes_by_kind()["padding"] == 0 and tokens <= 16, (head_dim, tokens)
    assert block_tokens(QuantFormat(), QuantFormat(), 64, "bfloat16", True) == 4


def test_reference_attention_is_exact_attention_over_all_regions():
    layer = random_layer(seed=1, kv_dtype=torch.float32)
    q = torch.randn(layer.batch, layer.kv_heads * 3, layer.head_dim)
    out, mass = R.attend(q, layer, 0.125, with_mass=True)
    for b in range(layer.batch):
        for h in range(layer.kv_heads):
            keys, values, bias, _ = R.layer_tokens(layer, b, h)
            for g in range(3):
                logits = (q[b, h * 3 + g] @ keys.T) * 0.125 + bias
                expected = torch.softmax(logits.double(), 0).float() @ values
                assert torch.allclose(out[b, h * 3 + g], expected, atol=1e-5)
    assert torch.allclose(mass.sum(-1), torch.full(mass.shape[:2], 3.0), atol=1e-5)


def test_snapkv_importance_pools_and_reduces_over_the_group():
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 10, 16)
    q = torch.randn(1, 4, 3, 16)
    observed = torch.arange(7, 10)
    plain = R.snapkv_importance(q, keys, observed, "none", 1, "sum", 0.25)
    assert torch.allclose(plain.sum(-1), torch.full((1, 2), 6.0))  # 2 heads x 3 queries each
    pooled = R.snapkv_importance(q, keys, observed, "max", 3, "mean", 0.25)
    mean = R.snapkv_importance(q, keys, observed, "none", 1, "mean", 0.25)
    assert pooled.shape == (1, 2, 10) and torch.all(pooled >= mean - 1e-7)
    # causality: the first observed query (position 7) gives no mass to positions 8 and 9
    first_only = R.snapkv_importance(q[:, :, :1], keys, observed[:1], "none", 1, "sum", 0.25)
    assert torch.all(first_only[..., 8:] == 0)
    assert torch.allclose(R.accumulate_importance(plain, plain, decay=0.5), 1.5 * plain)
