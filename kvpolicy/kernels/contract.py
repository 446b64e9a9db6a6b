"""What the Triton launchers (`launch`) and the C kernels (`cpu`) agree on with their templates:
the codes of the source dtypes a kernel reads (`SRC_DTYPE` / `NEW_DTYPE` in codegen/*.jinja), of
the reductions of attention mass over a KV group's query heads (`REDUCE`), and the tables a paged
decode launch reads (`PagedTables`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.dtypes import DTYPE_CODES, KV_DTYPES
from kvpolicy.kernels.reference import torch_dtype

SOURCE_DTYPES = {torch_dtype(name): DTYPE_CODES[name] for name in KV_DTYPES}
MASS_REDUCE = {"sum": 0, "mean": 1, "max": 2}


@dataclass(frozen=True)
class PagedTables:
    """What one paged decode launch reads besides the queries, pages and staging: per request
    (row b) and KV head (h), the guard pages and the body pages it attends (page k of head h
    starts at `pages + table[b, h, k] * stride_pb + h * stride_ph`; a body page's body blocks
    `body_offset` bytes in), how many of each, the body tokens of the last body page; and its
    staged runs (`stage_table[b, h, k]`: a staging slot, `stage_len`: its first tokens), how
    many. Each table is [b, H, width] or, shared by a request's KV heads, [b, width]; each count
    [b, H] or [b]. `guard_tokens` and `body_tokens`: every guard page's and body page's tokens."""

    guard_table: torch.Tensor
    guard_count: torch.Tensor
    body_table: torch.Tensor
    body_count: torch.Tensor
    body_tail: torch.Tensor
    body_offset: int
    guard_tokens: int
    body_tokens: int
    stage_table: torch.Tensor
    stage_len: torch.Tensor
    staged_count: torch.Tensor

    @classmethod
    def pages(cls, page_table: torch.Tensor, page_count: torch.Tensor,
              page_tail: torch.Tensor, guard_tokens: int, body_tokens: int, guard_bytes: int,
              stage_table: torch.Tensor, stage_len: torch.Tensor,
              staged_count: torch.Tensor) -> PagedTables:
        """Pages that hold guards then body (the page plan's): one table for both, shared by
        the request's KV heads; no guard pages when a page keeps no guards."""
        guards = page_count if guard_tokens else torch.zeros_like(page_count)
        return cls(page_table, guards, page_table, page_count, page_tail, guard_bytes,
                   guard_tokens, body_tokens, stage_table, stage_len, staged_count)

    @property
    def stage_width(self) -> int:
        """Staged runs a request's table has room for (its mass has a column block each)."""
        return self.stage_table.shape[-1]


def per_head(values: torch.Tensor, per_request_dims: int,
             device=None) -> tuple[torch.Tensor, int, int]:
    """A table (`per_request_dims` 1: [b, H, width] or, shared by the KV heads, [b, width]) or
    counts (0: [b, H] or [b]) as contiguous int32, with its strides along b and h — 0 along h
    when the request's KV heads share it (nothing is copied per head)."""
    values = values.to(dtype=torch.int32, device=device).contiguous()
    if values.dim() == per_request_dims + 2:
        return values, values.stride(0), values.stride(1)
    if values.dim() != per_request_dims + 1:
        raise ValueError(f"a {'table' if per_request_dims else 'count'} is [b, H"
                         f"{', width' if per_request_dims else ''}] or shared by the heads, "
                         f"not {list(values.shape)}")
    return values, values.stride(0), 0
