"""One request's compressed cache laid out by the stream plan (`plan.streams`), in PyTorch: the
reference the paged store's engines are to follow (docs/architecture.md, "Next").

Its micro-pages are really packed (the format's `kernels.reference.pack_blocks`) into a pool of
uint8 blocks at the plan's addresses (the request's i-th block is `pool[blocks[i]]`, as a vLLM
block table gives them); pending tokens and the sinks are kept at full precision in rows of their
own. The blocks sealed in one call (one engine step: a prompt's many, a decode step's one) are
selected together, as the page store selects them: each stream keeps as many more tokens as the
plan counts between the events before and after, the most important of the span's middle tokens
by the one selection rule (`store.select`: ties to the earlier; the guards the most important of
those). The counts, so the bytes, are the plan's whichever blocks a step seals."""

from __future__ import annotations

import torch

from kvpolicy.kernels import reference as R
from kvpolicy.kernels.contract import PagedTables
from kvpolicy.plan.pages import PAGE_ALIGN
from kvpolicy.plan.streams import PENDING_ROWS, StreamPlan
from kvpolicy.store.select import rank


class StreamRequest:
    """pool: [num_blocks, plan.block_bytes] uint8, shared with other requests; blocks: this
    request's block indices in the pool, in order (at least the blocks it holds at the length it
    reaches)."""

    def __init__(self, plan: StreamPlan, pool: torch.Tensor, blocks: list[int]):
        if pool.dtype != torch.uint8 or pool.dim() != 2 or pool.shape[1] != plan.block_bytes:
            raise ValueError(f"the pool must be uint8 [blocks, {plan.block_bytes}], not "
                             f"{pool.dtype} {list(pool.shape)}")
        self.plan = plan
        self.pool = pool
        self.blocks = list(blocks)
        self.events = 0  # blocks sealed so far
        self.packed = [0] * len(plan.streams)  # micro-pages packed, per stream
        dtype = R.torch_dtype(plan.staging_dtype)
        empty = torch.zeros(0, 2, plan.head_dim, dtype=dtype)
        self.pending = [empty] * len(plan.streams)  # [n, 2, D] each: keys, values
        self.sinks: dict[tuple[int, int], torch.Tensor] = {}  # (layer, head) → [n, 2, D]
        self._index = {(s.layer, s.head, s.kind): i for i, s in enumerate(plan.streams)}

    def seal(self, tokens: list[torch.Tensor], importance: list[torch.Tensor]) -> None:
        """Seals the blocks that left the window since the last call, together. tokens: per
        layer, the sealed blocks' tokens [H, m * block_size, 2, D] (m: the blocks sealed now,
        the first of them block `self.events`); importance: per layer [H, m * block_size],
        higher kept first."""
        bs = self.plan.block_size
        count = tokens[0].shape[1] // bs
        before, after = self.events, self.events + count
        for layer in range(self.plan.layers):
            self._seal_span(layer, before, after, tokens[layer], importance[layer])
        self.events = after

    def _seal_span(self, layer: int, before: int, after: int, block: torch.Tensor,
                   scores: torch.Tensor) -> None:
        plan = self.plan
        first = before * plan.block_size  # the span's first position in the sequence
        sinks = max(0, min(plan.sinks - first, block.shape[1]))  # the span's sink tokens
        for head in range(plan.kv_heads):
            if sinks:
                kept = self.sinks.get((layer, head), block[head, :0])
                self.sinks[layer, head] = torch.cat([kept, block[head, :sinks]])
            guard = self._index.get((layer, head, "guard"))
            body = self._index[layer, head, "body"]
            grow = {i: plan.kept[after][i] - plan.kept[before][i]
                    for i in (guard, body) if i is not None}
            order = rank(scores[head, sinks:])[:sum(grow.values())] + sinks
            if guard is not None:  # the most important of the kept are the guards
                self._append(guard, block[head, order[:grow[guard]].sort().values])
                order = order[grow[guard]:]
            self._append(body, block[head, order.sort().values])

    def _append(self, index: int, tokens: torch.Tensor) -> None:
        """Adds kept tokens to a stream's pending, then packs every micro-page they fill at the
        plan's address."""
        stream = self.plan.streams[index]
        pending = torch.cat([self.pending[index], tokens.to(self.pending[index].dtype)])
        while pending.shape[0] >= stream.tokens:
            full, pending = pending[:stream.tokens], pending[stream.tokens:]
            row, offset = self.plan.addresses[index][self.packed[index]]
            packed = R.pack_blocks(full[:, 0], full[:, 1], None, stream.layout)
            self.pool[self.blocks[row], offset:offset + stream.nbytes] = packed.flatten()
            self.packed[index] += 1
        self.pending[index] = pending

    def kept(self, index: int) -> int:
        """Tokens stream `index` keeps: packed and pending."""
        stream = self.plan.streams[index]
        return self.packed[index] * stream.tokens + self.pending[index].shape[0]

    def micro_pages(self, layer: int, head: int, kind: str) -> torch.Tensor:
        """A stream's packed micro-pages, [count, nbytes] uint8, read from the pool."""
        index = self._index[layer, head, kind]
        stream = self.plan.streams[index]
        rows = [self.pool[self.blocks[row], offset:offset + stream.nbytes]
                for row, offset in self.plan.addresses[index][:self.packed[index]]]
        return torch.stack(rows) if rows else torch.zeros(0, stream.nbytes, dtype=torch.uint8)

    def decode_inputs(self, layer: int) -> tuple[torch.Tensor, PagedTables, torch.Tensor]:
        """This request's sealed past in `layer` as one paged decode launch reads it (batch 1,
        `kernels.launch.paged_decode`): the pool as pages addressed in 16-byte units from its
        start (a table entry is a micro-page's first unit; every KV head's at the same stride),
        each KV head's guard and body micro-pages in tables of its own, and its pending guards,
        then its sinks and pending body tokens, as staged runs of PENDING_ROWS tokens (the
        plan's `pending_rows`) in a staging buffer [slots, H, PENDING_ROWS, 2, D]."""
        plan, heads, d = self.plan, self.plan.kv_heads, self.plan.head_dim
        if not self.pool.is_contiguous():
            raise ValueError("decode_inputs reads a contiguous pool")
        units = self.pool.numel() // PAGE_ALIGN
        pages = torch.as_strided(self.pool.view(-1), (units, heads, PAGE_ALIGN), (PAGE_ALIGN, 0, 1))
        tokens = {}
        tables = {}
        for kind in ("guard", "body"):
            rows = []
            for head in range(heads):
                index = self._index.get((layer, head, kind))
                if index is None:
                    rows.append([])
                    continue
                tokens[kind] = self.plan.streams[index].tokens
                rows.append([(self.blocks[row] * plan.block_bytes + offset) // PAGE_ALIGN
                             for row, offset in plan.addresses[index][:self.packed[index]]])
            tables[kind] = rows
        dtype = self.pending[0].dtype
        chunks = []  # per head: its staged runs, each at most PENDING_ROWS tokens
        for head in range(heads):
            runs = []
            if (layer, head, "guard") in self._index:
                runs.append(self.pending[self._index[layer, head, "guard"]])
            runs.append(torch.cat([self.sinks.get((layer, head), self.pending[0][:0]).to(dtype),
                                   self.pending[self._index[layer, head, "body"]]]))
            chunks.append([run[at:at + PENDING_ROWS] for run in runs
                           for at in range(0, run.shape[0], PENDING_ROWS)])
        slots = max(1, max(len(row) for row in chunks))
        staging = torch.zeros(slots, heads, PENDING_ROWS, 2, d, dtype=dtype)
        for head, row in enumerate(chunks):
            for slot, chunk in enumerate(row):
                staging[slot, head, :chunk.shape[0]] = chunk
        lengths = [[chunk.shape[0] for chunk in row] for row in chunks]

        def table(rows: list[list[int]]) -> torch.Tensor:
            width = max((len(row) for row in rows), default=0)
            return torch.tensor([row + [0] * (width - len(row)) for row in rows],
                                dtype=torch.int32).reshape(1, heads, width)

        def count(rows: list[list[int]]) -> torch.Tensor:
            return torch.tensor([[len(row) for row in rows]], dtype=torch.int32)
        body_tokens = tokens["body"]
        return pages, PagedTables(
            guard_table=table(tables["guard"]), guard_count=count(tables["guard"]),
            body_table=table(tables["body"]), body_count=count(tables["body"]),
            body_tail=torch.full((1, heads), body_tokens, dtype=torch.int32), body_offset=0,
            guard_tokens=tokens.get("guard", 0), body_tokens=body_tokens,
            stage_table=table([list(range(len(row))) for row in lengths]),
            stage_len=table(lengths), staged_count=count(lengths)), staging

    def past(self, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What one KV head of one layer holds of the sealed past, as attention reads it:
        (keys, values) fp32 [n, D] — the sinks, then guard and body micro-pages dequantized, then
        the pending tokens (attention over the past does not depend on order)."""
        parts = [self.sinks.get((layer, head), torch.zeros(0, 2, self.plan.head_dim)).float()]
        for kind in ("guard", "body"):
            index = self._index.get((layer, head, kind))
            if index is None:
                continue
            stream = self.plan.streams[index]
            pages = self.micro_pages(layer, head, kind)
            if pages.shape[0]:
                blocks = pages.reshape(-1, stream.layout.nbytes)  # the format blocks
                keys, values, _ = R.unpack_blocks(blocks, stream.layout,
                                                  pages.shape[0] * stream.tokens)
                parts.append(torch.stack([keys, values], 1))
            parts.append(self.pending[index].float())
        past = torch.cat(parts)
        return past[:, 0], past[:, 1]
