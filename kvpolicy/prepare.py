"""One step from what a user names to what an engine runs: policy → plan → page plan → artifact →
bound kernels. Every engine (the whole-prompt cache, the paged cache, vLLM's backend), the CLI,
eval and tune go through it; no engine loads a policy, compiles one or chooses its kernels.

    prepared = prepare_whole("policies/kivi.kvp", shape, device="cpu")          # PolicyCache
    prepared = prepare_paged("build/kivi", shape, block_size=32, device="cuda")  # PagedPolicyCache

The one rule for what attends (`backend_for`, "auto"): the artifact's compiled kernels where the
device has them — Triton on a CUDA device (both runtimes), the C kernels on CPU cores (the paged
store; the whole-prompt runtime has none) — else PyTorch. When the C kernels cannot be built, the
PyTorch path attends instead, said once in the words of `FALLBACK`; a backend asked for by name
never falls back. What a policy-like argument may be: a `.kvp` path, a checked `Policy`, a loaded
`CompiledPolicy` or an artifact directory (verified once, and only for the model at hand).
"""

from __future__ import annotations

import hashlib
import json
import dataclasses
import warnings
from dataclasses import dataclass

from kvpolicy.compiler.artifact import (MODEL_FIELDS, SHAPE_FIELDS, ArtifactError, CompiledPolicy,
                                        check_model, compile_policy, compiled_for, is_artifact,
                                        load, model_mismatches, verify)
from kvpolicy.files import cache_root
from kvpolicy.kernels.cpu import CpuKernelError
from kvpolicy.lang.ir import Policy, policy_from_json, policy_to_json
from kvpolicy.lang.lower import load_policy
from kvpolicy.models import ModelShape
from kvpolicy.plan.pages import PageFormat, UnsupportedConfiguration, page_format, policy_notes
from kvpolicy.plan.streams import StreamPlan, stream_plan

BACKENDS = ("auto", "torch", "triton", "cpu")
FALLBACK = ("kvpolicy: {reason}\nkvpolicy: the store's PyTorch path attends instead (slower; "
            "same results within fp32 rounding)")


def device_type(device) -> str:
    """"cuda", "cpu", …: of a torch.device, a device name, or None (the CPU)."""
    return "cpu" if device is None else str(getattr(device, "type", device)).split(":")[0]


def backend_for(requested: str, device, paged: bool) -> str:
    """What attends, by the one rule: `requested` unless "auto"; "auto" is the compiled kernels
    where the device has them (triton on CUDA; cpu, the C kernels, for the paged store on CPU
    cores) and torch where it has none (the whole-prompt runtime on the CPU). Raises ValueError
    for a backend the runtime does not have or the device cannot run."""
    kind = device_type(device)
    choices = BACKENDS if paged else ("auto", "torch", "triton")
    if requested not in choices:
        raise ValueError(f"backend must be {', '.join(choices[:-1])} or {choices[-1]}, not "
                         f"{requested!r}")
    if requested == "cpu" and kind != "cpu":
        raise ValueError(f"backend cpu runs a model on the CPU, not on {kind}")
    if requested != "auto":
        return requested
    if kind == "cuda":
        return "triton"
    return "cpu" if paged else "torch"


def artifact_fields(backend: str) -> tuple[str, ...]:
    """What of the model at hand an artifact must match: its shape (`MODEL_FIELDS`), and the
    cache dtype too when its compiled kernels attend (they read 16-bit regions of that dtype)."""
    return MODEL_FIELDS if backend == "torch" else SHAPE_FIELDS


def compiled_fields(requested: str, cuda: bool, paged: bool = False) -> tuple[str, ...]:
    """`artifact_fields` of what `requested` will be on a machine with (`cuda`) or without a GPU:
    for checking an artifact before the model is loaded."""
    return artifact_fields(backend_for(requested, "cuda" if cuda else "cpu", paged))


def resolve(policy, shape: ModelShape, fields: tuple[str, ...] = MODEL_FIELDS
            ) -> tuple[Policy, CompiledPolicy | None]:
    """(the checked policy, its loaded artifact or None) from a .kvp path, a Policy, a
    CompiledPolicy or an artifact directory; an artifact only for `shape` (`fields` of it)."""
    if isinstance(policy, Policy):
        return policy, None
    if isinstance(policy, CompiledPolicy):  # loaded elsewhere: still only for this model
        check_model(policy, shape, what=f"the model at hand ({shape.name})", fields=fields)
        return policy.policy, policy
    if is_artifact(policy):
        compiled = load(policy, model=shape, fields=fields)
        return compiled.policy, compiled
    return load_policy(policy), None


def compile_to_cache(policy: Policy, shape: ModelShape) -> CompiledPolicy:
    """The policy compiled for this model into $KVPOLICY_CACHE/build (reused when unchanged)."""
    key = hashlib.sha256(json.dumps([policy_to_json(policy), shape.to_json()],
                                    sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_root() / "build" / f"{policy.name}-{key}"
    compile_policy(policy, shape, directory)
    return load(directory)


def compile_to(policy: Policy, shape: ModelShape, directory) -> None:
    """The policy compiled for this model into `directory`: the artifact an engine in another
    process is pointed at (eval's served vLLM runs)."""
    compile_policy(policy, shape, directory)


@dataclass(frozen=True)
class Prepared:
    """What an engine runs: the checked policy on the model at hand, what attends (`backend`),
    the artifact (None on the PyTorch path of a policy given as text), and per layer of the
    policy the kernels bound to it (`kernels`: `bound.WholeKernels` or `bound.StoreKernels`;
    None: PyTorch). Paged engines also get the page plan (`pages`) and its `notes` (where pages
    realise the policy differently from the whole-prompt runtime)."""

    policy: Policy
    shape: ModelShape
    backend: str
    compiled: CompiledPolicy | None = None
    kernels: tuple | None = None
    pages: PageFormat | None = None
    notes: tuple[str, ...] = ()
    streams: StreamPlan | None = None  # the stream store's plan (`prepare_streamed`)

    def layer_kernels(self, layer: int):
        return None if self.kernels is None else self.kernels[layer]


def prepare_whole(policy, shape: ModelShape, device=None, backend: str = "auto") -> Prepared:
    """The whole-prompt runtime's preparation (`engines.hf.cache.PolicyCache`): with triton, the
    artifact's decode and pack kernels per layer (compiling the policy for `shape` when given as
    text); with torch, none (an artifact is still only for its model)."""
    from kvpolicy.kernels.bound import whole_kernels_for
    chosen = backend_for(backend, device, paged=False)
    policy, compiled = resolve(policy, shape, artifact_fields(chosen))
    if chosen == "torch":
        return Prepared(policy, shape, chosen)
    compiled = compiled or compile_to_cache(policy, shape)
    layers = len(compiled.layers)
    return Prepared(policy, shape, chosen, compiled,
                    tuple(whole_kernels_for(compiled, i) for i in range(layers)))


def prepare_paged(policy, shape: ModelShape, block_size: int, device=None,
                  backend: str = "auto", dtype_bytes: int | None = None) -> Prepared:
    """The paged store's preparation (`engines.hf.paged.PagedPolicyCache`): the page plan first
    (a policy no paged engine runs is refused, with every reason, before anything is compiled;
    `dtype_bytes`: the engine's own 16-bit page, the baseline), then the artifact's kernels bound
    per layer (`bind_paged`). "auto" on CPU cores falls back to PyTorch, with `FALLBACK` as a
    warning, when the C kernels cannot be built."""
    chosen = backend_for(backend, device, paged=True)
    policy, compiled = resolve(policy, shape, artifact_fields(chosen))
    pages = page_format(policy, shape, block_size, dtype_bytes=dtype_bytes)
    notes = tuple(policy_notes(policy, block_size))
    return _bound(Prepared(policy, shape, chosen, compiled, pages=pages, notes=notes), backend)


def prepare_streamed(policy, shape: ModelShape, block_size: int, max_len: int, device=None,
                     backend: str = "auto") -> Prepared:
    """The stream store's preparation (`engines.hf.streamed.StreamPolicyCache`): the stream plan
    for sequences up to `max_len` (refused, with every reason, before anything is compiled),
    then the artifact's paged kernels bound per layer, as `prepare_paged` binds them (micro-pages
    are whole format blocks of the same layouts)."""
    chosen = backend_for(backend, device, paged=True)
    policy, compiled = resolve(policy, shape, artifact_fields(chosen))
    streams = stream_plan(policy, shape, block_size, max_len)
    return _bound(Prepared(policy, shape, chosen, compiled, streams=streams), backend)


def _bound(prepared: Prepared, requested: str) -> Prepared:
    """`prepared` with its artifact's paged kernels bound per layer (compiled first when the
    policy came as text); "auto" on CPU cores falls back to PyTorch, with `FALLBACK` as a
    warning, when the C kernels cannot be built."""
    if prepared.backend == "torch":
        return prepared
    compiled = prepared.compiled or compile_to_cache(prepared.policy, prepared.shape)
    try:
        kernels = tuple(bind_paged(compiled, i, prepared.backend)
                        for i in range(prepared.shape.num_layers))
    except CpuKernelError as exc:
        if requested != "auto":
            raise
        warnings.warn(FALLBACK.format(reason=exc), stacklevel=3)
        return dataclasses.replace(prepared, backend="torch", compiled=compiled)
    return dataclasses.replace(prepared, compiled=compiled, kernels=kernels)


def bind_paged(compiled: CompiledPolicy, layer: int, backend: str):
    """`layer`'s paged kernels of a loaded artifact for `backend` ("triton" or "cpu"; raises
    CpuKernelError when the C kernels cannot be built): the one place a paged engine's kernels are
    chosen (vLLM's backend binds per layer on its first step, when the device is known)."""
    from kvpolicy.kernels.bound import cpu_kernels_for, kernels_for
    return kernels_for(compiled, layer) if backend == "triton" else cpu_kernels_for(compiled,
                                                                                    layer)


@dataclass(frozen=True)
class OpenedArtifact:
    """An artifact as a serving engine's process opens it: verified once, its manifest's policy,
    model and page plans read (nothing planned again), its kernels imported when they are to
    attend (`compiled`, None otherwise)."""

    directory: str
    manifest: dict
    policy: Policy
    model: ModelShape
    compiled: CompiledPolicy | None

    def mismatches(self, model: ModelShape) -> list[str]:
        """Every way `model`'s shape differs from the one the artifact was compiled for (its
        layers, heads and head size: `MODEL_FIELDS`; pages depend on the dtype only in their
        16-bit regions)."""
        return model_mismatches(self.model, model, fields=MODEL_FIELDS)

    def pages(self, block_size: int, dtype_bytes: int) -> PageFormat:
        """The page plan the manifest records for `block_size` (`PageFormat.from_json`;
        `dtype_bytes`: the engine's 16-bit page, the baseline). A block size it records none for
        is refused (UnsupportedConfiguration) with page_format's reasons (e.g. not a multiple of
        a format's unit), or with the sizes it records."""
        recorded = self.manifest.get("pages", {})
        if str(block_size) in recorded:
            try:
                return PageFormat.from_json(recorded[str(block_size)], dtype_bytes=dtype_bytes)
            except ValueError as exc:
                raise UnsupportedConfiguration([f"the artifact's page plan for block size "
                                                f"{block_size}: {exc}"]) from None
        page_format(self.policy, self.model, block_size)  # raises with the reasons, if any
        sizes = ", ".join(sorted(recorded, key=int)) or "none"
        raise UnsupportedConfiguration([
            f"block size {block_size}: the artifact records page plans for block sizes {sizes} "
            "(every size of kvpolicy.plan.pages.BLOCK_SIZES its formats allow); use one of them"])


def open_artifact(directory: str, with_kernels: bool) -> OpenedArtifact:
    """Opens an artifact for a serving engine (vLLM's settings): verified once — and with
    `with_kernels` its kernels imported (`load`) — else UnsupportedConfiguration with the
    reasons (`verify`'s)."""
    try:
        compiled = load(directory) if with_kernels else None
        manifest = compiled.manifest if compiled is not None else verify(directory)
    except ArtifactError as exc:
        raise UnsupportedConfiguration([str(exc)]) from None
    return OpenedArtifact(directory, manifest, policy_from_json(manifest["policy"]["ir"]),
                          compiled_for(manifest), compiled)
