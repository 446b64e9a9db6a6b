"""The stream store's engine step (kvpolicy.store.streamed), held to its reference
(kvpolicy.store.streams.StreamRequest): requests interleaved in one engine — prompts, chunked
prefills and decode steps batched together, their blocks scattered in one pool — hold the
reference's pool bytes bit for bit and its pending tokens, their staging is the plan's, and each
decode token's attention is softmax attention over what the reference holds, on the PyTorch path
and in the compiled kernels."""

from __future__ import annotations

import pytest
import torch

from conftest import POLICIES

from kvpolicy.kernels import reference as R
from kvpolicy.lang.lower import load_policy
from kvpolicy.models import resolve_model
from kvpolicy.plan.streams import PENDING_ROWS, stream_plan
from kvpolicy.store.select import ScoreRule
from kvpolicy.store.streamed import (StreamTable, attend_layer, layer_streams, new_buffers,
                                     new_staging, stream_step, write_layer)
from kvpolicy.store.streamed.past import _rows
from kvpolicy.store.streams import StreamRequest
from test_store_kernels import KINDS, store_kernels
from test_stream_store import GUARDED

SMOL = resolve_model("smollm2-135m")
MAX_LEN = 1024
POOL_BLOCKS = 160
# (request, first token, end): A's prompt alone, then B's prompt in two chunks beside A's
# decode steps, then both decode (each decode step of the engine is one token per request)
SCHEDULE = [[("A", 0, 600)], [("A", 600, 601), ("B", 0, 300)], [("A", 601, 602), ("B", 300, 460)]]
DECODES = 20
LAYERS = [0, 9, 29]  # the layers an engine step runs here (the reference seals them all)


@pytest.fixture(scope="module")
def policy_named(tmp_path_factory):
    guarded = tmp_path_factory.mktemp("policies") / "guarded.kvp"
    guarded.write_text(GUARDED)
    return lambda name: load_policy(guarded if name == "guarded" else POLICIES / f"{name}.kvp")


def schedule():
    steps = [list(s) for s in SCHEDULE]
    ends = {"A": 602, "B": 460}
    for _ in range(DECODES):
        steps.append([(name, ends[name], ends[name] + 1) for name in ("A", "B")])
        ends = {k: v + 1 for k, v in ends.items()}
    return steps, ends


class Engine:
    """The store driven as an engine drives it: one table, a pool, a layer's buffers each."""

    def __init__(self, plan, rule, kernels=None):
        self.plan, self.rule, self.kernels = plan, rule, kernels
        self.table = StreamTable(plan, window_slots=48)
        self.streams = layer_streams(plan)
        self.staging = new_staging(plan, 48, 0)
        self.buffers = [new_buffers(self.staging, layer, plan.needs_mass)
                        for layer in range(plan.layers)]
        self.pool = torch.zeros(POOL_BLOCKS, plan.block_bytes, dtype=torch.uint8)

    def step(self, work, rows, tokens, queries, layers):
        """work: [(request, start, end)]; → per layer, the step's output [n, Hq, D]."""
        bs = self.plan.block_size
        query_start, seq_lens, block_rows, slots = [0], [], [], []
        for name, start, end in work:
            query_start.append(query_start[-1] + end - start)
            seq_lens.append(end)
            block_rows.append(rows[name][:-(-end // bs)])
            slots += [rows[name][p // bs] * bs + p % bs for p in range(start, end)]
        step = stream_step(self.table, query_start, seq_lens, block_rows, torch.tensor(slots))
        outputs = {}
        for layer in layers:
            key = torch.cat([tokens[n][layer][:, s:e, 0].transpose(0, 1) for n, s, e in work])
            value = torch.cat([tokens[n][layer][:, s:e, 1].transpose(0, 1) for n, s, e in work])
            query = torch.cat([queries[n][layer][s:e] for n, s, e in work])
            buffers = self.buffers[layer]
            self.staging.grow(self.table.capacity)
            write_layer(buffers, key, value, step)
            output = torch.zeros(query.shape)
            attend_layer(self.pool, buffers, self.plan, self.rule, self.streams[layer], query,
                         key, value, step, SMOL.head_dim ** -0.5, output,
                         kernels=self.kernels)
            outputs[layer] = output
        return step, outputs


def importance_of(rule, span_keys):
    if rule.score == "keynorm":
        return R.keynorm_importance(span_keys)
    return R.recent_importance(1, span_keys.shape[0], span_keys.shape[1])[0]


def run(policy, block_size, kernels=None, layers=LAYERS):
    plan = stream_plan(policy, SMOL, block_size, MAX_LEN)
    rule = ScoreRule.of(policy)
    engine = Engine(plan, rule, kernels)
    steps, ends = schedule()
    generator = torch.Generator().manual_seed(11)
    heads, d, group = SMOL.num_kv_heads, SMOL.head_dim, SMOL.gqa_group
    tokens = {n: [torch.randn(heads, ends[n], 2, d, generator=generator).to(torch.bfloat16)
                  for _ in range(plan.layers)] for n in ends}
    queries = {n: [torch.randn(ends[n], heads * group, d, generator=generator)
                   for _ in range(plan.layers)] for n in ends}
    blocks = -(-ends["A"] // block_size) + -(-ends["B"] // block_size)
    order = torch.randperm(POOL_BLOCKS, generator=generator)[:blocks].tolist()  # scattered
    rows = {"A": order[:-(-ends["A"] // block_size)], "B": order[-(-ends["A"] // block_size):]}
    reference_pool = torch.zeros_like(engine.pool)
    reference = {n: StreamRequest(plan, reference_pool, rows[n]) for n in ends}
    checked = 0
    for work in steps:
        step, outputs = engine.step(work, rows, tokens, queries, layers)
        for (name, start, end), planned in zip(work, step.requests):
            request = reference[name]
            assert planned.before == request.events
            if planned.after > planned.before:
                span = slice(planned.before * block_size, planned.after * block_size)
                request.seal([t[:, span] for t in tokens[name]],
                             [importance_of(rule, t[:, span, 0]) for t in tokens[name]])
            if end - start != 1:
                continue
            first = step.window.query_start[step.requests.index(planned)]
            for layer in layers:
                for head in range(heads):
                    keys, values = request.past(layer, head)
                    window = tokens[name][layer][head, planned.after * block_size:end].float()
                    keys = torch.cat([keys, window[:, 0]]).double()
                    values = torch.cat([values, window[:, 1]]).double()
                    q = queries[name][layer][start, head * group:(head + 1) * group].double()
                    want = torch.softmax(q @ keys.T * d ** -0.5, -1) @ values
                    got = outputs[layer][first, head * group:(head + 1) * group].double()
                    torch.testing.assert_close(got, want, atol=2e-2 if kernels else 2e-5,
                                               rtol=2e-2 if kernels else 1e-4)
            checked += 1
    return plan, engine, reference, reference_pool, ends, checked


def assert_packed_as_the_reference(plan, engine, reference, reference_pool, layers) -> int:
    """The engine's micro-pages of `layers` are the reference's, bit for bit, and it wrote no
    other byte of the pool; → how many micro-pages were compared."""
    written = torch.zeros_like(engine.pool, dtype=torch.bool)
    compared = 0
    for index, stream in enumerate(plan.streams):
        if stream.layer not in layers:
            continue
        for request in reference.values():
            for row, offset in plan.addresses[index][:request.packed[index]]:
                at = (request.blocks[row], slice(offset, offset + stream.nbytes))
                assert torch.equal(engine.pool[at], reference_pool[at])
                written[at] = True
                compared += 1
    assert not engine.pool[~written].any()
    return compared


@pytest.mark.parametrize("name,block_size", [("guarded", 16), ("heads_8x_keep30", 16),
                                             ("kivi", 32)])
def test_interleaved_requests_hold_the_references_bytes_and_attend_over_them(name, block_size,
                                                                             policy_named):
    policy = policy_named(name)
    plan, engine, reference, reference_pool, ends, checked = run(policy, block_size)
    assert checked == 2 * (DECODES + 2) - 2  # every decode token's attention was checked
    assert assert_packed_as_the_reference(plan, engine, reference, reference_pool, LAYERS) > 0
    table = engine.table
    for name, request in reference.items():
        held = table.requests[request.blocks[0]]  # known by its first block
        assert held.events == plan.events(ends[name])
        for index, stream in enumerate(plan.streams):
            if stream.layer not in LAYERS:
                continue
            rows = _rows(plan, index, held.events)
            pending = engine.buffers[stream.layer].gather(tuple(held.chunks[index]), rows)
            sinks = request.sinks.get((stream.layer, stream.head)) if stream.kind == "body" \
                else None
            want = request.pending[index] if sinks is None else \
                torch.cat([sinks, request.pending[index]])
            assert torch.equal(pending, want)
            assert len(held.chunks[index]) * PENDING_ROWS == plan.pending_rows(ends[name])[index]


@pytest.mark.parametrize("name,kind", [("guarded", "triton"),
                                       pytest.param("heads_8x_keep30", "cpu",
                                                    marks=KINDS[1].marks)])
def test_decode_steps_in_the_compiled_kernels_attend_over_what_the_reference_holds(
        name, kind, policy_named, tmp_path):
    """The compiled paged decode (C; Triton in its interpreter) over the engine's pool and
    staging, and the compiled pack kernels' micro-pages, in the layer that packs the most."""
    policy = policy_named(name)
    plan = stream_plan(policy, SMOL, 16, MAX_LEN)
    end = plan.events(schedule()[1]["A"])
    layer = max(range(plan.layers), key=lambda i: sum(
        s.micro_pages(n) for s, n in zip(plan.streams, plan.kept[end]) if s.layer == i))
    kernels = store_kernels(policy, tmp_path, layer=layer, kind=kind)
    plan, engine, reference, reference_pool, _, checked = run(policy, 16, kernels=kernels,
                                                              layers=[layer])
    assert checked == 2 * (DECODES + 2) - 2
    assert assert_packed_as_the_reference(plan, engine, reference, reference_pool, [layer]) > 0
