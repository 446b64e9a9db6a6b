"""A loaded artifact's kernels bound to one layer, as the runtimes call them: the whole-prompt
runtime's decode and pack kernels (`whole_kernels_for`, Triton), and the paged store's — Triton on
a GPU (`kernels_for`), the same specs' C kernels on CPU cores (`cpu_kernels_for`). Which of them
an engine gets is `kvpolicy.prepare`'s one rule."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from kvpolicy.plan.pages import paged_refusals


@dataclass(frozen=True)
class StoreKernels:
    """One layer's compiled kernels as the store calls them: `decode`, one call for every
    one-token request of a step over their pages (through the block table), staged blocks and
    new tokens, with `kernels.launch.paged_decode`'s arguments after the modules and its results
    (out, attention mass), and `packer`, the page layouts' pack kernels (None: the reference
    packs). On a GPU both are the artifact's Triton kernels (`kernels_for`); on CPU cores the
    decode is the same spec's C kernel (`cpu_kernels_for`). Without any (`None`) the store runs
    its PyTorch path. The launch's attention mass feeds snapkv selection either way. Prompt
    chunks (more than one new token) attend with PyTorch."""

    decode: Callable
    packer: Callable | None = None


@dataclass(frozen=True)
class WholeKernels:
    """One layer's compiled kernels as the whole-prompt runtime calls them: `decode(query [b, Hq,
    D], layer: CompressedLayer, scale) → [b, Hq, D] fp32` (`launch.decode` with the layer's
    decode and combine modules), and `packer(keys, values, positions, layout) → blocks`, the
    artifact's pack kernels (`launch.packer`)."""

    decode: Callable
    packer: Callable


def whole_kernels_for(compiled, layer: int, num_splits: int | None = None) -> WholeKernels:
    """The whole-prompt runtime's Triton kernels for `layer` from a loaded artifact."""
    from kvpolicy.kernels import launch
    modules = compiled.layer_kernels(layer)
    splits = num_splits or compiled.launch["num_splits"]
    return WholeKernels(decode=functools.partial(launch.decode, modules["decode"],
                                                 modules["combine"], num_splits=splits),
                        packer=launch.packer(compiled.kernels))


def _paged_roles(compiled, layer: int):
    """`layer`'s kernel roles, which must include the paged ones: an artifact of a policy no
    paged engine runs has none (its start-up refusal comes first; this is the backstop)."""
    roles = compiled.layers[layer]
    if roles.paged_decode is None:
        raise ValueError(f"the artifact of {compiled.policy.name!r} has no paged kernels: "
                         + "; ".join(paged_refusals(compiled.policy)))
    return roles


def kernels_for(compiled, layer: int, num_splits: int | None = None) -> StoreKernels:
    """The store's Triton kernels for `layer` from a loaded artifact (`kvpolicy.load`)."""
    from kvpolicy.kernels import launch
    _paged_roles(compiled, layer)
    modules = compiled.layer_kernels(layer)
    splits = num_splits or compiled.launch.get("num_splits", 4)
    return StoreKernels(decode=functools.partial(launch.paged_decode, modules["paged_decode"],
                                                 modules["combine"], num_splits=splits),
                        packer=launch.packer(compiled.kernels))


def cpu_kernels_for(compiled, layer: int) -> StoreKernels:
    """The store's CPU kernels for `layer`: the C sources the artifact holds for its paged decode
    and page pack specs (`kvpolicy.kernels.cpu`), compiled on first use. Raises
    kernels.cpu.CpuKernelError when they cannot be compiled."""
    from kvpolicy.kernels import cpu
    roles = _paged_roles(compiled, layer)
    library = cpu.build(compiled.cpu_source(roles.paged_decode))
    packs = {uri: compiled.cpu_source(uri) for uri in (roles.pack_page_body,
                                                       roles.pack_page_guard) if uri}
    for source in packs.values():
        cpu.build(source, "pack")  # now, so that a compile error is a start-up error
    return StoreKernels(decode=functools.partial(cpu.paged_decode, library),
                        packer=cpu.packer(packs))

