"""The vLLM attention backend that runs a compiled policy: Backend (what vLLM asks of a backend,
and `customize_spec`, which publishes the packed page size), MetadataBuilder (once per step:
which staging slot holds which block, which blocks seal), Impl (per layer: write = stage and
seal, forward = attention over sealed pages and staged blocks).

The compute is in `paged.py` (plain functions of tensors); this module only adapts vLLM's
objects to them. Imported by vLLM through the registry path that `kvpolicy.integrations.vllm
.register` installs, never by kvpolicy itself.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from kvpolicy.integrations.vllm import paged
from kvpolicy.integrations.vllm.settings import Settings, load_settings
from kvpolicy.integrations.vllm.staging import RequestStep, StagingTable, StepPlan

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


@functools.cache
def settings() -> Settings:
    """The artifact named by KVPOLICY_ARTIFACT, checked against the running engine's model and
    settings (UnsupportedConfiguration lists every reason it cannot run)."""
    return load_settings(os.environ.get("KVPOLICY_ARTIFACT", ""), get_current_vllm_config())


class KVPolicyBackend(AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                     torch.float32]
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
        return (KVCacheLayout.LBHNC,)  # a page is [H, 1 state, page bytes] per block

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One state per block (all its tokens), of the packed page's bytes, per KV head."""
        fmt = settings().page_format
        return replace(spec, dtype=torch.uint8, state_content_bytes=fmt.page_bytes,
                       tokens_per_state=spec.block_size)

    @staticmethod
    def get_impl_cls() -> type[KVPolicyImpl]:
        return KVPolicyImpl

    @staticmethod
    def get_builder_cls() -> type[KVPolicyMetadataBuilder]:
        return KVPolicyMetadataBuilder


@dataclass
class KVPolicyMetadata:
    num_actual_tokens: int
    query_start: list[int]  # per request, then the end: [num_reqs + 1]
    seq_lens: list[int]
    block_rows: list[list[int]]
    step: StepPlan
    token_slot: torch.Tensor  # [num_actual_tokens] staging slot of each new token's block
    token_offset: torch.Tensor  # [num_actual_tokens] offset in its block
    seal_blocks: torch.Tensor
    seal_slots: torch.Tensor


class KVPolicyMetadataBuilder(AttentionMetadataBuilder[KVPolicyMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        s = settings()
        self.block_size = kv_cache_spec.block_size
        self.table = StagingTable(s.staging_blocks, self.block_size, s.page_format.window)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVPolicyMetadata:
        m = common_attn_metadata
        n = m.num_actual_tokens
        query_start = m.query_start_loc_cpu[:m.num_reqs + 1].tolist()
        seq_lens = m.seq_lens[:m.num_reqs].cpu().tolist()
        bs = self.block_size
        rows = []
        requests = []
        for i, end in enumerate(seq_lens):
            row = m.block_table_tensor[i, :-(-end // bs)].cpu().tolist()
            rows.append(row)
            requests.append(RequestStep(row, end - (query_start[i + 1] - query_start[i]), end))
        step = self.table.plan(requests)
        slots = m.slot_mapping[:n].cpu().to(torch.int64)
        stage = torch.tensor([step.stage_of_block[int(b)] for b in (slots // bs).tolist()],
                             dtype=torch.int64)
        return KVPolicyMetadata(
            num_actual_tokens=n, query_start=query_start, seq_lens=seq_lens, block_rows=rows,
            step=step, token_slot=stage, token_offset=slots % bs,
            seal_blocks=torch.tensor(step.seal_blocks, dtype=torch.int64),
            seal_slots=torch.tensor(step.seal_slots, dtype=torch.int64))


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
            raise paged.UnsupportedConfiguration([f"the model uses {r}" for r in reasons])
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale = float(scale)
        self.fmt = s.page_format
        self.staging_blocks = s.staging_blocks
        self.staging: torch.Tensor | None = None
        self.layer_index: int | None = None
        self.kv_sharing_target_layer_name = None

    def _layer(self, layer) -> int:
        """The model layer this Impl serves (one Impl per attention layer), parsed once."""
        if self.layer_index is None:
            match = _LAYER_INDEX.search(layer.layer_name)
            if match is None:
                raise paged.UnsupportedConfiguration(
                    [f"cannot tell the layer index of attention layer {layer.layer_name!r}"])
            self.layer_index = int(match.group(1))
        return self.layer_index

    def _staging(self, dtype: torch.dtype) -> torch.Tensor:
        if self.staging is None:
            self.staging = torch.zeros(self.staging_blocks, self.num_kv_heads,
                                       self.fmt.block_size, 2, self.head_size, dtype=dtype)
        return self.staging

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(layer.layer_name)
        if metadata is None:
            return  # profiling and warm-up runs
        n = metadata.num_actual_tokens
        staging = self._staging(key.dtype)
        paged.stage_tokens(staging, key[:n], value[:n], metadata.token_slot,
                           metadata.token_offset)
        paged.seal_blocks(kv_cache, staging, metadata.seal_blocks, metadata.seal_slots,
                          self.fmt, self._layer(layer))

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: KVPolicyMetadata | None,
                output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by kvpolicy")
        if attn_metadata is None:
            return output
        index = self._layer(layer)
        staging = self._staging(key.dtype)
        md = attn_metadata
        for i, seq_len in enumerate(md.seq_lens):
            first, last = md.query_start[i], md.query_start[i + 1]
            start = seq_len - (last - first)
            past_k, past_v = paged.cached_tokens(kv_cache, staging, md.block_rows[i],
                                                 md.step.request_slots[i], start, seq_len,
                                                 self.fmt, index)
            out = paged.attend(query[first:last], past_k, past_v, key[first:last],
                               value[first:last], self.scale)
            output[first:last] = out.to(output.dtype)
        return output

