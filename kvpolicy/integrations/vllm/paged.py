"""A compiled policy in vLLM's paged KV cache: the page format and the compute, as plain
functions of tensors (no vLLM import; the GPU machine, which has no vLLM, can test them).

A vLLM block holds `block_size` tokens of every KV head of a layer. Here its page holds, per KV
head, the block's tokens packed in the layer's body format (`kvpolicy.format.BlockLayout`,
`block_size / B` format blocks of B tokens back to back, no positions: nothing is evicted in
stage 1). A block is *sealed* — quantized and packed into its page — once it has left the
policy's full-precision window: block j is sealed when the sequence reaches
(j + 1) * block_size + window tokens. Until then its tokens live at full precision in a staging
buffer outside vLLM's pool (`staging.StagingTable` decides which slot). With block_size equal to
the format's unit B this is exactly the Hugging Face runtime's rule (the window holds between
`window` and `window + B - 1` tokens), so both runtimes quantize the same tokens the same way.

docs/vllm.md describes the design and what it cannot do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.format import DTYPE_BYTES, BlockLayout, block_layout, block_tokens
from kvpolicy.integrations.vllm import staging
from kvpolicy.lang.ir import Policy
from kvpolicy.models import ModelShape
from kvpolicy.plan.planner import layer_formats
from kvpolicy.runtime import reference as R


class UnsupportedConfiguration(ValueError):
    """The policy, model or engine settings cannot run in the vLLM backend; lists every reason."""

    def __init__(self, reasons: list[str]):
        self.reasons = list(reasons)
        super().__init__("kvpolicy's vLLM backend cannot run this configuration:\n"
                         + "\n".join(f"  - {r}" for r in self.reasons))


@dataclass(frozen=True)
class PageFormat:
    """How one layer group's pages are laid out. Every layer gets the same page size (vLLM
    gives one page format to a KV-cache group): the largest layer's; smaller layers pad."""

    block_size: int  # vLLM tokens per block
    window: int  # the policy's full-precision window (tokens)
    kv_heads: int
    head_dim: int
    dtype_bytes: int  # the model's KV dtype (staging and the baseline page)
    layouts: tuple[BlockLayout, ...]  # per model layer, B tokens each

    def layer_bytes(self, layer: int) -> int:
        """Bytes one KV head of one block needs in `layer` (without padding)."""
        layout = self.layouts[layer]
        return self.block_size // layout.tokens * layout.nbytes

    @property
    def page_bytes(self) -> int:
        """state_content_bytes published to vLLM: one KV head's share of a block."""
        return max(self.layer_bytes(i) for i in range(len(self.layouts)))

    @property
    def padding_bytes(self) -> int:
        """Bytes per block (all layers and heads) that pad smaller layers to the page size."""
        return self.kv_heads * sum(self.page_bytes - self.layer_bytes(i)
                                   for i in range(len(self.layouts)))

    @property
    def baseline_page_bytes(self) -> int:
        """What vLLM's own page for one KV head holds: block_size keys and values, 16-bit."""
        return self.block_size * 2 * self.head_dim * self.dtype_bytes

    @property
    def capacity_ratio(self) -> float:
        """Tokens that fit in the same pool memory, relative to the 16-bit cache (exact)."""
        return self.baseline_page_bytes / self.page_bytes

    def staging_bytes(self, slots: int) -> int:
        """Full-precision staging outside the pool, all layers: slots x layers x heads x block."""
        return slots * len(self.layouts) * self.baseline_page_bytes * self.kv_heads

    def sealed(self, block_index: int, seq_len: int) -> bool:
        """Is block `block_index` of a sequence of `seq_len` tokens packed in its page?"""
        return staging.sealed(block_index, seq_len, self.block_size, self.window)

    def to_json(self) -> dict:
        return {"block_size": self.block_size, "window": self.window,
                "page_bytes_per_kv_head": self.page_bytes,
                "baseline_page_bytes_per_kv_head": self.baseline_page_bytes,
                "capacity_ratio": self.capacity_ratio,
                "padding_bytes_per_block": self.padding_bytes}


def unsupported_policy_reasons(policy: Policy) -> list[str]:
    """What stage 1 (packed quantization in pages) does not realise, in the user's words."""
    reasons = []
    if policy.evicts:
        reasons.append("the policy evicts tokens (retain < 100%): retention in pages (stage 2) "
                       "is not built yet")
    if policy.sinks:
        reasons.append(f"keep sinks {policy.sinks}: full-precision sinks in pages are not built "
                       "yet (sinks are sealed like any other block)")
    if policy.guard is not None or any(o.guard is not None for o in policy.layers):
        reasons.append("guard tokens: per-page guard slots are not built yet")
    if policy.cluster is not None:
        reasons.append("cluster evicted: needs eviction (stage 2)")
    return reasons


def page_format(policy: Policy, model: ModelShape, block_size: int,
                dtype_bytes: int | None = None) -> PageFormat:
    """The page format of `policy` on `model` with vLLM blocks of `block_size` tokens; raises
    UnsupportedConfiguration listing every reason it cannot be built."""
    reasons = unsupported_policy_reasons(policy)
    layouts = []
    for index, (keys, values, _guard) in enumerate(layer_formats(policy, model)):
        unit = block_tokens(keys, values)
        if block_size % unit:
            reasons.append(f"layer {index}: block size {block_size} is not a multiple of the "
                           f"format's {unit}-token unit (per-channel groups need whole blocks; "
                           f"use --block-size {unit} or a multiple)")
            continue
        layouts.append(block_layout(keys, values, model.head_dim, model.kv_dtype,
                                    positions=False, tokens=unit))
    if reasons:
        raise UnsupportedConfiguration(sorted(set(reasons), key=reasons.index))
    return PageFormat(block_size=block_size, window=policy.window, kv_heads=model.num_kv_heads,
                      head_dim=model.head_dim,
                      dtype_bytes=dtype_bytes or DTYPE_BYTES[model.kv_dtype],
                      layouts=tuple(layouts))


# ---- writing --------------------------------------------------------------------------------

def stage_tokens(staging: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 stage_slot: torch.Tensor, offset: torch.Tensor) -> None:
    """Writes new tokens into the full-precision staging buffer.

    staging [slots, H, block_size, 2, D]; key, value [n, H, D]; stage_slot, offset [n] int64
    (the staging slot of each token's block and its offset in the block)."""
    staging[stage_slot, :, offset, 0] = key.to(staging.dtype)
    staging[stage_slot, :, offset, 1] = value.to(staging.dtype)


def seal_blocks(pages: torch.Tensor, staging: torch.Tensor, blocks: torch.Tensor,
                slots: torch.Tensor, fmt: PageFormat, layer: int, packer=None) -> None:
    """Quantizes and packs whole staged blocks into their pages.

    pages: the layer's uint8 cache [num_blocks, H, 1, page_bytes]; blocks, slots [m] int64 (the
    physical block and the staging slot holding its tokens). `packer(keys, values, positions,
    layout)` defaults to the PyTorch reference; a compiled pack kernel has the same signature."""
    if blocks.numel() == 0:
        return
    packer = packer or R.pack_blocks
    layout = fmt.layouts[layer]
    m, heads, bs = blocks.numel(), pages.shape[1], fmt.block_size  # heads of this TP rank
    tokens = staging[slots]  # [m, H, bs, 2, D]
    keys = tokens[..., 0, :].reshape(m * heads * bs, fmt.head_dim)
    values = tokens[..., 1, :].reshape(m * heads * bs, fmt.head_dim)
    packed = packer(keys, values, None, layout)  # [m * H * bs / B, nbytes]: B divides bs
    nbytes = fmt.layer_bytes(layer)
    pages[blocks, :, 0, :nbytes] = packed.reshape(m, heads, nbytes)


# ---- reading --------------------------------------------------------------------------------

def unpack_pages(pages: torch.Tensor, blocks: torch.Tensor, fmt: PageFormat,
                 layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sealed pages → (keys, values) fp32 [H, len(blocks) * block_size, D], in block order."""
    layout = fmt.layouts[layer]
    m, heads, bs = blocks.numel(), pages.shape[1], fmt.block_size
    raw = pages[blocks, :, 0, :fmt.layer_bytes(layer)]  # [m, H, nbytes]
    per_page = bs // layout.tokens
    flat = raw.permute(1, 0, 2).reshape(heads * m * per_page, layout.nbytes)
    keys, values, _ = R.unpack_blocks(flat, layout, heads * m * bs)
    shape = (heads, m * bs, fmt.head_dim)
    return keys.reshape(shape), values.reshape(shape)


def cached_tokens(pages: torch.Tensor, staging: torch.Tensor, block_row: list[int],
                  stage_slots: list[int], count: int, seq_len: int, fmt: PageFormat,
                  layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` tokens of a sequence of `seq_len`, as attention sees them: sealed blocks
    dequantized from their pages, the others from staging. block_row: the sequence's physical
    blocks; stage_slots: the staging slot of each (-1 when sealed). → fp32 [H, count, D] x 2."""
    bs = fmt.block_size
    needed = -(-count // bs)
    keys, values = [], []
    j = 0
    while j < needed:
        if fmt.sealed(j, seq_len):
            run = j
            while run < needed and fmt.sealed(run, seq_len):
                run += 1
            k, v = unpack_pages(pages, torch.tensor(block_row[j:run]), fmt, layer)
            j = run
        else:
            slot = stage_slots[j]
            assert slot >= 0, f"block {j} is neither sealed nor staged"
            k = staging[slot, :, :, 0].float()
            v = staging[slot, :, :, 1].float()
            j += 1
        keys.append(k)
        values.append(v)
    if not keys:
        empty = torch.zeros(pages.shape[1], 0, fmt.head_dim)
        return empty, empty
    return torch.cat(keys, 1)[:, :count], torch.cat(values, 1)[:, :count]


def attend(query: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor,
           new_keys: torch.Tensor, new_values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a chunk of new tokens over the cached past and themselves.

    query [m, Hq, D]; past_* [H, p, D] (as cached); new_* [m, H, D] (full precision, as the
    model produced them); → [m, Hq, D] fp32. GQA: query head h reads KV head h // (Hq / H)."""
    m, q_heads, _ = query.shape
    group = q_heads // past_keys.shape[0]
    keys = torch.cat([past_keys, new_keys.float().transpose(0, 1)], 1)  # [H, p + m, D]
    values = torch.cat([past_values, new_values.float().transpose(0, 1)], 1)
    keys = keys.repeat_interleave(group, 0)
    values = values.repeat_interleave(group, 0)
    p = past_keys.shape[1]
    allowed = torch.ones(m, p + m, dtype=torch.bool)
    allowed[:, p:] = torch.ones(m, m, dtype=torch.bool).tril()
    return torch.nn.functional.scaled_dot_product_attention(
        query.float().transpose(0, 1), keys, values, attn_mask=allowed,
        scale=scale).transpose(0, 1)
