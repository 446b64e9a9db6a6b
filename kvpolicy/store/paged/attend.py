"""Attention in the paged store's PyTorch path: a chunk of new tokens over its past (`read.Past`)
and themselves, with the attention mass the `observe` queries give (snapkv importance)."""

from __future__ import annotations

import math

import torch

from kvpolicy.kernels.reference import HALF_TORCH_DTYPES
from kvpolicy.store.paged.read import Past

QUERY_CHUNK = 512  # queries per softmax when attention mass is recorded (bounds its memory)


def chunk_dtype(query: torch.Tensor, record: bool) -> torch.dtype | None:
    """The dtype a chunk of queries [m, Hq, D] attends in when it is a prompt chunk (m > 1) with
    no attention mass to record and the engine computes in 16 bits: the engine's (as vLLM's own
    attention does); None when the rule does not apply (`attend`)."""
    sixteen = query.dtype in HALF_TORCH_DTYPES
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
    all_staged = mass_reduce is None and query.dtype in HALF_TORCH_DTYPES and \
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


