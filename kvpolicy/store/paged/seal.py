"""Writing the paged store: new tokens into the full-precision staging buffer, and sealing — the
blocks that left the window selected (`store.select`), quantized and packed into their pages."""

from __future__ import annotations

import torch

from kvpolicy.kernels import reference as R
from kvpolicy.plan.pages import HeadGroup, PageFormat
from kvpolicy.store.paged.views import group_pages
from kvpolicy.store.select import group_importance, select_tokens


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
        seal_heads(group_pages(pages, fmt, group), staging_buffer[:, group.heads], blocks,
                    slots, fmt, group, packer, None if mass is None else mass[:, group.heads],
                    groups)


def seal_heads(pages: torch.Tensor, staging_buffer: torch.Tensor, blocks: torch.Tensor,
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

