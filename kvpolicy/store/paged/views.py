"""Views of a paged engine's cache: one layer's pages of every block, a head group's pages, and
a layer's staging buffers. vLLM hands a backend each layer's view of one cache that all layers
share block by block (BLHNC); the Hugging Face paged cache lays its pool out the same way."""

from __future__ import annotations

import torch

from kvpolicy.kernels.reference import torch_dtype
from kvpolicy.plan.pages import HeadGroup, PageFormat, UnsupportedConfiguration


def new_staging(fmt: PageFormat, slots: int, heads: int, device=None):
    """One layer's staging: (tokens [slots, H, block_size, 2, D] in the page plan's cache dtype,
    whatever the engine computes in; attention mass [slots, H, block_size] fp32, or None when
    no importance needs it)."""
    tokens = torch.zeros(slots, heads, fmt.block_size, 2, fmt.head_dim,
                         dtype=torch_dtype(fmt.staging_dtype), device=device)
    mass = torch.zeros(slots, heads, fmt.block_size, device=device) if fmt.needs_mass else None
    return tokens, mass


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

