"""Which staging slot holds which vLLM block's full-precision tokens: plain-Python bookkeeping,
done once per engine step (by the metadata builder) and shared by every layer.

vLLM does not tell an attention backend when a request ends or its blocks are freed. The table
therefore learns everything from what each step schedules:
- a request whose scheduled tokens start at position 0 is new (or recomputed after
  preemption): whatever its blocks held before is stale and is dropped;
- every block that receives tokens and is not yet sealed gets a slot;
- a block whose last token has left the window is sealed this step (packed by every layer),
  and its slot is free for the next step; the blocks holding the policy's sinks never seal;
- when the table is full, the slot of the block that no step has touched for the longest time
  is reclaimed. Its tokens are *spilled* (every layer copies them out of the slot) rather than
  dropped: the backend cannot tell a finished request's window from a running request that a
  step left unscheduled (a chunked prefill that took the step's whole token budget), and the
  latter must not lose its staged tokens. When a spilled block is read or written again it is
  restored into a free slot; when a new request takes the block over, its spilled copy is
  dropped. Only more blocks in use in one step than the table has slots is refused
  (KVPOLICY_STAGING_BLOCKS sizes the table).
Prefix caching is refused at start-up: a block shared by two requests would be sealed by one
while still in the other's window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpolicy.plan.pages import sealed


class StagingFull(RuntimeError):
    pass


@dataclass
class RequestStep:
    """One scheduled request in a step: its block table row, and its tokens [start, end)."""

    blocks: list[int]
    start: int
    end: int


@dataclass
class StepPlan:
    """What every layer does this step."""

    stage_of_block: dict[int, int]  # physical block → staging slot, for blocks written or read
    seal_blocks: list[int] = field(default_factory=list)  # packed this step, after writing
    seal_slots: list[int] = field(default_factory=list)
    seal_groups: list[int] = field(default_factory=list)  # per request: its entries in seal_*
    request_slots: list[list[int]] = field(default_factory=list)  # per request, per block: slot
    # applied by every layer before the step writes, in this order:
    spills: list[tuple[int, int]] = field(default_factory=list)  # (block, slot): copy out
    restores: list[tuple[int, int]] = field(default_factory=list)  # (block, slot): copy back in
    drops: list[int] = field(default_factory=list)  # blocks whose spilled copy is stale


class StagingTable:
    def __init__(self, slots: int, block_size: int, window: int, sink_blocks: int = 0):
        self.slots = slots
        self.block_size = block_size
        self.window = window
        self.sink_blocks = sink_blocks
        self.slot_of_block: dict[int, int] = {}
        self.last_step: dict[int, int] = {}  # block → the step that last touched it
        self.free = list(range(slots - 1, -1, -1))
        self.spilled: set[int] = set()  # blocks whose staged tokens are held outside the table
        self.step = 0

    def sealed(self, block_index: int, seq_len: int) -> bool:
        return sealed(block_index, seq_len, self.block_size, self.window, self.sink_blocks)

    def _release(self, block: int) -> None:
        slot = self.slot_of_block.pop(block, None)
        self.last_step.pop(block, None)
        if slot is not None:
            self.free.append(slot)

    def _acquire(self, block: int, plan: "StepPlan") -> int:
        if not self.free:
            idle = [b for b in self.slot_of_block if self.last_step[b] < self.step]
            if not idle:
                raise StagingFull(f"all {self.slots} staging blocks are in use this step; set "
                                  "KVPOLICY_STAGING_BLOCKS higher")
            oldest = min(idle, key=self.last_step.__getitem__)
            plan.spills.append((oldest, self.slot_of_block[oldest]))
            self.spilled.add(oldest)
            self._release(oldest)
        slot = self.free.pop()
        self.slot_of_block[block] = slot
        if block in self.spilled:
            self.spilled.discard(block)
            plan.restores.append((block, slot))
        return slot

    def plan(self, requests: list[RequestStep]) -> StepPlan:
        self.step += 1
        bs = self.block_size
        plan = StepPlan(stage_of_block={})
        for r in requests:
            if r.start == 0:  # new or recomputed: anything its blocks held is stale
                for block in r.blocks[:-(-r.end // bs)]:
                    self._release(block)
                    if block in self.spilled:
                        self.spilled.discard(block)
                        plan.drops.append(block)
        for r in requests:
            first_written = r.start // bs
            row = []
            plan.seal_groups.append(0)
            for j, block in enumerate(r.blocks[:-(-r.end // bs)]):
                written = j >= first_written
                if self.sealed(j, r.start) and not written:
                    row.append(-1)  # sealed in an earlier step
                    continue
                slot = self.slot_of_block.get(block)
                if slot is None:
                    if j * bs < r.start and block not in self.spilled:
                        raise StagingFull(f"block {block} (index {j} of a request at "
                                          f"{r.start} tokens) lost its staged tokens")
                    slot = self._acquire(block, plan)
                self.last_step[block] = self.step
                plan.stage_of_block[block] = slot
                row.append(slot)
                if self.sealed(j, r.end):  # leaves the window this step
                    plan.seal_blocks.append(block)
                    plan.seal_slots.append(slot)
                    plan.seal_groups[-1] += 1
            plan.request_slots.append(row)
        for block in plan.seal_blocks:  # free for the next step (this step still packs them)
            self._release(block)
        return plan
