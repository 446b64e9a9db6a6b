"""Generated kernels, run in Triton's interpreter, against the PyTorch reference.

Codes and packed bytes must be bit-exact; attention within fp16-dot tolerance. Output buffers are
NaN-filled by the launchers, so an element a kernel does not write fails the comparison.
Sizes are small: the interpreter costs ~0.5 s per pack program and a few seconds per decode.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvpolicy.compiler.loader import render_and_import
from kvpolicy.compiler.specs import BlockSpec, CombineSpec, DecodeSpec, PackSpec, UnpackSpec
from kvpolicy.format import block_layout
from kvpolicy.lang.ir import QuantFormat as Q
from kvpolicy.kernels import launch, reference as R
from random_layers import random_layer

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    directory = tmp_path_factory.mktemp("kernels")
    cache = {}

    def get(spec):
        if spec.uri not in cache:
            cache[spec.uri] = render_and_import(spec, directory)
        return cache[spec.uri]
    return get


BLOCK_CASES = [
    # keys, values, head_dim, kv dtype, source dtype
    (Q(2, 32, "channel"), Q(2, 32, "token"), 64, torch.bfloat16, torch.bfloat16),
    (Q(3, 32, "channel", scale_dtype="bf16"), Q(2, 64, "token", True), 128, torch.float16,
     torch.float32),
    (Q(4, 16, "channel", True, "fp32"), Q(8, 16, "token"), 80, torch.bfloat16, torch.float32),
    (Q(8, 32, "token"), Q(), 64, torch.float16, torch.float16),
    (Q(), Q(), 64, torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=[f"case{i}" for i in range(len(BLOCK_CASES))])
def test_pack_is_bit_exact_and_unpack_matches(kernels, case):
    keys_fmt, values_fmt, head_dim, kv_dtype, src_dtype = case
    layout = block_layout(keys_fmt, values_fmt, head_dim, _DTYPE_NAMES[kv_dtype], positions=True)
    spec = BlockSpec.of(layout)
    tokens = layout.tokens + 5 if layout.tokens > 1 else 3  # a partial last block
    generator = torch.Generator().manual_seed(len(spec.tag))
    keys = (torch.randn(tokens, head_dim, generator=generator) * 3).to(src_dtype)
    values = torch.randn(tokens, head_dim, generator=generator).to(src_dtype)
    positions = torch.randperm(1000, generator=generator)[:tokens]

    got = launch.pack_tokens(kernels(PackSpec(spec)), keys, values, positions, layout)
    want = R.pack_blocks(keys, values, positions, layout)
    for section in layout.sections:  # every stored byte, section by section
        span = slice(section.offset, section.offset + section.nbytes)
        assert torch.equal(got[:, span], want[:, span]), section.name

    count = got.shape[0]
    per_block = torch.full((count,), layout.tokens, dtype=torch.int32)
    per_block[-1] = tokens - (count - 1) * layout.tokens
    out_k, out_v, out_pos = launch.unpack(kernels(UnpackSpec(spec)), got,
                                          torch.arange(count, dtype=torch.int32), per_block)
    ref_k, ref_v, ref_pos = R.unpack_blocks(want, layout, tokens)
    assert torch.equal(out_k.reshape(-1, head_dim)[:tokens], ref_k)
    assert torch.equal(out_v.reshape(-1, head_dim)[:tokens], ref_v)
    assert torch.equal(out_pos.reshape(-1)[:tokens], ref_pos)
    assert torch.all(out_pos.reshape(-1)[tokens:] == -1)


def test_pack_rows_gathers_scattered_rows_into_chosen_blocks(kernels):
    layout = block_layout(Q(2, 32, "channel"), Q(2, 32, "token"), 64, "bfloat16", True)
    spec = BlockSpec.of(layout)
    source = torch.randn(200, 64).to(torch.bfloat16)
    values = torch.randn(200, 64).to(torch.bfloat16)
    rows = torch.randperm(200)[:32].sort().values
    blocks = torch.zeros(3, layout.nbytes, dtype=torch.uint8)
    launch.pack_rows(kernels(PackSpec(spec)), source, values, rows[None].int(), rows[None].int(),
                     blocks, torch.tensor([2], dtype=torch.int32))
    assert torch.equal(blocks[2], R.pack_blocks(source[rows], values[rows], rows, layout)[0])
    assert not blocks[:2].any()  # other blocks untouched


DECODE_CASES = {
    # name: random_layer arguments, GQA group
    "bf16-gqa3": (dict(seed=1), 3),
    "fp16-gqa7-hd128": (dict(seed=2, head_dim=128, kv_dtype=torch.float16, heads=1), 7),
    "no-sinks-no-centroids-gqa1": (dict(seed=3, sinks=0, centroids=0), 1),
    "int3-int4-symmetric": (dict(seed=4, guard=(Q(8, 16, "channel"), Q(8, 16, "token")),
                                 body=(Q(3, 16, "channel", scale_dtype="bf16"),
                                       Q(4, 16, "token", True))), 2),
    "fp16-body-no-guard": (dict(seed=5, guard=(Q(), Q()), body=(Q(), Q()),
                                guard_counts=[0, 0, 0, 0]), 2),
}


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_decode_matches_reference_attention(kernels, name):
    arguments, group = DECODE_CASES[name]
    layer = random_layer(**arguments)
    has_guard = bool(layer.guard_count.any())
    spec = DecodeSpec(layer.head_dim, layer.guard_layout.kv_dtype, group,
                      sinks=layer.sinks_key.shape[2] > 0,
                      centroids=layer.centroid_key.shape[2] > 0,
                      guard=BlockSpec.of(layer.guard_layout) if has_guard else None,
                      body=BlockSpec.of(layer.body_layout))
    decode_module = kernels(spec)
    combine_module = kernels(CombineSpec(layer.head_dim, group))
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(layer.batch, layer.kv_heads * group, layer.head_dim, generator=generator) * 2
    want, _ = R.attend(q, layer, 1 / math.sqrt(layer.head_dim))
    for splits in (1, 3):
        got = launch.decode(decode_module, combine_module, q, layer, num_splits=splits)
        assert not torch.isnan(got).any()
        # fp16 operands of the tensor-core dots: relative error ~1e-3 of the output's scale
        assert (got - want).abs().max() <= 1e-2 * want.abs().max() + 1e-3, splits


# ---- property: on random codes, kernel pack and unpack are the identity -------------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([16, 32]),
       axis=st.sampled_from(["channel", "token"]), seed=st.integers(0, 2**31))
@settings(max_examples=16, deadline=None)  # each example runs the interpreter: keep it small
def test_kernels_round_trip_random_codes(kernels, bits, group, axis, seed):
    # Values that are already codes, with every group spanning 0 .. 2^b - 1, quantize with
    # scale 1 and zero 0: the kernel's packed words must be the reference packing of the codes,
    # and unpacking must give the codes back.
    fmt = Q(bits, group, axis)
    layout = block_layout(fmt, fmt, 64, "float16", positions=False)
    spec = BlockSpec.of(layout)
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (layout.tokens, 64), generator=generator)
    grouped, dim = R._grouped(codes, fmt)
    flat = grouped.movedim(dim, -1)
    flat[..., 0], flat[..., 1] = 0, (1 << bits) - 1  # pin each group's range
    codes = R._ungrouped(flat.movedim(-1, dim), codes.shape).contiguous()
    x = codes.to(torch.float16)
    blocks = launch.pack_tokens(kernels(PackSpec(spec)), x, x, None, layout)
    words = R._section_view(blocks, layout, "key.codes")[0]
    assert torch.equal(words, R.pack_codes(codes, bits))
    out_k, _, _ = launch.unpack(kernels(UnpackSpec(spec)), blocks,
                                torch.zeros(1, dtype=torch.int32),
                                torch.tensor([layout.tokens], dtype=torch.int32))
    assert torch.equal(out_k[0], codes.float())
