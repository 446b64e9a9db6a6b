"""The storage format of a compressed layer: the one home of its layout and byte accounting.

docs/format.md is the prose version, with byte offsets. Per layer and sequence:

| tensor                        | shape               | dtype  |
|-------------------------------|---------------------|--------|
| sinks.key, sinks.value        | [H, sinks, D]       | kv     |
| window.key, window.value      | [H, window, D]      | kv     |
| guard.blocks, body.blocks     | [H, blocks, bytes]  | uint8  |
| selected.head_counts          | [2, H]              | int32  |
| centroids.key, centroids.value| [H, k, D]           | kv     |
| centroids.count               | [H, k]              | int32  |

Selected tokens (guards and body) live in fixed-size blocks of `tokens` tokens; one block holds,
at 16-byte aligned offsets: key codes, value codes, positions, key scales, key zero points, value
scales, value zero points (`BlockLayout`). A paged engine can hold such blocks as pages.

Codes are packed along head_dim in bit planes: a b-bit code is split into power-of-two planes
(2 → 2, 3 → 2+1, 4 → 4, 8 → 8); a p-bit plane packs 32/p channels of one token into an int32
word, channel c at bits [(c mod 32/p) * p, +p). So 32 codes of any width fill exactly b words,
and no code crosses a word: unpacking is a shift and a mask.

The plan's byte count is the sum of these tensors' sizes; the runtime allocates from the same
specs, so what is planned is what is held.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from math import ceil, lcm, prod

from kvpolicy.dtypes import DTYPE_BYTES, LONG_NAMES
from kvpolicy.lang.ir import QuantFormat

ALIGN = 16  # every block section starts at a multiple of 16 bytes (one vector load)
MIN_QUANTIZED_BLOCK = 16  # tokens; keeps every section 16-byte aligned without padding
PLANES = {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}  # bit planes of a code, low bits first
BYTE_KINDS = ("full", "codes", "scales", "index", "centroids", "padding")


def words_per_token(bits: int, head_dim: int) -> int:
    """int32 words holding one token's codes: `bits` words per 32 channels."""
    return bits * ceil(head_dim / 32)


def block_tokens(keys: QuantFormat, values: QuantFormat, head_dim: int, kv_dtype: str,
                 positions: bool) -> int:
    """Tokens per block: whole per-channel groups of both formats, and at least 16 tokens when
    anything is quantized (so sections stay aligned). When both are 16-bit: the fewest tokens
    (1, 2, 4, 8 or 16) whose block needs no padding — 1 without positions, 4 with them for
    every head_dim (4·D·2 + 4 bytes a token is a multiple of 4, not of 16)."""
    tokens = lcm(keys.token_group, values.token_group)
    if keys.quantized or values.quantized:
        return lcm(tokens, MIN_QUANTIZED_BLOCK)
    for candidate in (1, 2, 4, 8, 16):
        layout = block_layout(keys, values, head_dim, kv_dtype, positions, candidate)
        if layout.nbytes == sum(section.nbytes for section in layout.sections):
            return candidate
    return 1


@dataclass(frozen=True)
class Section:
    name: str  # key.codes, value.codes, positions, key.scale, key.zero, value.scale, value.zero
    offset: int  # bytes from the start of the block
    shape: tuple[int, ...]  # logical shape inside the block
    dtype: str

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_BYTES[self.dtype]

    @property
    def kind(self) -> str:
        if self.name == "positions":
            return "index"
        if self.name.endswith((".scale", ".zero")):
            return "scales"
        return "codes" if self.dtype == "int32" else "full"


@dataclass(frozen=True)
class BlockLayout:
    """Where everything lives inside one block of `tokens` selected tokens of one KV head."""

    tokens: int
    head_dim: int
    keys: QuantFormat
    values: QuantFormat
    positions: bool
    kv_dtype: str
    sections: tuple[Section, ...]
    nbytes: int

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def bytes_by_kind(self) -> dict[str, int]:
        totals = dict.fromkeys(BYTE_KINDS, 0)
        for section in self.sections:
            totals[section.kind] += section.nbytes
        totals["padding"] += self.nbytes - sum(s.nbytes for s in self.sections)
        return totals


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


@functools.lru_cache(maxsize=4096)  # pure; planning asks for the same few layouts again and again
def block_layout(keys: QuantFormat, values: QuantFormat, head_dim: int, kv_dtype: str,
                 positions: bool, tokens: int | None = None) -> BlockLayout:
    if tokens is None:
        tokens = block_tokens(keys, values, head_dim, kv_dtype, positions)
    planned: list[tuple[str, tuple[int, ...], str]] = []
    for role, fmt in (("key", keys), ("value", values)):
        if fmt.quantized:
            planned.append((f"{role}.codes", (tokens, words_per_token(fmt.bits, head_dim)),
                            "int32"))
        else:
            planned.append((f"{role}.codes", (tokens, head_dim), kv_dtype))
    if positions:
        planned.append(("positions", (tokens,), "int32"))
    for role, fmt in (("key", keys), ("value", values)):
        if not fmt.quantized:
            continue
        if fmt.axis == "channel":
            assert tokens % fmt.group == 0, (tokens, fmt.group)
            shape = (tokens // fmt.group, head_dim)
        else:
            assert head_dim % fmt.group == 0, (head_dim, fmt.group)
            shape = (tokens, head_dim // fmt.group)
        dtype = LONG_NAMES[fmt.scale_dtype]
        planned.append((f"{role}.scale", shape, dtype))
        if not fmt.symmetric:
            planned.append((f"{role}.zero", shape, dtype))
    sections = []
    offset = 0
    for name, shape, dtype in planned:
        offset = _aligned(offset)
        section = Section(name, offset, shape, dtype)
        sections.append(section)
        offset += section.nbytes
    return BlockLayout(tokens, head_dim, keys, values, positions, kv_dtype, tuple(sections),
                       _aligned(offset))


@dataclass(frozen=True)
class TensorSpec:
    name: str  # "<region>.<part>", e.g. "window.key", "body.blocks", "centroids.count"
    shape: tuple[int, ...]
    dtype: str
    layout: BlockLayout | None = None  # for "<region>.blocks"

    @property
    def region(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_BYTES[self.dtype]

    def bytes_by_kind(self) -> dict[str, int]:
        """What the bytes are for: 'full' (16-bit keys/values), 'codes', 'scales' (scales and
        zero points), 'index' (positions, per-head counts), 'centroids', 'padding'."""
        totals = dict.fromkeys(BYTE_KINDS, 0)
        if self.layout is not None:
            blocks = prod(self.shape[:-1])
            for kind, count in self.layout.bytes_by_kind().items():
                totals[kind] += blocks * count
        elif self.region == "centroids":
            totals["centroids"] += self.nbytes
        elif self.name.endswith("head_counts"):
            totals["index"] += self.nbytes
        else:
            totals["full"] += self.nbytes
        return totals


@dataclass(frozen=True)
class LayerCounts:
    """Tokens per KV head in each region of one compressed layer."""

    sinks: int
    window: int
    guard: int
    body: int
    centroids: int
    positions: bool  # selected tokens carry explicit positions
    head_counts: bool  # per-head token counts vary (adaptive across heads)


def layer_tensors(counts: LayerCounts, guard: BlockLayout, body: BlockLayout, heads: int,
                  head_dim: int, kv_dtype: str,
                  by_head: tuple[tuple[int, int], ...] | None = None) -> list[TensorSpec]:
    """Every tensor of one compressed layer (one sequence, all KV heads). `by_head`: each KV
    head's own (guard, body) tokens when they differ (`adapt heads`); its blocks then lie head
    after head in one run, [blocks of all heads, bytes], and counts.guard/body are unused."""
    specs: list[TensorSpec] = []
    for region, tokens in (("sinks", counts.sinks), ("window", counts.window)):
        if tokens:
            specs.append(TensorSpec(f"{region}.key", (heads, tokens, head_dim), kv_dtype))
            specs.append(TensorSpec(f"{region}.value", (heads, tokens, head_dim), kv_dtype))
    for region, tokens, layout in (("guard", counts.guard, guard), ("body", counts.body, body)):
        if by_head is not None:
            index = 0 if region == "guard" else 1
            blocks = sum(-(-head[index] // layout.tokens) for head in by_head)
            if blocks:
                specs.append(TensorSpec(f"{region}.blocks", (blocks, layout.nbytes), "uint8",
                                        layout))
        elif tokens:
            blocks = -(-tokens // layout.tokens)
            specs.append(TensorSpec(f"{region}.blocks", (heads, blocks, layout.nbytes), "uint8",
                                    layout))
    if counts.head_counts:
        specs.append(TensorSpec("selected.head_counts", (2, heads), "int32"))  # guard, body
    if counts.centroids:
        specs.append(TensorSpec("centroids.key", (heads, counts.centroids, head_dim), kv_dtype))
        specs.append(TensorSpec("centroids.value", (heads, counts.centroids, head_dim), kv_dtype))
        specs.append(TensorSpec("centroids.count", (heads, counts.centroids), "int32"))
    return specs
