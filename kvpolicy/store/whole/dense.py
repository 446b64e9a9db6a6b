"""Attention over a compressed layer with vectorized PyTorch ops: the CPU path of the runtime.

The same math as `reference.attend` (which loops over sequences and heads, for clarity), with all
blocks dequantized at once each step — nothing dequantized is kept between steps, so the cache
stays packed. Tested against the reference; on a GPU the runtime uses the compiled kernels.
"""

from __future__ import annotations

import math

import torch

from kvpolicy.kernels.compressed import CompressedLayer
from kvpolicy.kernels.reference import slot_offsets, unpack_blocks


def _region_slots(blocks: torch.Tensor, layout, start: torch.Tensor, count: torch.Tensor,
                  capacity: int):
    """Dequantized tokens of each (sequence, head) run, padded to `capacity` slots:
    keys, values [b, H, capacity, D] fp32 and valid [b, H, capacity]."""
    batch, heads = count.shape
    d = layout.head_dim
    if capacity == 0 or blocks.shape[0] == 0:
        empty = torch.zeros(batch, heads, capacity, d)
        return empty, empty.clone(), torch.zeros(batch, heads, capacity, dtype=torch.bool)
    keys, values, _ = unpack_blocks(blocks, layout, blocks.shape[0] * layout.tokens)
    slots = torch.arange(capacity)
    index = start.long()[..., None] * layout.tokens + slots  # [b, H, capacity]
    valid = slots < count[..., None]
    index = torch.where(valid, index, torch.zeros_like(index))
    return keys[index], values[index], valid


def dense(layer: CompressedLayer):
    """Every slot of the layer, in `reference.slot_offsets` order: keys, values
    [b, H, slots, D] fp32, logit bias [b, H, slots] (log count for centroids), valid mask."""
    capacity = layer.slot_capacity()
    batch, heads = layer.batch, layer.kv_heads
    parts_k, parts_v, parts_bias, parts_valid = [], [], [], []

    def add(k, v, valid, bias=None):
        parts_k.append(k.float())
        parts_v.append(v.float())
        parts_valid.append(valid)
        parts_bias.append(torch.zeros(valid.shape) if bias is None else bias)

    for key, value, length in ((layer.sinks_key, layer.sinks_value, layer.sink_len),
                               (layer.window_key, layer.window_value, layer.window_len)):
        slots = torch.arange(key.shape[2])
        add(key, value, (slots < length[:, None].long()).expand(batch, -1)[:, None].expand(
            batch, heads, -1))
    counts = layer.centroid_count
    add(layer.centroid_key, layer.centroid_value, counts > 0,
        torch.log(counts.clamp_min(1).double()).float())
    for region in ("guard", "body"):
        k, v, valid = _region_slots(getattr(layer, f"{region}_blocks"),
                                    getattr(layer, f"{region}_layout"),
                                    getattr(layer, f"{region}_start"),
                                    getattr(layer, f"{region}_count"), capacity[region])
        add(k, v, valid)
    return (torch.cat(parts_k, 2), torch.cat(parts_v, 2), torch.cat(parts_bias, 2),
            torch.cat(parts_valid, 2))


def attend(q: torch.Tensor, layer: CompressedLayer, sm_scale: float | None = None,
           with_mass: bool = False):
    """q [b, Hq, D] → out fp32 [b, Hq, D] (and attention mass [b, H, slots]); `reference.attend`
    vectorized."""
    batch, q_heads, head_dim = q.shape
    heads = layer.kv_heads
    group = q_heads // heads
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    keys, values, bias, valid = dense(layer)
    if not with_mass:
        # PyTorch's fused attention: the same kernel a model's SDPA attention uses, so a policy
        # that keeps everything reproduces the uncompressed model to the last bits it can.
        mask = None
        if not bool(valid.all()) or bool(bias.any()):
            mask = bias.masked_fill(~valid, -math.inf).repeat_interleave(group, 1)[:, :, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.float()[:, :, None], keys, values, attn_mask=mask, scale=sm_scale, enable_gqa=True)
        return torch.nan_to_num(out[:, :, 0]), None
    queries = q.float().reshape(batch, heads, group, head_dim)
    logits = torch.einsum("bhgd,bhtd->bhgt", queries, keys) * sm_scale + bias[:, :, None]
    logits = logits.masked_fill(~valid[:, :, None], -math.inf)
    p = torch.softmax(logits, dim=-1)
    p = torch.nan_to_num(p)  # a sequence with no stored token at all attends to nothing
    out = torch.einsum("bhgt,bhtd->bhgd", p, values).reshape(batch, q_heads, head_dim)
    mass = p.sum(2) if with_mass else None
    assert mass is None or mass.shape[-1] == slot_offsets(layer)["total"]
    return out, mass


def attend_chunk(q: torch.Tensor, layer: CompressedLayer, sm_scale: float | None = None):
    """m new tokens at once, already appended to the end of the window: q [b, Hq, m, D] →
    [b, Hq, m, D]. Query i sees every stored token except the chunk's tokens after it."""
    batch, q_heads, m, head_dim = q.shape
    group = q_heads // layer.kv_heads
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    keys, values, bias, valid = dense(layer)
    offsets = slot_offsets(layer)
    slots = keys.shape[2]
    position = torch.arange(slots)
    in_window = (position >= offsets["window"]) & (position < offsets["centroids"])
    window_index = position - offsets["window"]
    visible = valid[:, :, None, :].expand(-1, -1, m, -1).clone()  # [b, H, m, slots]
    last = layer.window_len.long()[:, None] - m + torch.arange(m)[None, :]  # [b, m]
    future = in_window[None, None, :] & (window_index[None, None, :] > last[:, :, None])
    visible &= ~future[:, None]
    mask = bias[:, :, None, :].expand(-1, -1, m, -1).masked_fill(~visible, -math.inf)
    mask = mask.repeat_interleave(group, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), keys, values, attn_mask=mask, scale=sm_scale, enable_gqa=True)
    return torch.nan_to_num(out)
