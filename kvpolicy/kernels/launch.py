"""Launchers for the generated kernels: check shapes, allocate, launch.

Kernels:
    pack_kernel    quantize + pack rows of keys/values into blocks        (codegen/pack.py.jinja)
    unpack_kernel  blocks back to fp32 rows                              (codegen/unpack.py.jinja)
    decode_kernel  one decode step over every region of the whole-prompt runtime's compressed
                   layer, split over tokens (codegen/decode.py.jinja)
    paged_decode_kernel  one decode step of the paged store: pages through a block table, staged
                   blocks, the new token; scores for attention mass (codegen/paged_decode…)
    combine_kernel merge the splits; mass_kernel: attention mass per token (codegen/combine…)

Each launcher takes the loaded kernel module(s) of the right spec (`kvpolicy.load(...)` or
`kvpolicy.compiler.artifact.import_kernel_file`). Tensors may live on the CPU (Triton's
interpreter, TRITON_INTERPRET=1) or on a GPU.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from kvpolicy.format import BlockLayout
from kvpolicy.kernels.compressed import CompressedLayer
from kvpolicy.kernels.contract import MASS_REDUCE, SOURCE_DTYPES, PagedTables, per_head

LOG2E = 1.4426950408889634


def _poisoned(*shape: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Output buffers start as NaN (or -1), so an element a kernel fails to write cannot pass a
    comparison with the reference."""
    if dtype.is_floating_point:
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)


def _dummy(like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(16, dtype=dtype, device=like.device)


def _or_dummy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.numel() else _dummy(tensor, tensor.dtype)


def pack_rows(kernels: ModuleType, src_key: torch.Tensor, src_value: torch.Tensor,
              src_index: torch.Tensor, positions: torch.Tensor, blocks: torch.Tensor,
              block_ids: torch.Tensor) -> None:
    """Fills blocks[block_ids[i]] from rows src[src_index[i, :]] (-1: padding slot).

    src_key, src_value [rows, D] (fp16/bf16/fp32, unit stride in D); src_index, positions
    [programs, B] int32; blocks [blocks, NBYTES] uint8; block_ids [programs] int32."""
    tokens, nbytes = kernels.B.value, kernels.NBYTES.value
    programs = block_ids.numel()
    assert src_key.dtype == src_value.dtype and src_key.dtype in SOURCE_DTYPES
    assert src_key.stride(-1) == 1 and src_value.stride(-1) == 1
    assert src_key.shape[-1] == kernels.D.value == src_value.shape[-1]
    assert src_index.shape == (programs, tokens) and positions.shape == (programs, tokens)
    assert blocks.dtype == torch.uint8 and blocks.shape[-1] == nbytes
    if programs == 0:
        return
    kernels.pack_kernel[(programs,)](
        src_key, src_value, src_key.stride(0), src_value.stride(0),
        src_index.to(torch.int32).contiguous(), positions.to(torch.int32).contiguous(), blocks,
        block_ids.to(torch.int32).contiguous(), SRC_DTYPE=SOURCE_DTYPES[src_key.dtype])


def pack_tokens(kernels: ModuleType, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor | None, layout: BlockLayout) -> torch.Tensor:
    """n tokens of one KV head → uint8 blocks [ceil(n/B), NBYTES]; the kernel twin of
    `reference.pack_blocks` (same padding rule)."""
    n = keys.shape[0]
    tokens = layout.tokens
    count = -(-n // tokens)
    slots = torch.arange(count * tokens, device=keys.device)
    src_index = torch.where(slots < n, slots, -1).to(torch.int32).reshape(count, tokens)
    pos = torch.full((count * tokens,), -1, dtype=torch.int32, device=keys.device)
    if positions is not None:
        pos[:n] = positions.to(torch.int32)
    blocks = torch.zeros(count, layout.nbytes, dtype=torch.uint8, device=keys.device)
    pack_rows(kernels, keys, values, src_index, pos.reshape(count, tokens), blocks,
              torch.arange(count, dtype=torch.int32, device=keys.device))
    return blocks


def packer(kernels: dict[str, ModuleType]):
    """`pack(keys, values, positions, layout)` with the pack kernel of each layout, found among
    `kernels` (URI → loaded module, e.g. a CompiledPolicy's) by its spec's URI: the kernel twin
    of `reference.pack_blocks`."""
    from kvpolicy.compiler.specs import BlockSpec, PackSpec

    def pack(keys, values, positions, layout):
        return pack_tokens(kernels[PackSpec(BlockSpec.of(layout)).uri], keys, values, positions,
                           layout)
    return pack


def unpack(kernels: ModuleType, blocks: torch.Tensor, block_ids: torch.Tensor,
           counts: torch.Tensor):
    """→ keys, values fp32 [programs, B, D] and positions int32 [programs, B] (-1 past count)."""
    tokens, head_dim = kernels.B.value, kernels.D.value
    programs = block_ids.numel()
    device = blocks.device
    out_key = _poisoned(programs, tokens, head_dim, device=device)
    out_value = _poisoned(programs, tokens, head_dim, device=device)
    out_positions = _poisoned(programs, tokens, device=device, dtype=torch.int32)
    if programs:
        kernels.unpack_kernel[(programs,)](blocks, block_ids.to(torch.int32).contiguous(),
                                           counts.to(torch.int32).contiguous(), out_key,
                                           out_value, out_positions)
    return out_key, out_value, out_positions


def _step(kernels: ModuleType, prefix: str) -> int:
    """Blocks per tile of a blocked region: at least 16 tokens per tile (tl.dot's minimum)."""
    block = getattr(kernels, f"{prefix}B", None)
    return max(1, 16 // block.value) if block is not None else 1


def decode(decode_kernels: ModuleType, combine_kernels: ModuleType, q: torch.Tensor,
           layer: CompressedLayer, sm_scale: float | None = None, num_splits: int = 4,
           block_t: int = 32) -> torch.Tensor:
    """One decode step of the whole-prompt runtime: q [b, Hq, D] → out fp32 [b, Hq, D] over
    every region of a compressed layer. Matches `reference.attend`."""
    batch, q_heads, head_dim = q.shape
    kv_heads = layer.kv_heads
    assert q_heads % kv_heads == 0 and q_heads // kv_heads == decode_kernels.G.value
    assert head_dim == decode_kernels.D.value == layer.head_dim
    assert q.stride(-1) == 1 and num_splits >= 1
    sm_scale = (1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale) * LOG2E
    device = q.device
    rows = batch * q_heads
    part_m = _poisoned(rows, num_splits, device=device)
    part_l = _poisoned(rows, num_splits, device=device)
    part_acc = _poisoned(rows, num_splits, head_dim, device=device)
    for tensor in (layer.sinks_key, layer.window_key, layer.centroid_key):
        assert tensor.stride(-1) == 1
    sinks_key, sinks_value = _or_dummy(layer.sinks_key), _or_dummy(layer.sinks_value)
    cent_key, cent_value = _or_dummy(layer.centroid_key), _or_dummy(layer.centroid_value)
    window_key, window_value = _or_dummy(layer.window_key), _or_dummy(layer.window_value)
    decode_kernels.decode_kernel[(num_splits, batch * kv_heads)](
        q, q.stride(0), q.stride(1), sm_scale,
        sinks_key, sinks_value, *layer.sinks_key.stride()[:3], layer.sink_len.to(torch.int32),
        window_key, window_value, *layer.window_key.stride()[:3],
        layer.window_len.to(torch.int32),
        cent_key, cent_value, *layer.centroid_key.stride()[:3],
        _or_dummy(layer.centroid_count.to(torch.int32).contiguous()),
        layer.centroid_count.shape[-1],
        _or_dummy(layer.guard_blocks), layer.guard_start.to(torch.int32).contiguous(),
        layer.guard_count.to(torch.int32).contiguous(),
        _or_dummy(layer.body_blocks), layer.body_start.to(torch.int32).contiguous(),
        layer.body_count.to(torch.int32).contiguous(),
        part_m, part_l, part_acc, kv_heads, num_splits,
        BLOCK_T=block_t, GUARD_STEP=_step(decode_kernels, "GUARD_"),
        BODY_STEP=_step(decode_kernels, "BODY_"), num_warps=decode_kernels.NUM_WARPS)
    out, _, _ = _combine(combine_kernels, part_m, part_l, part_acc, num_splits)
    return out.reshape(batch, q_heads, head_dim)


def _combine(combine_kernels: ModuleType, part_m, part_l, part_acc, num_splits: int):
    """Merges the splits: → out fp32 [rows, D] and each row's max score and sum (base 2)."""
    rows, head_dim = part_acc.shape[0], part_acc.shape[-1]
    device = part_acc.device
    out = _poisoned(rows, head_dim, device=device)
    lse_m = _poisoned(rows, device=device)
    lse_l = _poisoned(rows, device=device)
    max_splits = 1 << max(num_splits - 1, 0).bit_length()
    combine_kernels.combine_kernel[(rows,)](part_m, part_l, part_acc, out, lse_m, lse_l,
                                            num_splits, MAX_SPLITS=max_splits)
    return out, lse_m, lse_l




def paged_decode(decode_kernels: ModuleType, combine_kernels: ModuleType, q: torch.Tensor,
                 new_key: torch.Tensor, new_value: torch.Tensor, pages: torch.Tensor,
                 tables: PagedTables, staging: torch.Tensor, scale: float, num_splits: int = 4,
                 mass_reduce: str | None = None, block_t: int = 32):
    """One decode step of b requests over a paged layer (`kvpolicy.store`), one new token each.

    q [b, Hq, D]; new_key, new_value [b, H, D] (the step's tokens, fp16/bf16/fp32); pages: the
    layer's pages [blocks, H, bytes] uint8 (`store.paged.group_pages`: one head group's; any
    strides with unit byte stride: page k of head h at k * stride 0 + h * stride 1); tables: what
    each request and KV head reads of them and of staging (`contract.PagedTables`); staging
    [slots, H, block_size, 2, D] in the cache dtype.
    → out fp32 [b, Hq, D]; with mass_reduce (sum / mean / max over a KV group's query heads) also
    the attention mass [b, H, S * block_size + 1] of each staged token (column k * block_size +
    t: staged run k, token t) and, in the last column, of the new token."""
    batch, q_heads, head_dim = q.shape
    kv_heads = new_key.shape[1]
    block_size = staging.shape[2]
    assert q_heads % kv_heads == 0 and q_heads // kv_heads == decode_kernels.G.value
    assert head_dim == decode_kernels.D.value and staging.shape[-1] == head_dim
    assert q.stride(-1) == 1 and new_key.stride(-1) == 1 and new_value.stride(-1) == 1
    assert new_key.stride() == new_value.stride() and new_key.dtype in SOURCE_DTYPES
    assert pages.dtype == torch.uint8 and pages.stride(-1) == 1 and staging.stride(-1) == 1
    assert tables.guard_tokens % _tokens(decode_kernels, "GUARD_") == 0
    assert tables.body_tokens % _tokens(decode_kernels, "BODY_") == 0
    sm_scale = scale * LOG2E
    device = q.device
    rows = batch * q_heads
    part_m = _poisoned(rows, num_splits, device=device)
    part_l = _poisoned(rows, num_splits, device=device)
    part_acc = _poisoned(rows, num_splits, head_dim, device=device)
    columns = tables.stage_width * block_size + 1
    logits = torch.full((rows, columns if mass_reduce else 1), -math.inf, device=device)
    guard_table, *guard_strides = per_head(tables.guard_table, 1, device)
    guard_count, *guard_count_strides = per_head(tables.guard_count, 0, device)
    body_table, *body_strides = per_head(tables.body_table, 1, device)
    body_count, *body_count_strides = per_head(tables.body_count, 0, device)
    body_tail, *tail_strides = per_head(tables.body_tail, 0, device)
    stage_table, *stage_strides = per_head(tables.stage_table, 1, device)
    stage_len, *len_strides = per_head(tables.stage_len, 1, device)
    staged_count, *staged_strides = per_head(tables.staged_count, 0, device)
    assert tail_strides == body_count_strides and len_strides == stage_strides
    decode_kernels.paged_decode_kernel[(num_splits, batch * kv_heads)](
        q, q.stride(0), q.stride(1), sm_scale,
        new_key, new_value, new_key.stride(0), new_key.stride(1),
        pages, pages.stride(0), pages.stride(1),
        _or_dummy(guard_table), *guard_strides, guard_count, *guard_count_strides,
        _or_dummy(body_table), *body_strides, body_count, body_tail, *body_count_strides,
        tables.body_offset, tables.guard_tokens, tables.body_tokens,
        staging, *staging.stride()[:4],
        _or_dummy(stage_table), _or_dummy(stage_len), *stage_strides,
        staged_count, *staged_strides, block_size,
        part_m, part_l, part_acc, logits, logits.shape[1], kv_heads, num_splits,
        BLOCK_T=block_t, GUARD_STEP=_step(decode_kernels, "GUARD_"),
        BODY_STEP=_step(decode_kernels, "BODY_"), NEW_DTYPE=SOURCE_DTYPES[new_key.dtype],
        EMIT_MASS=mass_reduce is not None, num_warps=decode_kernels.NUM_WARPS)
    out, lse_m, lse_l = _combine(combine_kernels, part_m, part_l, part_acc, num_splits)
    mass = None
    if mass_reduce is not None:
        mass = _poisoned(batch * kv_heads, columns, device=device)
        block_s = 128
        combine_kernels.mass_kernel[(batch * kv_heads, -(-columns // block_s))](
            logits, lse_m, lse_l, mass, columns, BLOCK_S=block_s,
            REDUCE=MASS_REDUCE[mass_reduce])
        mass = mass.reshape(batch, kv_heads, columns)
    return out.reshape(batch, q_heads, head_dim), mass


def _tokens(kernels: ModuleType, prefix: str) -> int:
    block = getattr(kernels, f"{prefix}B", None)
    return block.value if block is not None else 1
