"""Random compressed layers for tests: every region populated, uneven counts per head."""

from __future__ import annotations

import torch

from kvpolicy.format import BlockLayout, block_layout
from kvpolicy.lang.ir import QuantFormat
from kvpolicy.kernels.compressed import CompressedLayer
from kvpolicy.kernels.reference import pack_blocks

DEFAULT_GUARD = (QuantFormat(8, 32, "channel"), QuantFormat(8, 32, "token"))
DEFAULT_BODY = (QuantFormat(2, 32, "channel"), QuantFormat(2, 32, "token"))


def _blocks(layout: BlockLayout, counts: torch.Tensor, generator, dtype):
    batch, heads = counts.shape
    parts, start, used = [], torch.zeros(batch, heads, dtype=torch.int32), 0
    for b in range(batch):
        for h in range(heads):
            n = int(counts[b, h])
            start[b, h] = used
            if n:
                keys = torch.randn(n, layout.head_dim, generator=generator) * 2
                values = torch.randn(n, layout.head_dim, generator=generator)
                blocks = pack_blocks(keys.to(dtype), values.to(dtype),
                                     torch.arange(n) * 3 + 5, layout)
                parts.append(blocks)
                used += blocks.shape[0]
    blocks = torch.cat(parts) if parts else torch.zeros(0, layout.nbytes, dtype=torch.uint8)
    return blocks, start


def random_layer(seed: int = 0, batch: int = 2, heads: int = 2, head_dim: int = 64,
                 kv_dtype: torch.dtype = torch.bfloat16, sinks: int = 4, window: int = 40,
                 centroids: int = 5, guard=DEFAULT_GUARD, body=DEFAULT_BODY,
                 guard_counts=None, body_counts=None) -> CompressedLayer:
    generator = torch.Generator().manual_seed(seed)
    names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "bfloat16"}
    stored = torch.bfloat16 if kv_dtype == torch.float32 else kv_dtype
    guard_layout = block_layout(*guard, head_dim, names[kv_dtype], positions=True)
    body_layout = block_layout(*body, head_dim, names[kv_dtype], positions=True,
                               tokens=guard_layout.tokens)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(stored)

    def counts(given, high):
        if given is not None:
            return torch.tensor(given, dtype=torch.int32).reshape(batch, heads)
        return torch.randint(0, high, (batch, heads), generator=generator, dtype=torch.int32)

    guard_counts, body_counts = counts(guard_counts, 70), counts(body_counts, 110)
    guard_blocks, guard_start = _blocks(guard_layout, guard_counts, generator, stored)
    body_blocks, body_start = _blocks(body_layout, body_counts, generator, stored)
    return CompressedLayer(
        guard_layout=guard_layout, body_layout=body_layout,
        sinks_key=rand(batch, heads, sinks, head_dim, scale=2), sinks_value=rand(
            batch, heads, sinks, head_dim),
        sink_len=torch.randint(0, sinks + 1, (batch,), generator=generator, dtype=torch.int32),
        window_key=rand(batch, heads, window, head_dim, scale=2),
        window_value=rand(batch, heads, window, head_dim),
        window_len=torch.randint(1, window + 1, (batch,), generator=generator, dtype=torch.int32),
        guard_blocks=guard_blocks, guard_start=guard_start, guard_count=guard_counts,
        body_blocks=body_blocks, body_start=body_start, body_count=body_counts,
        centroid_key=rand(batch, heads, centroids, head_dim, scale=2),
        centroid_value=rand(batch, heads, centroids, head_dim),
        centroid_count=torch.randint(0, 5, (batch, heads, centroids), generator=generator,
                                     dtype=torch.int32))
