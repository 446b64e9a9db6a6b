"""The vLLM attention backend that runs a compiled policy: Backend (what vLLM asks of a backend,
and `customize_spec`, which publishes the packed page size), MetadataBuilder (once per step:
which staging slot holds which block, which blocks seal), Impl (per layer: write = stage the new
tokens, forward = attention over sealed pages and staged blocks, then sealing).

The compute is the store's, plain functions of tensors: `kvpolicy.store.streamed` for the stream
layout (one worker; the default), `kvpolicy.store.paged` for the page layout (tensor and
pipeline parallelism; `settings.LAYOUT_ENV`); this module only adapts vLLM's objects to them. Imported by vLLM through the registry path that
`kvpolicy.engines.vllm.register` installs, never by kvpolicy itself.
"""

from __future__ import annotations

import collections
import functools
import os
import re
from dataclasses import replace
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from kvpolicy.dtypes import KV_DTYPES
from kvpolicy.engines.vllm.settings import (Settings, WorkerShare, load_settings,
                                            reserve_staging)
from kvpolicy.kernels.bound import StoreKernels
from kvpolicy.kernels.cpu import CpuKernelError
from kvpolicy.kernels.reference import torch_dtype
from kvpolicy.plan.pages import UnsupportedConfiguration
from kvpolicy.prepare import FALLBACK
from kvpolicy.store import paged, streamed
from kvpolicy.store.paged.staging import StagingTable
from kvpolicy.store.select import ScoreRule

# under vLLM's own logger, which vLLM's logging configures: the start-up report reaches the
# server log
logger = init_logger("vllm.kvpolicy")
# layer index → blocks sealed in this process (what examples/vllm_offline.py reports; with
# VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine runs in the caller's process)
SEALED_BLOCKS: collections.Counter[int] = collections.Counter()
# staging: blocks whose slot was reclaimed (spilled) and brought back (restored), all steps
STAGING_MOVES: collections.Counter[str] = collections.Counter()
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning("%s", message)


@functools.cache
def settings() -> Settings:
    """The artifact named by KVPOLICY_ARTIFACT, checked against the running engine's model and
    settings (UnsupportedConfiguration lists every reason it cannot run)."""
    config = get_current_vllm_config()
    loaded = load_settings(os.environ.get("KVPOLICY_ARTIFACT", ""), config, _worker_share(config))
    reserve_staging(loaded, config.cache_config)
    for line in loaded.describe().splitlines():
        logger.info("%s", line)
    return loaded


@functools.cache
def _shared_staging(device) -> streamed.Staging:
    """The stream layout's staging, one buffer for every layer of this worker (its window slots
    and the pending chunks of all layers' streams), made on the first step that writes."""
    s = settings()
    return streamed.new_staging(s.streams, s.staging_blocks, s.pending_chunks, device)


@functools.cache
def _layer_streams() -> list[streamed.LayerStreams]:
    """The stream layout's per-layer constants (micro-page addresses as tensors), once."""
    return streamed.layer_streams(settings().streams)


def _worker_share(config: VllmConfig) -> WorkerShare:
    """This process's tensor-parallel rank and pipeline stage, from vLLM's parallel state (its
    own rule for which layers a stage holds: `get_pp_indices`, VLLM_PP_LAYER_PARTITION)."""
    from vllm.distributed import parallel_state
    from vllm.distributed.utils import get_pp_indices
    if not parallel_state.model_parallel_is_initialized():
        return WorkerShare()
    pipeline = parallel_state.get_pp_group()
    layers = config.model_config.get_total_num_hidden_layers()
    return WorkerShare(tensor_rank=parallel_state.get_tensor_model_parallel_rank(),
                       tensor_size=parallel_state.get_tensor_model_parallel_world_size(),
                       pipeline_rank=pipeline.rank_in_group,
                       stages=tuple(get_pp_indices(layers, stage, pipeline.world_size)
                                    for stage in range(pipeline.world_size)))


def rank_report() -> dict:
    """What this worker holds and did (read by `offline` through vLLM's collective_rpc): its
    ranks, KV heads and layers, page and pool sizes, and the blocks it sealed per layer."""
    s = settings()
    f, w = s.page_format, s.worker
    if f is None:  # the stream layout: one worker, every layer
        p = s.streams
        held = {"kv_heads": p.kv_heads, "layers": [0, p.layers], "page_bytes": p.page_bytes,
                "padding_bytes": 0,
                "baseline_page_bytes": s.baseline_block_bytes // (p.layers * p.kv_heads)}
    else:
        held = {"kv_heads": f.kv_heads, "layers": [f.held.start, f.held.stop],
                "page_bytes": f.page_bytes, "padding_bytes": f.padding_bytes,
                "baseline_page_bytes": f.baseline_page_bytes}
    return {"tp_rank": w.tensor_rank, "tp_size": w.tensor_size, "pp_rank": w.pipeline_rank,
            "pp_size": max(1, len(w.stages)), "layout": s.layout, **held,
            "staging_bytes": s.staging_bytes,
            "pool_bytes": s.pool_bytes, "whole_process_ratio": s.whole_process_ratio(),
            "sealed_blocks": dict(SEALED_BLOCKS), "staging_moves": dict(STAGING_MOVES)}


class KVPolicyBackend(AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch_dtype(name) for name in KV_DTYPES]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        from vllm.platforms import current_platform
        # the registry slot this backend fills (see register())
        return "CPU_ATTN" if current_platform.is_cpu() else "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # a block's pages of all layers side by side, so layers of different sizes share them
        # (paged.group_pages); a page is [H, 1 state, page bytes]
        return (KVCacheLayout.BLHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One state per block (all its tokens), of the packed page's bytes, per KV head (the
        stream layout: a block's share per layer and KV head of the micro-pages it holds)."""
        s = settings()
        page = s.page_format.page_bytes if s.streams is None else s.streams.page_bytes
        return replace(spec, dtype=torch.uint8, state_content_bytes=page,
                       tokens_per_state=spec.block_size)

    @staticmethod
    def get_impl_cls() -> type[KVPolicyImpl]:
        return KVPolicyImpl

    @staticmethod
    def get_builder_cls() -> type[KVPolicyMetadataBuilder]:
        return KVPolicyMetadataBuilder


class KVPolicyMetadataBuilder(AttentionMetadataBuilder[paged.StepMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        s = settings()
        self.block_size = kv_cache_spec.block_size
        if s.streams is not None:
            self.table = streamed.StreamTable(s.streams, s.staging_blocks, s.pending_chunks)
        else:
            self.table = StagingTable(s.staging_blocks, self.block_size, s.page_format.window,
                                      s.page_format.sink_blocks)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> paged.StepMetadata:
        m = common_attn_metadata
        query_start = m.query_start_loc_cpu[:m.num_reqs + 1].tolist()
        seq_lens = m.seq_lens[:m.num_reqs].cpu().tolist()
        rows = [m.block_table_tensor[i, :-(-end // self.block_size)].cpu().tolist()
                for i, end in enumerate(seq_lens)]
        slots = m.slot_mapping[:m.num_actual_tokens].cpu()
        if isinstance(self.table, streamed.StreamTable):
            step = streamed.stream_step(self.table, query_start, seq_lens, rows, slots)
            window = step.window
        else:
            step = window = paged.step_metadata(self.table, query_start, seq_lens, rows, slots)
        STAGING_MOVES["spilled"] += len(window.spills)
        STAGING_MOVES["restored"] += len(window.restores)
        return step


class KVPolicyImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str, logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        s = settings()
        reasons = []
        if alibi_slopes is not None:
            reasons.append("ALiBi slopes")
        if sliding_window is not None:
            reasons.append(f"sliding-window attention ({sliding_window})")
        if logits_soft_cap:
            reasons.append("logits soft-capping")
        if sinks is not None:
            reasons.append("learned attention sinks")
        if kv_sharing_target_layer_name is not None:
            reasons.append("KV sharing across layers")
        if attn_type != AttentionType.DECODER:
            reasons.append(f"{attn_type} attention")
        if kv_cache_dtype != "auto":
            reasons.append(f"kv_cache_dtype={kv_cache_dtype} (the policy decides storage; "
                           "leave it 'auto')")
        if reasons:
            raise UnsupportedConfiguration([f"the model uses {r}" for r in reasons])
        if num_kv_heads != s.kv_heads:
            raise UnsupportedConfiguration([
                f"this worker's attention has {num_kv_heads} KV heads and its share of the "
                f"pages {s.kv_heads}: the parallel split is not the one planned"])
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale = float(scale)
        self.fmt = s.page_format
        self.streams = s.streams  # the stream layout's plan (None: the page layout)
        self.pending_chunks = s.pending_chunks
        self.buffers: streamed.LayerBuffers | None = None
        self.rule = ScoreRule.of(s.policy)
        self.staging_blocks = s.staging_blocks
        self.staging: torch.Tensor | None = None
        self.device = None  # the engine's, from the first step's keys
        self.mass: torch.Tensor | None = None  # attention received by staged tokens (snapkv)
        self.spilled: dict = {}  # staged blocks whose slot was reclaimed (staging.py)
        self.layer_index: int | None = None
        self.kernels: StoreKernels | None = None  # settings().kernels, on first forward
        self.kernels_chosen = False
        self.kv_sharing_target_layer_name = None

    def _layer(self, layer) -> int:
        """The model layer this Impl serves (one Impl per attention layer), parsed once."""
        if self.layer_index is None:
            match = _LAYER_INDEX.search(layer.layer_name)
            if match is None:
                raise UnsupportedConfiguration(
                    [f"cannot tell the layer index of attention layer {layer.layer_name!r}"])
            self.layer_index = int(match.group(1))
        return self.layer_index

    def _buffers(self, layer) -> streamed.LayerBuffers:
        if self.buffers is None:
            self.buffers = streamed.new_buffers(_shared_staging(self.device), self._layer(layer),
                                                self.streams.needs_mass)
        return self.buffers

    def _pool(self, kv_cache: torch.Tensor, layer: int) -> torch.Tensor:
        """The whole cache as [blocks, block bytes] (every layer's micro-pages share a block's
        bytes), from this layer's view of it (BLHNC: layer l's view starts l x H x page bytes
        into each block)."""
        plan = self.streams
        run = plan.block_bytes
        before = layer * plan.kv_heads * plan.page_bytes
        if kv_cache.stride(0) != run or kv_cache.storage_offset() < before:
            raise UnsupportedConfiguration([
                f"layer {layer}'s KV cache is not laid out block-outermost (block stride "
                f"{kv_cache.stride(0)} bytes, expected {run}): the KV cache layout must be BLHNC "
                "(unset VLLM_KV_CACHE_LAYOUT)"])
        return torch.as_strided(kv_cache, (kv_cache.shape[0], run), (run, 1),
                                kv_cache.storage_offset() - before)

    def _staging(self) -> torch.Tensor:
        if self.staging is None:  # in the cache dtype the artifact was compiled for
            self.staging, self.mass = paged.new_staging(self.fmt, self.staging_blocks,
                                                        self.num_kv_heads, self.device)
        return self.staging

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(layer.layer_name)
        if metadata is None:
            return  # profiling and warm-up runs
        self.device = key.device
        if self.streams is not None:
            streamed.write_layer(self._buffers(layer), key, value, metadata)
            return
        paged.write_step(self._staging(), self.mass, key, value, metadata,
                         self.spilled)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: paged.StepMetadata | None,
                output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by kvpolicy")
        if attn_metadata is None:
            return output
        index = self._layer(layer)
        if self.streams is not None:
            SEALED_BLOCKS[index] += sum(r.after - r.before for r in attn_metadata.requests)
        else:
            SEALED_BLOCKS[index] += attn_metadata.seal_blocks.numel()
        if not self.kernels_chosen:
            self.kernels_chosen = True
            try:
                self.kernels = settings().kernels(index, query.device)
            except CpuKernelError as exc:
                _warn_once(FALLBACK.format(reason=exc))
        if self.streams is not None:
            return streamed.attend_layer(self._pool(kv_cache, index), self._buffers(layer),
                                         self.streams, self.rule, _layer_streams()[index],
                                         query, key, value, attn_metadata, self.scale, output,
                                         kernels=self.kernels)
        return paged.attend_step(kv_cache, self._staging(), self.mass, self.fmt, index,
                                 query, key, value, attn_metadata, self.scale, output,
                                 kernels=self.kernels)
