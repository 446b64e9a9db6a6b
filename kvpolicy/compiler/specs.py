"""Kernel specializations: frozen dataclasses whose URI spells every field in a fixed order.

A policy and a model give each layer a storage (keys, values, guards); each distinct storage
needs a pack and an unpack kernel per block layout, and a decode kernel for the combination of
regions it attends over. `specs_for(plan)` derives them all from the plan; URIs are never typed
by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil

from kvpolicy import format as storage
from kvpolicy.dtypes import DTYPE_CODES, HALF_DTYPES, short_name
from kvpolicy.lang.ir import QuantFormat
from kvpolicy.plan.pages import paged_refusals
from kvpolicy.plan.planner import Plan

KV_CODES = {name: DTYPE_CODES[name] for name in HALF_DTYPES}  # what the Triton kernels read
SCALE_CODES = {short_name(name): code for name, code in DTYPE_CODES.items()}


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class RoleFormat:
    """How keys (or values) are stored in a block."""

    bits: int
    group: int
    axis: str
    symmetric: bool
    scale_dtype: str

    @classmethod
    def of(cls, fmt: QuantFormat) -> "RoleFormat":
        if not fmt.quantized:
            return cls(16, 0, "-", False, "-")
        return cls(fmt.bits, fmt.group, fmt.axis, fmt.symmetric, fmt.scale_dtype)

    @property
    def tag(self) -> str:
        if self.bits == 16:
            return "fp16"
        axis = "ch" if self.axis == "channel" else "tok"
        symmetry = "sym" if self.symmetric else "asym"
        return f"int{self.bits}.g{self.group}.{axis}.{symmetry}.{self.scale_dtype}"

    def quant_format(self) -> QuantFormat:
        if self.bits == 16:
            return QuantFormat()
        return QuantFormat(self.bits, self.group, self.axis, self.symmetric, self.scale_dtype)


@dataclass(frozen=True)
class BlockSpec:
    tokens: int
    head_dim: int
    kv_dtype: str
    positions: bool
    keys: RoleFormat
    values: RoleFormat

    @classmethod
    def of(cls, layout: storage.BlockLayout) -> "BlockSpec":
        return cls(layout.tokens, layout.head_dim, layout.kv_dtype, layout.positions,
                   RoleFormat.of(layout.keys), RoleFormat.of(layout.values))

    @property
    def tag(self) -> str:
        return f"b{self.tokens}-k{self.keys.tag}-v{self.values.tag}-pos{int(self.positions)}"

    def layout(self) -> storage.BlockLayout:
        return storage.block_layout(self.keys.quant_format(), self.values.quant_format(),
                                    self.head_dim, self.kv_dtype, self.positions, self.tokens)


def _head(head_dim: int, kv_dtype: str) -> str:
    return f"hd{head_dim}_{short_name(kv_dtype)}"


@dataclass(frozen=True)
class _BlockKernelSpec:
    """A kernel specialised for one block layout."""

    block: BlockSpec

    @property
    def uri(self) -> str:
        return f"{self.kind}_{_head(self.block.head_dim, self.block.kv_dtype)}_{self.block.tag}"


@dataclass(frozen=True)
class PackSpec(_BlockKernelSpec):
    kind: str = field(default="pack", init=False)


@dataclass(frozen=True)
class UnpackSpec(_BlockKernelSpec):
    kind: str = field(default="unpack", init=False)


@dataclass(frozen=True)
class DecodeSpec:
    """One decode step of attention over every region of a compressed layer."""

    head_dim: int
    kv_dtype: str
    gqa_group: int
    sinks: bool
    centroids: bool
    guard: BlockSpec | None
    body: BlockSpec | None
    kind: str = field(default="decode", init=False)

    @property
    def uri(self) -> str:
        parts = [f"decode_{_head(self.head_dim, self.kv_dtype)}_gqa{self.gqa_group}",
                 f"sinks{int(self.sinks)}", f"cent{int(self.centroids)}",
                 f"guard-{self.guard.tag}" if self.guard else "guard-none",
                 f"body-{self.body.tag}" if self.body else "body-none"]
        return "_".join(parts)

    @property
    def padded_group(self) -> int:
        """Query rows of a GQA group, padded for tl.dot (at least 16, a power of two)."""
        return max(16, _next_pow2(self.gqa_group))


@dataclass(frozen=True)
class PagedDecodeSpec:
    """One decode step of attention over a paged layer (`kvpolicy.plan.pages`): sealed pages
    read through a block table (guards, then the body, in the page plan's position-free block
    layouts), staged blocks at full precision, and the step's own token; emits the scores of the
    staged tokens, whose attention mass is snapkv's while-staged importance."""

    head_dim: int
    kv_dtype: str
    gqa_group: int
    guard: BlockSpec | None
    body: BlockSpec
    kind: str = field(default="paged_decode", init=False)

    @property
    def uri(self) -> str:
        parts = [f"paged_decode_{_head(self.head_dim, self.kv_dtype)}_gqa{self.gqa_group}",
                 f"guard-{self.guard.tag}" if self.guard else "guard-none",
                 f"body-{self.body.tag}"]
        return "_".join(parts)

    @property
    def padded_group(self) -> int:
        return max(16, _next_pow2(self.gqa_group))


@dataclass(frozen=True)
class CombineSpec:
    """Merges the sequence splits of a decode step; normalises attention mass."""

    head_dim: int
    gqa_group: int
    kind: str = field(default="combine", init=False)

    @property
    def uri(self) -> str:
        return f"combine_hd{self.head_dim}_gqa{self.gqa_group}"


KernelSpec = PackSpec | UnpackSpec | DecodeSpec | PagedDecodeSpec | CombineSpec


@dataclass(frozen=True)
class LayerKernels:
    """The kernels one layer uses, by URI."""

    layer: int
    decode: str
    combine: str
    pack_body: str
    unpack_body: str
    pack_guard: str | None
    unpack_guard: str | None
    # paged engines (kvpolicy.store): the decode kernel over pages and staging, and the pack
    # kernels of the page plan's position-free layouts; None for a policy no paged engine runs
    # (plan.pages.paged_refusals)
    paged_decode: str | None
    pack_page_body: str | None
    pack_page_guard: str | None


@dataclass(frozen=True)
class CompiledSpecs:
    specs: tuple[KernelSpec, ...]  # unique, sorted by URI
    layers: tuple[LayerKernels, ...]


def specs_for(plan: Plan) -> CompiledSpecs:
    """The kernels a plan needs, per layer: the whole-prompt runtime's (its block layouts) and
    the paged store's (`LayerPlan.page_layouts`: the same formats in position-free blocks)
    unless the policy is one no paged engine runs (`paged_refusals`: vLLM and the store refuse
    it before they would load a kernel). The plan is the hand-off: its layers' formats and layouts are read, not
    re-derived. Raises ValueError for a cache the kernels do not support (they read 16-bit keys
    and values)."""
    policy, model = plan.policy, plan.model
    servable = not paged_refusals(policy)
    if model.kv_dtype not in KV_CODES:
        raise ValueError(f"the kernels need a 16-bit cache (float16 or bfloat16), not "
                         f"{model.kv_dtype}")
    found: dict[str, KernelSpec] = {}

    def add(spec: KernelSpec) -> str:
        found.setdefault(spec.uri, spec)
        return spec.uri

    combine = add(CombineSpec(model.head_dim, model.gqa_group))
    layers = []
    for index, layer in enumerate(plan.layers):
        guard = layer.guard
        body = BlockSpec.of(layer.body_layout)
        guarded = guard is not None and guard.fraction > 0
        guard_spec = BlockSpec.of(layer.guard_layout) if guarded else None
        decode = add(DecodeSpec(model.head_dim, model.kv_dtype, model.gqa_group,
                                sinks=policy.sinks > 0,
                                centroids=policy.cluster is not None and policy.evicts,
                                guard=guard_spec, body=body))
        paged = pack_page_body = pack_page_guard = None
        if servable:
            page_guard_layout, page_body_layout = layer.page_layouts
            page_body = BlockSpec.of(page_body_layout)
            page_guard = BlockSpec.of(page_guard_layout) if guarded else None
            paged = add(PagedDecodeSpec(model.head_dim, model.kv_dtype, model.gqa_group,
                                        guard=page_guard, body=page_body))
            pack_page_body = add(PackSpec(page_body))
            pack_page_guard = add(PackSpec(page_guard)) if page_guard else None
        layers.append(LayerKernels(
            layer=index, decode=decode, combine=combine,
            pack_body=add(PackSpec(body)), unpack_body=add(UnpackSpec(body)),
            pack_guard=add(PackSpec(guard_spec)) if guard_spec else None,
            unpack_guard=add(UnpackSpec(guard_spec)) if guard_spec else None,
            paged_decode=paged, pack_page_body=pack_page_body, pack_page_guard=pack_page_guard))
    return CompiledSpecs(tuple(found[uri] for uri in sorted(found)), tuple(layers))


def head_view(head_dim: int, kv_dtype: str) -> dict:
    """Template constants that depend only on the head."""
    d32 = ceil(head_dim / 32)
    d32p = _next_pow2(d32)
    return {"head_dim": head_dim, "d32": d32, "d32p": d32p, "dp": 32 * d32p,
            "kv_code": KV_CODES[kv_dtype]}


def block_view(block: BlockSpec) -> dict:
    """Template constants of a block layout: offsets of every section, per-role formats."""
    layout = block.layout()
    offsets = []
    for role in ("key", "value"):
        for part in ("codes", "scale", "zero"):
            section = layout.section(f"{role}.{part}")
            offsets.append((f"{role.upper()}_{part.upper()}", section.offset if section else 0))
    positions = layout.section("positions")
    offsets.append(("POSITIONS", positions.offset if positions else 0))
    roles = {}
    for role, fmt in (("key", block.keys), ("value", block.values)):
        roles[role] = {
            "bits": fmt.bits,
            "group": fmt.group or 1,
            "per_channel": fmt.axis == "channel",
            "symmetric": fmt.symmetric,
            "scale_code": SCALE_CODES.get(fmt.scale_dtype, 0),
            "scale_size": 4 if fmt.scale_dtype == "fp32" else 2,
            "words": fmt.bits * ceil(block.head_dim / 32) if fmt.bits < 16 else 0,
        }
    return {"tokens": block.tokens, "nbytes": layout.nbytes, "positions": block.positions,
            "describe": block.tag, "offsets": offsets, **roles}
