"""The store's CPU kernels (codegen/*.c.jinja, compiled by kvpolicy.kernels.cpu). Packing: bit
for bit the reference's blocks. Decode, on paged inputs, against the rule stated independently
with the reference: every page's guards and
body unpacked by `reference.unpack_blocks` (the last page's body up to its tail), the staged
blocks and the new token, softmax attention in fp64, and each staged token's (and the new one's)
softmax weight reduced over its KV group. Formats cover every bit-width, both axes, symmetric and
asymmetric, every scale dtype, 16-bit roles, guards, GQA groups and head sizes; the fp16
conversion is checked on all 65,536 bit patterns."""

from __future__ import annotations

import ctypes

import pytest
import torch

from conftest import SHIPPED, assert_refused_elsewhere, calibrated_elsewhere
from kvpolicy import load_policy
from kvpolicy.compiler.codegen import render_cpu
from kvpolicy.compiler.specs import BlockSpec, PackSpec, PagedDecodeSpec, specs_for
from kvpolicy.format import block_layout
from kvpolicy.lang.ir import QuantFormat
from kvpolicy.models import resolve_model
from kvpolicy.plan.pages import PAGE_ALIGN, paged_refusals
from kvpolicy.plan.planner import make_plan
from kvpolicy.kernels import cpu
from kvpolicy.kernels import reference as R
from kvpolicy.kernels.contract import PagedTables

pytestmark = pytest.mark.skipif(cpu.compiler() is None, reason="no C compiler")

INT2_CH = QuantFormat(bits=2, group=32, axis="channel")
INT2_TOK = QuantFormat(bits=2, group=32, axis="token")
INT3_TOK = QuantFormat(bits=3, group=16, axis="token", scale_dtype="bf16")
INT4_CH = QuantFormat(bits=4, group=16, axis="channel", symmetric=True)
INT8_TOK = QuantFormat(bits=8, group=64, axis="token", scale_dtype="fp32")
INT3_CH = QuantFormat(bits=3, group=32, axis="channel", scale_dtype="bf16", symmetric=True)
INT4_CH128 = QuantFormat(bits=4, group=128, axis="channel")  # 128-token format blocks
INT2_TOK128 = QuantFormat(bits=2, group=128, axis="token")
INT2_CH8 = QuantFormat(bits=2, group=8, axis="channel")  # groups under 16: the kernel's
INT4_TOK8 = QuantFormat(bits=4, group=8, axis="token")  # dequantizing paths, not its fused ones
FULL = QuantFormat()

CASES = {  # name: head_dim, kv dtype, gqa group, (guard keys, values) or None, body keys, values
    "kivi": (64, "bfloat16", 3, None, (INT2_CH, INT2_TOK)),
    "int8-guards-int4-body": (64, "bfloat16", 3, (INT8_TOK, INT8_TOK), (INT4_CH, INT4_CH)),
    "int3-bf16-scales-qwen": (128, "bfloat16", 7, None, (INT3_CH, INT3_TOK)),
    "16-bit-guards-fp16": (128, "float16", 4, (FULL, FULL), (INT2_CH, INT3_TOK)),
    "16-bit-keys-mha": (64, "float16", 1, None, (FULL, INT4_CH)),
    "group-128-blocks": (128, "bfloat16", 2, (INT8_TOK, INT8_TOK), (INT4_CH128, INT2_TOK128)),
    "group-8-formats": (64, "float16", 2, (INT4_TOK8, INT2_CH8), (INT2_CH8, INT4_TOK8)),
}


def spec_for(head_dim, kv_dtype, group, guard, body) -> PagedDecodeSpec:
    def block(keys, values):
        return BlockSpec.of(block_layout(keys, values, head_dim, kv_dtype, positions=False))
    return PagedDecodeSpec(head_dim, kv_dtype, group, block(*guard) if guard else None,
                           block(*body))


def random_rows(n, heads, d, generator):
    """Keys with outlier channels (what per-channel groups are for) and plain values."""
    keys = torch.randn(heads, n, d, generator=generator) * (1 + 4 * torch.rand(
        heads, 1, d, generator=generator))
    return keys, torch.randn(heads, n, d, generator=generator)


def paged_scene(spec, guard_blocks, body_blocks, seed=0):
    """Pages [blocks, H, bytes] packed by the reference (guards, then body), their dequantized
    tokens per (block, head), and the staging of a step: everything a launch reads."""
    g = torch.Generator().manual_seed(seed)
    heads, d, dtype = 2, spec.head_dim, R.torch_dtype(spec.kv_dtype)
    guard = spec.guard.layout() if spec.guard else None
    body = spec.body.layout()
    guard_tokens = guard_blocks * guard.tokens if guard else 0
    body_tokens = body_blocks * body.tokens
    guard_bytes = guard_blocks * guard.nbytes if guard else 0
    page_bytes = -(-(guard_bytes + body_blocks * body.nbytes) // PAGE_ALIGN) * PAGE_ALIGN
    num_blocks = 7
    pages = torch.randint(0, 256, (num_blocks, heads, page_bytes + 16), dtype=torch.uint8,
                          generator=g)[..., :page_bytes]  # strided, garbage after each page
    tokens = {}  # (block, head) → (keys, values) as the kernel must see them, fp32
    for block in range(num_blocks):
        for h in range(heads):
            parts = []
            for layout, count, begin in ((guard, guard_tokens, 0),
                                         (body, body_tokens, guard_bytes)):
                if not count:
                    continue
                k, v = random_rows(count, 1, d, g)
                packed = R.pack_blocks(k[0].to(dtype), v[0].to(dtype), None, layout)
                pages[block, h, begin:begin + packed.numel()] = packed.flatten()
                uk, uv, _ = R.unpack_blocks(packed, layout, count)
                parts.append((uk, uv))
            tokens[block, h] = (torch.cat([p[0] for p in parts]),
                                torch.cat([p[1] for p in parts]))
    block_size = 32
    staging = (torch.randn(9, heads, block_size, 2, d, generator=g) * 2).to(dtype)
    return pages, tokens, staging, guard_tokens, body_tokens


def expected(spec, q, new_k, new_v, tokens, staging, rows, scale, guard_tokens, body_tokens):
    """Per request: out [Hq, D] and mass {reduce: [H, S * bs + 1]} computed independently."""
    heads, group, d = new_k.shape[1], spec.gqa_group, spec.head_dim
    bs = staging.shape[2]
    outs, masses = [], []
    for r, (page_row, tail, staged) in enumerate(rows):
        out = torch.empty(heads * group, d, dtype=torch.float64)
        mass = {name: torch.zeros(heads, max(len(s) for *_, s in rows) * bs + 1,
                                  dtype=torch.float64) for name in ("sum", "mean", "max")}
        for h in range(heads):
            keys, values, columns = [], [], []
            for n, block in enumerate(page_row):
                k, v = tokens[block, h]
                keep = guard_tokens + (tail if n == len(page_row) - 1 else body_tokens)
                keys.append(k[:keep])
                values.append(v[:keep])
            for k, (slot, count) in enumerate(staged):
                keys.append(staging[slot, h, :count, 0].float())
                values.append(staging[slot, h, :count, 1].float())
                columns += [k * bs + t for t in range(count)]
            keys.append(new_k[r, h][None])
            values.append(new_v[r, h][None])
            keys, values = torch.cat(keys).double(), torch.cat(values).double()
            queries = q[r, h * group:(h + 1) * group].double()
            weights = torch.softmax(queries @ keys.T * scale, -1)  # [G, n]
            out[h * group:(h + 1) * group] = weights @ values
            staged_weights = weights[:, -len(columns) - 1:]
            index = columns + [mass["sum"].shape[1] - 1]
            mass["sum"][h, index] = staged_weights.sum(0)
            mass["mean"][h, index] = staged_weights.mean(0)
            mass["max"][h, index] = staged_weights.amax(0)
        outs.append(out)
        masses.append(mass)
    return outs, masses


def table(entries, width=None):
    width = width or max((len(e) for e in entries), default=0)
    return torch.tensor([list(e) + [0] * (width - len(e)) for e in entries],
                        dtype=torch.int32).reshape(len(entries), width)


@pytest.mark.parametrize("reduce", [None, "sum", "mean", "max"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_kernel_matches_the_reference_on_pages(case, reduce):
    spec = spec_for(*CASES[case])
    library = cpu.build(render_cpu(spec))
    guard_blocks = 2 if spec.guard else 0
    pages, tokens, staging, guard_tokens, body_tokens = paged_scene(spec, guard_blocks, 2,
                                                                    seed=len(case))
    g = torch.Generator().manual_seed(7)
    heads, d = pages.shape[1], spec.head_dim
    rows = [  # (pages through the block table, body tokens of the last one, staged (slot, n))
        ([4, 0, 6], body_tokens, [(2, 32), (5, 17)]),
        ([], 0, [(8, 3)]),  # no sealed page yet
        ([3], body_tokens - 16 if not spec.guard else body_tokens, []),  # read up to a tail
        ([1, 5, 2, 6, 0], body_tokens, [(0, 32), (1, 32), (4, 1)]),
    ]
    batch = len(rows)
    q = torch.randn(batch, heads * spec.gqa_group, d, generator=g) * 2
    new_k = torch.randn(batch, heads, d, generator=g).to(staging.dtype)
    new_v = torch.randn(batch, heads, d, generator=g).to(staging.dtype)
    scale = d ** -0.5
    guard_bytes = guard_tokens // spec.guard.layout().tokens * spec.guard.layout().nbytes \
        if spec.guard else 0
    tables = PagedTables.pages(
        table([r[0] for r in rows]), torch.tensor([len(r[0]) for r in rows]),
        torch.tensor([r[1] for r in rows]), guard_tokens, body_tokens, guard_bytes,
        table([[s for s, _ in r[2]] for r in rows]), table([[n for _, n in r[2]] for r in rows]),
        torch.tensor([len(r[2]) for r in rows]))
    out, mass = cpu.paged_decode(library, q, new_k, new_v, pages, tables, staging, scale,
                                 mass_reduce=reduce)
    want_out, want_mass = expected(spec, q, new_k.float(), new_v.float(), tokens, staging, rows,
                                   scale, guard_tokens, body_tokens)
    for r in range(batch):
        torch.testing.assert_close(out[r].double(), want_out[r], atol=2e-5, rtol=1e-4)
        if reduce is None:
            assert mass is None
            continue
        torch.testing.assert_close(mass[r].double(), want_mass[r][reduce], atol=1e-6, rtol=1e-4)


def per_head_expected(spec, q, new_k, new_v, tokens, staging, heads_rows, scale, guard_tokens,
                      body_tokens):
    """One request whose KV heads read tables of their own: heads_rows[h] = (guard pages, body
    pages, body tokens of the last body page, staged (slot, n)); a guard page's guards are its
    first guard_tokens tokens, a body page's body the ones after them. → out [Hq, D] float64."""
    group, d = spec.gqa_group, spec.head_dim
    out = torch.empty(len(heads_rows) * group, d, dtype=torch.float64)
    for h, (guard_row, body_row, tail, staged) in enumerate(heads_rows):
        keys, values = [], []
        for block in guard_row:
            k, v = tokens[block, h]
            keys.append(k[:guard_tokens])
            values.append(v[:guard_tokens])
        for n, block in enumerate(body_row):
            k, v = tokens[block, h]
            last = tail if n == len(body_row) - 1 else body_tokens
            keys.append(k[guard_tokens:guard_tokens + last])
            values.append(v[guard_tokens:guard_tokens + last])
        for slot, count in staged:
            keys.append(staging[slot, h, :count, 0].float())
            values.append(staging[slot, h, :count, 1].float())
        keys = torch.cat(keys + [new_k[0, h][None]]).double()
        values = torch.cat(values + [new_v[0, h][None]]).double()
        weights = torch.softmax(q[0, h * group:(h + 1) * group].double() @ keys.T * scale, -1)
        out[h * group:(h + 1) * group] = weights @ values
    return out


@pytest.mark.parametrize("case", ["kivi", "int8-guards-int4-body", "16-bit-keys-mha"])
def test_each_kv_head_reads_its_own_tables(case):
    """Tables [b, H, width] (the stream plan's micro-pages: each KV head's own): every head
    attends its own guard pages, body pages (a tail of its own) and staged runs, and a head's
    guard pages are not its body pages."""
    spec = spec_for(*CASES[case])
    library = cpu.build(render_cpu(spec))
    guard_blocks = 1 if spec.guard else 0
    pages, tokens, staging, guard_tokens, body_tokens = paged_scene(spec, guard_blocks, 2, seed=5)
    guard = spec.guard.layout() if spec.guard else None
    guard_bytes = guard.nbytes * guard_blocks if guard else 0
    heads_rows = [([2, 5] if guard else [], [4, 0, 6], body_tokens - 16, [(2, 32), (5, 17)]),
                  ([] if not guard else [1], [3], body_tokens, [])]
    g = torch.Generator().manual_seed(11)
    heads, d = pages.shape[1], spec.head_dim
    q = torch.randn(1, heads * spec.gqa_group, d, generator=g) * 2
    new_k = torch.randn(1, heads, d, generator=g).to(staging.dtype)
    new_v = torch.randn(1, heads, d, generator=g).to(staging.dtype)

    def per_head(column):
        return table([r[column] for r in heads_rows])[None]

    tables = PagedTables(
        guard_table=per_head(0), guard_count=torch.tensor([[len(r[0]) for r in heads_rows]]),
        body_table=per_head(1), body_count=torch.tensor([[len(r[1]) for r in heads_rows]]),
        body_tail=torch.tensor([[r[2] for r in heads_rows]]), body_offset=guard_bytes,
        guard_tokens=guard_tokens, body_tokens=body_tokens,
        stage_table=table([[s for s, _ in r[3]] for r in heads_rows], 2)[None],
        stage_len=table([[n for _, n in r[3]] for r in heads_rows], 2)[None],
        staged_count=torch.tensor([[len(r[3]) for r in heads_rows]]))
    out, _ = cpu.paged_decode(library, q, new_k, new_v, pages, tables, staging, d ** -0.5)
    want = per_head_expected(spec, q, new_k.float(), new_v.float(), tokens, staging, heads_rows,
                             d ** -0.5, guard_tokens, body_tokens)
    torch.testing.assert_close(out[0].double(), want, atol=2e-5, rtol=1e-4)


LAYOUTS = sorted({(case, role) for case, (_, _, _, guard, _) in CASES.items()
                  for role in (("guard", "body") if guard else ("body",))})


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case,role", LAYOUTS)
def test_cpu_pack_is_the_reference_bit_for_bit(case, role, source):
    """Every byte of the C pack kernel's blocks — codes, scales, zero points, padding — is the
    reference's, for whole blocks of every page layout, with constant groups (scale 0), tied
    values and outliers among the rows."""
    spec = spec_for(*CASES[case])
    layout = getattr(spec, role).layout()
    library = cpu.build(render_cpu(PackSpec(getattr(spec, role))), "pack")
    g = torch.Generator().manual_seed(3)
    rows = layout.tokens * max(3, -(-32 // layout.tokens))
    keys, values = random_rows(rows, 1, spec.head_dim, g)
    keys, values = keys[0], values[0]
    keys[:layout.tokens, :8] = 1.5  # constant per-channel groups
    values[5] = -2.0  # a constant token
    values[7, : spec.head_dim // 2] = 1e-3  # tiny and tied values
    keys[9, 3] = 300.0  # an outlier
    keys, values = keys.to(source), values.to(source)
    got = cpu.pack(library, keys, values, None, layout)
    want = R.pack_blocks(keys, values, None, layout)
    assert got.shape == want.shape and torch.equal(got, want)
    strided = torch.stack([keys, values], 1)  # row strides of 2 * D
    assert torch.equal(cpu.pack(library, strided[:, 0], strided[:, 1], None, layout), want)


def test_dropping_a_page_from_the_table_changes_the_output():
    """The check above can fail: the same launch with one page left out of a request's block
    table is far from the reference."""
    spec = spec_for(*CASES["kivi"])
    library = cpu.build(render_cpu(spec))
    pages, tokens, staging, _, body_tokens = paged_scene(spec, 0, 2)
    q = torch.randn(1, 6, 64) * 2
    new = torch.randn(1, 2, 64).to(staging.dtype)
    outs = [cpu.paged_decode(library, q, new, new, pages, PagedTables.pages(
                table([row]), torch.tensor([len(row)]), torch.tensor([body_tokens]), 0,
                body_tokens, 0, table([[]], 1), table([[]], 1), torch.tensor([0])), staging,
                0.125)[0]
            for row in ([1, 2, 3], [1, 3])]
    assert (outs[0] - outs[1]).abs().max() > 1e-2


def test_fp16_conversion_is_exact_on_every_bit_pattern(tmp_path):
    """The kernel's fp16 → fp32 conversion (integer ops, so it vectorizes) is torch's on all
    65,536 patterns: zeros, subnormals, normals, infinities (NaNs stay NaN); bf16 too."""
    source = render_cpu(spec_for(*CASES["kivi"]))
    start, end = source.index("static inline float load_float"), source.index("/* One role")
    probe = ("#include <stdint.h>\n#include <string.h>\n" + source[start:end]
             + "void convert(const uint8_t *p, float *out, int n, int dtype) {\n"
               "    for (int i = 0; i < n; i++) out[i] = load_float(p, i, dtype);\n}\n")
    library = cpu.build_source(probe, "convert")
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for code, dtype in ((0, torch.float16), (1, torch.bfloat16)):
        out = torch.empty(65536)
        library.convert(ctypes.c_void_p(bits.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                        65536, code)
        want = bits.view(dtype).float()
        assert torch.equal(out.isnan(), want.isnan())
        assert torch.equal(out[~want.isnan()], want[~want.isnan()])


def test_a_compile_error_is_reported_with_the_compilers_message():
    with pytest.raises(cpu.CpuKernelError, match="could not compile"):
        cpu.build_source("this is not C", "nothing")


def test_a_head_dim_the_decode_kernel_cannot_vectorize_is_refused_by_name():
    """The decode kernel reads sixteen channels a vector: a head_dim of 72 must not compile
    (engines then fall back to the PyTorch path) rather than silently skip channels."""
    source = render_cpu(spec_for(72, "bfloat16", 2, None, (INT2_CH, INT2_CH)))
    with pytest.raises(cpu.CpuKernelError, match="multiple of 16"):
        cpu.build(source)


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-7b"])
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_policy_has_c_kernels_that_compile(path, model):
    """Each shipped policy's paged decode and page pack specs, as an artifact carries them,
    compile with the system C compiler (the libraries a CPU engine loads); a policy no paged
    engine runs has none."""
    policy = load_policy(path)
    if calibrated_elsewhere(policy, resolve_model(model)):
        return assert_refused_elsewhere(policy, resolve_model(model))
    compiled = specs_for(make_plan(policy, resolve_model(model), 4096))
    by_uri = {spec.uri: spec for spec in compiled.specs}
    if paged_refusals(policy):
        assert not any(isinstance(spec, PagedDecodeSpec) for spec in compiled.specs)
        assert all(layer.paged_decode is layer.pack_page_body is layer.pack_page_guard is None
                   for layer in compiled.layers)
        return
    built = set()
    for layer in compiled.layers:
        for role, kind in (("paged_decode", "paged_decode"), ("pack_page_body", "pack"),
                           ("pack_page_guard", "pack")):
            uri = getattr(layer, role)
            if uri and uri not in built:
                assert getattr(cpu.build(render_cpu(by_uri[uri]), kind), kind) is not None
                built.add(uri)
    assert built
