"""The stream plan: how a paged engine can hold a policy's compressed cache so that one request
holds what the whole-prompt plan says, at every block size (issue 34; the design and the
arithmetic that chose it: docs/architecture.md, "Next"). Exact arithmetic, the reference the
paged store is to follow; the engines still hold the page plan (`plan.pages`) until they do.
Front end: no torch.

- **Sealing.** A sequence's blocks of `block_size` tokens seal as they leave the full-precision
  window (the one rule, `pages.blocks_left_window`). The first `sinks` tokens are kept apart, at
  full precision; the other sealed tokens are the *middle*.
- **Shares.** Each (layer, KV head) keeps, of the middle sealed so far, what the whole-prompt
  plan keeps at the sequence's current length (`planner.middle_budgets`, split over heads the way
  `adapt heads` splits it, `planner.proportional_split`), before whole units. The count is
  carried from block to block: a 16-token block keeps its exact share, not a rounded-up one, and
  never more tokens than it has. Of a head's kept tokens, the guard's fraction are guards.
- **Streams.** Heads whose counts agree at every length form a group; each (layer, group) has a
  guard stream (when the layer has guards) and a body stream. Kept tokens wait at full precision
  (*pending*) until one format block of their stream fills, then pack into a *micro-page*: that
  format block for every KV head of the group. Whole format blocks per stream, not per vLLM
  block: per-channel key groups no longer force a floor per block.
- **The log.** Micro-pages append to the request's log in sealing order (by layer, group, guard
  then body), laid over the request's own vLLM blocks in order (one block holds `layers x
  kv_heads x page_bytes` bytes; a micro-page never straddles two). vLLM allocates a block per
  `block_size` tokens, so `page_bytes` is the smallest (16-byte aligned) that holds the log at
  every length up to `max_len`: the window's blocks hold sealed tokens' micro-pages, and nothing
  is paid twice. No engine change beyond the backend: the blocks are the ones vLLM gives.
- **Staging.** The window's blocks (and the open one) are staged at full precision, a slot per
  block; the sinks and every stream's pending tokens in token rows, taken in chunks of
  PENDING_ROWS as the request needs them (`pending_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from kvpolicy.dtypes import DTYPE_BYTES
from kvpolicy.format import BlockLayout, block_tokens
from kvpolicy.lang.ir import Policy
from kvpolicy.models import ModelShape
from kvpolicy.plan.pages import (PAGE_ALIGN, UnsupportedConfiguration, blocks_left_window,
                                 model_refusals, paged_refusals)
from kvpolicy.plan.planner import (block_layouts, layer_formats, middle_budgets,
                                   proportional_split)

EPSILON = 1e-9  # shares are floored after float arithmetic: 3.9999999 tokens is 4
PENDING_ROWS = 16  # pending staging is taken in chunks of this many token rows
MICRO_TOKENS = 16  # the fewest tokens of a micro-page


class StreamBytes(NamedTuple):
    """One request's bytes in a paged engine laid out by the stream plan, by where they are."""

    pool: int  # the request's vLLM blocks (they hold the log)
    window_staging: int  # full-precision slots of the blocks not sealed yet (window, open)
    pending_staging: int  # the sinks and the pending kept tokens (`pending_rows`)


@dataclass(frozen=True)
class Stream:
    """The kept tokens of one kind (guards or body) of one KV head of one layer."""

    layer: int
    head: int
    kind: str  # "guard" or "body"
    layout: BlockLayout  # its format block (the page plan's, what the kernels read)
    blocks: int = 1  # format blocks per micro-page, side by side

    @property
    def tokens(self) -> int:
        """Tokens a micro-page holds."""
        return self.layout.tokens * self.blocks

    def micro_pages(self, kept: int) -> int:
        """Micro-pages the stream has packed with `kept` tokens."""
        return kept // self.tokens

    def pending(self, kept: int) -> int:
        """Kept tokens waiting at full precision for the next micro-page."""
        return kept % self.tokens

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes * self.blocks


@dataclass(frozen=True)
class StreamPlan:
    block_size: int
    window: int
    sinks: int
    layers: int
    kv_heads: int
    head_dim: int
    staging_dtype: str
    needs_mass: bool  # staged tokens carry fp32 attention mass (snapkv importance)
    max_len: int  # the longest sequence `page_bytes` holds the log of
    streams: tuple[Stream, ...]
    # per sealing event S (S blocks sealed; S = 0 .. max_len's), per stream: its kept tokens
    kept: tuple[tuple[int, ...], ...]
    page_bytes: int  # per layer and KV head of a vLLM block (the mean: the log ignores layers)
    # per stream, per micro-page: (index of the request's block, byte offset in it)
    addresses: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def block_bytes(self) -> int:
        """Bytes of one vLLM block: every layer's and KV head's share of it."""
        return self.layers * self.kv_heads * self.page_bytes

    def events(self, seq_len: int) -> int:
        """Blocks sealed at `seq_len` tokens (the one sealing rule)."""
        return blocks_left_window(seq_len, self.block_size, self.window)

    def micro_pages(self, seq_len: int) -> tuple[int, ...]:
        """Per stream, the micro-pages packed at `seq_len` tokens."""
        return tuple(s.micro_pages(n) for n, s in zip(self._kept_at(seq_len), self.streams))

    def pending(self, seq_len: int) -> tuple[int, ...]:
        """Per stream, kept tokens waiting at full precision for their format block to fill."""
        return tuple(s.pending(n) for n, s in zip(self._kept_at(seq_len), self.streams))

    def _kept_at(self, seq_len: int) -> tuple[int, ...]:
        if not 0 <= seq_len <= self.max_len:
            raise ValueError(f"{seq_len} tokens: this stream plan holds 0 to {self.max_len}")
        return self.kept[self.events(seq_len)]

    def pending_rows(self, seq_len: int) -> tuple[int, ...]:
        """Per stream, the token rows of staging (one KV head's full-precision keys and values
        each) it holds at `seq_len` tokens: its pending tokens, and in each head's body stream
        the sinks before them once their block has sealed (until then they are the window's),
        in whole chunks of PENDING_ROWS."""
        self._kept_at(seq_len)  # (checks the length)
        return self.pending_rows_at(self.events(seq_len))

    def pending_rows_at(self, event: int) -> tuple[int, ...]:
        """`pending_rows` once `event` blocks have sealed."""
        sinks = min(self.sinks, event * self.block_size)
        return tuple(-(-(s.pending(n) + (sinks if s.kind == "body" else 0)) // PENDING_ROWS)
                     * PENDING_ROWS for n, s in zip(self.kept[event], self.streams))

    def most_pending_rows(self, layer: int | None = None) -> int:
        """The most rows, over all streams (or `layer`'s), that `pending_rows` asks for at any
        length up to max_len (what an engine reserves per sequence: the worst case)."""
        return max(sum(r for r, s in zip(self.pending_rows_at(e), self.streams)
                       if layer is None or s.layer == layer) for e in range(len(self.kept)))

    @property
    def staging_dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.staging_dtype]

    def request_bytes(self, seq_len: int) -> StreamBytes:
        """What one sequence of `seq_len` tokens holds, exactly: its vLLM blocks, a staging slot
        per block not sealed yet, and the pending rows it holds at that length."""
        blocks = -(-seq_len // self.block_size)
        unsealed = blocks - min(blocks, self.events(seq_len))
        token = 2 * self.head_dim * self.staging_dtype_bytes
        cells = self.layers * self.kv_heads
        slot = self.block_size * (token + (4 if self.needs_mass else 0))
        return StreamBytes(pool=blocks * self.block_bytes,
                           window_staging=unsealed * cells * slot,
                           pending_staging=sum(self.pending_rows(seq_len)) * token)

    def held_bytes(self, seq_len: int) -> int:
        return sum(self.request_bytes(seq_len))


def stream_notes(policy: Policy) -> list[str]:
    """Where the stream layout realises the policy differently from the whole-prompt runtime
    (printed at start-up; docs/vllm.md lists them)."""
    notes = []
    if policy.evicts:
        notes.append("retention in streams: as its blocks leave the window each (layer, KV head) "
                     "keeps the whole-prompt plan's count at the current length, chosen among "
                     "the blocks sealed in that step (a prompt's: all together); a token "
                     "evicted then is gone, so a head whose share grows keeps a little less "
                     "than the plan early on")
        if policy.score.method == "snapkv":
            notes.append(f"importance = the attention mass a token received from the last "
                         f"{policy.score.observe} queries of every step while it was staged "
                         "(for a prompt prefilled in one step: SnapKV's observation window)")
    if policy.cluster is not None and policy.evicts:
        notes.append(f"cluster evicted k {policy.cluster.k}: no centroids in pages; evicted "
                     "tokens are dropped")
    return notes


def stream_plan(policy: Policy, model: ModelShape, block_size: int,
                max_len: int) -> StreamPlan:
    """The stream plan of `policy` on `model` with vLLM blocks of `block_size` tokens, for
    sequences up to `max_len` tokens; raises UnsupportedConfiguration listing every reason it
    cannot be built."""
    reasons = paged_refusals(policy) + model_refusals(model)
    if block_size < 1 or max_len < 1:
        reasons.append(f"block size {block_size} and length {max_len} must be positive")
    elif block_size % PENDING_ROWS:
        reasons.append(f"block size {block_size}: a block is staged as runs of {PENDING_ROWS} "
                       f"tokens (what vLLM's paged attention needs too), so it is a multiple of "
                       f"{PENDING_ROWS}")
    if reasons:
        raise UnsupportedConfiguration(reasons)
    formats = layer_formats(policy, model)
    heads, window, sinks = model.num_kv_heads, policy.window, policy.sinks
    events = blocks_left_window(max_len, block_size, window)
    # per (layer, head): kept tokens and guards after each sealing event
    kept = [[[0] * heads for _ in formats]]
    guards = [[[0] * heads for _ in formats]]
    fractions = [guard.fraction if guard is not None else 0.0 for _, _, guard in formats]
    for event in range(1, events + 1):
        middle = max(0, event * block_size - sinks)
        fresh = middle - max(0, (event - 1) * block_size - sinks)  # this block's middle tokens
        wanted = _head_targets(policy, model, formats, event * block_size + window)
        row_kept, row_guards = [], []
        for layer, targets in enumerate(wanted):
            before, guarded = kept[-1][layer], guards[-1][layer]
            now = [max(b, min(b + fresh, math.floor(t + EPSILON)))
                   for b, t in zip(before, targets)]
            row_kept.append(now)
            row_guards.append([max(g, math.floor(fractions[layer] * n + EPSILON))
                               for g, n in zip(guarded, now)])
        kept.append(row_kept)
        guards.append(row_guards)
    streams = _streams(policy, model, formats)
    table = tuple(tuple(guards[e][s.layer][s.head] if s.kind == "guard" else
                        kept[e][s.layer][s.head] - guards[e][s.layer][s.head]
                        for s in streams) for e in range(events + 1))
    page_bytes, addresses = _layout(streams, table, block_size, window, layers=len(formats),
                                    heads=heads)
    selects = policy.evicts or any(fractions)
    return StreamPlan(block_size=block_size, window=window, sinks=sinks, layers=len(formats),
                      kv_heads=heads, head_dim=model.head_dim, staging_dtype=model.kv_dtype,
                      needs_mass=policy.score.method == "snapkv" and selects, max_len=max_len,
                      streams=streams, kept=table, page_bytes=page_bytes, addresses=addresses)


def _head_targets(policy: Policy, model: ModelShape, formats, seq_len: int) -> list[list[float]]:
    """Per layer and KV head, the middle tokens the whole-prompt plan keeps at `seq_len`, before
    whole units; with `adapt heads`, the evicting layers that share a storage pool split its total
    over their (layer, head) cells by the calibration's weights, as the plan does."""
    heads = model.num_kv_heads
    wanted = middle_budgets(policy, model, seq_len)
    sinks = min(policy.sinks, seq_len)
    middle = seq_len - sinks - min(policy.window, seq_len - sinks)
    targets = [[w] * heads for w in wanted]
    if policy.adapt is None or not policy.adapt.static or not policy.evicts:
        return targets
    weights = policy.adapt.head_weights
    pools: dict[tuple, list[int]] = {}
    for layer, (keys, values, guard) in enumerate(formats):
        if wanted[layer] < middle:
            unit = block_tokens(keys, values, model.head_dim, model.kv_dtype, positions=False)
            pools.setdefault((keys, values, guard, unit), []).append(layer)
    for members in pools.values():
        cells = [(layer, h) for layer in members for h in range(heads)]
        split = proportional_split(sum(wanted[layer] for layer in members) * heads,
                                   [weights[layer][h] for layer, h in cells],
                                   [float(middle)] * len(cells))
        for (layer, h), share in zip(cells, split):
            targets[layer][h] = share
    return targets


def _streams(policy: Policy, model: ModelShape, formats):
    """Every (layer, KV head)'s streams: guards (where the layer has them), then body. A
    micro-page is whole format blocks of the page plan's layouts (what the paged decode kernels
    read), at least MICRO_TOKENS tokens (16-bit formats have one-token blocks: so few would make
    a table entry per token)."""
    streams = []
    for layer, (keys, values, guard) in enumerate(formats):
        guard_layout, body_layout = block_layouts(policy, model, keys, values, guard,
                                                  positions=False)
        blocks = math.lcm(body_layout.tokens, MICRO_TOKENS) // body_layout.tokens
        kinds = (("guard", guard_layout),) if guard is not None else ()
        for head in range(model.num_kv_heads):
            streams.extend(Stream(layer, head, kind, layout, blocks)
                           for kind, layout in (*kinds, ("body", body_layout)))
    return tuple(streams)


def _layout(streams, table, block_size: int, window: int, layers: int, heads: int):
    """The smallest page whose blocks hold the log at every event, and every micro-page's
    (block index, offset) at that page. A block (`layers x heads` pages) starts 16-byte aligned,
    as every micro-page does (the kernels' loads), so the page is a multiple of `step`."""
    cells = layers * heads
    step = PAGE_ALIGN // math.gcd(cells, PAGE_ALIGN)
    log = _log(streams, table)
    sizes = [streams[index].nbytes for _, index in log]
    bound, logged, at = max(sizes, default=0) / cells, 0, 0
    for event in range(1, len(table)):  # the log's bytes over the request's blocks, at most
        while at < len(log) and log[at][0] == event:
            logged, at = logged + sizes[at], at + 1
        bound = max(bound, logged / (_blocks_at(event, block_size, window) * cells))
    low = max(step, math.ceil(bound / step) * step)  # no page below it holds the log
    high = low
    while (placed := _place(streams, log, high * cells, block_size, window)) is None:
        low, high = high, high * 2
    if high == low:
        return high, placed
    while high - low > step:  # the smallest that holds it: bisection on multiples of step
        middle = (low + high) // 2 // step * step
        trial = _place(streams, log, middle * cells, block_size, window)
        if trial is None:
            low = middle
        else:
            high, placed = middle, trial
    return high, placed


def _blocks_at(event: int, block_size: int, window: int) -> int:
    """vLLM blocks a request holds when its `event`-th block seals (its length is then
    event x block_size + window)."""
    return -(-(event * block_size + window) // block_size)


def _log(streams, table) -> list[tuple[int, int]]:
    """The log: every micro-page as (the event that packs it, its stream's index), in order."""
    log = []
    for event in range(1, len(table)):
        for index, (before, now) in enumerate(zip(table[event - 1], table[event])):
            stream = streams[index]
            log.extend([(event, index)] * (stream.micro_pages(now) - stream.micro_pages(before)))
    return log


def _place(streams, log, block_bytes: int, block_size: int, window: int):
    """Lays the log over blocks of `block_bytes`, each micro-page in the first block with room
    for it (first fit: smaller micro-pages fill what larger ones leave at a block's end): None
    if it outgrows the request's blocks at some event, else every micro-page's (block index,
    offset)."""
    addresses = [[] for _ in streams]
    sizes = [stream.nbytes for stream in streams]
    smallest = min((sizes[index] for _, index in log), default=0)
    used: list[int] = []  # bytes used of each of the request's blocks, in order
    open_from = 0  # the blocks before it have no room for the smallest micro-page
    for at, (event, index) in enumerate(log):
        size = sizes[index]
        while open_from < len(used) and used[open_from] + smallest > block_bytes:
            open_from += 1
        row = next((r for r in range(open_from, len(used)) if used[r] + size <= block_bytes),
                   len(used))
        if row == len(used):
            used.append(0)
        addresses[index].append((row, used[row]))
        used[row] += size
        last_of_event = at + 1 == len(log) or log[at + 1][0] != event
        if last_of_event and len(used) > _blocks_at(event, block_size, window):
            return None
    return tuple(tuple(a) for a in addresses)
