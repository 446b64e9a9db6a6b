"""The stream store's reference (kvpolicy.store.streams): one request's kept tokens really packed
at the stream plan's addresses in a pool of uint8 blocks — bit-exact against the format's packer
applied to the tokens the selection rule picks, counted as the plan counts, the same whether a
request seals its blocks one step at a time or all at once."""

from __future__ import annotations

import pytest
import torch

from conftest import POLICIES

from kvpolicy.kernels import reference as R
from kvpolicy.lang.lower import load_policy
from kvpolicy.models import resolve_model
from kvpolicy.plan.streams import PENDING_ROWS, _blocks_at, stream_plan
from kvpolicy.store.streams import StreamRequest
from test_store_kernels import KINDS, store_kernels

SMOL = resolve_model("smollm2-135m")
LENGTH = 700
GUARDED = """policy guarded {
    keep sinks 4
    keep window 64
    retain 40%
    score keynorm
    keys   int2 group 32 per channel asymmetric
    values int2 group 32 per token asymmetric
    guard 50% of retained at int8 by score
}"""


@pytest.fixture(scope="module")
def policy_named(tmp_path_factory):
    guarded = tmp_path_factory.mktemp("policies") / "guarded.kvp"
    guarded.write_text(GUARDED)
    return lambda name: load_policy(guarded if name == "guarded" else POLICIES / f"{name}.kvp")


def sequence(seed: int = 0):
    """Per layer: the sequence's keys and values [H, LENGTH, 2, D] (bf16) and an importance
    [H, LENGTH] with no ties."""
    generator = torch.Generator().manual_seed(seed)
    heads, d = SMOL.num_kv_heads, SMOL.head_dim
    tokens = [torch.randn(heads, LENGTH, 2, d, generator=generator).to(torch.bfloat16)
              for _ in range(SMOL.num_layers)]
    importance = [torch.randperm(heads * LENGTH, generator=generator).reshape(heads, LENGTH)
                  .float() for _ in range(SMOL.num_layers)]
    return tokens, importance


def spans_of(plan, at_once: bool) -> list[tuple[int, int]]:
    """The sealing calls: every block at once (a prompt), or one block per call (decode)."""
    events = plan.events(LENGTH)
    return [(0, events)] if at_once else [(e, e + 1) for e in range(events)]


def sealed_request(plan, tokens, importance, at_once: bool) -> StreamRequest:
    blocks = -(-LENGTH // plan.block_size)
    pool = torch.zeros(blocks + 3, plan.block_bytes, dtype=torch.uint8)
    order = list(range(blocks + 3))[::-1][:blocks]  # scattered, as a block table gives them
    request = StreamRequest(plan, pool, order)
    spans = spans_of(plan, at_once)
    bs = plan.block_size
    for first, end in spans:
        request.seal([t[:, first * bs:end * bs] for t in tokens],
                     [s[:, first * bs:end * bs] for s in importance])
    return request


def expected_streams(plan, tokens, importance, spans):
    """What each stream holds, by the rule, from scratch: per sealing call (blocks [before,
    after)), a head keeps the most important of the span's middle tokens as the plan counts
    them (ties cannot happen here), the most important of those as guards; a stream's tokens
    in the order they were kept, each call's in position order."""
    bs = plan.block_size
    held = [[] for _ in plan.streams]
    index = {(s.layer, s.head, s.kind): i for i, s in enumerate(plan.streams)}
    for before, after in spans:
        positions = range(max(before * bs, plan.sinks), after * bs)
        for layer in range(plan.layers):
            for head in range(plan.kv_heads):
                guard, body = index.get((layer, head, "guard")), index[layer, head, "body"]
                grow = {i: plan.kept[after][i] - plan.kept[before][i]
                        for i in (guard, body) if i is not None}
                ranked = sorted(positions, key=lambda p: -float(importance[layer][head, p]))
                kept = ranked[:sum(grow.values())]
                if guard is not None:
                    held[guard] += sorted(kept[:grow[guard]])
                    kept = kept[grow[guard]:]
                held[body] += sorted(kept)
    return held


@pytest.mark.parametrize("name,block_size,at_once", [("heads_8x", 16, False),
                                                     ("guarded", 32, False), ("kivi", 16, False),
                                                     ("heads_8x_keep30", 16, True),
                                                     ("guarded", 16, True)])
def test_packed_bit_exact_where_the_plan_says_and_counted_as_it_counts(name, block_size,
                                                                       at_once, policy_named):
    """Sealed a block at a time (decode) or all at once (a prompt: selected together)."""
    plan = stream_plan(policy_named(name), SMOL, block_size, LENGTH)
    tokens, importance = sequence(int(at_once))
    request = sealed_request(plan, tokens, importance, at_once=at_once)
    held = expected_streams(plan, tokens, importance, spans_of(plan, at_once))
    events = plan.events(LENGTH)
    written = torch.zeros_like(request.pool, dtype=torch.bool)
    for index, stream in enumerate(plan.streams):
        assert request.kept(index) == plan.kept[events][index] == len(held[index])
        pages = plan.micro_pages(LENGTH)[index]
        assert request.packed[index] == pages
        assert request.pending[index].shape[0] == plan.pending(LENGTH)[index]
        positions = held[index]
        own = tokens[stream.layer][stream.head]
        for page, (row, offset) in enumerate(plan.addresses[index][:pages]):
            chosen = own[positions[page * stream.tokens:(page + 1) * stream.tokens]]
            want = R.pack_blocks(chosen[:, 0], chosen[:, 1], None, stream.layout).flatten()
            block = request.blocks[row]
            assert torch.equal(request.pool[block, offset:offset + stream.nbytes], want)
            written[block, offset:offset + stream.nbytes] = True
            assert row < _blocks_at(events, block_size, plan.window)
        assert torch.equal(request.pending[index], own[positions[pages * stream.tokens:]])
    assert not request.pool[~written].any()  # nothing else in the pool was touched
    unused = set(range(request.pool.shape[0])) - set(request.blocks)
    assert not request.pool[sorted(unused)].any()  # other requests' blocks were not written


@pytest.mark.parametrize("name,block_size", [("heads_8x_keep30", 16), ("guarded", 16)])
def test_sealing_many_blocks_at_once_holds_as_many_bytes_as_one_by_one(name, block_size,
                                                                        policy_named):
    """A prompt seals many blocks in one step, decode one per step: which tokens differ (a span
    is selected together), the micro-pages, pending tokens and sinks do not."""
    plan = stream_plan(policy_named(name), SMOL, block_size, LENGTH)
    tokens, importance = sequence(1)
    stepwise = sealed_request(plan, tokens, importance, at_once=False)
    at_once = sealed_request(plan, tokens, importance, at_once=True)
    assert stepwise.packed == at_once.packed
    assert [p.shape for p in stepwise.pending] == [p.shape for p in at_once.pending]
    assert all(torch.equal(stepwise.sinks[k], at_once.sinks[k]) for k in stepwise.sinks)
    assert stepwise.sinks.keys() == at_once.sinks.keys()
    assert not torch.equal(stepwise.pool, at_once.pool)  # the span chose other tokens


def test_a_heads_past_is_its_sinks_micro_pages_and_pending(policy_named):
    plan = stream_plan(policy_named("guarded"), SMOL, 32, LENGTH)
    tokens, importance = sequence(2)
    request = sealed_request(plan, tokens, importance, at_once=True)
    layer, head = 7, 1
    keys, values = request.past(layer, head)
    own = tokens[layer][head].float()
    index = {s.kind: i for i, s in enumerate(plan.streams) if (s.layer, s.head) == (layer, head)}
    kept = sum(request.kept(i) for i in index.values())
    assert keys.shape == values.shape == (plan.sinks + kept, SMOL.head_dim)
    assert torch.equal(keys[:plan.sinks], own[:plan.sinks, 0])  # the sinks, at 16 bits
    at = plan.sinks
    for kind in ("guard", "body"):
        i = index[kind]
        stream = plan.streams[i]
        pages = request.micro_pages(layer, head, kind).reshape(-1, stream.layout.nbytes)
        k, v, _ = R.unpack_blocks(pages, stream.layout, pages.shape[0] * stream.layout.tokens)
        n = k.shape[0]
        assert torch.equal(keys[at:at + n], k) and torch.equal(values[at:at + n], v)
        pending = request.pending[i].float()
        assert torch.equal(keys[at + n:at + n + pending.shape[0]], pending[:, 0])
        at += n + pending.shape[0]
        if kind == "guard":  # int8 guards stay close to what they quantize
            assert (k - own[expected_streams(plan, tokens, importance, spans_of(plan, True))[i][:n], 0]).abs().max() < 0.05


def test_a_pool_of_the_wrong_shape_is_refused(policy_named):
    plan = stream_plan(policy_named("kivi"), SMOL, 16, LENGTH)
    with pytest.raises(ValueError, match=f"uint8 \\[blocks, {plan.block_bytes}\\]"):
        StreamRequest(plan, torch.zeros(4, plan.block_bytes + 1, dtype=torch.uint8), [0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,layer", [("kivi", 3), ("guarded", 7), ("heads_8x", 11)])
def test_the_paged_decode_kernels_read_the_stream_store_as_it_holds_it(name, layer, kind,
                                                                       policy_named, tmp_path):
    """The compiled paged decode (C; Triton in its interpreter) over the stream store's pool —
    micro-pages addressed in 16-byte units through tables per KV head, guard pages apart from
    body pages, sinks and pending tokens as staged runs — is softmax attention over what the
    store holds of each head (`StreamRequest.past`) and the new token."""
    policy = policy_named(name)
    plan = stream_plan(policy, SMOL, 16, LENGTH)
    tokens, importance = sequence(3)
    request = sealed_request(plan, tokens, importance, at_once=True)
    decode = store_kernels(policy, tmp_path, layer=layer, kind=kind).decode
    pages, tables, staging = request.decode_inputs(layer)
    heads, group, d = SMOL.num_kv_heads, SMOL.gqa_group, SMOL.head_dim
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, heads * group, d, generator=generator)
    new_k, new_v = torch.randn(2, 1, heads, d, generator=generator)
    out, _ = decode(q, new_k, new_v, pages, tables, staging, d ** -0.5)
    assert tables.guard_table.shape[-1] > 0 or policy.guard is None
    rows = plan.pending_rows(LENGTH)  # the staged runs are the plan's pending rows
    for head in range(heads):
        held = sum(r for r, s in zip(rows, plan.streams) if (s.layer, s.head) == (layer, head))
        assert int(tables.staged_count[0, head]) * PENDING_ROWS == held
    for head in range(heads):
        keys, values = request.past(layer, head)
        keys = torch.cat([keys, new_k[0, head][None]]).double()
        values = torch.cat([values, new_v[0, head][None]]).double()
        queries = q[0, head * group:(head + 1) * group].double()
        want = torch.softmax(queries @ keys.T * d ** -0.5, -1) @ values
        torch.testing.assert_close(out[0, head * group:(head + 1) * group].double(), want,
                                   atol=3e-2 if kind == "triton" else 2e-5,
                                   rtol=3e-2 if kind == "triton" else 1e-4)
