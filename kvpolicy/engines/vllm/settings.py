"""Start-up checks: the compiled artifact, the engine's model and settings, and the page format
they give. Every reason a configuration cannot run is collected and reported together.

Needs only an object shaped like vLLM's VllmConfig (duck-typed), so it is tested without vLLM.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from kvpolicy.dtypes import DTYPE_BYTES, HALF_DTYPES
from kvpolicy.kernels.bound import StoreKernels
from kvpolicy.kernels.reference import dtype_name
from kvpolicy.lang.ir import Policy
from kvpolicy.models import ModelError, ModelShape, shape_from_config
from kvpolicy.plan.pages import PageFormat, UnsupportedConfiguration, policy_notes, rank_heads
from kvpolicy.plan.served import served_contexts, served_view
from kvpolicy.plan.streams import PENDING_ROWS, StreamPlan, stream_notes, stream_plan
from kvpolicy.prepare import CompiledPolicy, backend_for, bind_paged, open_artifact

ARTIFACT_ENV = "KVPOLICY_ARTIFACT"
STAGING_ENV = "KVPOLICY_STAGING_BLOCKS"
KERNELS_ENV = "KVPOLICY_KERNELS"  # "compiled" (the default) or "torch": see Settings.kernels
KERNEL_CHOICES = ("compiled", "torch")
# "streams" (`plan.streams`: a request holds the whole-prompt plan's bytes; one worker) or
# "pages" (`plan.pages`: a page per block; tensor and pipeline parallelism). Default: streams
# for an engine of one worker, pages otherwise.
LAYOUT_ENV = "KVPOLICY_LAYOUT"
LAYOUTS = ("streams", "pages")



@dataclass(frozen=True)
class WorkerShare:
    """The part of the model one worker process of a vLLM engine holds: its tensor-parallel rank
    (a share of every layer's KV heads) and its pipeline stage (a run of layers; `stages` lists
    every stage's (first, end), empty for one stage)."""

    tensor_rank: int = 0
    tensor_size: int = 1
    pipeline_rank: int = 0
    stages: tuple[tuple[int, int], ...] = ()

    @property
    def alone(self) -> bool:
        return self.tensor_size == 1 and len(self.stages) <= 1

    def describe(self, fmt: PageFormat, model_kv_heads: int) -> str:
        """What this worker holds, for its start-up lines."""
        held = rank_heads(model_kv_heads, self.tensor_size, self.tensor_rank)
        heads = f"KV head {held.start}" if len(held) == 1 else \
            f"KV heads {held.start}-{held.stop - 1}"
        layers = fmt.held
        return (f"kvpolicy: worker {self.tensor_rank}/{self.tensor_size} (tensor-parallel) of "
                f"stage {self.pipeline_rank}/{max(1, len(self.stages))} (pipeline): "
                f"{heads} of {model_kv_heads}, layers {layers.start}-{layers.stop - 1} of "
                f"{len(fmt.layers)}")


@dataclass(frozen=True)
class Settings:
    artifact: str
    policy: Policy
    compiled_for: ModelShape
    page_format: PageFormat | None  # the page layout's (None with the stream layout)
    staging_blocks: int  # full-precision block slots
    kv_bytes: int | None = None  # the engine's KV memory as given in bytes, staging included
    kernel_choice: str = "compiled"  # KVPOLICY_KERNELS
    worker: WorkerShare = WorkerShare()
    model_kv_heads: int = 0  # all the model's KV heads (page_format.kv_heads: this worker's)
    streams: StreamPlan | None = None  # the stream layout's plan, at the engine's max_model_len
    pending_chunks: int = 0  # the stream layout's pending chunks, all layers (PENDING_ROWS rows)
    dtype_bytes: int = 2  # the engine's 16-bit cache, the baseline
    # the artifact, verified and its kernels imported once per process (None with
    # KVPOLICY_KERNELS=torch: verified only)
    compiled: CompiledPolicy | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def layout(self) -> str:
        return "pages" if self.streams is None else "streams"

    @property
    def kv_heads(self) -> int:
        """The KV heads this worker's attention holds."""
        return self.page_format.kv_heads if self.streams is None else self.streams.kv_heads

    @property
    def staging_bytes(self) -> int:
        if self.streams is None:
            return self.page_format.staging_bytes(self.staging_blocks)
        s = self.streams
        token = 2 * s.head_dim * s.staging_dtype_bytes
        slot = s.kv_heads * s.block_size * (token + (4 if s.needs_mass else 0))
        return s.layers * self.staging_blocks * slot + self.pending_chunks * PENDING_ROWS * token

    @property
    def block_bytes(self) -> int:
        """Bytes of one vLLM block, every layer's share (what vLLM's pool is counted in)."""
        if self.streams is not None:
            return self.streams.block_bytes
        f = self.page_format
        return len(f.held) * f.kv_heads * f.page_bytes

    @property
    def baseline_block_bytes(self) -> int:
        """vLLM's own 16-bit block of the same layers and heads."""
        if self.streams is not None:
            s = self.streams
            return s.layers * s.kv_heads * s.block_size * 2 * s.head_dim * self.dtype_bytes
        f = self.page_format
        return len(f.held) * f.kv_heads * f.baseline_page_bytes

    @property
    def pool_bytes(self) -> int | None:
        """What vLLM's pool of pages gets: the KV memory less the plugin's staging, which is
        paid out of it (None when the KV memory was not given in bytes)."""
        return self.kv_bytes - self.staging_bytes if self.kv_bytes else None

    def whole_process_ratio(self) -> float | None:
        """Tokens the plugin holds relative to vLLM's own pages in the same KV memory, its
        staging paid out of that memory (exact from the page plan; None when the KV memory is
        not known or staging alone exceeds it)."""
        if not self.kv_bytes:
            return None
        baseline = self.kv_bytes // self.baseline_block_bytes
        if baseline == 0 or self.pool_bytes <= 0:
            return None
        return (self.pool_bytes // self.block_bytes) / baseline

    def kernels(self, layer: int, device) -> StoreKernels | None:
        """What decode steps of `layer` attend with on `device` (`prepare.bind_paged`, by the
        one rule `prepare.backend_for`): the artifact's Triton kernels on a CUDA device, its C
        kernel on CPU cores (compiled on first use; raises kernels.cpu.CpuKernelError when it
        cannot be), or None — the store's PyTorch path — with KVPOLICY_KERNELS=torch."""
        if self.kernel_choice == "torch" or self.compiled is None:
            return None
        return bind_paged(self.compiled, layer, backend_for("auto", device, paged=True))

    def kernels_line(self) -> str:
        if self.kernel_choice == "torch":
            return (f"kvpolicy: decode steps attend with the store's PyTorch path "
                    f"({KERNELS_ENV}=torch)")
        return ("kvpolicy: decode steps attend in the artifact's compiled kernels: Triton on a "
                "CUDA device, C on CPU cores (compiled on first use); prompt chunks with PyTorch")

    @property
    def notes(self) -> list[str]:
        """Where the pages realise the policy differently from the Hugging Face runtime."""
        if self.streams is not None:
            return stream_notes(self.policy)
        return policy_notes(self.policy, self.page_format.block_size)

    def describe(self) -> str:
        if self.streams is not None:
            return self._describe_streams()
        f = self.page_format
        kept = f.kept_tokens()
        text = (f"kvpolicy: policy {self.policy.name} from {self.artifact}: pages of "
                f"{f.page_bytes} bytes per KV head per {f.block_size}-token block "
                f"(16-bit: {f.baseline_page_bytes}; sealed blocks keep "
                f"{'/'.join(map(str, kept))} of {f.block_size} tokens per layer and KV head; "
                f"padding {f.padding_bytes:,} bytes per block), {f.capacity_ratio:.2f}x the tokens of "
                f"vLLM's own pages in the same pool memory; full-precision staging: "
                f"{self.staging_blocks} blocks, {self.staging_bytes:,} bytes")
        if self.kv_bytes:
            ratio = self.whole_process_ratio()
            text += (f"\nkvpolicy: staging is paid out of the {self.kv_bytes:,}-byte KV memory "
                     f"(vLLM's pool gets {self.pool_bytes:,} bytes): "
                     + (f"{ratio:.2f}x the tokens of vLLM's own pages in the same memory, "
                        "staging included" if ratio is not None else "staging alone exceeds it"))
        else:
            text += ("\nkvpolicy: the KV memory was not given in bytes, so staging is outside "
                     "vLLM's accounting (pass --kv-cache-memory-bytes to pay it out of the KV "
                     "memory)")
        if not self.worker.alone:
            text = self.worker.describe(f, self.model_kv_heads) + "\n" + text
        served = served_view(self.policy, self.compiled_for, f.block_size,
                             served_contexts(None, self.compiled_for.max_context), fmt=f)
        return "\n".join([text, *(f"kvpolicy: {line}" for line in served.lines()),
                          self.kernels_line()] + [f"kvpolicy: note: {n}" for n in self.notes])


    def _describe_streams(self) -> str:
        s = self.streams
        text = (f"kvpolicy: policy {self.policy.name} from {self.artifact}: stream layout "
                f"(kept tokens packed into each request's own blocks at the whole-prompt plan's "
                f"rate): blocks of {s.block_size} tokens, {s.block_bytes:,} bytes "
                f"({s.page_bytes} per layer and KV head; 16-bit: {self.baseline_block_bytes:,}), "
                f"laid out for sequences up to {s.max_len:,} tokens; full-precision staging: "
                f"{self.staging_blocks} block slots per layer and {self.pending_chunks:,} "
                f"pending chunks of {PENDING_ROWS} rows for all layers, "
                f"{self.staging_bytes:,} bytes")
        if self.kv_bytes:
            ratio = self.whole_process_ratio()
            text += (f"\nkvpolicy: staging is paid out of the {self.kv_bytes:,}-byte KV memory "
                     f"(vLLM's pool gets {self.pool_bytes:,} bytes): "
                     + (f"{ratio:.2f}x the tokens of vLLM's own pages in the same memory, "
                        "staging included" if ratio is not None else "staging alone exceeds it"))
        served = served_view(self.policy, self.compiled_for, s.block_size,
                             served_contexts(None, min(s.max_len, self.compiled_for.max_context)),
                             streams=s)
        return "\n".join([text, *(f"kvpolicy: {line}" for line in served.lines()),
                          self.kernels_line()] + [f"kvpolicy: note: {n}" for n in self.notes])


def pending_chunks_for(plan: StreamPlan, max_num_seqs: int) -> int:
    """Pending chunks for all layers: every running request's worst case, all layers together
    (`StreamPlan.most_pending_rows`: its layers do not all hold the most at the same length)."""
    return max_num_seqs * plan.most_pending_rows() // PENDING_ROWS


def window_slots_for(plan: StreamPlan, max_num_seqs: int, max_batched_tokens: int) -> int:
    """The stream layout's block slots per layer, enough for any step: a one-token step of a
    request reads or writes ceil(window / block) + 1 blocks not sealed; a prompt chunk of m
    tokens at most ceil(m / block) + 1 more (the chunk's blocks, its first partly the
    window's); so per request its window, the open block and one more, and a step's prompt
    tokens."""
    per_request = math.ceil(plan.window / plan.block_size) + 2
    return max_num_seqs * per_request + math.ceil(max_batched_tokens / plan.block_size)


def staging_blocks_for(fmt: PageFormat, max_num_seqs: int, max_batched_tokens: int) -> int:
    """Every running request's sinks, window and open block, plus one step's worth of
    prefill."""
    per_request = fmt.sink_blocks + math.ceil(fmt.window / fmt.block_size) + 2
    return max_num_seqs * per_request + math.ceil(max_batched_tokens / fmt.block_size)


def load_settings(artifact: str, vllm_config, worker: WorkerShare | None = None) -> Settings:
    """The artifact checked against the engine's model and settings, for `worker` (the part of
    the model this process holds; by default every layer, and the tensor-parallel size of
    `vllm_config.parallel_config` at rank 0)."""
    if not artifact:
        raise UnsupportedConfiguration([f"{ARTIFACT_ENV} is not set: point it at a directory "
                                        "built by `kvpolicy compile POLICY --model M -o DIR`"])
    reasons: list[str] = []
    model_config = vllm_config.model_config
    dtype = dtype_name(model_config.dtype)
    try:
        engine_model = shape_from_config(model_config.hf_config.to_dict(), model_config.model,
                                         "the engine's model", kv_dtype=dtype
                                         if dtype in HALF_DTYPES else None)
    except ModelError as exc:
        raise UnsupportedConfiguration([str(exc)]) from None
    choice = os.environ.get(KERNELS_ENV) or "compiled"
    # verified once per process; the kernels imported only when they are to attend
    opened = open_artifact(artifact, with_kernels=choice == "compiled")
    model, policy = opened.model, opened.policy
    # the dtype is compared below: only 16-bit regions depend on it in pages
    reasons += [f"artifact {artifact} was {mismatch}" for mismatch in opened.mismatches(
        engine_model)]
    cache = vllm_config.cache_config
    if cache.enable_prefix_caching:
        reasons.append("prefix caching is on: a shared block would be sealed by one request "
                       "while in another's full-precision window (pass "
                       "enable_prefix_caching=False / --no-enable-prefix-caching)")
    if getattr(vllm_config, "speculative_config", None) is not None:
        reasons.append("speculative decoding is not supported")
    if worker is None:
        worker = WorkerShare(tensor_size=getattr(getattr(vllm_config, "parallel_config", None),
                                            "tensor_parallel_size", 1))
    layout = os.environ.get(LAYOUT_ENV) or ("streams" if worker.alone else "pages")
    fmt = streams = None
    if layout not in LAYOUTS:
        reasons.append(f"{LAYOUT_ENV}={layout!r}: choose one of {', '.join(LAYOUTS)}")
    elif layout == "streams":
        if not worker.alone:
            reasons.append(f"{LAYOUT_ENV}=streams lays out one worker's cache: a tensor- or "
                           f"pipeline-parallel engine runs {LAYOUT_ENV}=pages (the default)")
        try:
            streams = stream_plan(policy, model, cache.block_size, model_config.max_model_len)
        except UnsupportedConfiguration as exc:
            reasons += exc.reasons
    else:
        try:
            fmt = opened.pages(cache.block_size, dtype_bytes=DTYPE_BYTES.get(dtype, 2))
        except UnsupportedConfiguration as exc:
            reasons += exc.reasons
    model_kv_heads = fmt.kv_heads if fmt is not None else model.num_kv_heads
    if fmt is not None and not worker.alone:
        try:  # this worker's heads and layers
            fmt = fmt.for_worker(worker.tensor_size,
                                 list(worker.stages) or [(0, len(fmt.layers))],
                                 worker.pipeline_rank, worker.tensor_rank)
        except UnsupportedConfiguration as exc:
            reasons += exc.reasons
    if reasons:
        raise UnsupportedConfiguration(reasons)
    if choice not in KERNEL_CHOICES:
        raise UnsupportedConfiguration([f"{KERNELS_ENV}={choice!r}: choose one of "
                                        f"{', '.join(KERNEL_CHOICES)}"])
    scheduler = vllm_config.scheduler_config
    if streams is not None:
        staging = int(os.environ.get(STAGING_ENV) or window_slots_for(
            streams, scheduler.max_num_seqs, scheduler.max_num_batched_tokens))
        pending = pending_chunks_for(streams, scheduler.max_num_seqs)
        block = streams.block_size
        one_block = streams.layers * streams.kv_heads * block * 2 * streams.head_dim * \
            streams.staging_dtype_bytes
    else:
        staging = int(os.environ.get(STAGING_ENV) or staging_blocks_for(
            fmt, scheduler.max_num_seqs, scheduler.max_num_batched_tokens))
        pending, block, one_block = 0, fmt.block_size, fmt.staging_bytes(1)
    settings = Settings(artifact=artifact, policy=policy, compiled_for=model,
                        page_format=fmt, staging_blocks=staging,
                        kv_bytes=getattr(cache, "kv_cache_memory_bytes", None),
                        kernel_choice=choice, worker=worker, model_kv_heads=model_kv_heads,
                        compiled=opened.compiled, streams=streams, pending_chunks=pending,
                        dtype_bytes=DTYPE_BYTES.get(dtype, 2))
    if settings.kv_bytes and settings.pool_bytes <= 0:
        raise UnsupportedConfiguration([
            f"full-precision staging ({staging} blocks for {scheduler.max_num_seqs} sequences "
            f"and {scheduler.max_num_batched_tokens:,}-token steps: {settings.staging_bytes:,} "
            f"bytes) does not fit in the {settings.kv_bytes:,}-byte KV memory it is paid out "
            "of: raise --kv-cache-memory-bytes, or lower --max-num-batched-tokens "
            f"(each {block} tokens of a step stage one block: "
            f"{one_block:,} bytes) or --max-num-seqs"])
    return settings


def reserve_staging(settings: Settings, cache_config) -> None:
    """Pays the plugin's staging out of the engine's KV memory: vLLM sizes its pool of pages
    from `cache_config.kv_cache_memory_bytes` after the model (and this backend) is built, so
    lowering it here leaves pool + staging = the memory the operator gave. Once per process."""
    if settings.pool_bytes is not None and cache_config.kv_cache_memory_bytes == \
            settings.kv_bytes:
        cache_config.kv_cache_memory_bytes = settings.pool_bytes
