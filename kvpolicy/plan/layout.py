"""The compressed layer's storage, as tensors: the one home of the format's byte accounting.

A compressed layer holds, for each KV head (docs/format.md has the full description):

| region      | tokens                | stored as                                              |
|-------------|-----------------------|--------------------------------------------------------|
| sinks       | first `sinks`         | keys and values in the 16-bit cache dtype              |
| window      | most recent `window`  | keys and values in the 16-bit cache dtype              |
| guard       | top fraction by score | packed codes at the guard's bits + scales (and zeros)  |
| body        | the other selected    | packed codes at the policy's bits + scales (and zeros) |
| positions   | guard + body          | int32 position of each selected token                  |
| centroids   | `cluster evicted k`   | 16-bit key and value means + int32 member count        |

Codes are packed along head_dim: each run of 32 codes of one token fills exactly `bits` int32
words (2, 3, 4 or 8 words; 3-bit codes cross word boundaries), so a token's row is
`bits * ceil(head_dim / 32)` words and no bit is wasted when head_dim is a multiple of 32.
A scale (and a zero point, if asymmetric) covers one group: `group` consecutive tokens of one
channel for per-channel quantization, `group` consecutive channels of one token for per-token.

The plan's byte count is the sum of `TensorSpec.nbytes` over these tensors; the runtime allocates
from the same specs, so what is planned is what is held.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, prod

from kvpolicy.lang.ir import QuantFormat

DTYPE_BYTES = {"int32": 4, "float16": 2, "bfloat16": 2, "float32": 4}
SCALE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
CODES_PER_RUN = 32  # a run of 32 codes occupies exactly `bits` int32 words


@dataclass(frozen=True)
class TensorSpec:
    name: str  # "<region>.<key|value|positions|...>[.codes|.scale|.zero]"
    shape: tuple[int, ...]
    dtype: str

    @property
    def region(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_BYTES[self.dtype]

    @property
    def kind(self) -> str:
        """What the bytes are for: 'full' (16-bit keys/values), 'codes', 'scales' (scales and
        zero points), 'index' (positions, per-head counts) or 'centroids'."""
        if self.region == "centroids":
            return "centroids"
        last = self.name.rsplit(".", 1)[-1]
        if last == "codes":
            return "codes"
        if last in ("scale", "zero"):
            return "scales"
        if last in ("positions", "head_counts"):
            return "index"
        return "full"


BYTE_KINDS = ("full", "codes", "scales", "index", "centroids")


def words_per_token(bits: int, head_dim: int) -> int:
    return bits * ceil(head_dim / CODES_PER_RUN)


def stored_tensors(prefix: str, fmt: QuantFormat, heads: int, tokens: int, head_dim: int,
                   kv_dtype: str) -> list[TensorSpec]:
    """Tensors holding `tokens` keys (or values) of every head in format `fmt`.

    For per-channel groups `tokens` must be a multiple of the group (the planner guarantees it);
    for per-token groups, the group must divide head_dim (a plan-time check).
    """
    if not fmt.quantized:
        return [TensorSpec(prefix, (heads, tokens, head_dim), kv_dtype)]
    codes = TensorSpec(f"{prefix}.codes", (heads, tokens, words_per_token(fmt.bits, head_dim)),
                       "int32")
    if fmt.axis == "channel":
        assert tokens % fmt.group == 0, (tokens, fmt.group)
        param_shape = (heads, tokens // fmt.group, head_dim)
    else:
        assert head_dim % fmt.group == 0, (head_dim, fmt.group)
        param_shape = (heads, tokens, head_dim // fmt.group)
    dtype = SCALE_DTYPES[fmt.scale_dtype]
    specs = [codes, TensorSpec(f"{prefix}.scale", param_shape, dtype)]
    if not fmt.symmetric:
        specs.append(TensorSpec(f"{prefix}.zero", param_shape, dtype))
    return specs


@dataclass(frozen=True)
class LayerCounts:
    """Tokens per KV head in each region of one compressed layer."""

    sinks: int
    window: int
    guard: int
    body: int
    centroids: int
    positions: bool  # selected tokens carry explicit positions (see `needs_positions`)
    head_counts: bool  # per-head token counts vary (adaptive across heads)


def layer_tensors(counts: LayerCounts, keys: QuantFormat, values: QuantFormat,
                  guard_keys: QuantFormat, guard_values: QuantFormat, heads: int, head_dim: int,
                  kv_dtype: str) -> list[TensorSpec]:
    specs: list[TensorSpec] = []
    for region, tokens in (("sinks", counts.sinks), ("window", counts.window)):
        if tokens:
            specs.append(TensorSpec(f"{region}.key", (heads, tokens, head_dim), kv_dtype))
            specs.append(TensorSpec(f"{region}.value", (heads, tokens, head_dim), kv_dtype))
    for region, tokens, k_fmt, v_fmt in (("guard", counts.guard, guard_keys, guard_values),
                                         ("body", counts.body, keys, values)):
        if tokens:
            specs += stored_tensors(f"{region}.key", k_fmt, heads, tokens, head_dim, kv_dtype)
            specs += stored_tensors(f"{region}.value", v_fmt, heads, tokens, head_dim, kv_dtype)
    selected = counts.guard + counts.body
    if counts.positions and selected:
        specs.append(TensorSpec("selected.positions", (heads, selected), "int32"))
    if counts.head_counts:
        specs.append(TensorSpec("selected.head_counts", (2, heads), "int32"))  # guard, body
    if counts.centroids:
        specs.append(TensorSpec("centroids.key", (heads, counts.centroids, head_dim), kv_dtype))
        specs.append(TensorSpec("centroids.value", (heads, counts.centroids, head_dim), kv_dtype))
        specs.append(TensorSpec("centroids.count", (heads, counts.centroids), "int32"))
    return specs
