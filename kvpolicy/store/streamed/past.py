"""Reading the stream store: one request's past in one layer, as it stood once `event` blocks had
sealed — per KV head its sinks and pending rows, its guard and body micro-pages, and the window's
blocks from `event` up to the step's first token. As tensors for the PyTorch path (`head_past`),
or as the compiled paged decode kernels' tables (`decode_tables`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.kernels import reference as R
from kvpolicy.kernels.contract import PagedTables
from kvpolicy.plan.pages import PAGE_ALIGN
from kvpolicy.plan.streams import PENDING_ROWS, StreamPlan
from kvpolicy.store.streamed.buffers import LayerBuffers, LayerStreams
from kvpolicy.store.streamed.seal import flat_pool
from kvpolicy.store.streamed.table import RequestPlan


@dataclass(frozen=True)
class State:
    """Which of a request's two states in this step a read sees: sealed by its start (before the
    step seals) or by its end (after)."""

    event: int
    chunks: tuple[tuple[int, ...], ...]


def state(request: RequestPlan, after: bool) -> State:
    return State(request.after, request.chunks_after) if after else \
        State(request.before, request.chunks_before)


def _rows(plan: StreamPlan, index: int, event: int) -> int:
    """A stream's pending rows in use once `event` blocks sealed (the body's: sinks first)."""
    stream = plan.streams[index]
    sinks = min(plan.sinks, event * plan.block_size) if stream.kind == "body" else 0
    return sinks + stream.pending(plan.kept[event][index])


def _window_blocks(plan: StreamPlan, request: RequestPlan, event: int):
    """The window's blocks a chunk starting at `request.start` reads: (slot, tokens)."""
    bs = plan.block_size
    return [(request.window_slots[j], min(bs, request.start - j * bs))
            for j in range(event, -(-request.start // bs))]


def micro_page_starts(plan: StreamPlan, streams: LayerStreams, request: RequestPlan,
                      index: int, event: int) -> torch.Tensor:
    """Byte offsets in the pool of a stream's micro-pages packed once `event` blocks sealed."""
    count = plan.streams[index].micro_pages(plan.kept[event][index])
    blocks = torch.tensor(request.blocks, dtype=torch.int64)[streams.rows[index][:count]]
    return blocks * plan.block_bytes + streams.offsets[index][:count]


@dataclass
class HeadPast:
    keys: torch.Tensor  # [p, D]
    values: torch.Tensor
    window: list[tuple[int, int, int]]  # the window's runs among them: (slot, first, count)
    packed: bool  # does it hold micro-pages (quantized tokens)?


def head_past(pool: torch.Tensor, buffers: LayerBuffers, plan: StreamPlan,
              streams: LayerStreams, request: RequestPlan, head: int, at: State,
              dtype: torch.dtype | None, exact: bool) -> HeadPast:
    """One KV head's past for the PyTorch path: dequantized micro-pages in fp32 (or `dtype`);
    with `exact` and no micro-pages, in the staging's own dtype (nothing converted)."""
    staged, packed = [], []  # pending rows (and sinks); dequantized micro-pages
    for index in streams.heads[head]:
        if index is None:
            continue
        staged.append(buffers.gather(at.chunks[index], _rows(plan, index, at.event)))
        stream = plan.streams[index]
        starts = micro_page_starts(plan, streams, request, index, at.event)
        if starts.numel():
            at_bytes = (starts[:, None] + torch.arange(stream.nbytes)[None, :]).flatten()
            raw = flat_pool(pool)[at_bytes.to(pool.device)]
            blocks = raw.view(-1, stream.layout.nbytes)
            keys, values, _ = R.unpack_blocks(blocks, stream.layout,
                                              starts.numel() * stream.tokens)
            packed.append(torch.stack([keys, values], 1))
    window, runs = buffers.window(), []
    length = sum(p.shape[0] for p in staged + packed)
    for slot, n in _window_blocks(plan, request, at.event):  # the window's blocks, last
        staged.append(window[slot, head, :n])
        runs.append((slot, length, n))
        length += n
    if dtype is None:
        dtype = buffers.rows.dtype if exact and not packed else torch.float32
    pending = len(staged) - len(runs)
    parts = staged[:pending] + packed + staged[pending:]
    tokens = torch.cat([p.to(dtype) for p in parts]) if parts else \
        buffers.rows.new_zeros(0, 2, plan.head_dim, dtype=dtype)
    return HeadPast(tokens[:, 0], tokens[:, 1], runs, bool(packed))


@dataclass(frozen=True)
class DecodeTables:
    tables: PagedTables
    # per request, per KV head: the window's staged runs, (run index, slot, first, tokens)
    window_runs: list[list[list[tuple[int, int, int, int]]]]


def decode_tables(plan: StreamPlan, buffers: LayerBuffers, streams: LayerStreams,
                  requests: list[RequestPlan], states: list[State], device) -> DecodeTables:
    """The requests' pasts as one paged decode launch reads them: the pool as 16-byte units
    (a table entry is a micro-page's first unit), a table per KV head for its guard and its body
    micro-pages, and staged runs of up to 16 rows — its pending guards, its sinks and pending
    body tokens, then the window's blocks — as chunks of the layer's buffer."""
    heads = len(streams.heads)
    guard_rows, body_rows, stage_rows, length_rows, windows = [], [], [], [], []
    guard_tokens = body_tokens = 0
    for request, at in zip(requests, states):
        g_row, b_row, s_row, l_row, w_row = [], [], [], [], []
        for head, pair in enumerate(streams.heads):
            units = {}
            slots, lengths, runs = [], [], []
            for kind, index in zip(("guard", "body"), pair):
                if index is None:
                    units[kind] = []
                    continue
                stream = plan.streams[index]
                if kind == "guard":
                    guard_tokens = stream.tokens
                else:
                    body_tokens = stream.tokens
                starts = micro_page_starts(plan, streams, request, index, at.event)
                units[kind] = (starts // PAGE_ALIGN).tolist()
                rows = _rows(plan, index, at.event)
                for k, chunk in enumerate(at.chunks[index][:-(-rows // PENDING_ROWS)]):
                    slots.append(buffers.pending_chunk(chunk))
                    lengths.append(min(PENDING_ROWS, rows - k * PENDING_ROWS))
            for slot, n in _window_blocks(plan, request, at.event):
                base = buffers.window_chunk(slot, head)
                for k in range(-(-n // PENDING_ROWS)):
                    tokens = min(PENDING_ROWS, n - k * PENDING_ROWS)
                    runs.append((len(slots), slot, k * PENDING_ROWS, tokens))
                    slots.append(base + k)
                    lengths.append(tokens)
            g_row.append(units["guard"])
            b_row.append(units["body"])
            s_row.append(slots)
            l_row.append(lengths)
            w_row.append(runs)
        guard_rows.append(g_row)
        body_rows.append(b_row)
        stage_rows.append(s_row)
        length_rows.append(l_row)
        windows.append(w_row)

    def table(rows: list[list[list[int]]]) -> torch.Tensor:
        width = max((len(r) for row in rows for r in row), default=0)
        return torch.tensor([[r + [0] * (width - len(r)) for r in row] for row in rows],
                            dtype=torch.int32, device=device).reshape(len(rows), heads, width)

    def count(rows: list[list[list[int]]]) -> torch.Tensor:
        return torch.tensor([[len(r) for r in row] for row in rows], dtype=torch.int32,
                            device=device).reshape(len(rows), heads)

    tables = PagedTables(
        guard_table=table(guard_rows), guard_count=count(guard_rows),
        body_table=table(body_rows), body_count=count(body_rows),
        body_tail=torch.full((len(requests), heads), body_tokens, dtype=torch.int32,
                             device=device),
        body_offset=0, guard_tokens=guard_tokens, body_tokens=body_tokens,
        stage_table=table(stage_rows), stage_len=table(length_rows),
        staged_count=count(length_rows))
    return DecodeTables(tables, windows)


def kernel_views(pool: torch.Tensor, buffers: LayerBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """(pages, staging) as the paged decode kernels read them: the pool as [units, H, 16]
    bytes and the buffer as [chunks, H, 16, 2, D], both with a KV-head stride of 0."""
    flat = flat_pool(pool)
    heads = buffers.heads
    pages = torch.as_strided(flat, (flat.numel() // PAGE_ALIGN, heads, PAGE_ALIGN),
                             (PAGE_ALIGN, 0, 1))
    rows = buffers.rows
    staging = torch.as_strided(rows, (rows.shape[0], heads, *rows.shape[1:]),
                               (rows.stride(0), 0, *rows.stride()[1:]))
    return pages, staging
