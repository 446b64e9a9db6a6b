"""One engine step of the paged store, per layer (what vLLM's backend Impl and the Hugging Face
paged cache do): the step's plan (`StepMetadata`, from the staging table), its write, and its
attention and sealing (`attend_step`), with one compiled-kernel launch for the one-token requests
(`attend_decodes`, over `LaunchTables`) and the PyTorch path for the rest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvpolicy.kernels.bound import StoreKernels
from kvpolicy.kernels.contract import PagedTables
from kvpolicy.plan.pages import HeadGroup, PageFormat
from kvpolicy.store.paged import staging
from kvpolicy.store.paged.attend import accumulate_mass, attend, chunk_dtype
from kvpolicy.store.paged.read import cached_tokens, past_segments
from kvpolicy.store.paged.seal import seal_heads, stage_tokens
from kvpolicy.store.paged.views import group_pages


@dataclass
class StepMetadata:
    """One engine step, as every layer needs it (built once per step by the metadata builder)."""

    num_actual_tokens: int
    query_start: list[int]  # per request, then the end: [num_reqs + 1]
    seq_lens: list[int]  # per request: tokens after this step
    block_rows: list[list[int]]  # per request: its physical blocks
    request_slots: list[list[int]]  # per request, per block: staging slot, -1 when sealed
    token_slot: torch.Tensor  # [num_actual_tokens] staging slot of each new token's block
    token_offset: torch.Tensor  # [num_actual_tokens] offset in its block
    seal_blocks: torch.Tensor  # [k] blocks sealed in this step, and their staging slots
    seal_slots: torch.Tensor
    seal_groups: list[int]  # per request: how many consecutive seal entries are its own
    past_sealed_now: list[bool]  # per request: does its past hold a block sealed in this step?
    spills: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # staging.StepPlan
    restores: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    drops: list[int] = dataclasses.field(default_factory=list)
    # the step's decode launch tables, built once and shared by its layers (`decode_tables`)
    launch_tables: "StepLaunchTables" = dataclasses.field(
        default_factory=lambda: StepLaunchTables(), repr=False, compare=False)

    @property
    def starts(self) -> list[int]:
        return [n - (self.query_start[i + 1] - self.query_start[i])
                for i, n in enumerate(self.seq_lens)]


def step_metadata(table: staging.StagingTable, query_start: list[int], seq_lens: list[int],
                  block_rows: list[list[int]], slot_mapping: torch.Tensor) -> StepMetadata:
    """Plans the step in the staging table; slot_mapping [n]: each new token's cache slot
    (physical block * block_size + offset), as vLLM gives it."""
    requests = step_requests(query_start, seq_lens, block_rows)
    return metadata_from_plan(table, table.plan(requests), requests, query_start, seq_lens,
                              block_rows, slot_mapping)


def step_requests(query_start: list[int], seq_lens: list[int],
                  block_rows: list[list[int]]) -> list[staging.RequestStep]:
    """The step's requests as the staging table plans them."""
    return [staging.RequestStep(row, end - (query_start[i + 1] - query_start[i]), end)
            for i, (row, end) in enumerate(zip(block_rows, seq_lens))]


def metadata_from_plan(table: staging.StagingTable, plan: staging.StepPlan,
                       requests: list[staging.RequestStep], query_start: list[int],
                       seq_lens: list[int], block_rows: list[list[int]],
                       slot_mapping: torch.Tensor) -> StepMetadata:
    """The step's metadata from the staging table's plan of it."""
    bs = table.block_size
    past_sealed_now = [any(table.sealed(j, r.end) and not table.sealed(j, r.start)
                           for j in range(r.start // bs)) for r in requests]
    slots = slot_mapping.to(torch.int64)
    stage = torch.tensor([plan.stage_of_block[int(b)] for b in (slots // bs).tolist()],
                         dtype=torch.int64)
    return StepMetadata(num_actual_tokens=slots.numel(), query_start=query_start,
                        seq_lens=seq_lens, block_rows=block_rows,
                        request_slots=plan.request_slots, token_slot=stage,
                        token_offset=slots % bs,
                        seal_blocks=torch.tensor(plan.seal_blocks, dtype=torch.int64),
                        seal_slots=torch.tensor(plan.seal_slots, dtype=torch.int64),
                        seal_groups=plan.seal_groups,
                        past_sealed_now=past_sealed_now, spills=plan.spills,
                        restores=plan.restores, drops=plan.drops)


def move_staged(staging_buffer: torch.Tensor, mass: torch.Tensor | None, spilled: dict,
                md: StepMetadata) -> None:
    """Applies the staging table's spills, restores and drops to one layer's staging: a block
    whose slot was reclaimed keeps its staged tokens (and their attention mass) in `spilled`,
    block → (tokens, mass), until a step needs it again or a new request takes it over."""
    for block, slot in md.spills:
        spilled[block] = (staging_buffer[slot].clone(),
                          None if mass is None else mass[slot].clone())
    for block, slot in md.restores:
        tokens, received = spilled.pop(block)
        staging_buffer[slot] = tokens
        if mass is not None:
            mass[slot] = received
    for block in md.drops:
        spilled.pop(block, None)


def write_step(staging_buffer: torch.Tensor, mass: torch.Tensor | None, key: torch.Tensor,
               value: torch.Tensor, md: StepMetadata, spilled: dict | None = None) -> None:
    """The step's write (vLLM's do_kv_cache_update): move spilled blocks (`move_staged`), then
    stage the new tokens at full precision. Sealing waits for `attend_step`, so a block sealed in
    this step was first seen by this step's queries."""
    if md.spills or md.restores or md.drops:
        if spilled is None:
            raise ValueError("the staging table spilled blocks but this layer keeps no spill "
                             "store")
        move_staged(staging_buffer, mass, spilled, md)
    n = md.num_actual_tokens
    stage_tokens(staging_buffer, key[:n], value[:n], md.token_slot, md.token_offset, mass)


@dataclass(frozen=True)
class DecodeTables:
    """What a decode launch reads for its requests, as tensors: their rows among the step's
    tokens, the block table of their sealed pages (and how many, and the body tokens of the
    last), and the table of their staged blocks (slots, tokens, how many)."""

    rows: torch.Tensor | slice
    page_table: torch.Tensor
    page_count: torch.Tensor
    page_tail: torch.Tensor
    stage_table: torch.Tensor
    stage_len: torch.Tensor
    staged_count: torch.Tensor
    staged: list[list[tuple[int, int]]]  # per request: (slot, tokens) of its staged blocks


@dataclass(frozen=True)
class LaunchKey:
    """What a step's decode launch tables depend on: the head group's page counts and whether it
    selects, the requests launched and how far their past is sealed, and the device."""

    selected: int
    guard_tokens: int
    body_tokens: int
    selects: bool
    requests: tuple[int, ...]
    sealed_by: tuple[int, ...]
    device: str


@dataclass
class StepLaunchTables:
    """One step's decode launch tables by `LaunchKey`: the layers (and head groups) of a step whose
    pages keep the same tokens launch over the same tables, so each is built once per step."""

    tables: dict[LaunchKey, DecodeTables] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tables)


def decode_tables(md: StepMetadata, fmt: PageFormat, group: HeadGroup, requests: list[int],
                  sealed_by: list[int], device) -> DecodeTables:
    """The requests' pasts (`past_segments`) as a launch's tables. Built once per step for every
    head group whose pages keep the same tokens (`md.launch_tables`): they depend on the group
    only through its page counts and whether it selects."""
    page = group.page
    key = LaunchKey(page.selected, page.guard_tokens, page.body_tokens, group.selects,
                    tuple(requests), tuple(sealed_by), str(device))
    cached = md.launch_tables.tables.get(key)
    if cached is not None:
        return cached
    starts = md.starts
    page_rows, tails, staged_rows = [], [], []
    for i, end in zip(requests, sealed_by):
        segments = past_segments(md.block_rows[i], md.request_slots[i], starts[i], end, fmt,
                                 group)
        blocks = [b for seg in segments if not seg.staged for b in seg.blocks]
        last = next((seg for seg in reversed(segments) if not seg.staged), None)
        tail = page.body_tokens if last is None else \
            last.tokens - (len(last.blocks) - 1) * page.selected - page.guard_tokens
        page_rows.append(blocks)
        tails.append(tail)
        staged_rows.append([(seg.slot, seg.tokens) for seg in segments if seg.staged])

    def int32(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    def table(entries: list[list[int]]) -> torch.Tensor:
        width = max((len(row) for row in entries), default=0)
        return int32([row + [0] * (width - len(row)) for row in entries]).reshape(
            len(entries), width)

    rows = [md.query_start[i] for i in requests]
    every = rows == list(range(len(rows)))  # the step's first tokens, in order: no gather
    tables = DecodeTables(
        rows=slice(0, len(rows)) if every else torch.tensor(rows, device=device),
        page_table=table(page_rows), page_count=int32([len(r) for r in page_rows]),
        page_tail=int32(tails), stage_table=table([[s for s, _ in r] for r in staged_rows]),
        stage_len=table([[n for _, n in r] for r in staged_rows]),
        staged_count=int32([len(r) for r in staged_rows]), staged=staged_rows)
    md.launch_tables.tables[key] = tables
    return tables


def attend_decodes(kernels: StoreKernels, pages: torch.Tensor, staging_buffer: torch.Tensor,
                   mass: torch.Tensor | None, fmt: PageFormat, group: HeadGroup,
                   query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, md: StepMetadata,
                   requests: list[int], sealed_by: list[int], scale: float,
                   output: torch.Tensor, record: bool) -> None:
    """One kernel launch for requests that each add one token this step: their past's segments
    become a block table of pages and a table of staged slots (`decode_tables`). With `record`,
    the attention mass the launch computed is added to the staged tokens that received it (the
    PyTorch path's `accumulate_mass`). Every tensor is the head group's view."""
    page = group.page
    t = decode_tables(md, fmt, group, requests, sealed_by, query.device)
    tables = PagedTables.pages(t.page_table, t.page_count, t.page_tail, page.guard_tokens,
                               page.body_tokens, page.guard_bytes, t.stage_table, t.stage_len,
                               t.staged_count)
    out, received = kernels.decode(
        query[t.rows].contiguous(), key[t.rows].contiguous(), value[t.rows].contiguous(),
        pages, tables, staging_buffer, scale, mass_reduce=fmt.gqa if record else None)
    output[t.rows] = out.to(output.dtype)
    if record:
        bs = fmt.block_size
        for r, (i, staged) in enumerate(zip(requests, t.staged)):
            for k, (slot, n) in enumerate(staged):
                mass[slot, :, :n] += received[r, :, k * bs:k * bs + n]
            first = md.query_start[i]
            mass[md.token_slot[first], :, md.token_offset[first]] += received[r, :, -1]


def attend_step(pages: torch.Tensor, staging_buffer: torch.Tensor, mass: torch.Tensor | None,
                fmt: PageFormat, layer: int, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, md: StepMetadata, scale: float, output: torch.Tensor,
                packer=None, kernels: StoreKernels | None = None) -> torch.Tensor:
    """One layer's attention for every request of the step, and the step's sealing.

    With snapkv importance (`mass` given and the layer selects), the queries first attend over
    the blocks as they were before this step (staged blocks at full precision), their attention
    mass is added to the staged tokens, the due blocks are sealed by it, and a request whose past
    holds a block sealed just now attends again over the sealed page: the Hugging Face runtime's
    order, where the window is flushed before a new token attends. Otherwise sealing comes first.
    query [n, Hq, D], key/value [n, H, D]; output [n, Hq, D] is written and returned. With
    `kernels` (a CUDA engine and a loaded artifact) one-token requests attend in the compiled
    paged decode kernel and sealing packs with the compiled pack kernels. Each head group of the
    layer (`PageFormat.head_groups`: all its heads unless `adapt heads` gives them pages of
    their own) does all of this on its own, over views of its KV heads and their query heads."""
    heads = staging_buffer.shape[1]
    per_kv = query.shape[1] // heads
    for group in fmt.head_groups(layer, heads):
        kv = group.heads
        q = slice(group.first * per_kv, (group.first + group.count) * per_kv)
        _attend_heads(group_pages(pages, fmt, group), staging_buffer[:, kv],
                      None if mass is None else mass[:, kv], fmt, group, query[:, q],
                      key[:, kv], value[:, kv], md, scale, output[:, q], packer, kernels)
    return output


def _attend_heads(pages: torch.Tensor, staging_buffer: torch.Tensor, mass: torch.Tensor | None,
                  fmt: PageFormat, group: HeadGroup, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, md: StepMetadata, scale: float, output: torch.Tensor,
                  packer, kernels: StoreKernels | None) -> None:
    """`attend_step` in one head group: every tensor is the group's view."""
    scored = mass is not None and group.selects
    starts = md.starts
    if kernels is not None and packer is None:
        packer = kernels.packer

    def seal() -> None:
        seal_heads(pages, staging_buffer, md.seal_blocks, md.seal_slots, fmt, group, packer,
                    mass, md.seal_groups)

    def attend_requests(requests: list[int], sealed_by: list[int], record: bool) -> None:
        decodes = [] if kernels is None else \
            [n for n, i in enumerate(requests) if md.query_start[i + 1] - md.query_start[i] == 1]
        if decodes:
            attend_decodes(kernels, pages, staging_buffer, mass, fmt, group, query, key, value,
                           md, [requests[n] for n in decodes], [sealed_by[n] for n in decodes],
                           scale, output, record)
        chosen = set(decodes)
        for n, i in enumerate(requests):
            if n not in chosen:
                attend_request(i, sealed_by[n], record)

    def attend_request(i: int, sealed_by: int, record: bool) -> None:
        first, last = md.query_start[i], md.query_start[i + 1]
        past = cached_tokens(pages, staging_buffer, md.block_rows[i], md.request_slots[i],
                             starts[i], sealed_by, fmt, group, exact=not record,
                             dtype=chunk_dtype(query[first:last], record))
        result = attend(query[first:last], past.keys, past.values, key[first:last],
                        value[first:last], scale, mass_reduce=fmt.gqa if record else None,
                        observe=fmt.observe)
        if record:
            result, received = result
            accumulate_mass(mass, past, md.token_slot[first:last], md.token_offset[first:last],
                            received)
        output[first:last] = result.to(output.dtype)

    everyone = list(range(len(md.seq_lens)))
    if not scored:
        seal()
        attend_requests(everyone, md.seq_lens, record=False)
        return
    attend_requests(everyone, starts, record=True)
    seal()
    again = [i for i in everyone if md.past_sealed_now[i]]
    attend_requests(again, [md.seq_lens[i] for i in again], record=False)
