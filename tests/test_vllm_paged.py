"""The vLLM backend's compute and bookkeeping as plain functions (no vLLM needed): page format,
staging table, write (stage + seal), and attention over sealed pages and staged blocks, against
an independent statement of the rule and the PyTorch reference."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import POLICIES
from kvpolicy import load_policy
from kvpolicy.compiler.artifact import compile_policy
from kvpolicy.plan import pages
from kvpolicy.store import paged
from kvpolicy.engines.vllm.settings import load_settings
from kvpolicy.store.paged.staging import RequestStep, StagingFull, StagingTable
from kvpolicy.models import resolve_model as get_model
from kvpolicy.plan.planner import block_retain_ratios
from kvpolicy.kernels import reference as R

SMOL = get_model("smollm2-135m")


def kivi_format(block_size=32, window=None):
    policy = load_policy(POLICIES / "kivi.kvp")
    fmt = pages.page_format(policy, SMOL, block_size)
    return fmt if window is None else dataclasses.replace(fmt, window=window)


RETAINING = """policy retaining {{
    keep sinks {sinks}
    keep window {window}
    retain 50%
    score {score}
    keys   int4 group 16 per channel
    values int4 group 16 per token
    guard 50% of retained at int8 by score
}}"""


def retaining_format(write_policy, score="keynorm", window=0, sinks=0, block_size=64):
    """Half of each 64-token block kept: 16 guards at int8 and 16 body tokens at int4."""
    policy = load_policy(write_policy(RETAINING.format(score=score, window=window, sinks=sinks)))
    return pages.page_format(policy, SMOL, block_size)


def test_kivi_page_is_the_format_block_and_the_ratio_is_exact():
    fmt = kivi_format()
    layout = fmt.layers[0].body
    assert fmt.layers[0].selected == 32 and fmt.layers[0].guard_tokens == 0
    assert layout.tokens == 32 and not layout.positions
    # int2 codes: 32 tokens x 4 words x 4 B, keys and values; fp16 scale + zero per group
    assert fmt.page_bytes == 2 * 512 + 4 * 128 == layout.nbytes
    assert fmt.baseline_page_bytes == 32 * 2 * 64 * 2
    assert fmt.capacity_ratio == pytest.approx(8192 / 1536)
    assert fmt.padding_bytes == 0
    assert kivi_format(block_size=64).page_bytes == 2 * layout.nbytes


def test_a_block_size_off_the_format_unit_is_refused():
    with pytest.raises(pages.UnsupportedConfiguration, match="not a multiple of the format's "
                       "32-token unit"):
        pages.page_format(load_policy(POLICIES / "aggressive.kvp"), SMOL, 48)


def test_aggressive_pages_keep_each_layers_share_of_a_block():
    """Stage 2: every sealed block keeps ceil(retain_l x block) tokens (whole 32-token format
    blocks), half of them int8 guards; the page is the largest layer's."""
    policy = load_policy(POLICIES / "aggressive.kvp")
    fmt = pages.page_format(policy, SMOL, 256)
    ratios = block_retain_ratios(policy, SMOL)
    assert sum(ratios) / len(ratios) == pytest.approx(0.18)  # the global ratio, no window floor
    for page, ratio in zip(fmt.layers, ratios):
        assert page.selected == 32 * math.ceil(ratio * 256 / 32)
        assert page.guard_tokens == 32 * math.floor(page.selected / 64 + 0.5)
        assert page.guard.keys.bits == 8 and page.body.keys.bits == 2
        assert page.nbytes == (page.guard_tokens // 32 * page.guard.nbytes
                               + page.body_tokens // 32 * page.body.nbytes)
    assert fmt.layers[0].selected == 128 and fmt.layers[-1].selected == 32  # 40% ... 6%
    mean = -(-sum(page.nbytes for page in fmt.layers) // 30)
    assert fmt.page_bytes == -(-mean // 16) * 16  # the mean, rounded up to 16-byte alignment
    assert fmt.page_bytes < 0.6 * fmt.layers[0].nbytes  # layers share a block's bytes
    assert fmt.sink_blocks == 1 and fmt.needs_mass
    assert fmt.capacity_ratio == pytest.approx(256 * 2 * 64 * 2 / fmt.page_bytes)
    notes = " ".join(pages.policy_notes(policy, 256))
    for words in ("retention in pages", "no centroids", "keep sinks 4", "adapt"):
        assert words in notes, notes


def model_cache(fmt, num_blocks):
    """The cache vLLM allocates for the backend: every layer's pages of a block side by side
    (BLHNC), and each layer's view of it [num_blocks, H, 1, page_bytes]."""
    cache = torch.zeros(num_blocks, len(fmt.layers), fmt.kv_heads, 1, fmt.page_bytes,
                        dtype=torch.uint8)
    return cache, [cache[:, layer] for layer in range(len(fmt.layers))]


def test_layers_of_different_sizes_share_each_blocks_bytes(write_policy):
    """4-bit keys in layers 0-1, 2-bit elsewhere: the page is the mean, not the largest layer's,
    and every layer's sealed pages survive the others' (no overlap)."""
    policy = load_policy(write_policy("""policy mixed {
        keys int2 group 32 per channel
        values int2 group 32 per token
        layers 0..1 { keys int4 group 32 per channel }
    }"""))
    fmt = pages.page_format(policy, SMOL, 32)
    small, big = fmt.layer_bytes(5), fmt.layer_bytes(0)
    mean = -(-(2 * big + 28 * small) // 30)
    assert big > small and fmt.page_bytes == -(-mean // 16) * 16 < big
    assert fmt.page_bytes % 16 == 0 and 0 <= fmt.padding_bytes < 16 * 30 * 3
    torch.manual_seed(5)
    cache, views = model_cache(fmt, 6)
    staging = torch.randn(2, 3, 32, 2, 64)
    for layer in range(30):
        paged.seal_blocks(views[layer], staging, torch.tensor([4, 1]), torch.tensor([0, 1]), fmt,
                          layer)
    for layer in (0, 1, 2, 29):
        held = paged.layer_pages(views[layer], fmt, layer)
        for block, slot in ((4, 0), (1, 1)):
            for h in range(3):
                want = R.pack_blocks(staging[slot, h, :, 0], staging[slot, h, :, 1], None,
                                     fmt.layers[layer].body)
                assert torch.equal(held[block, h], want.reshape(-1))
    assert cache[[0, 2, 3, 5]].count_nonzero() == 0  # other blocks untouched
    with pytest.raises(pages.UnsupportedConfiguration, match="BLHNC"):
        paged.layer_pages(torch.zeros(6, 3, 1, fmt.page_bytes, dtype=torch.uint8), fmt, 1)


# ---- the staging table ------------------------------------------------------------------------

def test_table_seals_blocks_as_they_leave_the_window_and_frees_their_slots():
    table = StagingTable(slots=8, block_size=32, window=64)
    blocks = [7, 3, 9, 1, 4, 6]
    step = table.plan([RequestStep(blocks, 0, 100)])  # blocks 0..3 written; 0 leaves (32+64 ≤ 100)
    assert step.seal_blocks == [7]
    assert len(step.request_slots[0]) == 4 and -1 not in step.request_slots[0]
    assert 7 not in table.slot_of_block and len(table.free) == 8 - 3
    for end in range(101, 129):
        step = table.plan([RequestStep(blocks, end - 1, end)])
        assert step.seal_blocks == ([3] if end == 128 else [])
    assert step.request_slots[0][0] == -1  # sealed earlier


def test_table_starts_fresh_for_a_new_request_on_reused_blocks():
    table = StagingTable(slots=4, block_size=16, window=0)
    table.plan([RequestStep([5, 6], 0, 20)])  # block 5 sealed at once, 6 staged (4 tokens)
    assert set(table.slot_of_block) == {6}
    step = table.plan([RequestStep([6, 5], 0, 3)])  # a new request reuses block 6
    assert step.seal_blocks == [] and set(table.slot_of_block) == {6}


def test_table_spills_an_idle_slot_and_restores_it_when_its_request_returns():
    table = StagingTable(slots=2, block_size=16, window=32)
    first = table.plan([RequestStep([1], 0, 10)])  # request A: block 1
    table.plan([RequestStep([2], 0, 10)])  # request B: block 2 (A not scheduled)
    # request C needs a slot: A's block is idle longest: its tokens are spilled, not lost
    step = table.plan([RequestStep([3], 0, 10)])
    assert set(table.slot_of_block) == {2, 3}
    assert step.spills == [(1, first.stage_of_block[1])] and table.spilled == {1}
    step = table.plan([RequestStep([1], 10, 11)])  # A comes back: its block is restored
    assert step.spills == [(2, step.restores[0][1])] and step.restores[0][0] == 1
    assert table.spilled == {2}
    step = table.plan([RequestStep([2, 9], 0, 20)])  # a new request takes block 2 over
    assert step.drops == [2] and table.spilled == {1, 3}  # its 2 slots: A's and C's spill
    table = StagingTable(slots=2, block_size=16, window=32)
    table.plan([RequestStep([1], 0, 10)])
    with pytest.raises(StagingFull, match="lost its staged tokens"):  # never staged, never spilled
        table.plan([RequestStep([5], 10, 11)])
    table = StagingTable(slots=1, block_size=16, window=32)
    with pytest.raises(StagingFull, match="KVPOLICY_STAGING_BLOCKS"):
        table.plan([RequestStep([1], 0, 10), RequestStep([2], 0, 10)])


# ---- write and attend, simulated engine steps ------------------------------------------------

class FakeEngine:
    """Drives the plain functions the way the backend does (paged.step_metadata, write_step,
    attend_step), over shuffled physical blocks, for one layer."""

    def __init__(self, fmt, num_blocks=64, slots=32, dtype=torch.float32, layer=0):
        self.fmt, self.layer = fmt, layer
        heads, d = fmt.kv_heads, fmt.head_dim
        self.cache, views = model_cache(fmt, num_blocks)
        self.pages = views[layer]
        self.staging = torch.zeros(slots, heads, fmt.block_size, 2, d, dtype=dtype)
        self.mass = torch.zeros(slots, heads, fmt.block_size) if fmt.needs_mass else None
        self.table = StagingTable(slots, fmt.block_size, fmt.window, fmt.sink_blocks)
        self.spilled = {}
        self.spills = self.restores = 0

    def step(self, chunks, scale=0.125, kernels=None):
        """chunks: [(block_row, start, query [m, Hq, D], keys [m, H, D], values [m, H, D])];
        kernels: the store's compiled kernels (`bound.StoreKernels`), or its PyTorch path."""
        bs = self.fmt.block_size
        query_start, seq_lens, mapping = [0], [], []
        for row, start, _, k, _ in chunks:
            query_start.append(query_start[-1] + len(k))
            seq_lens.append(start + len(k))
            mapping += [row[pos // bs] * bs + pos % bs for pos in range(start, start + len(k))]
        md = paged.step_metadata(self.table, query_start, seq_lens, [c[0] for c in chunks],
                                 torch.tensor(mapping))
        query = torch.cat([q for _, _, q, _, _ in chunks])
        keys = torch.cat([k for *_, k, _ in chunks])
        values = torch.cat([v for *_, v in chunks])
        self.spills += len(md.spills)
        self.restores += len(md.restores)
        paged.write_step(self.staging, self.mass, keys, values, md, self.spilled)
        out = torch.empty(query.shape)
        paged.attend_step(self.pages, self.staging, self.mass, self.fmt, self.layer, query,
                          keys, values, md, scale, out, kernels=kernels)
        return [out[query_start[i]:query_start[i + 1]] for i in range(len(chunks))]


def run_interleaved(engine, lengths, rows, data, arrived, expected, atol):
    """Drives requests through the engine, a whole prompt and then one token per step, and
    checks every chunk's output against `expected(name, q, start, end)`. lengths: name →
    (prompt, final length); data: name → (keys, values, queries); arrived(name, step, pos) says
    whether a request is scheduled yet. → tokens processed per request."""
    pos = {r: 0 for r in lengths}
    for step in range(10_000):
        chunks, names = [], []
        for r, (prompt, final) in lengths.items():
            if pos[r] < final and arrived(r, step, pos):
                size = prompt if pos[r] == 0 else 1
                k, v, q = (t[pos[r]:pos[r] + size] for t in data[r])
                chunks.append((rows[r], pos[r], q, k, v))
                names.append(r)
        if not chunks:
            break
        for r, out, (_, start, q, k, _) in zip(names, engine.step(chunks), chunks):
            torch.testing.assert_close(out, expected(r, q, start, start + len(k)), atol=atol,
                                       rtol=1e-5)
            pos[r] += len(k)
    return pos


def quantized_blocks(fmt, keys, values):
    """Every whole block of a sequence [T, H, D] through the reference's pack and unpack."""
    bs, layout = fmt.block_size, fmt.layers[0].body
    k_q, v_q = keys.clone().float(), values.clone().float()
    for j in range(keys.shape[0] // bs):
        for h in range(keys.shape[1]):
            part = slice(j * bs, (j + 1) * bs)
            blocks = R.pack_blocks(keys[part, h], values[part, h], None, layout)
            k_q[part, h], v_q[part, h], _ = R.unpack_blocks(blocks, layout, bs)
    return k_q, v_q


def expected_attention(fmt, keys, values, quantized, query, start, end, scale):
    """The rule stated independently: tokens of blocks sealed at `end` are their whole block's
    quantize-dequantize; the rest, and the chunk itself, are exact."""
    bs = fmt.block_size
    sealed = sum(bs for j in range(end // bs) if fmt.sealed(j, end))
    k_hat = torch.cat([quantized[0][:sealed], keys[sealed:end].float()])
    v_hat = torch.cat([quantized[1][:sealed], values[sealed:end].float()])
    k_hat[start:end], v_hat[start:end] = keys[start:end].float(), values[start:end].float()
    group = query.shape[1] // keys.shape[1]
    kk = k_hat.transpose(0, 1).repeat_interleave(group, 0)
    vv = v_hat.transpose(0, 1).repeat_interleave(group, 0)
    mask = torch.ones(end - start, end, dtype=torch.bool).tril(start)
    return torch.nn.functional.scaled_dot_product_attention(
        query.float().transpose(0, 1), kk, vv, attn_mask=mask, scale=scale).transpose(0, 1)


@pytest.mark.parametrize("window", [0, 40, 64])
def test_two_interleaved_requests_match_the_rule_step_by_step(window):
    torch.manual_seed(window)
    fmt = kivi_format(window=window)
    heads, d, q_heads = fmt.kv_heads, fmt.head_dim, 9
    engine = FakeEngine(fmt)
    lengths = {"a": (70, 150), "b": (33, 120)}  # prompt, final length
    rows = {"a": [12, 40, 3, 27, 8, 51], "b": [5, 60, 19, 2]}
    data = {r: (torch.randn(n, heads, d) * 2, torch.randn(n, heads, d), torch.randn(n, q_heads, d))
            for r, (_, n) in lengths.items()}
    quantized = {r: quantized_blocks(fmt, k, v) for r, (k, v, _) in data.items()}
    pos = run_interleaved(
        engine, lengths, rows, data, lambda r, step, pos: r == "a" or step >= 3,  # b later
        lambda r, q, start, end: expected_attention(fmt, data[r][0], data[r][1], quantized[r],
                                                    q, start, end, 0.125), atol=2e-5)
    assert pos == {"a": 150, "b": 120}


def test_a_request_left_unscheduled_while_its_slots_are_reclaimed_loses_nothing():
    """Request a is running but unscheduled for many steps (as when a chunked prefill takes a
    step's whole token budget) while b and c need more slots than are free: a's staged blocks are
    spilled and restored, and every output still follows the rule (the table used to refuse
    here, which killed every request in flight)."""
    torch.manual_seed(7)
    fmt = kivi_format(window=64)
    heads, d, q_heads = fmt.kv_heads, fmt.head_dim, 9
    engine = FakeEngine(fmt, slots=8)
    lengths = {"a": (90, 140), "b": (150, 190), "c": (120, 170)}
    rows = {"a": [12, 40, 3, 27, 8], "b": [5, 60, 19, 2, 33, 34, 35], "c": [44, 45, 46, 47, 48, 49]}
    data = {r: (torch.randn(n, heads, d) * 2, torch.randn(n, heads, d), torch.randn(n, q_heads, d))
            for r, (_, n) in lengths.items()}
    quantized = {r: quantized_blocks(fmt, k, v) for r, (k, v, _) in data.items()}

    def scheduled(r, step, pos):
        if r == "a":
            return step < 3 or step >= 45  # a decodes, then waits 42 steps, then goes on
        return step >= 3 + (r == "c") * 10

    pos = run_interleaved(
        engine, lengths, rows, data, scheduled,
        lambda r, q, start, end: expected_attention(fmt, data[r][0], data[r][1], quantized[r],
                                                    q, start, end, 0.125), atol=2e-5)
    assert pos == {"a": 140, "b": 190, "c": 170}
    assert engine.spills > 0 and engine.restores > 0


def test_sealed_pages_hold_exactly_the_reference_bytes():
    torch.manual_seed(1)
    fmt = kivi_format(window=0)
    engine = FakeEngine(fmt)
    keys, values = torch.randn(64, 3, 64), torch.randn(64, 3, 64)
    engine.step([([9, 4], 0, torch.randn(64, 9, 64), keys, values)])
    for j, block in enumerate([9, 4]):
        for h in range(3):
            want = R.pack_blocks(keys[j * 32:(j + 1) * 32, h], values[j * 32:(j + 1) * 32, h],
                                 None, fmt.layers[0].body)
            assert torch.equal(paged.layer_pages(engine.pages, fmt, 0)[block, h], want.reshape(-1))


# ---- stage 2: retention in pages ----------------------------------------------------------------

def kept_offsets(importance, page):
    """The rule stated plainly for one head's block: the `selected` highest (the earlier token on
    ties), the top `guard_tokens` of them guards; each set in position order."""
    order = sorted(range(len(importance)), key=lambda t: (-float(importance[t]), t))
    keep = order[:page.selected]
    return sorted(keep[:page.guard_tokens]), sorted(keep[page.guard_tokens:])


def packed_page(page, keys, values, guards, body):
    """One head's page bytes: guards packed at the guard's bits, then the body."""
    parts = [R.pack_blocks(keys[idx], values[idx], None, layout).reshape(-1)
             for idx, layout in ((guards, page.guard), (body, page.body)) if idx]
    return torch.cat(parts)


def test_a_sealed_page_holds_the_most_important_tokens_and_nothing_else(write_policy):
    torch.manual_seed(2)
    fmt = retaining_format(write_policy, score="snapkv(pool = max 3)")
    page = fmt.layers[0]
    assert (page.guard_tokens, page.body_tokens) == (16, 16)
    assert fmt.page_bytes == page.guard.nbytes + page.body.nbytes < fmt.baseline_page_bytes / 3
    staging = torch.randn(2, 3, 64, 2, 64)
    mass = torch.rand(2, 3, 64)
    _, views = model_cache(fmt, 5)
    paged.seal_blocks(views[0], staging, torch.tensor([4, 1]), torch.tensor([1, 0]), fmt, 0,
                      mass=mass)
    held = paged.layer_pages(views[0], fmt, 0)
    for block, slot in ((4, 1), (1, 0)):
        for h in range(3):
            m = mass[slot, h].tolist()
            pooled = [max(m[max(0, t - 1):t + 2]) for t in range(64)]  # max-pool, kernel 3
            guards, body = kept_offsets(pooled, page)
            want = packed_page(page, staging[slot, h, :, 0], staging[slot, h, :, 1], guards,
                               body)
            assert torch.equal(held[block, h], want)


def test_blocks_sealed_together_are_selected_together(write_policy):
    """Two blocks a request seals in one step are ranked as one 128-token span: when every
    important token sits in the second block, it keeps them all (32 of its 64), the first block
    keeps none, and the two pages hold the 32 guards and 32 body tokens densely, in position
    order — the bytes of two per-block pages."""
    torch.manual_seed(6)
    fmt = retaining_format(write_policy, score="snapkv(pool = none)")
    page = fmt.layers[0]
    staging = torch.randn(2, 3, 64, 2, 64)
    mass = torch.rand(2, 3, 64)
    mass[1, :, 10:42] += 5.0  # slot 1 (the later block) holds the needle
    _, views = model_cache(fmt, 5)
    paged.seal_blocks(views[0], staging, torch.tensor([2, 3]), torch.tensor([0, 1]), fmt, 0,
                      mass=mass, groups=[2])
    held = paged.layer_pages(views[0], fmt, 0)
    for h in range(3):
        span_k = torch.cat([staging[0, h, :, 0], staging[1, h, :, 0]])
        span_v = torch.cat([staging[0, h, :, 1], staging[1, h, :, 1]])
        guards, body = kept_offsets(torch.cat([mass[0, h], mass[1, h]]).tolist(),
                                    pages.LayerPage(page.guard, page.body, 32, 32))
        assert guards == list(range(64 + 10, 64 + 42))  # all 32 from the second block
        for i, block in enumerate((2, 3)):  # page i: the i-th 16 guards, the i-th 16 body tokens
            want = packed_page(page, span_k, span_v, guards[16 * i:16 * (i + 1)],
                               body[16 * i:16 * (i + 1)])
            assert torch.equal(held[block, h], want)


def expected_with_retention(fmt, keys, values, query, start, end, scale, prompt, layer=0):
    """The retention rule stated independently (keynorm importance). The blocks sealed when the
    `prompt` was prefilled in one step form one group, every later block its own; a group's
    kept tokens are the `selected x g` lowest-norm keys of its span, quantize-dequantized in
    position order at their bits. Blocks sealed by `end` come from their pages unless they were
    sealed in this step and some of them reach into the chunk; the rest of the past and the
    chunk itself are exact. Each KV head keeps its own page's counts (`adapt heads`)."""
    bs = fmt.block_size
    heads = keys.shape[1]
    first_group = [j for j in range(-(-prompt // bs)) if fmt.sealed(j, prompt)]
    sealed_now = [j for j in range(-(-end // bs)) if fmt.sealed(j, end) and not fmt.sealed(j, start)]
    straddles = any((j + 1) * bs > start for j in sealed_now)
    past_k, past_v = [[] for _ in range(heads)], [[] for _ in range(heads)]
    for j in range(-(-start // bs)):
        group = first_group if j in first_group else [j]
        for h in range(heads):
            page = fmt.pages_of(layer)[h]
            if fmt.sealed(j, end) and not (straddles and j in sealed_now):
                if j != group[0]:
                    continue  # the group's kept tokens were added with its first block
                span = slice(group[0] * bs, (group[-1] + 1) * bs)
                k, v = keys[span, h], values[span, h]
                g = len(group)
                guards, body = kept_offsets(-k.float().norm(dim=-1), pages.LayerPage(
                    page.guard, page.body, g * page.guard_tokens, g * page.body_tokens))
                for idx, layout in ((guards, page.guard), (body, page.body)):
                    if not idx:
                        continue
                    blocks = R.pack_blocks(k[idx], v[idx], None, layout)
                    kq, vq, _ = R.unpack_blocks(blocks, layout, len(idx))
                    past_k[h].append(kq)
                    past_v[h].append(vq)
            else:
                part = slice(j * bs, min((j + 1) * bs, start))
                past_k[h].append(keys[part, h].float())
                past_v[h].append(values[part, h].float())
    chunk = slice(start, end)
    group = query.shape[1] // heads
    out = []
    for h in range(heads):  # each KV head over its own past (heads may keep different counts)
        k_all = torch.cat(past_k[h] + [keys[chunk, h].float()])
        v_all = torch.cat(past_v[h] + [values[chunk, h].float()])
        p = k_all.shape[0] - (end - start)
        mask = torch.ones(end - start, p + end - start, dtype=torch.bool).tril(p)
        q = query[:, h * group:(h + 1) * group].float().transpose(0, 1)
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q, k_all.expand(group, -1, -1), v_all.expand(group, -1, -1), attn_mask=mask,
            scale=scale).transpose(0, 1))
    return torch.cat(out, 1)


@pytest.mark.parametrize("window,sinks", [(0, 0), (48, 4), (64, 0)])
def test_retention_matches_the_rule_step_by_step(write_policy, window, sinks):
    """Two interleaved requests (prefill, then one token per step) over shuffled blocks; keys of
    different norms so that keynorm importance decides what each sealed block keeps."""
    torch.manual_seed(window + sinks)
    fmt = retaining_format(write_policy, window=window, sinks=sinks)
    assert fmt.sink_blocks == (1 if sinks else 0)
    heads, d, q_heads = fmt.kv_heads, fmt.head_dim, 9
    engine = FakeEngine(fmt)
    lengths = {"a": (150, 300), "b": (70, 230)}
    rows = {"a": [12, 40, 3, 27, 8], "b": [5, 60, 19, 2]}
    data = {r: (torch.randn(n, heads, d) * torch.rand(n, heads, 1) * 3, torch.randn(n, heads, d),
                torch.randn(n, q_heads, d)) for r, (_, n) in lengths.items()}
    pos = run_interleaved(
        engine, lengths, rows, data, lambda r, step, pos: r == "a" or pos["a"] >= 160,
        lambda r, q, start, end: expected_with_retention(fmt, data[r][0], data[r][1], q, start,
                                                         end, 0.125, lengths[r][0]), atol=3e-5)
    assert pos == {"a": 300, "b": 230}


def test_attention_mass_is_what_the_queries_gave_the_staged_tokens(write_policy):
    """Nothing seals (window 208): after a 70-token prefill and decode steps, each staged token's
    mass is the sum of the softmax weight it got from the prefill's last 32 queries (observe 32)
    and from every decode query, averaged over the query heads of its KV head."""
    torch.manual_seed(3)
    fmt = retaining_format(write_policy, score="snapkv", window=208)
    engine = FakeEngine(fmt)
    n = 100
    keys, values, queries = torch.randn(n, 3, 64), torch.randn(n, 3, 64), torch.randn(n, 9, 64)
    row = [7, 2]
    engine.step([(row, 0, queries[:70], keys[:70], values[:70])])
    for t in range(70, n):
        engine.step([(row, t, queries[t:t + 1], keys[t:t + 1], values[t:t + 1])])
    logits = torch.einsum("qhd,khd->hqk", queries, keys.repeat_interleave(3, 1)) * 0.125
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, -float("inf")), -1)  # [Hq, q, k]
    counted = torch.zeros(n, dtype=torch.bool)
    counted[70 - 32:] = True  # the prefill step's last 32 queries, then every decode query
    want = probs[:, counted].sum(1).reshape(3, 3, n).mean(1)  # [H, n]
    got = torch.cat([engine.mass[engine.table.slot_of_block[b]] for b in row], 1)[:, :n]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_prompt_seals_its_old_blocks_by_its_own_attention(write_policy):
    """A 100-token prompt in one step with a 16-token window: block 0 seals in that step, keeping
    the tokens the prompt's last 32 queries (SnapKV's observation window) attended to most
    (max-pooled, kernel 7)."""
    torch.manual_seed(4)
    fmt = retaining_format(write_policy, score="snapkv", window=16)
    engine = FakeEngine(fmt)
    keys, values = torch.randn(100, 3, 64), torch.randn(100, 3, 64)
    queries = torch.randn(100, 9, 64)
    engine.step([([6, 1], 0, queries, keys, values)])
    logits = torch.einsum("qhd,khd->hqk", queries, keys.repeat_interleave(3, 1)) * 0.125
    causal = torch.ones(100, 100, dtype=torch.bool).tril()
    mass = torch.softmax(logits.masked_fill(~causal, -float("inf")), -1)[:, 100 - 32:].sum(1)
    mass = mass.reshape(3, 3, 100).mean(1)[:, :64]
    page = fmt.layers[0]
    for h in range(3):
        m = mass[h].tolist()
        pooled = [max(m[max(0, t - 3):t + 4]) for t in range(64)]
        guards, body = kept_offsets(pooled, page)
        want = packed_page(page, keys[:64, h], values[:64, h], guards, body)
        assert torch.equal(paged.layer_pages(engine.pages, fmt, 0)[6, h], want)
    assert engine.table.slot_of_block.keys() == {1}  # block 0's slot is free again


# ---- start-up checks ---------------------------------------------------------------------------

def engine_config(model=SMOL, dtype="torch.bfloat16", block_size=32, prefix_caching=False):
    hf = {"num_hidden_layers": model.num_layers, "num_attention_heads": model.num_q_heads,
          "num_key_value_heads": model.num_kv_heads, "head_dim": model.head_dim}
    return SimpleNamespace(
        model_config=SimpleNamespace(dtype=dtype, model="test-model", max_model_len=2048,
                                     hf_config=SimpleNamespace(to_dict=lambda: hf)),
        cache_config=SimpleNamespace(block_size=block_size, enable_prefix_caching=prefix_caching),
        scheduler_config=SimpleNamespace(max_num_seqs=4, max_num_batched_tokens=256),
        speculative_config=None)


@pytest.fixture
def kivi_artifact(tmp_path):
    out = tmp_path / "kivi"
    compile_policy(load_policy(POLICIES / "kivi.kvp"), SMOL, out)
    return out


@pytest.fixture
def page_layout(monkeypatch):
    """The page layout, which the tests below check (one worker's default is the stream
    layout: tests/test_streamed_settings.py)."""
    from kvpolicy.engines.vllm.settings import LAYOUT_ENV
    monkeypatch.setenv(LAYOUT_ENV, "pages")


def test_settings_for_a_supported_configuration(kivi_artifact, page_layout):
    s = load_settings(str(kivi_artifact), engine_config())
    assert s.policy.name == "kivi" and s.page_format.page_bytes == 1536
    assert s.staging_blocks == 4 * (4 + 2) + 8
    assert "5.33x" in s.describe()


def test_staging_is_paid_out_of_the_kv_memory(kivi_artifact, page_layout):
    """With the KV memory given in bytes, staging is paid out of it: vLLM's pool gets the rest
    (the engine's cache config is lowered once), start-up states the ratio to vLLM's own pages
    in the same memory, staging included, computed exactly; staging that does not fit is
    refused with the numbers and what to change."""
    from kvpolicy.engines.vllm.settings import reserve_staging
    config = engine_config()
    config.cache_config.kv_cache_memory_bytes = 64 << 20
    s = load_settings(str(kivi_artifact), config)
    staging = s.staging_bytes
    assert staging == 32 * 30 * 3 * (32 * 2 * 64 * 2)  # 32 slots in bfloat16, no mass (kivi)
    assert s.pool_bytes == (64 << 20) - staging
    per_block = 30 * 3
    want = ((64 << 20) - staging) // (per_block * 1536) / ((64 << 20) // (per_block * 8192))
    assert s.whole_process_ratio() == pytest.approx(want) and want < s.page_format.capacity_ratio
    assert f"{want:.2f}x the tokens of vLLM's own pages in the same memory" in s.describe()
    reserve_staging(s, config.cache_config)
    reserve_staging(s, config.cache_config)  # once
    assert config.cache_config.kv_cache_memory_bytes == (64 << 20) - staging
    config.cache_config.kv_cache_memory_bytes = staging - 1
    with pytest.raises(pages.UnsupportedConfiguration, match="does not fit in the"):
        load_settings(str(kivi_artifact), config)
    config.cache_config.kv_cache_memory_bytes = None
    assert "staging is outside vLLM's accounting" in load_settings(str(kivi_artifact),
                                                                   config).describe()


def test_settings_refuse_with_every_reason(kivi_artifact):
    other = get_model("qwen2.5-7b")
    with pytest.raises(pages.UnsupportedConfiguration) as info:
        load_settings(str(kivi_artifact), engine_config(model=other, block_size=24,
                                                        prefix_caching=True))
    text = str(info.value)
    for words in ("num_layers 30", "num_kv_heads 3", "head_dim 64", "prefix caching",
                  "block size 24"):
        assert words in text, text


def test_settings_refuse_a_tampered_artifact(kivi_artifact):
    kernel = next((kivi_artifact / "kernels").rglob("*.py"))
    data = bytearray(kernel.read_bytes())
    data[10] ^= 1
    kernel.write_bytes(bytes(data))
    with pytest.raises(pages.UnsupportedConfiguration, match="was modified"):
        load_settings(str(kivi_artifact), engine_config())
    with pytest.raises(pages.UnsupportedConfiguration, match="KVPOLICY_ARTIFACT is not set"):
        load_settings("", engine_config())


def test_settings_load_the_seed_policy_and_say_where_pages_differ(tmp_path, page_layout):
    out = tmp_path / "aggressive"
    compile_policy(load_policy(POLICIES / "aggressive.kvp"), SMOL, out)
    s = load_settings(str(out), engine_config(block_size=256))
    fmt = s.page_format
    assert s.staging_blocks == 4 * (1 + 2048 // 256 + 2) + 1  # sinks' block, window, open block
    text = s.describe()
    assert f"{fmt.capacity_ratio:.2f}x" in text and "keep 32/" in text
    # what one request holds, at the standard lengths within the model's, as `plan` prints it
    assert ("kvpolicy: Served by paged engines (vLLM, kvpolicy's paged store), pages layout, "
            "blocks of 256") in text
    for context in (2048, 4096, 8192):
        served = fmt.baseline_bytes(context) / fmt.held_bytes(context)
        assert f"{context:>9,}" in text and f"{served:>7.2f}x" in text
    for words in ("note: retention in pages", "note: cluster evicted k 20",
                  "note: keep sinks 4", "note: adapt"):
        assert words in text, text
