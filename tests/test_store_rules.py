"""The rules both runtimes share have one home each, and both runtimes follow them: importance
(reduce over a KV group's query heads, then pool), selection, the sealing rule, KVzip's one
threshold. Each test compares the two runtimes' own code paths on the same input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import POLICIES
from kvpolicy import load_policy
from kvpolicy.format import block_layout
from kvpolicy.kernels import reference as R
from kvpolicy.lang.ir import QuantFormat
from kvpolicy.models import PRESETS
from kvpolicy.plan import pages
from kvpolicy.plan.planner import make_plan
from kvpolicy.store.paged.attend import attend
from kvpolicy.store.select import above_threshold, group_importance, select_tokens
from kvpolicy.store.whole import compress as compressor


@pytest.mark.parametrize("pool, gqa", [("max", "mean"), ("max", "sum"), ("avg", "max")])
def test_snapkv_importance_is_the_same_in_both_runtimes(pool, gqa):
    """A prompt prefilled in one step: the paged store's importance (the mass its attention
    records per KV head, pooled when the block seals) equals the whole-prompt runtime's SnapKV
    score over the same observation window — both reduce over the group, then pool. With max
    pooling and a mean or sum reduction the other order gives other scores (shown too)."""
    torch.manual_seed(0)
    n, observe, heads, group, dim, scale = 64, 8, 2, 3, 16, 0.25
    query = torch.randn(n, heads * group, dim)
    keys, values = torch.randn(n, heads, dim), torch.randn(n, heads, dim)
    empty = torch.zeros(heads, 0, dim)
    _, received = attend(query, empty, empty, keys, values, scale, mass_reduce=gqa,
                         observe=observe)  # [H, n]
    fmt = SimpleNamespace(score="snapkv", pool=pool, pool_kernel=7)
    paged = group_importance(fmt, torch.zeros(heads, n, 2, dim), received)
    whole = R.snapkv_importance(query[-observe:].transpose(0, 1)[None],
                                keys.transpose(0, 1)[None], torch.arange(n - observe, n), pool,
                                7, gqa, scale)[0]
    torch.testing.assert_close(paged, whole, atol=1e-5, rtol=1e-5)
    if pool == "max" and gqa != "max":
        logits = (query[-observe:].transpose(0, 1) @ keys.repeat_interleave(
            group, 1).permute(1, 2, 0)) * scale  # [Hq, observe, n]
        causal = torch.arange(n)[None, :] > torch.arange(n - observe, n)[:, None]
        per_head = torch.softmax(logits.masked_fill(causal, -torch.inf), -1).sum(1)[None]
        pooled_first = R.reduce_query_heads(R.pool_scores(per_head, pool, 7), heads, gqa)[0]
        assert not torch.allclose(pooled_first, whole, atol=1e-3)


def test_the_whole_prompt_runtime_keeps_what_the_selection_rule_selects():
    """`store.whole.compress` keeps, per head, exactly the guards and body `select_tokens`
    chooses from the middle tokens' importance (the paged store's sealing calls the same)."""
    torch.manual_seed(1)
    policy = load_policy(POLICIES / "aggressive.kvp")
    shape = PRESETS["smollm2-135m"]
    n = 3000
    plan = make_plan(policy, shape, n)
    layer = plan.layers[5]
    heads, dim = shape.num_kv_heads, shape.head_dim
    prefill = compressor.PrefillLayer(torch.randn(1, heads, n, dim).bfloat16(),
                                      torch.randn(1, heads, n, dim).bfloat16(), None, 0.125)
    scores = torch.rand(1, heads, n)
    selected = torch.full((1, heads), layer.selected)
    guards = torch.full((1, heads), layer.guard_tokens)
    packed = compressor.compress_layer(prefill, scores, layer, selected, guards)
    middle = torch.arange(layer.sinks, n - layer.window)
    for h in range(heads):
        want_guard, want_body = select_tokens(scores[0, h, middle], layer.selected,
                                              layer.guard_tokens)
        for blocks, start, count, want, layout in (
                (packed.guard_blocks, packed.guard_start, packed.guard_count, want_guard,
                 layer.guard_layout),
                (packed.body_blocks, packed.body_start, packed.body_count, want_body,
                 layer.body_layout)):
            first, tokens = int(start[0, h]), int(count[0, h])
            run = blocks[first:first + -(-tokens // layout.tokens)]
            _, _, positions = R.unpack_blocks(run, layout, tokens)
            assert positions.tolist() == middle[want].tolist()


def test_one_sealing_rule():
    """`sealed` (the paged store) and `blocks_left_window` (the whole-prompt runtime's packing of
    its window) are one rule: block j of n tokens is packed once its last token has left the
    window, sinks' blocks never."""
    for block, window, sinks in ((16, 0, 0), (32, 64, 1), (64, 100, 2), (256, 2048, 1)):
        for n in range(0, 3000, 7):
            left = pages.blocks_left_window(n, block, window)
            assert left == max(0, (n - window) // block)
            for j in range(-(-n // block)):
                assert pages.sealed(j, n, block, window, sinks) == \
                    (j >= sinks and (j + 1) * block + window <= n)
                assert (sinks <= j < left) == pages.sealed(j, n, block, window, sinks)


def test_the_whole_prompt_cache_packs_the_blocks_that_left_its_window():
    """A decode step of the whole-prompt runtime leaves fewer than window + one block of tokens
    at full precision: it packed every whole block `blocks_left_window` names."""
    from kvpolicy.engines.hf.cache import PolicyLayer
    unit = 32
    owner = SimpleNamespace(policy=SimpleNamespace(window=40))
    layer = PolicyLayer(owner, 0)
    flushed = []
    layer.compressed = SimpleNamespace(body_layout=SimpleNamespace(tokens=unit),
                                       window_key=torch.zeros(1, 1, 150, 1))

    def flush(tokens):
        flushed.append(tokens)
        layer.compressed.window_key = layer.compressed.window_key[:, :, tokens:]
    layer._flush = flush
    layer._flush_whole_blocks()
    assert flushed == [unit] * pages.blocks_left_window(150, unit, 40) == [unit] * 3
    assert layer.compressed.window_key.shape[2] < 40 + unit


def test_one_threshold_rule():
    """KVzip's one threshold: `adapt threshold`'s per-head counts (whole-prompt runtime) and
    `kvpolicy calibrate`'s head shares are `select.above_threshold` of the same scores."""
    from kvpolicy.tune.calibrate import head_shares
    torch.manual_seed(2)
    n, sinks, window = 120, 4, 16
    scores = [torch.rand(3, n) for _ in range(4)]
    counts = above_threshold([s[:, sinks:n - window] for s in scores], 150)
    assert int(counts.sum()) == 150 and counts.shape == (4, 3)
    shares = head_shares(scores, sinks, window, 150 / (4 * 3 * (n - sinks - window)))
    torch.testing.assert_close(shares, counts / counts.sum())
    policy = load_policy(POLICIES / "retrieval_5x.kvp")  # reconstruct + adapt threshold
    plan = make_plan(policy, PRESETS["smollm2-135m"], n)
    members = [0, 1, 2, 3]
    assert torch.equal(compressor._above_threshold(plan, members, scores, 150), above_threshold(
        [s[:, plan.layers[i].sinks:n - plan.layers[i].window] for i, s in zip(members, scores)],
        150))


def test_page_formats_round_trip_through_the_manifest_record():
    """The page plan a manifest records (`PageFormat.to_json`) rebuilds the same format, per-head
    pages included: what a vLLM worker reads instead of planning pages again."""
    import json
    layout = block_layout(QuantFormat(bits=2), QuantFormat(bits=2, axis="token"), 64,
                          "bfloat16", False)
    assert pages._layout_from_json(json.loads(json.dumps(pages._layout_json(layout)))) == layout
    for name in ("kivi", "aggressive", "heads_8x_keep30", "conservative", "tuned_6x"):
        policy = load_policy(POLICIES / f"{name}.kvp")
        for size, fmt in pages.page_plans(policy, PRESETS["smollm2-135m"]).items():
            back = pages.PageFormat.from_json(json.loads(json.dumps(fmt.to_json())))
            assert back == fmt and back.page_bytes == fmt.page_bytes, (name, size)
            assert back.held_bytes(4096) == fmt.held_bytes(4096)
            assert pages.PageFormat.from_json(fmt.to_json(), dtype_bytes=4).baseline_page_bytes \
                == 2 * fmt.baseline_page_bytes
    with pytest.raises(ValueError, match="not a recorded page format"):
        pages.PageFormat.from_json({"block_size": 32})
