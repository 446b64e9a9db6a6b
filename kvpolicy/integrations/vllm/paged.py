"""A compiled policy in vLLM's paged KV cache: the page format and the compute, as plain
functions of tensors (no vLLM import; the GPU machine, which has no vLLM, can test them).

A vLLM block holds `block_size` tokens of every KV head of a layer. A block is *sealed* once it
has left the policy's full-precision window: block j is sealed when the sequence reaches
(j + 1) * block_size + window tokens. Until then its tokens live at full precision in a staging
buffer outside vLLM's pool (`staging.StagingTable` decides which slot); the blocks holding the
policy's sinks never seal. Sealing keeps `selected` of the block's tokens per KV head, chosen by
importance (stage 2: retention; all of them when the policy evicts nothing), and packs them into
the block's page: the most important `guard_tokens` at the guard's bits, then the rest in the
layer's body format (`kvpolicy.format.BlockLayout`, whole format blocks of B tokens, no
positions: keys carry RoPE already, and attention over the past does not depend on order).
The page, and so vLLM's page size, is the selected tokens' packed bytes: evicted tokens never
take pool memory.

With block_size equal to the format's unit B and nothing evicted this is exactly the Hugging
Face runtime's rule (the window holds between `window` and `window + B - 1` tokens), so both
runtimes quantize the same tokens the same way. docs/vllm.md describes the design and what it
cannot do.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from kvpolicy.format import DTYPE_BYTES, BlockLayout, block_tokens
from kvpolicy.integrations.vllm import staging
from kvpolicy.lang.ir import Policy
from kvpolicy.models import ModelShape
from kvpolicy.plan.planner import block_layouts, block_retain_ratios, layer_formats
from kvpolicy.runtime import reference as R

QUERY_CHUNK = 512  # queries per softmax when attention mass is recorded (bounds its memory)


class UnsupportedConfiguration(ValueError):
    """The policy, model or engine settings cannot run in the vLLM backend; lists every reason."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__("kvpolicy's vLLM backend cannot run this configuration:\n"
                         + "\n".join(f"  - {r}" for r in self.reasons))


@dataclass(frozen=True)
class LayerPage:
    """One layer's page for one KV head of one block: `guard_tokens` of the block's tokens at the
    guard's bits, then `body_tokens` in the body format; the block's other tokens are evicted."""

    guard: BlockLayout
    body: BlockLayout
    guard_tokens: int
    body_tokens: int

    @property
    def selected(self) -> int:
        return self.guard_tokens + self.body_tokens

    @property
    def guard_bytes(self) -> int:
        return self.guard_tokens // self.guard.tokens * self.guard.nbytes

    @property
    def nbytes(self) -> int:
        return self.guard_bytes + self.body_tokens // self.body.tokens * self.body.nbytes


@dataclass(frozen=True)
class PageFormat:
    """How a model's pages are laid out. vLLM gives every layer the same page size, but lays a
    block's pages of all layers side by side (the block-outermost BLHNC layout the backend asks
    for), so the backend treats them as one run of `layers x H x page_bytes` bytes per block in
    which layer l's pages ([H, layer_bytes(l)]) sit at `layer_offset(l)`: a layer that keeps more
    tokens uses bytes a layer keeping fewer leaves free, and nothing pads to the largest layer.
    page_bytes is the mean over layers, rounded up."""

    block_size: int  # vLLM tokens per block
    window: int  # the policy's full-precision window (tokens)
    sink_blocks: int  # leading blocks that hold the policy's sinks: staged, never sealed
    kv_heads: int
    head_dim: int
    dtype_bytes: int  # the model's KV dtype (staging and the baseline page)
    layers: tuple[LayerPage, ...]  # per model layer
    score: str = "snapkv"  # the policy's importance: snapkv (attention mass), keynorm, recent
    pool: str = "max"  # snapkv's pooling along the block, and its kernel
    pool_kernel: int = 7
    gqa: str = "mean"  # how a KV head's query heads' attention mass is reduced

    def layer_bytes(self, layer: int) -> int:
        """Bytes one KV head of one block needs in `layer`."""
        return self.layers[layer].nbytes

    def layer_offset(self, layer: int, heads: int) -> int:
        """Where `layer`'s pages of a block start in the block's run of bytes (`heads`: the KV
        heads this rank holds)."""
        return heads * sum(page.nbytes for page in self.layers[:layer])

    def selects(self, layer: int) -> bool:
        """Does sealing choose tokens by importance (eviction or guards) in `layer`?"""
        page = self.layers[layer]
        return page.selected < self.block_size or page.guard_tokens > 0

    @property
    def needs_mass(self) -> bool:
        """Is attention mass recorded while tokens are staged (snapkv importance in use)?"""
        return self.score == "snapkv" and any(self.selects(i) for i in range(len(self.layers)))

    @property
    def page_bytes(self) -> int:
        """state_content_bytes published to vLLM: one KV head's share of a block, per layer
        (the mean over layers, rounded up)."""
        return -(-sum(page.nbytes for page in self.layers) // len(self.layers))

    @property
    def padding_bytes(self) -> int:
        """Bytes per block (all layers and heads) left unused by the rounding of page_bytes."""
        return self.kv_heads * (len(self.layers) * self.page_bytes
                                - sum(page.nbytes for page in self.layers))

    @property
    def baseline_page_bytes(self) -> int:
        """What vLLM's own page for one KV head holds: block_size keys and values, 16-bit."""
        return self.block_size * 2 * self.head_dim * self.dtype_bytes

    @property
    def capacity_ratio(self) -> float:
        """Tokens that fit in the same pool memory, relative to the 16-bit cache (exact)."""
        return self.baseline_page_bytes / self.page_bytes

    def staging_bytes(self, slots: int) -> int:
        """Full-precision staging outside the pool, all layers: slots x layers x heads x block,
        and the fp32 attention mass of staged tokens when snapkv importance is in use."""
        per_slot = self.baseline_page_bytes + (self.block_size * 4 if self.needs_mass else 0)
        return slots * len(self.layers) * per_slot * self.kv_heads

    def sealed(self, block_index: int, seq_len: int) -> bool:
        """Is block `block_index` of a sequence of `seq_len` tokens packed in its page?"""
        return staging.sealed(block_index, seq_len, self.block_size, self.window,
                              self.sink_blocks)

    def to_json(self) -> dict:
        return {"block_size": self.block_size, "window": self.window,
                "sink_blocks": self.sink_blocks,
                "selected_tokens_per_block": [p.selected for p in self.layers],
                "guard_tokens_per_block": [p.guard_tokens for p in self.layers],
                "page_bytes_per_kv_head": self.page_bytes,
                "baseline_page_bytes_per_kv_head": self.baseline_page_bytes,
                "capacity_ratio": self.capacity_ratio,
                "padding_bytes_per_block": self.padding_bytes}


def policy_notes(policy: Policy, block_size: int) -> list[str]:
    """Where the pages realise the policy differently from the Hugging Face runtime (printed at
    start-up; docs/vllm.md explains each)."""
    notes = []
    if policy.evicts:
        notes.append("retention per sealed block: each layer keeps its retain ratio of every "
                     f"sealed {block_size}-token block (rounded up to whole format blocks); the "
                     "sinks' blocks and the window are kept on top of it")
        if policy.score.method == "snapkv":
            notes.append("importance = the attention mass a token received from every query "
                         "while it was staged (at least the window's worth), not only the "
                         f"last {policy.score.observe} queries")
    if policy.adapt is not None and policy.evicts:
        notes.append("adapt: budgets follow the per-layer schedule; a page has one size, so "
                     "there is no redistribution across heads or layers by attention mass")
    if policy.cluster is not None and policy.evicts:
        notes.append(f"cluster evicted k {policy.cluster.k}: no centroids in pages; evicted "
                     "tokens are dropped")
    if policy.sinks:
        notes.append(f"keep sinks {policy.sinks}: the first "
                     f"{math.ceil(policy.sinks / block_size) * block_size} tokens (whole "
                     "blocks) stay at full precision in staging")
    return notes


def page_format(policy: Policy, model: ModelShape, block_size: int,
                dtype_bytes: int | None = None) -> PageFormat:
    """The page format of `policy` on `model` with vLLM blocks of `block_size` tokens; raises
    UnsupportedConfiguration listing every reason it cannot be built."""
    reasons = []
    pages = []
    ratios = block_retain_ratios(policy, model)
    for index, (keys, values, guard) in enumerate(layer_formats(policy, model)):
        unit = block_tokens(keys, values, model.head_dim, model.kv_dtype, positions=False)
        if block_size % unit:
            reasons.append(f"layer {index}: block size {block_size} is not a multiple of the "
                           f"format's {unit}-token unit (per-channel groups need whole blocks; "
                           f"use --block-size {unit} or a multiple)")
            continue
        selected = block_size
        if ratios[index] < 1.0:
            selected = min(block_size, unit * max(1, math.ceil(ratios[index] * block_size / unit)))
        guard_tokens = 0
        if guard is not None and guard.fraction > 0:
            guard_tokens = min(selected, unit * math.floor(guard.fraction * selected / unit + 0.5))
        guard_layout, body_layout = block_layouts(policy, model, keys, values, guard,
                                                  positions=False)
        pages.append(LayerPage(guard=guard_layout, body=body_layout, guard_tokens=guard_tokens,
                               body_tokens=selected - guard_tokens))
    if reasons:
        raise UnsupportedConfiguration(sorted(set(reasons), key=reasons.index))
    score = policy.score
    return PageFormat(block_size=block_size, window=policy.window,
                      sink_blocks=math.ceil(policy.sinks / block_size),
                      kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                      dtype_bytes=dtype_bytes or DTYPE_BYTES[model.kv_dtype],
                      layers=tuple(pages), score=score.method, pool=score.pool,
                      pool_kernel=score.pool_kernel, gqa=score.gqa)


def layer_pages(pages: torch.Tensor, fmt: PageFormat, layer: int) -> torch.Tensor:
    """`layer`'s pages in vLLM's cache, [num_blocks, H, layer_bytes] (a view: writes land in the
    cache). `pages` is the layer's own view [num_blocks, H, 1, page_bytes] of the cache that all
    layers share block by block (BLHNC: block stride = layers x H x page_bytes, layer l's view
    starting l x H x page_bytes into each block)."""
    num_blocks, heads = pages.shape[0], pages.shape[1]
    run = len(fmt.layers) * heads * fmt.page_bytes
    if pages.stride(0) != run or pages.storage_offset() < layer * heads * fmt.page_bytes:
        raise UnsupportedConfiguration([
            f"layer {layer}'s KV cache is not laid out block-outermost (block stride "
            f"{pages.stride(0)} bytes, expected {run}): the KV cache layout must be BLHNC "
            "(unset VLLM_KV_CACHE_LAYOUT)"])
    base = torch.as_strided(pages, (num_blocks, run), (run, 1),
                            pages.storage_offset() - layer * heads * fmt.page_bytes)
    begin, size = fmt.layer_offset(layer, heads), fmt.layer_bytes(layer)
    return base[:, begin:begin + heads * size].view(num_blocks, heads, size)


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


def block_importance(fmt: PageFormat, keys: torch.Tensor,
                     mass: torch.Tensor | None) -> torch.Tensor:
    """Importance of each token of m staged blocks, higher kept first: keys [m, H, bs, D], mass
    [m, H, bs] (attention received while staged; snapkv only) → [m, H, bs]."""
    m, heads, bs, _ = keys.shape
    if fmt.score == "keynorm":
        return R.keynorm_importance(keys)
    if fmt.score == "recent":
        return R.recent_importance(m, heads, bs)
    return R.pool_scores(mass.float(), fmt.pool, fmt.pool_kernel)


def select_tokens(importance: torch.Tensor, page: LayerPage) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-block offsets a sealed page keeps: (guards, body), each [m, H, n] in ascending
    order. The `selected` most important tokens are kept (ties: the earlier token), and the most
    important `guard_tokens` of them are the guards."""
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)
    keep = order[..., :page.selected]
    return (keep[..., :page.guard_tokens].sort(-1).values,
            keep[..., page.guard_tokens:].sort(-1).values)


def seal_blocks(pages: torch.Tensor, staging: torch.Tensor, blocks: torch.Tensor,
                slots: torch.Tensor, fmt: PageFormat, layer: int, packer=None,
                mass: torch.Tensor | None = None) -> None:
    """Selects, quantizes and packs whole staged blocks into their pages.

    pages: the layer's view of the uint8 cache (`layer_pages`); blocks, slots [m] int64 (the
    physical block and the staging slot holding its tokens); mass: the layer's attention-mass
    buffer (snapkv importance). `packer(keys, values, positions, layout)` defaults to the PyTorch
    reference; a compiled pack kernel has the same signature."""
    if blocks.numel() == 0:
        return
    packer = packer or R.pack_blocks
    page = fmt.layers[layer]
    m, heads, d = blocks.numel(), pages.shape[1], fmt.head_dim  # heads of this TP rank
    tokens = staging[slots]  # [m, H, block_size, 2, D]
    if not fmt.selects(layer):  # every token, in order
        regions = [(tokens, page.body)]
    else:
        importance = block_importance(fmt, tokens[..., 0, :],
                                      None if mass is None else mass[slots])
        regions = []
        for offsets, layout in zip(select_tokens(importance, page), (page.guard, page.body)):
            n = offsets.shape[-1]
            if n:
                index = offsets[..., None, None].expand(m, heads, n, 2, d)
                regions.append((tokens.gather(2, index), layout))
    packed = []
    for chosen, layout in regions:  # [m, H, n, 2, D]; B divides n
        n = chosen.shape[2]
        part = packer(chosen[..., 0, :].reshape(m * heads * n, d),
                      chosen[..., 1, :].reshape(m * heads * n, d), None, layout)
        packed.append(part.reshape(m, heads, -1))
    layer_pages(pages, fmt, layer)[blocks] = torch.cat(packed, -1)


# ---- reading --------------------------------------------------------------------------------

def unpack_pages(pages: torch.Tensor, blocks: torch.Tensor, fmt: PageFormat,
                 layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sealed pages → (keys, values) fp32 [H, len(blocks) * selected, D]: each block's guards then
    its body (attention over the past does not depend on order)."""
    page = fmt.layers[layer]
    m, heads = blocks.numel(), pages.shape[1]
    raw = layer_pages(pages, fmt, layer)[blocks].permute(1, 0, 2)  # [H, m, nbytes]
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
    shape = (heads, m * page.selected, fmt.head_dim)
    return torch.cat(keys, 2).reshape(shape), torch.cat(values, 2).reshape(shape)


@dataclass
class Past:
    """A chunk's past as attention sees it: keys, values fp32 [H, p, D], and where the staged
    tokens among them came from: (staging slot, first index in the p tokens, count)."""

    keys: torch.Tensor
    values: torch.Tensor
    staged: list[tuple[int, int, int]]


def cached_tokens(pages: torch.Tensor, staging: torch.Tensor, block_row: list[int],
                  stage_slots: list[int], start: int, sealed_by: int, fmt: PageFormat,
                  layer: int) -> Past:
    """The past of a chunk that starts at token `start`: blocks sealed by the time the sequence
    had `sealed_by` tokens (the step's start, before this step seals; or its end, after) come
    dequantized from their pages, the others from staging, up to token `start`. block_row: the
    sequence's physical blocks; stage_slots: the staging slot of each (-1 when sealed in an
    earlier step). A sealed block that also holds tokens of the chunk (window 0, or chunked
    prefill) is read from its page only when the page keeps every token in order; when the
    layer selects, its kept tokens might be the chunk's own, so its staged copy is read."""
    bs = fmt.block_size
    selects = fmt.selects(layer)

    def from_page(j: int) -> bool:
        return fmt.sealed(j, sealed_by) and (not selects or (j + 1) * bs <= start)

    keys, values, staged = [], [], []
    length = 0
    j, needed = 0, -(-start // bs)
    while j < needed:
        if from_page(j):
            run = j
            while run < needed and from_page(run):
                run += 1
            k, v = unpack_pages(pages, torch.tensor(block_row[j:run]), fmt, layer)
            if not selects:  # every token in order: cut at the chunk
                k, v = k[:, :start - j * bs], v[:, :start - j * bs]
            j = run
        else:
            slot = stage_slots[j]
            assert slot >= 0, f"block {j} is neither sealed nor staged"
            n = min(bs, start - j * bs)
            k = staging[slot, :, :n, 0].float()
            v = staging[slot, :, :n, 1].float()
            staged.append((slot, length, n))
            j += 1
        keys.append(k)
        values.append(v)
        length += k.shape[1]
    if not keys:
        empty = torch.zeros(pages.shape[1], 0, fmt.head_dim)
        return Past(empty, empty, [])
    return Past(torch.cat(keys, 1), torch.cat(values, 1), staged)


def attend(query: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor,
           new_keys: torch.Tensor, new_values: torch.Tensor, scale: float,
           mass_reduce: str | None = None):
    """Causal attention of a chunk of new tokens over the cached past and themselves.

    query [m, Hq, D]; past_* [H, p, D] (as cached); new_* [m, H, D] (full precision, as the
    model produced them); → [m, Hq, D] fp32. GQA: query head h reads KV head h // (Hq / H); the
    queries of a KV head are stacked as rows (row g * m + i: group member g, token i), so K and V
    are read once, never copied per query head. With `mass_reduce` (mean / max / sum over a KV
    head's query heads) also returns the attention mass each of the p + m keys received from
    the chunk's queries, [H, p + m]."""
    m, q_heads, head_dim = query.shape
    kv_heads = past_keys.shape[0]
    group = q_heads // kv_heads
    keys = torch.cat([past_keys, new_keys.float().transpose(0, 1)], 1)  # [H, p + m, D]
    values = torch.cat([past_values, new_values.float().transpose(0, 1)], 1)
    p = past_keys.shape[1]
    allowed = torch.ones(m, p + m, dtype=torch.bool)
    allowed[:, p:] = torch.ones(m, m, dtype=torch.bool).tril()
    allowed = allowed.repeat(group, 1)  # [group * m, p + m]
    q = query.float().reshape(m, kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q = q.reshape(kv_heads, group * m, head_dim)

    def heads_last(out: torch.Tensor) -> torch.Tensor:  # [H, group * m, D] → [m, Hq, D]
        return out.reshape(kv_heads, group, m, head_dim).permute(2, 0, 1, 3).reshape(
            m, q_heads, head_dim)

    if mass_reduce is None:
        return heads_last(torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=allowed, scale=scale))
    rows = group * m
    out = torch.empty(kv_heads, rows, head_dim)
    mass = torch.zeros(kv_heads, group, p + m)
    for first in range(0, rows, QUERY_CHUNK):
        chunk = slice(first, min(rows, first + QUERY_CHUNK))
        logits = (q[:, chunk] @ keys.transpose(1, 2)) * scale
        probs = torch.softmax(logits.masked_fill(~allowed[chunk], -math.inf), dim=-1)
        out[:, chunk] = probs @ values
        member = torch.arange(chunk.start, chunk.stop) // m
        mass.index_add_(1, member, probs)
    reduced = {"mean": mass.mean(1), "max": mass.amax(1), "sum": mass.sum(1)}
    return heads_last(out), reduced[mass_reduce]


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
    past_sealed_now: list[bool]  # per request: does its past hold a block sealed in this step?
    spills: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # staging.StepPlan
    restores: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    drops: list[int] = dataclasses.field(default_factory=list)

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


def attend_step(pages: torch.Tensor, staging_buffer: torch.Tensor, mass: torch.Tensor | None,
                fmt: PageFormat, layer: int, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, md: StepMetadata, scale: float, output: torch.Tensor,
                packer=None) -> torch.Tensor:
    """One layer's attention for every request of the step, and the step's sealing.

    With snapkv importance (`mass` given and the layer selects), the queries first attend over
    the blocks as they were before this step (staged blocks at full precision), their attention
    mass is added to the staged tokens, the due blocks are sealed by it, and a request whose past
    holds a block sealed just now attends again over the sealed page: the Hugging Face runtime's
    order, where the window is flushed before a new token attends. Otherwise sealing comes first.
    query [n, Hq, D], key/value [n, H, D]; output [n, Hq, D] is written and returned."""
    scored = mass is not None and fmt.selects(layer)
    starts = md.starts

    def seal() -> None:
        seal_blocks(pages, staging_buffer, md.seal_blocks, md.seal_slots, fmt, layer, packer,
                    mass)

    def attend_request(i: int, sealed_by: int, record: bool) -> None:
        first, last = md.query_start[i], md.query_start[i + 1]
        past = cached_tokens(pages, staging_buffer, md.block_rows[i], md.request_slots[i],
                             starts[i], sealed_by, fmt, layer)
        result = attend(query[first:last], past.keys, past.values, key[first:last],
                        value[first:last], scale, mass_reduce=fmt.gqa if record else None)
        if record:
            result, received = result
            accumulate_mass(mass, past, md.token_slot[first:last], md.token_offset[first:last],
                            received)
        output[first:last] = result.to(output.dtype)

    if not scored:
        seal()
        for i, seq_len in enumerate(md.seq_lens):
            attend_request(i, seq_len, record=False)
        return output
    for i in range(len(md.seq_lens)):
        attend_request(i, starts[i], record=True)
    seal()
    for i, seq_len in enumerate(md.seq_lens):
        if md.past_sealed_now[i]:
            attend_request(i, seq_len, record=False)
    return output
