"""Reading the paged store: where a chunk's past is (sealed pages through the block table, or
staged blocks) and, for the PyTorch path, that past dequantized."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.kernels import reference as R
from kvpolicy.plan.pages import HeadGroup, PageFormat


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


