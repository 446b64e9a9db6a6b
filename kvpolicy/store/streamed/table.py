"""Which staging rows hold what, for an engine whose pages follow the stream plan: plain-Python
bookkeeping done once per engine step (by vLLM's metadata builder, or the Hugging Face cache) and
shared by every layer.

- The window's blocks (and the open one) are staged a slot per block, by the page store's
  `staging.StagingTable` (its reclaiming and spilling included); the blocks holding the sinks
  seal like any other, their sink tokens kept apart in rows.
- Each request's streams (`plan.streams.StreamPlan`) hold their pending tokens, and each body
  stream the sinks before them, in chunks of PENDING_ROWS rows, a chunk allocator per layer. A
  stream's chunk list grows or shrinks at its end as sealing changes its pending count (exactly
  the plan's `pending_rows`), from one pool of chunks for every layer; chunks a step no longer
  needs are freed when the next step is planned, so no chunk a layer still reads in this step is
  handed to another request.
- A request is known by its first block (vLLM tells a backend no request ids): scheduled from
  position 0 it is new, and whatever that block's request held is dropped; a request whose
  blocks are handed to another has ended, and its chunks are freed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpolicy.plan.streams import PENDING_ROWS, StreamPlan
from kvpolicy.store.paged.staging import RequestStep, StagingFull, StagingTable


@dataclass
class _Held:
    """What the table knows of one live request."""

    events: int  # blocks sealed so far
    chunks: list[list[int]]  # per stream of the plan: its pending chunks, in row order
    blocks: list[int] = field(default_factory=list)  # the block table row seen so far


@dataclass(frozen=True)
class RequestPlan:
    """One scheduled request in a step, as every layer reads it: its tokens [start, end), its
    blocks, the events sealed at its start and at its end, the staging slots of the blocks it
    seals now (in order), and each stream's pending chunks before sealing and after."""

    key: int
    start: int
    end: int
    blocks: tuple[int, ...]
    before: int  # events sealed at `start`
    after: int  # events sealed at `end`
    window_slots: tuple[int, ...]  # per block: its staging slot, -1 when sealed earlier
    chunks_before: tuple[tuple[int, ...], ...]
    chunks_after: tuple[tuple[int, ...], ...]
    block_size: int

    @property
    def seals(self) -> bool:
        return self.after > self.before

    @property
    def straddles(self) -> bool:
        """Does a block sealed in this step hold some of this step's own tokens?"""
        return self.seals and self.after * self.block_size > self.start


class StreamTable:
    """window_slots: full-precision block slots per layer (the window's and open blocks of every
    running request, and a step's prompt blocks); pending_chunks: chunks of every layer's
    streams, or None to grow as requests need them (the Hugging Face cache; vLLM reserves them
    up front)."""

    def __init__(self, plan: StreamPlan, window_slots: int, pending_chunks: int | None = None):
        self.plan = plan
        self.window = StagingTable(window_slots, plan.block_size, plan.window)
        self.growable = pending_chunks is None
        self.capacity = pending_chunks or 0
        self.free = list(range(self.capacity - 1, -1, -1))
        self.released: list[int] = []
        self.requests: dict[int, _Held] = {}
        self.owner: dict[int, int] = {}  # block → the key of the live request holding it
        self._rows = [tuple(r // PENDING_ROWS for r in plan.pending_rows_at(e))
                      for e in range(len(plan.kept))]

    def chunks_at(self, event: int) -> tuple[int, ...]:
        """Per stream, the chunks a request holds once `event` blocks have sealed."""
        return self._rows[event]

    def chunks_in_use(self) -> int:
        """The pending chunks live requests hold now."""
        return sum(len(chunks) for held in self.requests.values() for chunks in held.chunks)

    def _drop(self, key: int) -> None:
        held = self.requests.pop(key, None)
        if held is None:
            return
        for chunks in held.chunks:
            self.released.extend(chunks)
        for block in held.blocks:
            if self.owner.get(block) == key:
                del self.owner[block]

    def _take(self) -> int:
        if not self.free:
            if not self.growable:
                raise StagingFull(f"all {self.capacity} pending chunks are held by running "
                                  "requests")
            grown = max(64, self.capacity)
            self.free = list(range(self.capacity + grown - 1, self.capacity - 1, -1))
            self.capacity += grown
        return self.free.pop()

    def plan_step(self, requests: list[RequestStep]) -> tuple[list[RequestPlan], "object"]:
        """Plans the step: each request's RequestPlan, and the window's `staging.StepPlan`."""
        self.free.extend(self.released)  # the last step has read them
        self.released.clear()
        plan, bs = self.plan, self.plan.block_size
        for r in requests:
            key = r.blocks[0]
            if r.start == 0:
                self._drop(key)
        window = self.window.plan(requests)
        planned = []
        for n, r in enumerate(requests):
            key = r.blocks[0]
            held = self.requests.get(key)
            before, after = plan.events(r.start), plan.events(r.end)
            if held is None:
                if r.start and before:
                    raise StagingFull(f"a request at {r.start} tokens (first block {key}) has "
                                      "no sealed state: its pending tokens were lost")
                held = _Held(0, [[] for _ in plan.streams])
                self.requests[key] = held
            for block in r.blocks[len(held.blocks):]:  # a block handed on: its request ended
                other = self.owner.get(block)
                if other is not None and other != key:
                    self._drop(other)
                self.owner[block] = key
            held.blocks = list(r.blocks)
            if held.events != before:
                raise StagingFull(f"a request at {r.start} tokens (first block {key}) sealed "
                                  f"{held.events} blocks, not {before}")
            chunks_before = tuple(tuple(c) for c in held.chunks)
            if after > before:
                wanted = self._rows[after]
                for index, count in enumerate(wanted):
                    chunks = held.chunks[index]
                    while len(chunks) < count:
                        chunks.append(self._take())
                    if len(chunks) > count:
                        self.released.extend(chunks[count:])
                        del chunks[count:]
                held.events = after
            planned.append(RequestPlan(
                key=key, start=r.start, end=r.end, blocks=tuple(r.blocks), before=before,
                after=after, window_slots=tuple(window.request_slots[n]),
                chunks_before=chunks_before,
                chunks_after=tuple(tuple(c) for c in held.chunks) if after > before
                else chunks_before, block_size=bs))
        return planned, window
