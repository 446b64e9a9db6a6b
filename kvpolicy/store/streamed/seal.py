"""Sealing in the stream store: the blocks a request seals in one step leave the window; each KV
head keeps of their middle tokens what the stream plan counts, selected together by the one rule
(`store.select`: the most important of the span, ties to the earlier; the guards the most
important of those), its sinks kept apart at full precision; kept tokens join their stream's
pending rows, and every micro-page they fill is packed into the request's blocks at the plan's
address. `store.streams.StreamRequest` is the reference (tests/test_streamed_store.py)."""

from __future__ import annotations

import torch

from kvpolicy.kernels import reference as R
from kvpolicy.plan.streams import StreamPlan
from kvpolicy.store.select import ScoreRule, group_importance, rank
from kvpolicy.store.streamed.buffers import LayerBuffers, LayerStreams
from kvpolicy.store.streamed.table import RequestPlan


def flat_pool(pool: torch.Tensor) -> torch.Tensor:
    """The pool [blocks, block bytes] as one run of bytes (a view)."""
    if not pool.is_contiguous():
        raise ValueError("the stream store's pool must be contiguous blocks of bytes")
    return pool.view(-1)


def seal_layer(pool: torch.Tensor, buffers: LayerBuffers, plan: StreamPlan, rule: ScoreRule,
               streams: LayerStreams, requests: list[RequestPlan], packer=None) -> None:
    """Seals, in one layer, every request's blocks that left the window this step. pool:
    [blocks, plan.block_bytes] uint8 (every layer's micro-pages share a block's bytes)."""
    packer = packer or R.pack_blocks
    for request in requests:
        if request.seals:
            _seal_request(pool, buffers, plan, rule, streams, request, packer)


def _seal_request(pool, buffers: LayerBuffers, plan: StreamPlan, rule: ScoreRule,
                  streams: LayerStreams, request: RequestPlan, packer) -> None:
    bs, d = plan.block_size, plan.head_dim
    slots = torch.tensor(request.window_slots[request.before:request.after], dtype=torch.int64,
                         device=buffers.rows.device)
    g = slots.numel()
    tokens = buffers.window()[slots]  # [g, H, bs, 2, D]
    heads = tokens.shape[1]
    span = tokens.permute(1, 0, 2, 3, 4).reshape(heads, g * bs, 2, d)
    sinks = max(0, min(plan.sinks - request.before * bs, g * bs))  # the span's sink tokens
    importance = None
    if streams.selects:
        window_mass = buffers.window_mass()
        received = None if window_mass is None else \
            window_mass[slots].permute(1, 0, 2).reshape(heads, g * bs)
        importance = group_importance(rule, span, received)
    before, after = plan.kept[request.before], plan.kept[request.after]
    for head, (guard, body) in enumerate(streams.heads):
        grow = {i: after[i] - before[i] for i in (guard, body) if i is not None}
        total = sum(grow.values())
        if importance is None:  # every middle token, in order
            order = torch.arange(sinks, sinks + total, device=span.device)
        else:
            order = rank(importance[head, sinks:])[:total] + sinks
        if guard is not None:
            _append(pool, buffers, plan, streams, request, guard,
                    span[head, order[:grow[guard]].sort().values], None, packer)
            order = order[grow[guard]:]
        _append(pool, buffers, plan, streams, request, body, span[head, order.sort().values],
                span[head, :sinks], packer)


def _append(pool, buffers: LayerBuffers, plan: StreamPlan, streams: LayerStreams,
            request: RequestPlan, index: int, tokens: torch.Tensor,
            new_sinks: torch.Tensor | None, packer) -> None:
    """Adds a stream's kept tokens [n, 2, D] (and, for a body stream, the span's sinks) to its
    pending rows, packs the micro-pages they fill, and writes back what still waits."""
    stream = plan.streams[index]
    kept_before = plan.kept[request.before][index]
    sinks_before = min(plan.sinks, request.before * plan.block_size) \
        if new_sinks is not None else 0
    held = buffers.gather(request.chunks_before[index],
                          sinks_before + stream.pending(kept_before))
    pending = torch.cat([held[sinks_before:], tokens.to(held.dtype)])
    full = pending.shape[0] // stream.tokens
    if full:
        packed = packer(pending[:full * stream.tokens, 0], pending[:full * stream.tokens, 1],
                        None, stream.layout).reshape(full, stream.nbytes)
        first = stream.micro_pages(kept_before)
        rows = streams.rows[index][first:first + full]
        offsets = streams.offsets[index][first:first + full]
        blocks = torch.tensor(request.blocks, dtype=torch.int64)[rows]
        starts = blocks * plan.block_bytes + offsets
        at = (starts[:, None] + torch.arange(stream.nbytes)[None, :]).flatten()
        flat_pool(pool)[at.to(pool.device)] = packed.flatten().to(pool.device)
    kept_sinks = held[:sinks_before] if new_sinks is None else \
        torch.cat([held[:sinks_before], new_sinks.to(held.dtype)])
    buffers.scatter(request.chunks_after[index],
                    torch.cat([kept_sinks, pending[full * stream.tokens:]]))
