"""One engine step of the stream store, per layer (what vLLM's backend Impl and the Hugging Face
paged cache do when pages follow the stream plan): the step's plan (`stream_step`, once per step),
its write (`write_layer`), and its attention and sealing (`attend_layer`).

Which past a step's queries see (the page store's rule, `store.paged`): with snapkv importance
they first attend over the past sealed by the step's start, recording the attention mass its
staged tokens receive; the due blocks are then sealed by it, and a request whose sealed-now blocks
all lie before its new tokens attends again over what sealing made of them. Otherwise sealing
comes first and the queries attend over its result — except a request whose sealed-now blocks
hold some of its own new tokens (a prompt longer than the window), which attends over the past
as the step found it, its new tokens at full precision."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.kernels.bound import StoreKernels
from kvpolicy.plan.streams import PENDING_ROWS, StreamPlan
from kvpolicy.store.paged.attend import attend, chunk_dtype
from kvpolicy.store.paged.step import (StepMetadata, metadata_from_plan, step_requests,
                                       write_step)
from kvpolicy.store.select import ScoreRule
from kvpolicy.store.streamed.buffers import LayerBuffers, LayerStreams
from kvpolicy.store.streamed.past import (State, decode_tables, head_past, kernel_views,
                                          state)
from kvpolicy.store.streamed.seal import seal_layer
from kvpolicy.store.streamed.table import RequestPlan, StreamTable


@dataclass
class StreamStep:
    """One engine step as every layer needs it: the window's staging (`window`: the page store's
    step metadata, whose writes and spills serve the window unchanged) and each request's plan."""

    window: StepMetadata
    requests: list[RequestPlan]


def stream_step(table: StreamTable, query_start: list[int], seq_lens: list[int],
                block_rows: list[list[int]], slot_mapping: torch.Tensor) -> StreamStep:
    """Plans the step in the table; slot_mapping [n]: each new token's cache slot (physical block
    * block_size + offset), as vLLM gives it."""
    requests = step_requests(query_start, seq_lens, block_rows)
    planned, window = table.plan_step(requests)
    return StreamStep(metadata_from_plan(table.window, window, requests, query_start,
                                         seq_lens, block_rows, slot_mapping), planned)


def write_layer(buffers: LayerBuffers, key: torch.Tensor, value: torch.Tensor,
                step: StreamStep) -> None:
    """The step's write: its new tokens staged at full precision in their window slots."""
    write_step(buffers.window(), buffers.window_mass(), key, value, step.window,
               buffers.spilled)


def attend_layer(pool: torch.Tensor, buffers: LayerBuffers, plan: StreamPlan, rule: ScoreRule,
                 streams: LayerStreams, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, step: StreamStep, scale: float, output: torch.Tensor,
                 kernels: StoreKernels | None = None, packer=None) -> torch.Tensor:
    """One layer's attention for every request of the step, and its sealing. pool: [blocks,
    plan.block_bytes] uint8; query [n, Hq, D], key/value [n, H, D]; output [n, Hq, D] is written
    and returned. With `kernels`, one-token requests attend in the compiled paged decode kernel
    and sealing packs with the compiled pack kernels."""
    scored = buffers.mass is not None and streams.selects
    if kernels is not None and packer is None:
        packer = kernels.packer
    md, requests = step.window, step.requests
    everyone = list(range(len(requests)))

    def run(chosen: list[int], after: bool, record: bool) -> None:
        decodes = [] if kernels is None else \
            [i for i in chosen if md.query_start[i + 1] - md.query_start[i] == 1]
        if decodes:
            _attend_decodes(kernels, pool, buffers, plan, rule, streams, query, key, value, md,
                            requests, decodes, after, scale, output, record)
        for i in chosen:
            if i not in decodes:
                _attend_request(pool, buffers, plan, rule, streams, query, key, value, md,
                                requests[i], i, after, scale, output, record)

    def seal() -> None:
        seal_layer(pool, buffers, plan, rule, streams, requests, packer)

    if scored:
        run(everyone, after=False, record=True)
        seal()
        run([i for i in everyone if requests[i].seals and not requests[i].straddles],
            after=True, record=False)
    else:
        early = [i for i in everyone if requests[i].straddles]
        run(early, after=False, record=False)
        seal()
        run([i for i in everyone if not requests[i].straddles], after=True, record=False)
    return output


def _attend_request(pool, buffers: LayerBuffers, plan: StreamPlan, rule: ScoreRule,
                    streams: LayerStreams, query, key, value, md: StepMetadata,
                    request: RequestPlan, i: int, after: bool, scale: float, output,
                    record: bool) -> None:
    first, last = md.query_start[i], md.query_start[i + 1]
    heads = len(streams.heads)
    group = query.shape[1] // heads
    dtype = chunk_dtype(query[first:last], record)
    at = state(request, after)
    window_mass = buffers.window_mass()
    pasts = [head_past(pool, buffers, plan, streams, request, head, at, dtype, exact=not record)
             for head in range(heads)]
    # heads whose pasts are alike (the same length and dtype: every head but under `adapt
    # heads`) attend in one call, as the page store's head groups do
    runs = [list(range(heads))] if len({(p.keys.shape[0], p.keys.dtype) for p in pasts}) == 1 \
        else [[head] for head in range(heads)]
    for run in runs:
        q = slice(run[0] * group, (run[-1] + 1) * group)
        kv = slice(run[0], run[-1] + 1)
        result = attend(query[first:last, q], torch.stack([pasts[h].keys for h in run]),
                        torch.stack([pasts[h].values for h in run]), key[first:last, kv],
                        value[first:last, kv], scale,
                        mass_reduce=rule.gqa if record else None, observe=rule.observe)
        if record:
            result, received = result
            for r, head in enumerate(run):
                past = pasts[head]
                for slot, begin, count in past.window:
                    window_mass[slot, head, :count] += received[r, begin:begin + count]
                p = past.keys.shape[0]
                window_mass[md.token_slot[first:last], head, md.token_offset[first:last]] += \
                    received[r, p:]
        output[first:last, q] = result.to(output.dtype)


def _attend_decodes(kernels: StoreKernels, pool, buffers: LayerBuffers, plan: StreamPlan,
                    rule: ScoreRule, streams: LayerStreams, query, key, value,
                    md: StepMetadata, requests: list[RequestPlan], chosen: list[int],
                    after: bool, scale: float, output, record: bool) -> None:
    """One compiled-kernel launch for requests that each add one token this step."""
    states: list[State] = [state(requests[i], after) for i in chosen]
    t = decode_tables(plan, buffers, streams, [requests[i] for i in chosen], states,
                      query.device)
    pages, staging = kernel_views(pool, buffers)
    rows = torch.tensor([md.query_start[i] for i in chosen], device=query.device)
    out, received = kernels.decode(
        query[rows].contiguous(), key[rows].contiguous(), value[rows].contiguous(), pages,
        t.tables, staging, scale, mass_reduce=rule.gqa if record else None)
    output[rows] = out.to(output.dtype)
    if record:
        window_mass = buffers.window_mass()
        for r, i in enumerate(chosen):
            for head, runs in enumerate(t.window_runs[r]):
                for run, slot, begin, n in runs:
                    window_mass[slot, head, begin:begin + n] += \
                        received[r, head, run * PENDING_ROWS:run * PENDING_ROWS + n]
            first = md.query_start[i]
            window_mass[md.token_slot[first], :, md.token_offset[first]] += received[r, :, -1]
