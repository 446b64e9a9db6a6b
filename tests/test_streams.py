"""The stream plan (kvpolicy.plan.streams): one request's bytes at every block size within a few
percent of the whole-prompt plan, kept counts that follow the plan as a sequence grows, and a
log of micro-pages laid over the request's own blocks without overlap or overflow."""

from __future__ import annotations

import functools
import math

import pytest

from conftest import POLICIES, SHIPPED

from kvpolicy.lang.lower import load_policy
from kvpolicy.models import resolve_model
from kvpolicy.plan.pages import UnsupportedConfiguration, blocks_left_window, paged_refusals
from kvpolicy.plan.planner import make_plan
from kvpolicy.plan.streams import MICRO_TOKENS, PENDING_ROWS, _blocks_at, _log, _place, stream_plan

SMOL = resolve_model("smollm2-135m")
QWEN = resolve_model("qwen2.5-7b")
SEED = ("conservative", "aggressive", "extreme")
PAGED = [path.stem for path in SHIPPED if not paged_refusals(load_policy(path))]
CASES = [(name, SMOL, 4096) for name in PAGED] + [(name, QWEN, 32768) for name in SEED]


@functools.lru_cache(maxsize=None)
def planned(name: str, model_name: str, block_size: int, max_len: int):
    return stream_plan(load_policy(POLICIES / f"{name}.kvp"), resolve_model(model_name),
                       block_size, max_len)


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("name,model,context", CASES,
                         ids=[f"{n}-{m.name}-{c}" for n, m, c in CASES])
def test_one_request_holds_the_plans_bytes_within_ten_percent(name, model, context, block_size):
    """Issue 34's acceptance over the plan: pool blocks, window staging and pending rows of one
    request at the plan's context, against `make_plan`'s bytes, for every shipped policy the
    paged engines run (SmolLM2, 4k) and the seed's three at the seed's setting (Qwen2.5-7B,
    32k) — block 16 included, which the page plan refuses for most of them."""
    plan = make_plan(load_policy(POLICIES / f"{name}.kvp"), model, context).compressed_bytes
    streams = planned(name, model.name, block_size, context)
    held = streams.held_bytes(context)
    assert abs(held / plan - 1) <= 0.10, (streams.request_bytes(context), plan)


@pytest.mark.parametrize("name,block_size", [("heads_8x_keep30", 16), ("tuned_6x", 32),
                                             ("kivi", 16), ("snapkv", 64)])
def test_each_heads_kept_tokens_follow_the_plan_as_the_sequence_grows(name, block_size):
    """At each length, every (layer, KV head) keeps at most what the whole-prompt plan keeps
    (`make_plan`'s own count, within the unit it rounds to and a block), `adapt heads`
    included; and in all, at least 90% of it. Less, not more: a stream sees its tokens as they
    seal, and a head whose share grows faster than its middle (the plan's floor of sinks and
    window weighs less as the context grows) cannot take back tokens it evicted earlier."""
    policy = load_policy(POLICIES / f"{name}.kvp")
    streams = planned(name, SMOL.name, block_size, 4096)
    for length in (1000, 2048, 4096):
        plan = make_plan(policy, SMOL, length)
        kept = {}
        for n, stream in zip(streams._kept_at(length), streams.streams):
            kept[stream.layer, stream.head] = kept.get((stream.layer, stream.head), 0) + n
        total = 0
        for layer in plan.layers:
            for head, want in enumerate(layer.selected_by_head(SMOL.num_kv_heads)):
                assert kept[layer.layer, head] <= want + layer.token_unit + block_size, \
                    (length, layer.layer, head, kept[layer.layer, head], want)
                total += want
        assert sum(kept.values()) >= 0.9 * total, (length, sum(kept.values()), total)


@pytest.mark.parametrize("name,model,block_size", [("heads_8x", SMOL, 16), ("aggressive", QWEN, 32),
                                                   ("pyramidkv", SMOL, 64)])
def test_a_block_gives_at_most_its_middle_and_guards_are_the_fraction(name, model, block_size):
    """Counts never fall, a sealing event adds at most the block's middle tokens (sinks are kept
    apart), and guards are the guard's fraction of what a head keeps, floored."""
    policy = load_policy(POLICIES / f"{name}.kvp")
    context = 32768 if model is QWEN else 4096
    streams = planned(name, model.name, block_size, context)
    fraction = policy.guard.fraction if policy.guard is not None else 0.0
    for event in range(1, len(streams.kept)):
        fresh = max(0, event * block_size - policy.sinks) - \
            max(0, (event - 1) * block_size - policy.sinks)
        by_head: dict[tuple[int, int], dict[str, tuple[int, int]]] = {}
        for before, now, stream in zip(streams.kept[event - 1], streams.kept[event],
                                       streams.streams):
            assert now >= before
            by_head.setdefault((stream.layer, stream.head), {})[stream.kind] = (before, now)
        for kinds in by_head.values():
            kept_before = sum(b for b, _ in kinds.values())
            kept_now = sum(n for _, n in kinds.values())
            assert kept_now - kept_before <= fresh
            if "guard" in kinds:
                assert kinds["guard"][1] == math.floor(fraction * kept_now + 1e-9)


@pytest.mark.parametrize("name,model,block_size", [("heads_8x_keep30", SMOL, 16),
                                                   ("extreme", QWEN, 16), ("kivi", SMOL, 32)])
def test_the_log_lies_in_the_requests_own_blocks_without_overlap(name, model, block_size):
    """Every micro-page starts 16-byte aligned inside one block, none overlaps another, and at
    every sealing event the log uses no block the request does not hold yet."""
    context = 32768 if model is QWEN else 4096
    streams = planned(name, model.name, block_size, context)
    assert streams.block_bytes % 16 == 0
    spans: dict[int, list[tuple[int, int]]] = {}
    for stream, addresses, kept in zip(streams.streams, streams.addresses, streams.kept[-1]):
        assert stream.tokens % MICRO_TOKENS == 0 and stream.nbytes % 16 == 0
        assert len(addresses) == stream.micro_pages(kept)
        for row, offset in addresses:
            assert offset % 16 == 0 and offset + stream.nbytes <= streams.block_bytes
            spans.setdefault(row, []).append((offset, offset + stream.nbytes))
    for row, used in spans.items():
        used.sort()
        assert all(end <= start for (_, end), (start, _) in zip(used, used[1:])), row
    cursor = [0] * len(streams.streams)
    for event, index in _log(streams.streams, streams.kept):  # in the order they are packed
        row = streams.addresses[index][cursor[index]][0]
        cursor[index] += 1
        assert row < _blocks_at(event, block_size, streams.window)


@pytest.mark.parametrize("name,block_size", [("heads_8x", 16), ("kivi", 64)])
def test_the_page_is_the_smallest_that_holds_the_log(name, block_size):
    streams = planned(name, SMOL.name, block_size, 4096)
    cells = streams.layers * streams.kv_heads
    step = 16 // math.gcd(cells, 16)
    log = _log(streams.streams, streams.kept)
    assert streams.page_bytes % step == 0
    assert _place(streams.streams, log, streams.page_bytes * cells, block_size,
                  streams.window) == streams.addresses
    assert _place(streams.streams, log, (streams.page_bytes - step) * cells, block_size,
                  streams.window) is None


def test_the_bytes_by_part():
    """Pool = the request's blocks x block bytes; window staging = a full-precision slot per
    block not sealed (with snapkv's fp32 mass); pending = every stream's rows (its pending
    tokens, the body stream's sinks before them) in chunks, at full precision."""
    policy = load_policy(POLICIES / "heads_8x.kvp")
    streams = planned("heads_8x", SMOL.name, 16, 4096)
    token = 2 * SMOL.head_dim * 2
    for length in (5, 70, 1000, 4096):
        held = streams.request_bytes(length)
        blocks = -(-length // 16)
        sealed = blocks_left_window(length, 16, policy.window)
        assert held.pool == blocks * SMOL.num_layers * SMOL.num_kv_heads * streams.page_bytes
        assert held.window_staging == (blocks - sealed) * SMOL.num_layers * \
            SMOL.num_kv_heads * 16 * token  # score recent: no attention mass
        rows = streams.pending_rows(length)
        assert held.pending_staging == sum(rows) * token
        sinks = min(policy.sinks, sealed * 16)  # the sealed sinks (before: the window's)
        for n, stream, count in zip(streams._kept_at(length), streams.streams, rows):
            own = n % stream.tokens + (sinks if stream.kind == "body" else 0)
            assert count % PENDING_ROWS == 0
            assert own <= count < own + PENDING_ROWS
    assert streams.most_pending_rows() >= sum(streams.pending_rows(4096))
    snapkv = planned("snapkv", SMOL.name, 32, 4096)
    assert snapkv.needs_mass
    blocks = -(-4096 // 32)
    unsealed = blocks - blocks_left_window(4096, 32, 64)
    assert snapkv.request_bytes(4096).window_staging == \
        unsealed * SMOL.num_layers * SMOL.num_kv_heads * 32 * (token + 4)


def test_block_sizes_the_page_plan_refuses_are_planned():
    """heads_8x keeps 64-token key groups: the page plan refuses blocks of 16 and 32 (a block
    must hold whole groups), the stream plan does not (a micro-page gathers kept tokens over
    blocks)."""
    from kvpolicy.plan.pages import page_format
    policy = load_policy(POLICIES / "heads_8x.kvp")
    with pytest.raises(UnsupportedConfiguration):
        page_format(policy, SMOL, 16)
    assert planned("heads_8x", SMOL.name, 16, 4096).page_bytes > 0


def test_the_paged_engines_refusals_and_bad_sizes_are_refused():
    retrieval = load_policy(POLICIES / "retrieval_6x.kvp")
    with pytest.raises(UnsupportedConfiguration) as refused:
        stream_plan(retrieval, SMOL, 16, 4096)
    assert refused.value.reasons == paged_refusals(retrieval)
    with pytest.raises(UnsupportedConfiguration, match="must be positive"):
        stream_plan(load_policy(POLICIES / "kivi.kvp"), SMOL, 0, 4096)
    with pytest.raises(UnsupportedConfiguration, match="multiple of 16"):
        stream_plan(load_policy(POLICIES / "kivi.kvp"), SMOL, 24, 4096)
    with pytest.raises(ValueError, match="holds 0 to 4096"):
        planned("kivi", SMOL.name, 16, 4096).request_bytes(4097)


def test_a_micro_page_is_whole_format_blocks_of_the_page_plans_layouts():
    """What the paged decode kernels read: the page plan's format blocks (one-token blocks for a
    16-bit format, gathered MICRO_TOKENS to a micro-page; quantized formats: one block of their
    group's tokens)."""
    from kvpolicy.plan.planner import make_plan
    for name in ("pyramidkv", "kivi", "heads_8x"):
        streams = planned(name, SMOL.name, 16, 4096)
        layouts = make_plan(load_policy(POLICIES / f"{name}.kvp"), SMOL, 4096).layers
        for stream in streams.streams:
            assert stream.layout == layouts[stream.layer].page_layouts[1]
            assert stream.tokens == max(stream.layout.tokens, MICRO_TOKENS)
            assert stream.nbytes == stream.blocks * stream.layout.nbytes
