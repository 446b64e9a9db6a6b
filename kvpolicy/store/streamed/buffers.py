"""The stream store's staging, and what the plan fixes per layer.

One buffer of 16-row chunks for the whole engine, [L x W + P, PENDING_ROWS, 2, D] in the cache
dtype (`Staging`): each layer's W chunks are its window's block slots ([slots, H, block_size, 2,
D] viewed, the page store's layout, so its write and spill code serve it unchanged), and the last
P chunks are every layer's streams' pending rows, one pool for all layers — a request's layers do
not all hold their most pending tokens at the same length, so one pool reserves less than a pool
per layer would. The compiled decode kernels read the whole buffer as staged runs of up to 16
tokens ([chunks, H, 16, 2, D] with a KV-head stride of 0: a run's chunk is its own head's), and
the pool as 16-byte units, so one launch reads a request's window, sinks and pending tokens
alike. Attention mass (snapkv) is kept for the window's chunks only, a tensor per layer: pending
tokens are chosen already.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpolicy.kernels.reference import torch_dtype
from kvpolicy.plan.pages import PAGE_ALIGN
from kvpolicy.plan.streams import PENDING_ROWS, StreamPlan


@dataclass(frozen=True)
class LayerStreams:
    """What the stream plan fixes for one layer: each KV head's (guard, body) stream indices
    (guard None when the layer has none), whether sealing chooses tokens (eviction or guards),
    and every stream's micro-page addresses as tensors (request block index, byte offset)."""

    layer: int
    heads: tuple[tuple[int | None, int], ...]
    selects: bool
    rows: dict[int, torch.Tensor]
    offsets: dict[int, torch.Tensor]


def layer_streams(plan: StreamPlan) -> list[LayerStreams]:
    index = {(s.layer, s.head, s.kind): i for i, s in enumerate(plan.streams)}
    bs, sinks = plan.block_size, plan.sinks
    out = []
    for layer in range(plan.layers):
        heads = tuple((index.get((layer, h, "guard")), index[layer, h, "body"])
                      for h in range(plan.kv_heads))
        guarded = heads[0][0] is not None
        evicts = any(sum(kept[i] for pair in heads for i in pair if i is not None)
                     < plan.kv_heads * max(0, e * bs - sinks) for e, kept in enumerate(plan.kept))
        rows, offsets = {}, {}
        for pair in heads:
            for i in pair:
                if i is not None:
                    at = plan.addresses[i]
                    rows[i] = torch.tensor([r for r, _ in at], dtype=torch.int64)
                    offsets[i] = torch.tensor([o for _, o in at], dtype=torch.int64)
        out.append(LayerStreams(layer, heads, guarded or evicts, rows, offsets))
    return out


@dataclass
class Staging:
    """The engine's staging buffer, shared by its layers: [layers x W + P, PENDING_ROWS, 2, D]."""

    rows: torch.Tensor
    layers: int
    slots: int  # window block slots per layer
    heads: int
    block_size: int

    @property
    def window_chunks(self) -> int:
        """W: one layer's window slots, in chunks."""
        return self.slots * self.heads * self.block_size // PENDING_ROWS

    @property
    def pending_base(self) -> int:
        return self.layers * self.window_chunks

    @property
    def pending_chunks(self) -> int:
        return self.rows.shape[0] - self.pending_base

    def grow(self, chunks: int) -> None:
        """Room for `chunks` pending chunks (the Hugging Face cache grows as requests need)."""
        more = chunks - self.pending_chunks
        if more > 0:
            self.rows = torch.cat([self.rows, self.rows.new_zeros(more, *self.rows.shape[1:])])

    def chunk_bytes(self) -> int:
        return self.rows[0].numel() * self.rows.element_size()


def new_staging(plan: StreamPlan, slots: int, pending_chunks: int, device=None) -> Staging:
    """`slots` window block slots per layer and `pending_chunks` chunks for all layers."""
    assert plan.block_size % PENDING_ROWS == 0 and plan.block_bytes % PAGE_ALIGN == 0
    window = slots * plan.kv_heads * plan.block_size // PENDING_ROWS
    rows = torch.zeros(plan.layers * window + pending_chunks, PENDING_ROWS, 2, plan.head_dim,
                       dtype=torch_dtype(plan.staging_dtype), device=device)
    return Staging(rows, plan.layers, slots, plan.kv_heads, plan.block_size)


@dataclass
class LayerBuffers:
    """One layer's part of the staging: its window slots, its snapkv mass, and (through the
    shared pending chunks) its streams' pending rows."""

    staging: Staging
    layer: int
    mass: torch.Tensor | None  # [W, PENDING_ROWS] fp32 (snapkv), the window's chunks only
    slots: int  # window block slots
    heads: int
    block_size: int
    spilled: dict = field(default_factory=dict)  # the page store's spilled window blocks

    @property
    def rows(self) -> torch.Tensor:
        """The whole engine's buffer (what a kernel launch reads)."""
        return self.staging.rows

    @property
    def window_base(self) -> int:
        return self.layer * self.staging.window_chunks

    def window(self) -> torch.Tensor:
        """The window's slots, [slots, H, block_size, 2, D] (a view)."""
        base = self.window_base
        return self.rows[base:base + self.staging.window_chunks].view(
            self.slots, self.heads, self.block_size, 2, self.rows.shape[-1])

    def window_mass(self) -> torch.Tensor | None:
        if self.mass is None:
            return None
        return self.mass.view(self.slots, self.heads, self.block_size)

    def window_chunk(self, slot: int, head: int) -> int:
        """The buffer's chunk of one KV head's first tokens of a window slot."""
        return self.window_base + (slot * self.heads + head) * self.block_size // PENDING_ROWS

    def pending_chunk(self, chunk: int) -> int:
        """The buffer's chunk of pending chunk `chunk`."""
        return self.staging.pending_base + chunk

    def gather(self, chunks: tuple[int, ...], count: int) -> torch.Tensor:
        """The first `count` rows of a stream's chunks, [count, 2, D]."""
        if not count:
            return self.rows.new_zeros(0, 2, self.rows.shape[-1])
        index = torch.tensor(chunks, dtype=torch.int64, device=self.rows.device)
        return self.rows[self.staging.pending_base + index].reshape(
            -1, 2, self.rows.shape[-1])[:count]

    def scatter(self, chunks: tuple[int, ...], tokens: torch.Tensor) -> None:
        """Writes `tokens` [n, 2, D] as the first n rows of a stream's chunks."""
        if not chunks:
            assert tokens.shape[0] == 0, "pending tokens with no chunk to hold them"
            return
        index = torch.tensor(chunks, dtype=torch.int64, device=self.rows.device)
        held = self.rows.new_zeros(len(chunks) * PENDING_ROWS, 2, self.rows.shape[-1])
        held[:tokens.shape[0]] = tokens.to(held.dtype)
        self.rows[self.staging.pending_base + index] = held.view(len(chunks), PENDING_ROWS,
                                                                 2, -1)

    def window_bytes(self, window_slots: int) -> int:
        """Bytes of `window_slots` of this layer's window slots, their mass included."""
        chunks = window_slots * self.heads * self.block_size // PENDING_ROWS
        mass = 0 if self.mass is None else chunks * PENDING_ROWS * 4
        return chunks * self.staging.chunk_bytes() + mass


def new_buffers(staging: Staging, layer: int, needs_mass: bool) -> LayerBuffers:
    """Layer `layer`'s part of `staging` (and its mass, when snapkv ranks)."""
    mass = torch.zeros(staging.window_chunks, PENDING_ROWS, device=staging.rows.device) \
        if needs_mass else None
    return LayerBuffers(staging, layer, mass, staging.slots, staging.heads, staging.block_size)
