"""The page plan: how a policy's compressed cache is laid out in fixed-size blocks of tokens (the
form paged engines — vLLM, and the Hugging Face runtime's paged store — hold it in).

A block holds `block_size` tokens of every KV head of a layer. A block is *sealed* once it has
left the policy's full-precision window: block j is sealed when the sequence reaches
(j + 1) * block_size + window tokens; the blocks holding the policy's sinks never seal. A sealed
block's page keeps `selected` of its tokens per KV head — the most important `guard_tokens` at
the guard's bits, the rest in the layer's body format (`kvpolicy.format.BlockLayout`, whole
format blocks, no positions: keys carry RoPE already, and attention over the past does not depend
on order). Evicted tokens never take page memory. Which tokens a page keeps is the store's
selection rule (kvpolicy.store). Front end: no torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

from kvpolicy.dtypes import DTYPE_BYTES
from kvpolicy.format import BlockLayout, block_layout, block_tokens
from kvpolicy.lang.ir import Policy, QuantFormat, Score
from kvpolicy.models import ModelShape
from kvpolicy.plan.planner import (block_layouts, block_retain_ratios, guarded_tokens,
                                   head_units, layer_formats, ranges)

PAGE_ALIGN = 16  # bytes: every section of a format block is 16-byte aligned, and so every page


def blocks_left_window(seq_len: int, block_size: int, window: int) -> int:
    """The one sealing rule: how many whole `block_size`-token blocks of `seq_len` tokens have
    left the full-precision window of the last `window` tokens — the blocks a paged engine seals,
    and the blocks the whole-prompt runtime packs from its window."""
    return max(0, (seq_len - window) // block_size)


def sealed(block_index: int, seq_len: int, block_size: int, window: int,
           sink_blocks: int = 0) -> bool:
    """Is block `block_index` of a sequence of `seq_len` tokens packed in its page? It is once its
    last token has left the full-precision window (`blocks_left_window`); the blocks holding the
    policy's sinks (the first `sink_blocks`) never are: they stay staged at full precision."""
    return sink_blocks <= block_index < blocks_left_window(seq_len, block_size, window)


def rank_heads(kv_heads: int, tensor_parallel: int, tensor_rank: int) -> range:
    """The model's KV heads (of `kv_heads`) that tensor-parallel rank `tensor_rank` of
    `tensor_parallel` holds — vLLM's split: consecutive heads, each head replicated over
    tensor_parallel / kv_heads ranks when there are more ranks than heads."""
    if tensor_parallel <= kv_heads:
        per_rank = kv_heads // tensor_parallel
        return range(tensor_rank * per_rank, (tensor_rank + 1) * per_rank)
    first = tensor_rank * kv_heads // tensor_parallel
    return range(first, first + 1)


def widest_pages(head_pages: tuple[tuple[LayerPage, ...], ...]) -> tuple[LayerPage, ...]:
    """Per layer, the page of its KV head that keeps the most tokens (`PageFormat.layers` under
    `adapt heads`)."""
    return tuple(max(heads, key=lambda page: page.selected) for heads in head_pages)


class HeldBytes(NamedTuple):
    """One request's bytes in a paged engine, by where they are."""

    pool: int  # pool pages of every block, sealed or staged
    window_staging: int  # full-precision staging of the blocks not sealed yet (window, open)
    sinks_staging: int  # full-precision staging of the sinks' blocks, for the request's life


class UnsupportedConfiguration(ValueError):
    """The policy, model or engine settings cannot run in a paged engine (vLLM's backend, the
    Hugging Face paged cache); lists every reason."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__("kvpolicy's paged store cannot run this configuration:\n"
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
class HeadGroup:
    """Consecutive KV heads of one layer whose pages keep the same tokens — all of a layer's
    heads, unless `adapt heads` gives them budgets of their own: the store seals and attends
    them together (one kernel launch per group), over views of their pages, staging, queries
    and output."""

    layer: int
    first: int  # its first KV head among the rank's
    count: int
    page: LayerPage  # each of its heads' page
    offset: int  # bytes from the start of the layer's pages of a block to the group's
    block_size: int

    @property
    def heads(self) -> slice:
        return slice(self.first, self.first + self.count)

    @property
    def selects(self) -> bool:
        """Does sealing choose tokens by importance (eviction or guards) in these heads?"""
        return self.page.selected < self.block_size or self.page.guard_tokens > 0


def _runs_of_equal_pages(layer: int, pages: tuple[LayerPage, ...],
                         block_size: int) -> tuple[HeadGroup, ...]:
    groups, first, offset = [], 0, 0
    while first < len(pages):
        count = 1
        while first + count < len(pages) and pages[first + count] == pages[first]:
            count += 1
        groups.append(HeadGroup(layer, first, count, pages[first], offset, block_size))
        offset += count * pages[first].nbytes
        first += count
    return tuple(groups)


@dataclass(frozen=True)
class PageFormat:
    """How a model's pages are laid out. vLLM gives every layer the same page size, but lays a
    block's pages of all layers side by side (the block-outermost BLHNC layout the backend asks
    for), so the backend treats them as one run of `layers x H x page_bytes` bytes per block in
    which layer l's pages ([H, layer_bytes(l)]) sit at `layer_offset(l)`: a layer that keeps more
    tokens uses bytes a layer keeping fewer leaves free, and nothing pads to the largest layer.
    page_bytes is the mean over layers, rounded up to 16 bytes."""

    block_size: int  # vLLM tokens per block
    window: int  # the policy's full-precision window (tokens)
    sink_blocks: int  # leading blocks that hold the policy's sinks: staged, never sealed
    kv_heads: int
    head_dim: int
    dtype_bytes: int  # the engine's dtype (vLLM's own 16-bit page, the baseline)
    layers: tuple[LayerPage, ...]  # per model layer (with head_pages: its widest head's page)
    # the policy's importance (defaults: the language's, `Score`): snapkv (attention mass),
    # keynorm, recent; snapkv's pooling along the block and its kernel; the last queries of each
    # step whose attention counts; how a KV head's query heads' attention mass is reduced
    score: str = Score.method
    pool: str = Score.pool
    pool_kernel: int = Score.pool_kernel
    observe: int = Score.observe
    staging_dtype: str = "bfloat16"  # the full-precision window's dtype: the cache dtype
    gqa: str = Score.gqa
    # `adapt heads`: per layer, each KV head's page (empty: every head has the layer's page)
    head_pages: tuple[tuple[LayerPage, ...], ...] = ()
    # one worker of a parallel engine (`for_worker`): the layers its pipeline stage holds, as
    # (first, end), None for all; and the page size every stage published to vLLM (the largest
    # stage mean), None for this format's own
    held_layers: tuple[int, int] | None = None
    pool_page_bytes: int | None = None
    # bytes of all KV heads' pages of the layers before each layer, then of all of them, and
    # each layer's head groups over all KV heads: computed once (every layer of every step asks)
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _groups: tuple[tuple[HeadGroup, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts, total, groups = [], 0, []
        for layer in range(len(self.layers)):
            starts.append(total)
            pages = self.pages_of(layer)
            if layer in self.held:  # layers of other pipeline stages take no bytes here
                total += sum(page.nbytes for page in pages)
            groups.append(_runs_of_equal_pages(layer, pages, self.block_size))
        object.__setattr__(self, "_starts", (*starts, total))
        object.__setattr__(self, "_groups", tuple(groups))

    @property
    def held(self) -> range:
        """The layers whose pages this format lays out: all of them, or one pipeline stage's."""
        return range(*self.held_layers) if self.held_layers else range(len(self.layers))

    def for_worker(self, tensor_parallel: int, stages: list[tuple[int, int]],
                   stage: int, tensor_rank: int = 0) -> PageFormat:
        """The pages one worker of a parallel engine holds: under tensor parallelism
        (`tensor_parallel` ranks) the KV heads of its `tensor_rank` — kv_heads / ranks
        consecutive heads, or one when vLLM replicates heads over more ranks than there are
        (`rank_heads`) — and under pipeline parallelism (`stages`: each stage's layers as
        (first, end)) the layers of its `stage`. vLLM gives every layer of every worker the same
        page size (one block table for all), so the page is the largest worker's mean
        (`pool_page_bytes`): a worker holding smaller pages — a stage of lighter layers, or a
        rank whose heads `adapt heads` gives fewer tokens — leaves the difference as padding
        (`padding_bytes`). Raises UnsupportedConfiguration when the pages cannot be split that
        way."""
        reasons = []
        if not (0 <= tensor_rank < tensor_parallel and 0 <= stage < len(stages)):
            reasons.append(f"no worker at tensor-parallel rank {tensor_rank} of "
                           f"{tensor_parallel} and pipeline stage {stage} of {len(stages)}")
        if self.kv_heads % tensor_parallel and tensor_parallel % self.kv_heads:
            reasons.append(f"the model's {self.kv_heads} KV heads do not split over "
                           f"{tensor_parallel} tensor-parallel ranks")
        covered = [layer for first, end in stages for layer in range(first, end)]
        if covered != list(range(len(self.layers))):
            reasons.append(f"the pipeline stages {stages} do not cover the policy's "
                           f"{len(self.layers)} layers once each, in order")
        if reasons:
            raise UnsupportedConfiguration(reasons)
        shares = {(rank, index): self._share(tensor_parallel, rank, layers)
                  for rank in range(tensor_parallel) for index, layers in enumerate(stages)}
        pool = max(share.page_bytes for share in shares.values())
        return dataclasses.replace(shares[tensor_rank, stage], pool_page_bytes=pool)

    def _share(self, tensor_parallel: int, tensor_rank: int,
               layers: tuple[int, int]) -> PageFormat:
        """One worker's heads and layers at its own page size (`for_worker` pads them)."""
        heads = rank_heads(self.kv_heads, tensor_parallel, tensor_rank)
        head_pages = tuple(row[heads.start:heads.stop] for row in self.head_pages)
        return dataclasses.replace(self, kv_heads=len(heads), held_layers=tuple(layers),
                                   pool_page_bytes=None, head_pages=head_pages,
                                   layers=widest_pages(head_pages) or self.layers)

    def pages_of(self, layer: int) -> tuple[LayerPage, ...]:
        """Each KV head's page in `layer`."""
        if self.head_pages:
            return self.head_pages[layer]
        return (self.layers[layer],) * self.kv_heads

    def kept_tokens(self) -> list[int]:
        """The distinct numbers of tokens a sealed page keeps, over layers and heads, ascending."""
        return sorted({page.selected for layer in range(len(self.layers))
                       for page in self.pages_of(layer)})

    def check_rank_heads(self, heads: int) -> None:
        """Raises UnsupportedConfiguration when a worker holding `heads` of the model's KV heads
        (tensor parallelism) cannot read these pages: per-head pages are laid out for the
        heads they were planned for (a worker's share: `for_worker`)."""
        if self.head_pages and heads != self.kv_heads:
            raise UnsupportedConfiguration([
                f"adapt heads gives each of these pages' {self.kv_heads} KV heads its own page, "
                f"and this worker holds {heads} KV heads: its share of the pages was not taken "
                "for its tensor-parallel rank (PageFormat.for_worker)"])

    def head_groups(self, layer: int, heads: int) -> tuple[HeadGroup, ...]:
        """`layer`'s KV heads (`heads`: those this rank holds) in runs of equal pages, in head
        order: one group of all of them unless the policy gives heads their own pages."""
        self.check_rank_heads(heads)
        groups = self._groups[layer]
        if heads == self.kv_heads:
            return groups
        return (dataclasses.replace(groups[0], count=heads),)  # uniform pages: one group

    @property
    def staging_dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.staging_dtype]

    def layer_bytes(self, layer: int) -> int:
        """Bytes one KV head of one block needs in `layer` (with head_pages: its widest head)."""
        return self.layers[layer].nbytes

    def layer_run(self, layer: int, heads: int) -> int:
        """Bytes `layer`'s pages of one block take for `heads` KV heads (those this rank holds)."""
        self.check_rank_heads(heads)
        return (self._starts[layer + 1] - self._starts[layer]) * heads // self.kv_heads

    def layer_offset(self, layer: int, heads: int) -> int:
        """Where `layer`'s pages of a block start in the block's run of bytes (`heads`: the KV
        heads this rank holds)."""
        self.check_rank_heads(heads)
        return self._starts[layer] * heads // self.kv_heads

    def selects(self, layer: int) -> bool:
        """Does sealing choose tokens by importance (eviction or guards) in any head of
        `layer`?"""
        return any(group.selects for group in self.head_groups(layer, self.kv_heads))

    @property
    def needs_mass(self) -> bool:
        """Is attention mass recorded while tokens are staged (snapkv importance in use)?"""
        return self.score == "snapkv" and any(self.selects(i) for i in range(len(self.layers)))

    @property
    def page_bytes(self) -> int:
        """state_content_bytes published to vLLM: one KV head's share of a block, per layer
        (the mean over the held layers, rounded up to PAGE_ALIGN bytes, so that every page of
        the block-outermost cache starts aligned for the kernels' 16-byte loads; a pipeline
        stage's worker publishes the largest stage's, `for_worker`)."""
        if self.pool_page_bytes is not None:
            return self.pool_page_bytes
        mean = -(-self._starts[-1] // (len(self.held) * self.kv_heads))
        return -(-mean // PAGE_ALIGN) * PAGE_ALIGN

    @property
    def padding_bytes(self) -> int:
        """Bytes per block (all held layers and heads) left unused by the rounding of
        page_bytes."""
        return self.kv_heads * len(self.held) * self.page_bytes - self._starts[-1]

    @property
    def baseline_page_bytes(self) -> int:
        """What vLLM's own page for one KV head holds: block_size keys and values, 16-bit."""
        return self.block_size * 2 * self.head_dim * self.dtype_bytes

    @property
    def capacity_ratio(self) -> float:
        """Tokens that fit in the same pool memory, relative to the 16-bit cache (exact)."""
        return self.baseline_page_bytes / self.page_bytes

    def staging_bytes(self, slots: int) -> int:
        """Full-precision staging outside the pool, all held layers: slots x layers x heads x block
        in the staging dtype, and the fp32 attention mass of staged tokens when snapkv
        importance is in use."""
        per_slot = (self.block_size * 2 * self.head_dim * self.staging_dtype_bytes
                    + (self.block_size * 4 if self.needs_mass else 0))
        return slots * len(self.held) * per_slot * self.kv_heads

    def sealed(self, block_index: int, seq_len: int) -> bool:
        """Is block `block_index` of a sequence of `seq_len` tokens packed in its page?"""
        return sealed(block_index, seq_len, self.block_size, self.window, self.sink_blocks)

    def held_bytes(self, seq_len: int) -> int:
        """Exact bytes one sequence of `seq_len` tokens holds in a paged store (the sum of
        `request_bytes`)."""
        return sum(self.request_bytes(seq_len))

    def request_bytes(self, seq_len: int) -> HeldBytes:
        """What one sequence of `seq_len` tokens holds in a paged store, exactly: a pool block per
        `block_size` tokens (every layer's pages of it, sealed or not: that is what the pool
        allocates) and, for each block not yet sealed — the sinks' blocks, the window's and the
        open one — a staging slot per layer: full-precision keys and values in the staging
        dtype and fp32 attention mass when snapkv importance is in use."""
        blocks = -(-seq_len // self.block_size)
        sinks = min(self.sink_blocks, blocks)
        staged = sum(1 for j in range(sinks, blocks) if not self.sealed(j, seq_len))
        return HeldBytes(pool=blocks * len(self.held) * self.kv_heads * self.page_bytes,
                         window_staging=self.staging_bytes(staged),
                         sinks_staging=self.staging_bytes(sinks))

    def baseline_bytes(self, seq_len: int) -> int:
        """The 16-bit cache of `seq_len` tokens in the same layers and KV heads (the whole-prompt
        plan's baseline)."""
        return seq_len * 2 * self.head_dim * self.dtype_bytes * len(self.held) * \
            self.kv_heads

    def to_json(self) -> dict:
        by_head = {}
        if self.head_pages:  # adapt heads: each KV head's own, per layer
            by_head = {"selected_tokens_per_block_by_head":
                       [[p.selected for p in heads] for heads in self.head_pages],
                       "guard_tokens_per_block_by_head":
                       [[p.guard_tokens for p in heads] for heads in self.head_pages]}
        return {"block_size": self.block_size, "window": self.window,
                "sink_blocks": self.sink_blocks,
                "selected_tokens_per_block": [p.selected for p in self.layers],
                "guard_tokens_per_block": [p.guard_tokens for p in self.layers],
                **by_head,
                "page_bytes_per_kv_head": self.page_bytes,
                "baseline_page_bytes_per_kv_head": self.baseline_page_bytes,
                "capacity_ratio": self.capacity_ratio,
                "padding_bytes_per_block": self.padding_bytes,
                "format": self._format_json()}

    def _format_json(self) -> dict:
        """Everything `from_json` needs to rebuild this format exactly (an artifact's manifest
        records it; paged engines read it instead of planning pages again)."""
        pages = {page: i for i, page in enumerate(dict.fromkeys(
            [*self.layers, *(p for heads in self.head_pages for p in heads)]))}
        return {"kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "dtype_bytes": self.dtype_bytes, "score": self.score, "pool": self.pool,
                "pool_kernel": self.pool_kernel, "observe": self.observe,
                "staging_dtype": self.staging_dtype, "gqa": self.gqa,
                "pages": [_page_json(page) for page in pages],
                "layers": [pages[page] for page in self.layers],
                "head_pages": [[pages[page] for page in heads] for heads in self.head_pages]}

    @classmethod
    def from_json(cls, data: dict, dtype_bytes: int | None = None) -> PageFormat:
        """The format `to_json` recorded (`dtype_bytes`: another engine dtype's baseline page);
        raises ValueError (with the missing or wrong field) for a record it cannot rebuild."""
        try:
            f = data["format"]
            pages = [_page_from_json(page) for page in f["pages"]]
            return cls(block_size=int(data["block_size"]), window=int(data["window"]),
                       sink_blocks=int(data["sink_blocks"]), kv_heads=int(f["kv_heads"]),
                       head_dim=int(f["head_dim"]),
                       dtype_bytes=dtype_bytes or int(f["dtype_bytes"]),
                       layers=tuple(pages[i] for i in f["layers"]), score=f["score"],
                       pool=f["pool"], pool_kernel=int(f["pool_kernel"]),
                       observe=int(f["observe"]), staging_dtype=f["staging_dtype"],
                       gqa=f["gqa"],
                       head_pages=tuple(tuple(pages[i] for i in heads)
                                        for heads in f["head_pages"]))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"not a recorded page format ({type(exc).__name__}: {exc})") \
                from None


def _layout_json(layout: BlockLayout) -> dict:
    return {"tokens": layout.tokens, "head_dim": layout.head_dim, "kv_dtype": layout.kv_dtype,
            "positions": layout.positions, "keys": _plain_format(layout.keys),
            "values": _plain_format(layout.values)}


def _plain_format(fmt: QuantFormat) -> dict:
    return {f.name: getattr(fmt, f.name) for f in dataclasses.fields(fmt) if f.compare}


def _layout_from_json(data: dict) -> BlockLayout:
    return block_layout(QuantFormat(**data["keys"]), QuantFormat(**data["values"]),
                        int(data["head_dim"]), data["kv_dtype"], bool(data["positions"]),
                        int(data["tokens"]))


def _page_json(page: LayerPage) -> dict:
    return {"guard": _layout_json(page.guard), "body": _layout_json(page.body),
            "guard_tokens": page.guard_tokens, "body_tokens": page.body_tokens}


def _page_from_json(data: dict) -> LayerPage:
    return LayerPage(guard=_layout_from_json(data["guard"]), body=_layout_from_json(data["body"]),
                     guard_tokens=int(data["guard_tokens"]), body_tokens=int(data["body_tokens"]))


def paged_refusals(policy: Policy) -> list[str]:
    """Why no paged engine (vLLM, the paged store in transformers) can run the policy at all,
    whatever the model and block size: the one list, read by page_format, `kvpolicy check` and
    `plan`, and the reports. Empty when paged engines can run it."""
    reasons = []
    ranks = policy.evicts or (policy.guard is not None and policy.guard.fraction > 0)
    how = {"reconstruct": "it re-reads it",
           "expected": "the statistics of its last queries score every key"}
    if policy.score.needs_whole_context and ranks:
        reasons.append(f"score {policy.score.method} needs the whole context before it ranks "
                       f"a token ({how[policy.score.method]}), and pages are ranked as they "
                       "seal, while the prompt still arrives; run it in the whole-prompt runtime "
                       "(kvpolicy run, kvpolicy eval --engine hf)")
    return reasons


def policy_notes(policy: Policy, block_size: int) -> list[str]:
    """Where pages realise the policy differently from the whole-prompt (unpaged) Hugging Face
    runtime: the one list of what cannot be paged, printed at start-up by every paged engine and
    listed in docs/vllm.md."""
    notes = []
    if policy.evicts:
        notes.append("retention in pages: each layer keeps its retain ratio of every sealed "
                     f"{block_size}-token block (rounded up to whole format blocks); the blocks "
                     "a request seals in one step are selected together, so one block can keep "
                     "more than its share; the sinks' blocks and the window are kept on top")
        if policy.score.method == "snapkv":
            notes.append(f"importance = the attention mass a token received from the last "
                         f"{policy.score.observe} queries of every step while it was staged "
                         "(for a prompt prefilled in one step: SnapKV's observation window; "
                         "the whole-prompt runtime's reads only the prompt's last queries)")
    if policy.adapt is not None and policy.adapt.static and policy.evicts:
        notes.append("adapt heads: each KV head's page keeps its share of every sealed block "
                     "(the calibration's weights over the block's whole format units; the "
                     "whole-prompt runtime splits a whole context's tokens the same way)")
    elif policy.adapt is not None and policy.evicts:
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


BLOCK_SIZES = (16, 32, 64, 128, 256, 512)  # the block sizes an artifact records page plans for


def page_plans(policy: Policy, model: ModelShape) -> dict[int, PageFormat]:
    """The page plan at every block size of BLOCK_SIZES that fits the policy's formats (a
    multiple of every layer's format unit): what an artifact's manifest and report record."""
    plans = {}
    for size in BLOCK_SIZES:
        try:
            plans[size] = page_format(policy, model, size)
        except UnsupportedConfiguration:
            continue
    return plans


def model_refusals(model: ModelShape) -> list[str]:
    """Why no paged engine runs any policy on `model` (empty when they can)."""
    if not model.window_layers:
        return []
    return [f"{model.name} has sliding-window layers ({len(model.window_layers)} of "
            f"{model.model_layers}): paged engines keep every layer's tokens in pages, and a "
            "page of a sliding-window layer is not freed as its tokens leave the window; run it "
            "in the whole-prompt runtime (kvpolicy run, kvpolicy eval --engine hf)"]


def page_format(policy: Policy, model: ModelShape, block_size: int,
                dtype_bytes: int | None = None) -> PageFormat:
    """The page format of `policy` on `model` with vLLM blocks of `block_size` tokens; raises
    UnsupportedConfiguration listing every reason it cannot be built."""
    reasons = paged_refusals(policy) + model_refusals(model)
    pages, pools, misfits = [], {}, {}
    ratios = block_retain_ratios(policy, model)
    for index, (keys, values, guard) in enumerate(layer_formats(policy, model)):
        unit = block_tokens(keys, values, model.head_dim, model.kv_dtype, positions=False)
        if block_size % unit:
            misfits.setdefault(unit, []).append(index)
            continue
        selected = block_size
        if ratios[index] < 1.0:
            selected = min(block_size, unit * max(1, math.ceil(ratios[index] * block_size / unit)))
            pools.setdefault((keys, values, guard, unit), []).append(index)
        guard_tokens = guarded_tokens(guard, selected, unit)
        guard_layout, body_layout = block_layouts(policy, model, keys, values, guard,
                                                  positions=False)
        pages.append(LayerPage(guard=guard_layout, body=body_layout, guard_tokens=guard_tokens,
                               body_tokens=selected - guard_tokens))
    for unit, layers in misfits.items():
        where = ("every layer" if len(layers) == model.num_layers else
                 f"layer{'s' if len(layers) > 1 else ''} {ranges(layers)}")
        reasons.append(f"{where}: block size {block_size} is not a multiple of the format's "
                       f"{unit}-token unit (per-channel groups need whole blocks; use "
                       f"--block-size {unit} or a multiple)")
    head_pages = ()
    if not reasons and policy.adapt is not None and policy.adapt.static and pools:
        head_pages = _head_pages(policy, model, block_size, ratios, pages, pools, reasons)
        pages = list(widest_pages(head_pages))
    if reasons:
        raise UnsupportedConfiguration(sorted(set(reasons), key=reasons.index))
    score = policy.score
    return PageFormat(block_size=block_size, window=policy.window,
                      sink_blocks=math.ceil(policy.sinks / block_size),
                      kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                      dtype_bytes=dtype_bytes or DTYPE_BYTES[model.kv_dtype],
                      staging_dtype=model.kv_dtype,
                      layers=tuple(pages), score=score.method, pool=score.pool,
                      pool_kernel=score.pool_kernel, gqa=score.gqa, observe=score.observe,
                      head_pages=head_pages)


def _head_pages(policy: Policy, model: ModelShape, block_size: int, ratios, pages: list,
                pools: dict, reasons: list[str]) -> tuple[tuple[LayerPage, ...], ...]:
    """`adapt heads` in pages: the plan's rule (`planner.head_units`) applied to one sealed
    block. The evicting layers that share a storage pool keep their retain ratios' share of the
    pool's block units in all (rounded up once, for the pool), split over their (layer, KV head)
    cells in proportion to the calibration's weights, in whole units, none above the block's
    (largest remainders); guards in each head's proportion."""
    weights = policy.adapt.head_weights
    heads = model.num_kv_heads
    if len(weights) != model.num_layers or any(len(row) != heads for row in weights):
        reasons.append(f"the head weights are for {len(weights)} layers of {len(weights[0])} KV "
                       f"heads; {model.name} has {model.num_layers} layers of {heads} (run "
                       "`kvpolicy calibrate --model DIR` on this model)")
        return ()
    per_head = [[page] * heads for page in pages]
    for (_, _, guard, unit), members in pools.items():
        whole = block_size // unit
        total = math.ceil(sum(ratios[index] for index in members) * whole * heads - 1e-9)
        for index, mine in zip(members, head_units(weights, members, heads, total,
                                                   [whole] * len(members))):
            for h, count in enumerate(mine):
                selected = unit * count
                guard_tokens = guarded_tokens(guard, selected, unit)
                per_head[index][h] = dataclasses.replace(pages[index], guard_tokens=guard_tokens,
                                                         body_tokens=selected - guard_tokens)
    return tuple(tuple(row) for row in per_head)
