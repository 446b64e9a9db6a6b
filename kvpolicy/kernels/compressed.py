"""The compressed cache of one layer for a batch of sequences, as tensors (docs/format.md).

Selected tokens are stored in blocks (`kvpolicy.format.BlockLayout`); each (sequence, KV head)
owns a contiguous run of blocks given by a start index and a token count, so the same container
holds equal budgets (a rectangle of blocks) and per-head budgets (runs of different lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.format import BlockLayout


@dataclass
class CompressedLayer:
    guard_layout: BlockLayout
    body_layout: BlockLayout
    sinks_key: torch.Tensor  # [b, H, S, D] 16-bit
    sinks_value: torch.Tensor  # [b, H, S, D]
    sink_len: torch.Tensor  # [b] int32, <= S
    window_key: torch.Tensor  # [b, H, W, D] 16-bit (W: capacity)
    window_value: torch.Tensor  # [b, H, W, D]
    window_len: torch.Tensor  # [b] int32, <= W
    guard_blocks: torch.Tensor  # [blocks, guard_layout.nbytes] uint8
    guard_start: torch.Tensor  # [b, H] int32: first block of each (sequence, head)
    guard_count: torch.Tensor  # [b, H] int32: tokens of each (sequence, head)
    body_blocks: torch.Tensor  # [blocks, body_layout.nbytes] uint8
    body_start: torch.Tensor  # [b, H] int32
    body_count: torch.Tensor  # [b, H] int32
    centroid_key: torch.Tensor  # [b, H, C, D] 16-bit
    centroid_value: torch.Tensor  # [b, H, C, D]
    centroid_count: torch.Tensor  # [b, H, C] int32: tokens each centroid stands for (0: empty)

    @property
    def batch(self) -> int:
        return self.sinks_key.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.sinks_key.shape[1]

    @property
    def head_dim(self) -> int:
        return self.sinks_key.shape[3]

    def slot_capacity(self) -> dict[str, int]:
        """Per (sequence, KV head), the slots of each region in the attention-mass output, in
        order: sinks, window, centroids, guard, body (guard/body rounded up to whole blocks)."""
        def blocked(count: torch.Tensor, tokens: int) -> int:
            most = int(count.max()) if count.numel() else 0
            return -(-most // tokens) * tokens
        return {
            "sinks": self.sinks_key.shape[2],
            "window": self.window_key.shape[2],
            "centroids": self.centroid_key.shape[2],
            "guard": blocked(self.guard_count, self.guard_layout.tokens),
            "body": blocked(self.body_count, self.body_layout.tokens),
        }
