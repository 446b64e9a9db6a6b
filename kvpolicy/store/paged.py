"""The compressed store: a compiled policy's KV cache in pages, as plain functions of tensors,
engine-independent — vLLM's backend and the Hugging Face runtime's paged cache are adapters over
it (neither imports the other, and neither re-states a rule that lives here).

The page plan (`kvpolicy.plan.pages`) says which blocks are sealed and how many tokens each
sealed page keeps per KV head. Until a block seals, its tokens live at full precision in a
staging buffer (`staging.StagingTable` decides which slot). The store's rules:
- importance (snapkv): the attention mass a staged token receives from the last `observe`
  queries of every step that sees it (a prompt prefilled in one step: SnapKV's observation
  window), reduced over the query heads of its KV group as the policy says; keynorm and recent
  need no mass;
- selection: the blocks a request seals in one step are selected *together*: their tokens are
  pooled (snapkv) and ranked as one span, the `selected x g` most important kept (ties: the
  earlier token), the most important `guard_tokens x g` of those are guards; guards and body
  tokens are packed densely in position order into the g pages, each page holding its plan's
  count. A needle's block can keep more than its share; the bytes are the per-block plan's;
- sealing happens after a step's queries have attended (their mass counts), and a request whose
  past holds a block sealed in this step attends again over the sealed pages.
docs/vllm.md describes the design and what it cannot do.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvpolicy.plan.pages import HeadGroup, PageFormat, UnsupportedConfiguration, paged_refusals
from kvpolicy.runtime import reference as R
from kvpolicy.store import staging

QUERY_CHUNK = 512  # queries per softmax when attention mass is recorded (bounds its memory)


def new_staging(fmt: PageFormat, slots: int, heads: int, device=None):
    """One layer's staging: (tokens [slots, H, block_size, 2, D] in the page plan's cache dtype,
    whatever the engine computes in; attention mass [slots, H, block_size] fp32, or None when
    no importance needs it)."""
    tokens = torch.zeros(slots, heads, fmt.block_size, 2, fmt.head_dim,
                         dtype=R.torch_dtype(fmt.staging_dtype), device=device)
    mass = torch.zeros(slots, heads, fmt.block_size, device=device) if fmt.needs_mass else None
    return tokens, mass


@dataclass(frozen=True)
class StoreKernels:
    """One layer's compiled kernels as the store calls them: `decode`, one call for every
    one-token request of a step over their pages (through the block table), staged blocks and
    new tokens, with `runtime.launch.paged_decode`'s arguments after the modules and its results
    (out, attention mass), and `packer`, the page layouts' pack kernels (None: the reference
    packs). On a GPU both are the artifact's Triton kernels (`kernels_for`); on CPU cores the
    decode is the same spec's C kernel (`cpu_kernels_for`). Without any (`None`) the store runs
    its PyTorch path. The launch's attention mass feeds snapkv selection either way. Prompt
    chunks (more than one new token) attend with PyTorch."""

    decode: Callable
    packer: Callable | None = None


def _paged_roles(compiled, layer: int):
    """`layer`'s kernel roles, which must include the paged ones: an artifact of a policy no
    paged engine runs has none (its start-up refusal comes first; this is the backstop)."""
    roles = compiled.layers[layer]
    if roles.paged_decode is None:
        raise ValueError(f"the artifact of {compiled.policy.name!r} has no paged kernels: "
                         + "; ".join(paged_refusals(compiled.policy)))
    return roles


def kernels_for(compiled, layer: int, num_splits: int | None = None) -> StoreKernels:
    """The store's Triton kernels for `layer` from a loaded artifact (`kvpolicy.load`)."""
    from kvpolicy.runtime import launch
    _paged_roles(compiled, layer)
    modules = compiled.layer_kernels(layer)
    splits = num_splits or compiled.launch.get("num_splits", 4)
    return StoreKernels(decode=functools.partial(launch.paged_decode, modules["paged_decode"],
                                                 modules["combine"], num_splits=splits),
                        packer=launch.packer(compiled.kernels))


def cpu_kernels_for(compiled, layer: int) -> StoreKernels:
    """The store's CPU kernels for `layer`: the C sources the artifact holds for its paged decode
    and page pack specs (`kvpolicy.runtime.cpu`), compiled on first use. Raises
    runtime.cpu.CpuKernelError when they cannot be compiled."""
    from kvpolicy.runtime import cpu
    roles = _paged_roles(compiled, layer)
    library = cpu.build(compiled.cpu_source(roles.paged_decode))
    packs = {uri: compiled.cpu_source(uri) for uri in (roles.pack_page_body,
                                                       roles.pack_page_guard) if uri}
    for source in packs.values():
        cpu.build(source, "pack")  # now, so that a compile error is a start-up error
    return StoreKernels(decode=functools.partial(cpu.paged_decode, library),
                        packer=cpu.packer(packs))


def _layer_run(pages: torch.Tensor, fmt: PageFormat, layer: int) -> torch.Tensor:
    """`layer`'s pages of every block in vLLM's cache, [num_blocks, layer_run bytes] (a view:
    writes land in the cache). `pages` is the layer's own view [num_blocks, H, 1, page_bytes] of
    the cache that all layers share block by block (BLHNC: block stride = layers x H x
    page_bytes, layer l's view starting l x H x page_bytes into each block; under pipeline
    parallelism the layers are this stage's, `fmt.held`)."""
    num_blocks, heads = pages.shape[0], pages.shape[1]
    run = len(fmt.held) * heads * fmt.page_bytes
    before = (layer - fmt.held.start) * heads * fmt.page_bytes  # the held layers before it
    if pages.stride(0) != run or pages.storage_offset() < before:
        raise UnsupportedConfiguration([
            f"layer {layer}'s KV cache is not laid out block-outermost (block stride "
            f"{pages.stride(0)} bytes, expected {run}): the KV cache layout must be BLHNC "
            "(unset VLLM_KV_CACHE_LAYOUT)"])
    base = torch.as_strided(pages, (num_blocks, run), (run, 1),
                            pages.storage_offset() - before)
    begin = fmt.layer_offset(layer, heads)
    return base[:, begin:begin + fmt.layer_run(layer, heads)]


def group_pages(pages: torch.Tensor, fmt: PageFormat, group: HeadGroup) -> torch.Tensor:
    """A head group's pages, [num_blocks, its heads, page bytes] (a view into vLLM's cache;
    `pages`: the layer's view, as `_layer_run` takes it)."""
    run = _layer_run(pages, fmt, group.layer)
    size = group.count * group.page.nbytes
    return run[:, group.offset:group.offset + size].view(run.shape[0], group.count,
                                                         group.page.nbytes)


def layer_pages(pages: torch.Tensor, fmt: PageFormat, layer: int) -> torch.Tensor:
    """`layer`'s pages in vLLM's cache, [num_blocks, H, layer_bytes] (a view: writes land in the
    cache), for a layer whose KV heads keep the same tokens (otherwise: `group_pages`)."""
    groups = fmt.head_groups(layer, pages.shape[1])
    if len(groups) != 1:
        raise ValueError(f"layer {layer}'s KV heads have pages of their own sizes "
                         "(adapt heads): read them by head group (group_pages)")
    return group_pages(pages, fmt, groups[0])


# ---- writing --------------------------------------------------------------------------------

def stage_tokens(staging: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 stage_slot: torch.Tensor, offset: torch.Tensor,
                 mass: torch.Tensor | None = None) -> None:
    """Writes new tokens into the full-precision staging buffer (and zeroes their attention mass).

    staging [slots, H, block_size, 2, D]; key, value [n, H, D]; stage_slot, offset [n] int64
    (the staging slot of each token's block and its offset in the block); mass [slots, H,
    block_size] fp32 or None."""
    staging[stage_slot, :, offset, 0] = key.to(staging.dtype)
    staging[stage_slot, :, offset, 1] = value.to(staging.dtype)
    if mass is not None:
        mass[stage_slot, :, offset] = 0.0


def group_importance(fmt: PageFormat, tokens: torch.Tensor,
                     mass: torch.Tensor | None) -> torch.Tensor:
    """Importance of the tokens of g consecutive blocks of one request, as one span, higher kept
    first: tokens [H, g * bs, 2, D] (staged keys and values), mass [H, g * bs] (snapkv: the
    attention received while staged) → [H, g * bs]."""
    heads, n = tokens.shape[0], tokens.shape[1]
    if fmt.score == "keynorm":
        return R.keynorm_importance(tokens[:, :, 0])
    if fmt.score == "recent":
        return R.recent_importance(1, heads, n)[0]
    return R.pool_scores(mass.float(), fmt.pool, fmt.pool_kernel)


def select_tokens(importance: torch.Tensor, selected: int,
                  guards: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The offsets a group of sealed blocks keeps: (guards, body), [H, guards] and
    [H, selected - guards], each in ascending order. The `selected` most important tokens are
    kept (ties: the earlier token); the most important `guards` of them are the guards."""
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)
    keep = order[..., :selected]
    return keep[..., :guards].sort(-1).values, keep[..., guards:].sort(-1).values


def _seal_group(pages: torch.Tensor, staging_buffer: torch.Tensor, blocks: torch.Tensor,
                slots: torch.Tensor, fmt: PageFormat, group: HeadGroup, packer, mass) -> None:
    """One request's blocks sealed in one step (consecutive, in position order), in one head
    group: pages, staging_buffer and mass are the group's views."""
    page = group.page
    g, heads, d, bs = blocks.numel(), group.count, fmt.head_dim, fmt.block_size
    tokens = staging_buffer[slots]  # [g, H, bs, 2, D]
    if not group.selects:  # every token, in order, block by block
        regions = [(tokens, page.body)]
    else:
        span = tokens.permute(1, 0, 2, 3, 4).reshape(heads, g * bs, 2, d)
        received = None if mass is None else mass[slots].permute(1, 0, 2).reshape(heads, g * bs)
        importance = group_importance(fmt, span, received)
        regions = []
        chosen = select_tokens(importance, g * page.selected, g * page.guard_tokens)
        for offsets, per_page, layout in zip(chosen, (page.guard_tokens, page.body_tokens),
                                             (page.guard, page.body)):
            if per_page:  # dense: page i holds the i-th run of per_page kept tokens
                picked = span.gather(1, offsets[..., None, None].expand(-1, -1, 2, d))
                regions.append((picked.reshape(heads, g, per_page, 2, d).transpose(0, 1),
                                layout))
    packed = []
    for chosen_tokens, layout in regions:  # [g, H, n, 2, D]; B divides n
        n = chosen_tokens.shape[2]
        part = packer(chosen_tokens[..., 0, :].reshape(g * heads * n, d),
                      chosen_tokens[..., 1, :].reshape(g * heads * n, d), None, layout)
        packed.append(part.reshape(g, heads, -1))
    if packed:  # (a head that keeps none of its blocks' tokens has empty pages)
        pages[blocks] = torch.cat(packed, -1)


def seal_blocks(pages: torch.Tensor, staging_buffer: torch.Tensor, blocks: torch.Tensor,
                slots: torch.Tensor, fmt: PageFormat, layer: int, packer=None,
                mass: torch.Tensor | None = None, groups: list[int] | None = None) -> None:
    """Selects, quantizes and packs whole staged blocks into their pages.

    pages: the layer's view of the uint8 cache (as vLLM hands it); blocks, slots [m] int64 (the
    physical block and the staging slot holding its tokens), grouped by request: `groups` gives
    how many consecutive entries each request sealed (default: each block alone); mass: the
    layer's attention-mass buffer (snapkv importance). `packer(keys, values, positions, layout)`
    defaults to the PyTorch reference; a compiled pack kernel has the same signature."""
    for group in fmt.head_groups(layer, pages.shape[1]):
        _seal_heads(group_pages(pages, fmt, group), staging_buffer[:, group.heads], blocks,
                    slots, fmt, group, packer, None if mass is None else mass[:, group.heads],
                    groups)


def _seal_heads(pages: torch.Tensor, staging_buffer: torch.Tensor, blocks: torch.Tensor,
                slots: torch.Tensor, fmt: PageFormat, group: HeadGroup, packer,
                mass: torch.Tensor | None, groups: list[int] | None) -> None:
    """`seal_blocks` in one head group (pages, staging_buffer and mass: the group's views)."""
    if blocks.numel() == 0:
        return
    packer = packer or R.pack_blocks
    if not group.selects:  # block by block, whoever sealed them: one call for the step
        _seal_group(pages, staging_buffer, blocks, slots, fmt, group, packer, mass)
        return
    first = 0
    for count in (groups if groups is not None else [1] * blocks.numel()):
        if count:
            part = slice(first, first + count)
            _seal_group(pages, staging_buffer, blocks[part], slots[part], fmt, group, packer,
                        mass)
        first += count


# ---- reading --------------------------------------------------------------------------------

def unpack_pages(pages: torch.Tensor, blocks: torch.Tensor, fmt: PageFormat,
                 group: HeadGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """A head group's sealed pages (`group_pages`) → (keys, values) fp32 [its heads,
    len(blocks) * selected, D]: each block's guards then its body (attention over the past does
    not depend on order)."""
    page = group.page
    m, heads = blocks.numel(), group.count
    shape = (heads, m * page.selected, fmt.head_dim)
    if not page.selected:
        empty = torch.zeros(shape, device=pages.device)
        return empty, empty
    raw = pages[blocks].permute(1, 0, 2)  # [H, m, nbytes]
    keys, values = [], []
    for layout, count, begin in ((page.guard, page.guard_tokens, 0),
                                 (page.body, page.body_tokens, page.guard_bytes)):
        if not count:
            continue
        per_page = count // layout.tokens
        section = raw[..., begin:begin + per_page * layout.nbytes]
        flat = section.reshape(heads * m * per_page, layout.nbytes)
        k, v, _ = R.unpack_blocks(flat, layout, heads * m * count)
        keys.append(k.reshape(heads, m, count, fmt.head_dim))
        values.append(v.reshape(heads, m, count, fmt.head_dim))
    return torch.cat(keys, 2).reshape(shape), torch.cat(values, 2).reshape(shape)


@dataclass
class Past:
    """A chunk's past as attention sees it: keys, values [H, p, D] (fp32, or 16-bit:
    `cached_tokens`), and where the staged tokens among them came from: (staging slot, first
    index in the p tokens, count)."""

    keys: torch.Tensor
    values: torch.Tensor
    staged: list[tuple[int, int, int]]


@dataclass(frozen=True)
class Segment:
    """A run of a chunk's past, in position order: sealed pages (`blocks`, physical, read
    through the block table; `tokens` of them, fewer than the pages keep only when a layer that
    keeps every token in order holds the chunk's own tokens in its last page) or one staged block
    (`slot`, its first `tokens` tokens)."""

    tokens: int
    blocks: tuple[int, ...] = ()
    slot: int = -1

    @property
    def staged(self) -> bool:
        return self.slot >= 0


def past_segments(block_row: list[int], stage_slots: list[int], start: int, sealed_by: int,
                  fmt: PageFormat, group: HeadGroup) -> list[Segment]:
    """Where the past of a chunk that starts at token `start` is read from: blocks sealed by the
    time the sequence had `sealed_by` tokens (the step's start, before this step seals; or its
    end, after) from their pages, the others from staging, up to token `start`. block_row: the
    sequence's physical blocks; stage_slots: the staging slot of each (-1 when sealed in an
    earlier step). A sealed block that also holds tokens of the chunk (window 0, or chunked
    prefill) is read from its page only when the page keeps every token in order; when the
    layer selects, the blocks sealed in this step were selected together, so if any of them
    reaches into the chunk, their pages may hold the chunk's own tokens: all of them are read
    from their staged copies instead. Heads whose pages keep no tokens read no pages."""
    bs = fmt.block_size
    selects = group.selects
    selected = group.page.selected
    straddles = False
    if selects:
        sealed_now = [j for j in range(len(block_row))
                      if fmt.sealed(j, sealed_by) and not fmt.sealed(j, start)]
        straddles = any((j + 1) * bs > start for j in sealed_now)

    def from_page(j: int) -> bool:
        if not fmt.sealed(j, sealed_by):
            return False
        return not (straddles and not fmt.sealed(j, start))

    segments = []
    j, needed = 0, -(-start // bs)
    while j < needed:
        if from_page(j):
            run = j
            while run < needed and from_page(run):
                run += 1
            tokens = (run - j) * selected
            if not selects:  # every token in order: cut at the chunk
                tokens = min(tokens, start - j * bs)
            if tokens:
                segments.append(Segment(tokens, blocks=tuple(block_row[j:run])))
            j = run
        else:
            assert stage_slots[j] >= 0, f"block {j} is neither sealed nor staged"
            segments.append(Segment(min(bs, start - j * bs), slot=stage_slots[j]))
            j += 1
    return segments


def cached_tokens(pages: torch.Tensor, staging: torch.Tensor, block_row: list[int],
                  stage_slots: list[int], start: int, sealed_by: int, fmt: PageFormat,
                  group: HeadGroup, exact: bool = False, dtype: torch.dtype | None = None) -> Past:
    """The past of a chunk that starts at token `start` (`past_segments`) in one head group
    (pages, staging: the group's views), dequantized: the
    PyTorch path. fp32; with `dtype` (the 16-bit dtype a prompt chunk attends in, `chunk_dtype`)
    in that dtype, page tokens dequantized then rounded to it; or with `exact`, when every token of
    it is staged, in the staging's own 16-bit dtype (nothing converted)."""
    segments = past_segments(block_row, stage_slots, start, sealed_by, fmt, group)
    if dtype is None:
        dtype = staging.dtype if exact and all(segment.staged for segment in segments) \
            else torch.float32
    keys, values, staged = [], [], []
    length = 0
    for segment in segments:
        if segment.staged:
            n = segment.tokens
            k = staging[segment.slot, :, :n, 0]
            v = staging[segment.slot, :, :n, 1]
            staged.append((segment.slot, length, n))
        else:
            k, v = unpack_pages(pages, torch.tensor(segment.blocks), fmt, group)
            k, v = k[:, :segment.tokens], v[:, :segment.tokens]
        keys.append(k.to(dtype))
        values.append(v.to(dtype))
        length += k.shape[1]
    if not keys:
        empty = torch.zeros(group.count, 0, fmt.head_dim, device=pages.device, dtype=dtype)
        return Past(empty, empty, [])
    return Past(torch.cat(keys, 1), torch.cat(values, 1), staged)


def chunk_dtype(query: torch.Tensor, record: bool) -> torch.dtype | None:
    """The dtype a chunk of queries [m, Hq, D] attends in when it is a prompt chunk (m > 1) with
    no attention mass to record and the engine computes in 16 bits: the engine's (as vLLM's own
    attention does); None when the rule does not apply (`attend`)."""
    sixteen = query.dtype in (torch.float16, torch.bfloat16)
    return query.dtype if sixteen and query.shape[0] > 1 and not record else None


def attend(query: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor,
           new_keys: torch.Tensor, new_values: torch.Tensor, scale: float,
           mass_reduce: str | None = None, observe: int | None = None):
    """Causal attention of a chunk of new tokens over the cached past and themselves.

    query [m, Hq, D]; past_* [H, p, D] (as cached); new_* [m, H, D] (full precision, as the
    model produced them); → [m, Hq, D] fp32, in PyTorch's flash kernel. GQA: query head h reads
    KV head h // (Hq / H), and K and V are never copied per query head (the kernel's own GQA; the
    mass stacks a KV head's queries as rows, row g * m + i: group member g, token i). With
    `mass_reduce` (mean / max / sum over a KV
    head's query heads) also returns the attention mass each of the p + m keys received from
    the chunk's last `observe` queries (all of them when None), [H, p + m]. With no mass to
    record and a 16-bit query, a prompt chunk (m > 1) attends in the query's dtype — PyTorch's
    flash kernel, which accumulates in fp32 — as vLLM's own attention does, a past dequantized
    from pages rounded to that dtype as a 16-bit cache would hold it; so does a single token
    whose past is all staged (`cached_tokens(exact=True)`: nothing is rounded). The result is
    then in the query's dtype; everything else attends and returns in fp32."""
    m, q_heads, head_dim = query.shape
    kv_heads = past_keys.shape[0]
    group = q_heads // kv_heads
    p = past_keys.shape[1]
    device = query.device
    all_staged = mass_reduce is None and query.dtype in (torch.float16, torch.bfloat16) and \
        new_keys.dtype == past_keys.dtype == query.dtype  # e.g. a token over a staged-only past
    causal = None if p == 0 or m == 1 else \
        torch.arange(p + m, device=device)[None, :] <= (p + torch.arange(m, device=device))[:, None]

    def cat(past: torch.Tensor, new: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([past.to(dtype), new.to(dtype).transpose(0, 1)], 1)  # [H, p + m, D]

    def flash(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # [m, Hq, D]
        # 4-D with a mask row per token: PyTorch's flash kernel (a 3-D [H, group * m, D] query
        # takes the math kernel, ~3.7x slower for 3k tokens over a 3k past in fp32)
        return torch.nn.functional.scaled_dot_product_attention(
            query.to(keys.dtype).transpose(0, 1)[None], keys[None], values[None],
            attn_mask=causal, is_causal=p == 0 and m > 1, scale=scale,
            enable_gqa=True)[0].transpose(0, 1)

    if chunk_dtype(query, mass_reduce is not None) is not None or all_staged:
        dtype = query.dtype
        return flash(cat(past_keys, new_keys, dtype), cat(past_values, new_values, dtype))
    keys = cat(past_keys, new_keys, torch.float32)  # the mass below reads them too
    out = flash(keys, cat(past_values, new_values, torch.float32))
    if mass_reduce is None:
        return out
    q = query.float().reshape(m, kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q = q.reshape(kv_heads, group * m, head_dim)  # row g * m + i: group member g, token i

    def allowed(rows: torch.Tensor) -> torch.Tensor:  # [rows, p + m]: causal for token row % m
        return torch.arange(p + m, device=device)[None, :] <= (p + rows % m)[:, None]

    watched = m if observe is None else min(observe, m)
    rows = (torch.arange(group, device=device)[:, None] * m
            + torch.arange(m - watched, m, device=device)[None, :]).flatten()
    mass = torch.zeros(kv_heads, group, p + m, device=device)
    for first in range(0, rows.numel(), QUERY_CHUNK):
        chunk = rows[first:first + QUERY_CHUNK]
        logits = (q[:, chunk] @ keys.transpose(1, 2)) * scale
        probs = torch.softmax(logits.masked_fill(~allowed(chunk), -math.inf), dim=-1)
        mass.index_add_(1, chunk // m, probs)
    reduced = {"mean": mass.mean(1), "max": mass.amax(1), "sum": mass.sum(1)}
    return out, reduced[mass_reduce]


def accumulate_mass(mass: torch.Tensor, past: Past, new_slots: torch.Tensor,
                    new_offsets: torch.Tensor, received: torch.Tensor) -> None:
    """Adds the attention mass a chunk's queries gave (received [H, p + m], from `attend`) to the
    staged tokens that received it: the past's staged tokens and the chunk's own (new_slots,
    new_offsets [m]). Sealed pages' tokens need none: their selection is done."""
    for slot, begin, count in past.staged:
        mass[slot, :, :count] += received[:, begin:begin + count]
    p = past.keys.shape[1]
    mass[new_slots, :, new_offsets] += received[:, p:].transpose(0, 1)


# ---- one engine step (what the backend's Impl does per layer) ----------------------------------

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
    # decode_tables' per-step cache: the layers of a step share their launch tables
    decode_tables: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def starts(self) -> list[int]:
        return [n - (self.query_start[i + 1] - self.query_start[i])
                for i, n in enumerate(self.seq_lens)]


def step_metadata(table: staging.StagingTable, query_start: list[int], seq_lens: list[int],
                  block_rows: list[list[int]], slot_mapping: torch.Tensor) -> StepMetadata:
    """Plans the step in the staging table; slot_mapping [n]: each new token's cache slot
    (physical block * block_size + offset), as vLLM gives it."""
    bs = table.block_size
    requests = [staging.RequestStep(row, end - (query_start[i + 1] - query_start[i]), end)
                for i, (row, end) in enumerate(zip(block_rows, seq_lens))]
    plan = table.plan(requests)
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


def decode_tables(md: StepMetadata, fmt: PageFormat, group: HeadGroup, requests: list[int],
                  sealed_by: list[int], device) -> DecodeTables:
    """The requests' pasts (`past_segments`) as a launch's tables. Built once per step for every
    head group whose pages keep the same tokens (`md.decode_tables`): they depend on the group
    only through its page counts and whether it selects."""
    page = group.page
    key = (page.selected, page.guard_tokens, page.body_tokens, group.selects,
           tuple(requests), tuple(sealed_by), str(device))
    cached = md.decode_tables.get(key)
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
    md.decode_tables[key] = tables
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
    out, received = kernels.decode(
        query[t.rows].contiguous(), key[t.rows].contiguous(), value[t.rows].contiguous(),
        pages, t.page_table, t.page_count, t.page_tail,
        page.guard_tokens, page.body_tokens, staging_buffer, t.stage_table, t.stage_len,
        t.staged_count, scale, mass_reduce=fmt.gqa if record else None)
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
        _seal_heads(pages, staging_buffer, md.seal_blocks, md.seal_slots, fmt, group, packer,
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
