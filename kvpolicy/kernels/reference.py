"""The living spec: quantization, packing, blocks and attention in plain PyTorch.

Every generated kernel is tested against these functions — codes and packed bytes bit for bit,
attention within stated tolerances. They are written for clarity, not speed. The format they
produce is the one `kvpolicy.format` accounts for and docs/format.md describes.

Quantization of a group (all arithmetic in fp32, IEEE division, round half up):
    asymmetric:  scale = to_dtype((max - min) / (2^b - 1)),  zero = to_dtype(min)
                 code  = clamp(floor((x - zero) / scale + 0.5), 0, 2^b - 1)   (0 if scale == 0)
                 x^    = code * scale + zero
    symmetric:   q = 2^(b-1) - 1,  scale = to_dtype(max|x| / q)
                 code  = clamp(floor(x / scale + 0.5), -q, q) + q            (q if scale == 0)
                 x^    = (code - q) * scale
Codes are computed from the *stored* (rounded) scale and zero, so dequantizing the stored values
gives exactly what the kernels compute. bf16 rounding is done on the bits (round to nearest even)
so that it is the same on every backend.
"""

from __future__ import annotations

import math

import torch

from kvpolicy.dtypes import DTYPE_BYTES, HALF_DTYPES, LONG_NAMES
from kvpolicy.format import PLANES, BlockLayout
from kvpolicy.lang.ir import QuantFormat

_TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_BYTES}


def torch_dtype(name: str) -> torch.dtype:
    """A dtype name of `kvpolicy.dtypes` → torch's dtype."""
    return _TORCH_DTYPES[name]


HALF_TORCH_DTYPES = tuple(torch_dtype(name) for name in HALF_DTYPES)


def storage_dtype(name: str) -> torch.dtype:
    """How a section of dtype `name` is held here: bfloat16 as its bit pattern (int16, rounded
    on integers by `round_to_bf16_bits`), any other as itself."""
    return torch.int16 if name == "bfloat16" else torch_dtype(name)


def dtype_name(dtype: torch.dtype) -> str:
    """torch's dtype → its name in `kvpolicy.dtypes` (torch.bfloat16 → "bfloat16")."""
    return str(dtype).removeprefix("torch.")


# ---- rounding to the scale dtype ----------------------------------------------------------

def round_to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16 bit pattern (int16), round to nearest even, done on integers."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (rounded & 0xFFFF).to(torch.int32).to(torch.int16)


def bf16_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    return ((bits.to(torch.int32) & 0xFFFF) << 16).view(torch.float32)


def store_scale(x: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """fp32 values → their stored form (fp16, bf16 bits as int16, or fp32)."""
    if scale_dtype == "bf16":
        return round_to_bf16_bits(x)
    return x.to(storage_dtype(LONG_NAMES[scale_dtype]))


def load_scale(stored: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    if scale_dtype == "bf16":
        return bf16_bits_to_float(stored)
    return stored.float()


# ---- quantization ---------------------------------------------------------------------------

def _grouped(x: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, int]:
    """View [..., n, D] as groups; returns (view, dim reduced over)."""
    *lead, n, d = x.shape
    if fmt.axis == "channel":
        return x.reshape(*lead, n // fmt.group, fmt.group, d), -2
    return x.reshape(*lead, n, d // fmt.group, fmt.group), -1


def _ungrouped(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return x.reshape(shape)


def quantize(x: torch.Tensor, fmt: QuantFormat, valid: torch.Tensor | None = None):
    """x [..., n, D] → (codes int32 [..., n, D], scale, zero) with scale/zero in stored form:
    [..., n/G, D] per channel, [..., n, D/G] per token; zero is None when symmetric.

    `valid` [..., n] (bool) marks real tokens; padding tokens are left out of the group statistics
    and get code 0. For per-channel groups n must be a multiple of the group."""
    x = x.float()
    levels = (1 << fmt.bits) - 1
    mask = torch.ones(x.shape[:-1], dtype=torch.bool) if valid is None else valid
    full_mask = mask[..., None].expand(x.shape)
    grouped, dim = _grouped(x, fmt)
    grouped_mask, _ = _grouped(full_mask, fmt)
    lo = torch.where(grouped_mask, grouped, torch.full_like(grouped, math.inf)).amin(dim)
    hi = torch.where(grouped_mask, grouped, torch.full_like(grouped, -math.inf)).amax(dim)
    empty = ~grouped_mask.any(dim)
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    if fmt.symmetric:
        half = (1 << (fmt.bits - 1)) - 1
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = store_scale(amax / half, fmt.scale_dtype)
        s = load_scale(scale, fmt.scale_dtype).unsqueeze(dim)
        raw = torch.floor(grouped / torch.where(s == 0, torch.ones_like(s), s) + 0.5)
        codes = torch.where(s == 0, torch.zeros_like(raw), raw.clamp(-half, half)) + half
        zero = None
    else:
        scale = store_scale((hi - lo) / levels, fmt.scale_dtype)
        zero = store_scale(lo, fmt.scale_dtype)
        s = load_scale(scale, fmt.scale_dtype).unsqueeze(dim)
        z = load_scale(zero, fmt.scale_dtype).unsqueeze(dim)
        raw = torch.floor((grouped - z) / torch.where(s == 0, torch.ones_like(s), s) + 0.5)
        codes = torch.where(s == 0, torch.zeros_like(raw), raw.clamp(0, levels))
    codes = _ungrouped(codes, x.shape).to(torch.int32)
    codes = torch.where(full_mask, codes, torch.zeros_like(codes))
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               fmt: QuantFormat) -> torch.Tensor:
    """Inverse of `quantize` up to rounding: fp32 [..., n, D]."""
    grouped, dim = _grouped(codes.float(), fmt)
    s = load_scale(scale, fmt.scale_dtype).unsqueeze(dim)
    if fmt.symmetric:
        half = (1 << (fmt.bits - 1)) - 1
        values = (grouped - half) * s
    else:
        values = grouped * s + load_scale(zero, fmt.scale_dtype).unsqueeze(dim)
    return _ungrouped(values, codes.shape)


# ---- packing codes into words (bit planes along head_dim) ------------------------------------

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., D] in [0, 2^bits) → int32 words [..., bits * ceil(D/32)].

    Plane by plane (low bits first): a p-bit plane holds 32/p channels per word, channel c at
    bits [(c mod 32/p) * p, +p) of word c // (32/p) of that plane."""
    *lead, d = codes.shape
    padded = math.ceil(d / 32) * 32
    codes = torch.nn.functional.pad(codes.to(torch.int64), (0, padded - d))
    words = []
    shift = 0
    for plane in PLANES[bits]:
        part = (codes >> shift) & ((1 << plane) - 1)
        per_word = 32 // plane
        part = part.reshape(*lead, padded // per_word, per_word)
        offsets = torch.arange(per_word, dtype=torch.int64) * plane
        word = (part << offsets).sum(-1)  # disjoint bit fields: the sum is an OR
        words.append(word)
        shift += plane
    packed = torch.cat(words, -1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """int32 words [..., bits * ceil(D/32)] → codes int32 [..., D]. In int32 throughout: a right
    shift of a negative word fills the high bits with ones, which the plane's mask drops."""
    *lead, _ = words.shape
    padded = math.ceil(head_dim / 32) * 32
    codes = None
    start = 0
    shift = 0
    for plane in PLANES[bits]:
        per_word = 32 // plane
        count = padded // per_word
        plane_words = words[..., start:start + count].to(torch.int32)
        offsets = torch.arange(per_word, dtype=torch.int32, device=words.device) * plane
        part = ((plane_words[..., None] >> offsets) & ((1 << plane) - 1)).reshape(*lead, padded)
        part = part << shift if shift else part
        codes = part if codes is None else codes | part
        start += count
        shift += plane
    return codes[..., :head_dim]


# ---- blocks -----------------------------------------------------------------------------------

def _section_view(blocks: torch.Tensor, layout: BlockLayout, name: str) -> torch.Tensor:
    section = layout.section(name)
    raw = blocks[:, section.offset:section.offset + section.nbytes].contiguous()
    return raw.view(storage_dtype(section.dtype)).reshape(blocks.shape[0], *section.shape)


def pack_blocks(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None,
                layout: BlockLayout) -> torch.Tensor:
    """n tokens of one KV head → uint8 blocks [ceil(n/B), layout.nbytes].

    keys, values [n, D] (any float dtype); positions [n] int. When n is not a multiple of the block
    size B, the last block is padded: padding slots hold code 0 (16-bit: 0.0), position -1, and
    are left out of the group statistics."""
    n, d = keys.shape
    tokens = layout.tokens
    count = -(-n // tokens)
    pad = count * tokens - n
    valid = torch.arange(count * tokens) < n
    blocks = torch.zeros(count, layout.nbytes, dtype=torch.uint8)

    def put(name: str, tensor: torch.Tensor) -> None:
        section = layout.section(name)
        data = tensor.contiguous().reshape(count, -1).view(torch.uint8)
        blocks[:, section.offset:section.offset + section.nbytes] = data

    for role, x, fmt in (("key", keys, layout.keys), ("value", values, layout.values)):
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).reshape(count, tokens, d)
        if not fmt.quantized:
            stored = x.to(torch_dtype(layout.kv_dtype))
            stored = torch.where(valid.reshape(count, tokens, 1), stored, torch.zeros_like(stored))
            put(f"{role}.codes", stored.view(torch.int16))
            continue
        codes, scale, zero = quantize(x, fmt, valid.reshape(count, tokens))
        put(f"{role}.codes", pack_codes(codes, fmt.bits))
        put(f"{role}.scale", scale.view(torch.int16) if scale.dtype == torch.float16 else scale)
        if zero is not None:
            put(f"{role}.zero", zero.view(torch.int16) if zero.dtype == torch.float16 else zero)
    if layout.positions:
        assert positions is not None
        padded = torch.full((count * tokens,), -1, dtype=torch.int32)
        padded[:n] = positions.to(torch.int32)
        put("positions", padded)
    return blocks


def unpack_blocks(blocks: torch.Tensor, layout: BlockLayout, count: int):
    """uint8 blocks → (keys fp32 [count, D], values fp32 [count, D], positions int32 [count] or
    None): the first `count` tokens, dequantized."""
    out = []
    for role, fmt in (("key", layout.keys), ("value", layout.values)):
        if not fmt.quantized:
            raw = _section_view(blocks, layout, f"{role}.codes")
            values = raw.view(torch_dtype(layout.kv_dtype)).float()
        else:
            codes = unpack_codes(_section_view(blocks, layout, f"{role}.codes"), fmt.bits,
                                 layout.head_dim)
            scale = _stored(_section_view(blocks, layout, f"{role}.scale"), fmt)
            zero = None if fmt.symmetric else _stored(
                _section_view(blocks, layout, f"{role}.zero"), fmt)
            values = dequantize(codes, scale, zero, fmt)
        out.append(values.reshape(-1, layout.head_dim)[:count])
    positions = None
    if layout.positions:
        positions = _section_view(blocks, layout, "positions").reshape(-1)[:count]
    return out[0], out[1], positions


def _stored(raw: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    if fmt.scale_dtype == "fp16":
        return raw.view(torch.float16)
    return raw


# ---- attention of one decode step over a compressed layer ---------------------------------


def slot_offsets(layer) -> dict[str, int]:
    """Where each region starts in the attention-mass output's slot axis."""
    offsets, start = {}, 0
    for region, capacity in layer.slot_capacity().items():
        offsets[region] = start
        start += capacity
    offsets["total"] = start
    return offsets


def layer_tokens(layer, b: int, h: int):
    """The tokens (sequence b, KV head h) attends to: keys, values (fp32 [n, D]), logit bias [n]
    and their slots in the mass output."""
    offsets = slot_offsets(layer)
    keys, values, bias, slots = [], [], [], []

    def add(region, k, v, extra, first_slot, slot_index=None):
        n = k.shape[0]
        keys.append(k.float())
        values.append(v.float())
        bias.append(extra if extra is not None else torch.zeros(n))
        index = torch.arange(n) if slot_index is None else slot_index
        slots.append(offsets[region] + first_slot + index)

    s = int(layer.sink_len[b])
    add("sinks", layer.sinks_key[b, h, :s], layer.sinks_value[b, h, :s], None, 0)
    w = int(layer.window_len[b])
    add("window", layer.window_key[b, h, :w], layer.window_value[b, h, :w], None, 0)
    count = layer.centroid_count[b, h]
    live = torch.nonzero(count > 0).flatten()
    add("centroids", layer.centroid_key[b, h, live], layer.centroid_value[b, h, live],
        torch.log(count[live].double()).float(), 0, live)
    for region, blocks, start, counts, block_layout in (
            ("guard", layer.guard_blocks, layer.guard_start, layer.guard_count,
             layer.guard_layout),
            ("body", layer.body_blocks, layer.body_start, layer.body_count, layer.body_layout)):
        n = int(counts[b, h])
        if n == 0:
            continue
        first = int(start[b, h])
        used = blocks[first:first + -(-n // block_layout.tokens)]
        k, v, _ = unpack_blocks(used, block_layout, n)
        add(region, k, v, None, 0)
    return torch.cat(keys), torch.cat(values), torch.cat(bias), torch.cat(slots)


def attend(q: torch.Tensor, layer, sm_scale: float, with_mass: bool = False):
    """One decode step. q [b, Hq, D] → out fp32 [b, Hq, D] and, if asked, the attention mass of
    every stored token summed over the query heads of its KV group: [b, H, slots] (zeros in empty
    slots; slot layout from `slot_offsets`). Centroids get a logit bias of log(count)."""
    batch, q_heads, head_dim = q.shape
    kv_heads = layer.kv_heads
    group = q_heads // kv_heads
    out = torch.zeros(batch, q_heads, head_dim)
    mass = torch.zeros(batch, kv_heads, slot_offsets(layer)["total"]) if with_mass else None
    for b in range(batch):
        for h in range(kv_heads):
            keys, values, bias, slots = layer_tokens(layer, b, h)
            rows = slice(h * group, (h + 1) * group)
            logits = q[b, rows].float() @ keys.T * sm_scale + bias
            p = torch.softmax(logits, dim=-1)
            out[b, rows] = p @ values
            if mass is not None:
                mass[b, h, slots] = p.sum(0)
    return out, mass


# ---- importance of prompt tokens (what selection and guards rank by) ----------------------

def pool_scores(scores: torch.Tensor, pool: str, kernel: int) -> torch.Tensor:
    """SnapKV's pooling along the last axis (max or avg over a centred window of `kernel`
    tokens, edges not padded into the average); "none" or kernel 1 leaves scores as they are."""
    if pool == "none" or kernel <= 1:
        return scores
    n = scores.shape[-1]
    flat = scores.reshape(-1, 1, n)
    if pool == "max":
        flat = torch.nn.functional.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        flat = torch.nn.functional.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2,
                                              count_include_pad=False)
    return flat[..., :n].reshape(scores.shape)


def snapkv_importance(q_observe: torch.Tensor, keys: torch.Tensor, observe_positions: torch.Tensor,
                      pool: str, kernel: int, gqa: str, sm_scale: float) -> torch.Tensor:
    """SnapKV: attention of the observation-window queries over the prompt, summed over those
    queries, reduced over the query heads of each KV group, pooled along the sequence
    (`reduce_then_pool`).

    q_observe [b, Hq, w, D] (queries of the last w prompt tokens), keys [b, H, N, D],
    observe_positions [w] (their positions, for the causal mask) → importance [b, H, N]."""
    batch, q_heads, w, _ = q_observe.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    expanded = keys.float().repeat_interleave(group, dim=1)  # [b, Hq, N, D]
    logits = q_observe.float() @ expanded.transpose(-1, -2) * sm_scale  # [b, Hq, w, N]
    causal = torch.arange(n)[None, :] > observe_positions[:, None]  # [w, N]
    logits = logits.masked_fill(causal, -math.inf)
    return reduce_then_pool(torch.softmax(logits, dim=-1).sum(-2), kv_heads, gqa, pool, kernel)


def reduce_then_pool(scores: torch.Tensor, kv_heads: int, gqa: str, pool: str,
                     kernel: int) -> torch.Tensor:
    """The one order of both runtimes: per-query-head scores [b, Hq, N] reduced over each KV
    group's query heads (`gqa`), then pooled along the sequence → [b, H, N]. The paged store can
    hold no other: it keeps one attention mass per KV head while a token is staged (the kernels
    reduce it), accumulated over steps, and pools only when the block seals. (The two orders
    agree whenever the reduction or the pooling is linear, or both are max.)"""
    return pool_scores(reduce_query_heads(scores, kv_heads, gqa), pool, kernel)


def reduce_query_heads(scores: torch.Tensor, kv_heads: int, gqa: str) -> torch.Tensor:
    """[b, Hq, N] per query head → [b, H, N] per KV head: mean, max or sum over each group."""
    batch, q_heads, n = scores.shape
    grouped = scores.reshape(batch, kv_heads, q_heads // kv_heads, n)
    if gqa == "mean":
        return grouped.mean(2)
    if gqa == "max":
        return grouped.amax(2)
    return grouped.sum(2)


def reconstruct_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          sm_scale: float, first: int):
    """One pass of KVzip's context reconstruction, in fp32: the queries of a repeat instruction
    and of a re-read chunk of the context (positions right after the context) attend over the
    context and causally over themselves.

    query [b, Hq, m, D]; keys, values [b, H, N + m, D] (the context's, then the pass's own) →
    (out [b, Hq, m, D] in the query's dtype, received [b, Hq, N]: the largest softmax weight each
    context token receives from the pass's queries from row `first` on — the re-read tokens, not
    the instruction)."""
    batch, q_heads, m, d = query.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    n = keys.shape[2] - m
    # a KV head's query heads as one matrix of rows: one product per KV head, no key copies
    rows = query.float().reshape(batch, kv_heads, group * m, d) * sm_scale
    logits = (rows @ keys.float().transpose(-1, -2)).view(batch, kv_heads, group, m, n + m)
    future = torch.arange(m)[None, :] > torch.arange(m)[:, None]  # [m, m]
    logits[..., n:].masked_fill_(future, -math.inf)
    weights = torch.softmax(logits, dim=-1)
    received = weights[..., first:, :n].amax(3).reshape(batch, q_heads, n)
    out = weights.view(batch, kv_heads, group * m, n + m) @ values.float()
    return out.view(batch, q_heads, m, d).to(query.dtype), received


def reconstruct_importance(received: torch.Tensor, kv_heads: int, pool: str, kernel: int,
                           gqa: str) -> torch.Tensor:
    """KVzip's importance from the reconstruction passes: received [b, Hq, N] (the largest
    attention weight each context token got from any re-reading query, over every pass) →
    [b, H, N], reduced over each KV group's query heads, pooled along the sequence."""
    return reduce_then_pool(received.float(), kv_heads, gqa, pool, kernel)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary embedding's pairing (dimension i with i + D/2): (x1, x2) → (-x2, x1)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undoes the rotary embedding: x [..., T, D] rotated at the positions of cos, sin [T, D]
    → fp32, as before RoPE (the inverse rotation, divided by cos² + sin², so rope scalings that
    multiply both tables are undone too)."""
    c, s = cos.float(), sin.float()
    x = x.float()
    return (x * c - rotate_half(x) * s) / (c * c + s * s)


def expected_importance(q_observe: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, future: int, pool: str,
                        kernel: int, gqa: str, sm_scale: float) -> torch.Tensor:
    """Expected Attention (Devoto et al., 2025): the attention the next `future` queries are
    expected to pay each prompt token, from the statistics of the last prompt queries.

    q_observe [b, Hq, w, D]: the last w prompt queries, after RoPE; keys, values [b, H, N, D]
    (keys after RoPE); cos, sin [P, D] (P >= N + future): the layer's rotary tables by position
    (x at position t is x cos_t + rotate_half(x) sin_t). The queries are rotated back to no
    position; their mean mu and covariance S per query head are moved to the future by the mean
    rotation R over positions N .. N + future - 1; a future query q ~ N(R mu, R S R^T) gives key k
    the expected logit E[exp(s q.k)] = exp(s k.R mu + s^2 k^T R S R^T k / 2) (s = sm_scale),
    softmax over the N keys; times the value's norm; reduced over each KV group's query heads and
    pooled along the sequence (`reduce_then_pool`). → [b, H, N]."""
    batch, q_heads, w, dim = q_observe.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    q = unrotate(q_observe, cos[n - w:n], sin[n - w:n])
    mean = q.mean(2)  # [b, Hq, D]
    centred = q - mean[:, :, None]
    covariance = centred.transpose(-1, -2) @ centred / w  # [b, Hq, D, D]
    c_future = cos[n:n + future].float().mean(0)  # [D]
    s_future = sin[n:n + future].float().mean(0)
    rotation = torch.diag(c_future) + torch.diag(s_future) @ rotate_half(torch.eye(dim)).T
    mean = mean @ rotation.T  # R mu
    covariance = rotation @ covariance @ rotation.T
    k = keys.float()  # [b, H, N, D]
    mean = mean.reshape(batch, kv_heads, group, dim)
    covariance = covariance.reshape(batch, kv_heads, group, dim, dim)
    linear = torch.einsum("bhnd,bhgd->bhgn", k, mean)
    quadratic = ((k[:, :, None] @ covariance) * k[:, :, None]).sum(-1)  # [b, H, g, N]
    probs = torch.softmax(sm_scale * linear + 0.5 * sm_scale * sm_scale * quadratic, dim=-1)
    scores = probs * values.float().norm(dim=-1)[:, :, None]
    return reduce_then_pool(scores.reshape(batch, q_heads, n), kv_heads, gqa, pool, kernel)


def keynorm_importance(keys: torch.Tensor) -> torch.Tensor:
    """KNorm: keys with a small L2 norm rank high. [b, H, N, D] → [b, H, N]."""
    return -keys.float().norm(dim=-1)


def recent_importance(batch: int, kv_heads: int, n: int) -> torch.Tensor:
    """Recency: later tokens rank higher. → [b, H, N]."""
    return torch.arange(n, dtype=torch.float32).expand(batch, kv_heads, n).clone()


def accumulate_importance(running: torch.Tensor | None, mass: torch.Tensor,
                          decay: float = 1.0) -> torch.Tensor:
    """Running importance of stored tokens during decoding: decay * running + this step's mass."""
    return mass.clone() if running is None else decay * running + mass
