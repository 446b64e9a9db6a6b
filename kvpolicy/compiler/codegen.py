"""Renders Triton source for a KernelSpec from the Jinja templates in codegen/.

Templates set types, constants and which loops exist; arithmetic lives in the `@triton.jit`
helpers of codegen/_lib.py.jinja. Rendering is deterministic: the same spec and templates give
the same bytes.
"""

from __future__ import annotations

import functools
import hashlib

import jinja2

from kvpolicy import _resources
from kvpolicy._version import __version__
from kvpolicy.compiler.specs import (CombineSpec, DecodeSpec, KernelSpec, PackSpec,
                                     PagedDecodeSpec, UnpackSpec, block_view, head_view)

TEMPLATES = {PackSpec: "pack.py.jinja", UnpackSpec: "unpack.py.jinja",
             DecodeSpec: "decode.py.jinja", PagedDecodeSpec: "paged_decode.py.jinja",
             CombineSpec: "combine.py.jinja"}
# the paged store's kernels for CPU engines, in C (`render_cpu`)
CPU_TEMPLATES = {PagedDecodeSpec: "paged_decode.c.jinja", PackSpec: "pack.c.jinja"}


@functools.lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_resources.data_dir("codegen"))),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def template_hash() -> str:
    """sha256 over every template's name and bytes, in name order: part of an artifact's key."""
    digest = hashlib.sha256()
    for path in sorted(_resources.data_dir("codegen").glob("*.jinja")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _dense_regions(spec: DecodeSpec) -> list[dict]:
    def region(name, prefix, length, bias=False):
        return {"name": name, "key": f"{prefix}_key", "value": f"{prefix}_value",
                "sb": f"stride_{prefix[0]}b", "sh": f"stride_{prefix[0]}h",
                "st": f"stride_{prefix[0]}t", "length": length, "bias": bias}
    regions = []
    if spec.sinks:
        regions.append(region("sinks", "sinks", "tl.load(sink_len + b)"))
    regions.append(region("window", "window", "tl.load(window_len + b)"))
    if spec.centroids:
        regions.append(region("centroids", "cent", "cent_capacity", bias=True))
    return regions


def _block_regions(spec: DecodeSpec) -> list[dict]:
    regions = []
    for name, block in (("guard", spec.guard), ("body", spec.body)):
        if block is not None:
            regions.append({"name": name, "prefix": f"{name.upper()}_", "block": block_view(block),
                            "step": f"{name.upper()}_STEP"})
    return regions


def _tile_elements(spec: DecodeSpec | PagedDecodeSpec) -> int:
    """Elements of the largest block tile a decode kernel's loop holds (a block's tokens, times
    the blocks one step loads to reach 16 tokens, times the padded head)."""
    dp = head_view(spec.head_dim, spec.kv_dtype)["dp"]
    tiles = [block.tokens * max(1, 16 // block.tokens) for block in (spec.guard, spec.body)
             if block is not None]
    return max(tiles, default=0) * dp


def _decode_warps(spec: DecodeSpec) -> int:
    """Warps for the whole-prompt decode kernel: 16 when a block tile holds 64+ tokens of a
    128-wide head, else 4. Measured on sm_90 for 64-token blocks of a 128-wide head (GQA 7):
    int4 keys / int3 values spill with 4 warps (255 registers + 128 bytes of stack) and with 8
    (255 + 8), not with 16 (127); int2 / int2 sits at 255 with 4 warps (244 with 8, 128 with
    16). Smaller tiles stay at 4 (<= 220 registers)."""
    return 16 if _tile_elements(spec) >= 64 * 128 else 4


def _paged_warps(spec: PagedDecodeSpec) -> int:
    """Warps for the paged decode kernel: 8 when a page tile holds 64+ tokens of a 128-wide head
    (with 4, its loop nest spills on sm_90: 255 registers + 48 bytes of stack; with 8, 226 and
    none), else 4."""
    return 8 if _tile_elements(spec) >= 64 * 128 else 4


def render_cpu(spec: PagedDecodeSpec | PackSpec) -> str:
    """The C source of a paged decode or pack spec for CPU engines (codegen/*.c.jinja,
    `kvpolicy.kernels.cpu`): the same spec, layouts and constants as its Triton kernel."""
    template = environment().get_template(CPU_TEMPLATES[type(spec)])
    if isinstance(spec, PackSpec):
        return template.render(spec=spec, version=__version__, block=block_view(spec.block),
                               head=head_view(spec.block.head_dim, spec.block.kv_dtype))
    blocks = [(prefix, block_view(block)) for prefix, block in (("GUARD_", spec.guard),
                                                                 ("BODY_", spec.body)) if block]
    return template.render(spec=spec, version=__version__,
                           head=head_view(spec.head_dim, spec.kv_dtype),
                           gqa_group=spec.gqa_group, guard=spec.guard is not None,
                           blocks=blocks, tile=max([64] + [b["tokens"] for _, b in blocks]))


def render(spec: KernelSpec) -> str:
    template = environment().get_template(TEMPLATES[type(spec)])
    context = {"spec": spec, "version": __version__}
    if isinstance(spec, (PackSpec, UnpackSpec)):
        context["head"] = head_view(spec.block.head_dim, spec.block.kv_dtype)
        context["block"] = block_view(spec.block)
    elif isinstance(spec, PagedDecodeSpec):
        context["head"] = head_view(spec.head_dim, spec.kv_dtype)
        context["guard"] = block_view(spec.guard) if spec.guard else None
        context["body"] = block_view(spec.body)
        context["num_warps"] = _paged_warps(spec)
    elif isinstance(spec, DecodeSpec):
        context["head"] = head_view(spec.head_dim, spec.kv_dtype)
        context["guard"] = block_view(spec.guard) if spec.guard else None
        context["body"] = block_view(spec.body) if spec.body else None
        context["dense_regions"] = _dense_regions(spec)
        context["block_regions"] = _block_regions(spec)
        context["num_warps"] = _decode_warps(spec)
    else:
        context["head"] = head_view(spec.head_dim, "float16")
    return template.render(**context)
