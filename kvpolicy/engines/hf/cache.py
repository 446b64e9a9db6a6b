"""A transformers Cache that holds a compiled policy's compressed KV cache.

    cache = PolicyCache(policy, model)          # policy: a .kvp path, a Policy, or an artifact
    with attend_through(model):                 # routes the model's attention to the cache
        model(prompt_ids, past_key_values=cache)        # prefill, full precision (recorded)
        cache.compress()                                # per the plan: select, guard, cluster, pack
        model(next_id, past_key_values=cache)           # decode: attends over the packed cache

Prefill runs the model's own attention (SDPA) on the full-precision prompt and records, per layer,
the keys, values and the last queries (for SnapKV importance). `compress()` plans the policy for
the prompt's length and packs every layer (`kvpolicy.store.whole.compress`); it also runs by itself
before the first decode step. Decode steps append to the full-precision window; when it holds a
whole block beyond the policy's window, its oldest block is quantized and packed into the body
(generated tokens are never evicted or made guards). A forward of several tokens after the
prompt (a question, a continuation to score) appends them all and attends causally among them;
their whole blocks are packed before the next forward. Attention over the compressed layer runs
with the compiled kernels on a GPU, or with PyTorch on the CPU (`backend`, "auto" picks).

`nbytes()` counts the tensors the cache holds, layer by layer (`compress.measured_bytes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import threading

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from kvpolicy.models import ModelShape, shape_from_config
from kvpolicy.plan.pages import blocks_left_window
from kvpolicy.plan.planner import make_plan
from kvpolicy.prepare import Prepared, prepare_whole
from kvpolicy.kernels import reference as R
from kvpolicy.store.whole import compress as compressor, dense
from kvpolicy.kernels.compressed import CompressedLayer
from kvpolicy.kernels.reference import pack_blocks

ATTENTION_NAME = "kvpolicy"
_routing = threading.local()


class RoutedLayer(CacheLayerMixin):
    """A layer of one of kvpolicy's transformers Caches: its owner and index (what the
    "kvpolicy" attention is routed by), not compileable, croppable or sliding."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner, index: int):
        super().__init__()
        self.owner = owner
        self.index = index

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_max_length(self) -> int:
        return -1


class WindowLayer(RoutedLayer):
    """A sliding-window layer's cache (`ModelShape.window_layers`): its last `window - 1`
    tokens at the cache's full precision, as the model's own cache holds them; attention over
    them and the new tokens is causal within the window (a query at position p sees keys at
    p - window + 1 .. p). No policy governs it. During a prefill the whole prompt's keys and
    values are recorded (`prefill`) like a PolicyLayer's, so that a recorded prefill rebuilds
    either kind of layer."""

    windowed = True  # what kvpolicy_attention dispatches on

    def __init__(self, owner, index: int, window: int, dtype: torch.dtype):
        super().__init__(owner, index)
        self.window, self.cache_dtype = window, dtype
        self.prefill: compressor.PrefillLayer | None = None
        self.keys = self.values = None  # [b, H, <= window - 1, D]
        self.seen = 0
        self._first = 0  # position of the first key the last update returned

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys is None:  # the prompt's forward
            self.prefill = compressor.PrefillLayer(key_states, value_states, None, 1.0)
            keys, values = key_states, value_states
        else:
            keys = torch.cat([self.keys.to(key_states.dtype), key_states], dim=2)
            values = torch.cat([self.values.to(value_states.dtype), value_states], dim=2)
        self._first = self.seen - (0 if self.keys is None else self.keys.shape[2])
        self.seen += key_states.shape[2]
        self._hold(keys, values)
        return keys, values

    def load(self, record: compressor.PrefillLayer, prompt: int) -> None:
        """This layer after a recorded prefill of `prompt` tokens (the record is only read)."""
        self.lazy_initialization(record.keys, record.values)
        self.seen = prompt
        self._hold(record.keys, record.values)

    def _hold(self, keys, values) -> None:
        self.keys = window_tail(keys, self.window).to(self.cache_dtype)
        self.values = window_tail(values, self.window).to(self.cache_dtype)

    def attend(self, query, key, value, scaling: float) -> torch.Tensor:
        """query [b, Hq, m, D] (the newest m tokens), key/value as `update` returned them →
        attention output [b, m, Hq, D] (the model's layout)."""
        return window_attention(query, key, value, scaling, self.seen - query.shape[2],
                                self._first, self.window)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def window_tail(states: torch.Tensor, window: int) -> torch.Tensor:
    """The last `window - 1` tokens of [b, H, L, D] states (all when fewer): what a
    sliding-window layer keeps for the queries that follow (`ModelShape.window_tokens`)."""
    return states[:, :, max(states.shape[2] - (window - 1), 0):]


def window_attention(query, key, value, scaling: float, first_query: int, first_key: int,
                     window: int) -> torch.Tensor:
    """Sliding-window causal attention: query [b, Hq, m, D] at positions first_query.., keys
    and values [b, H, L, D] at first_key..; a query at p sees the keys at p - window + 1 .. p.
    → [b, m, Hq, D]."""
    queries = torch.arange(first_query, first_query + query.shape[2], device=query.device)
    keys = torch.arange(first_key, first_key + key.shape[2], device=query.device)
    distance = queries[:, None] - keys[None, :]
    mask = (distance >= 0) & (distance < window)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.to(query.dtype), value.to(query.dtype), attn_mask=mask, scale=scaling,
        enable_gqa=True)
    return out.transpose(1, 2).contiguous()


class PolicyLayer(RoutedLayer):
    """One model layer's cache: the recorded prefill, then the compressed layer. `index`: the
    model's layer; `plan_index`: the plan's (they differ when the model has sliding-window
    layers, which a policy does not govern)."""

    def __init__(self, owner: "PolicyCache", index: int, plan_index: int | None = None):
        super().__init__(owner, index)
        self.plan_index = index if plan_index is None else plan_index
        self.prefill: compressor.PrefillLayer | None = None
        self.compressed: CompressedLayer | None = None
        self.seen = 0  # tokens this layer has been given (prompt + generated)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.prefill is None and self.compressed is None:
            self.prefill = compressor.PrefillLayer(key_states, value_states, None, 1.0)
            self.seen = new
            return key_states, value_states
        if self.compressed is None:
            self.owner.compress()
        self._flush_whole_blocks()  # what a chunk of several tokens left in the window
        self._append(key_states, value_states)
        if new == 1:
            self._flush_whole_blocks()
        return key_states, value_states

    def _append(self, key_states, value_states) -> None:
        layer = self.compressed
        dtype = layer.window_key.dtype
        layer.window_key = torch.cat([layer.window_key, key_states.to(dtype)], dim=2)
        layer.window_value = torch.cat([layer.window_value, value_states.to(dtype)], dim=2)
        layer.window_len = layer.window_len + key_states.shape[2]
        self.seen += key_states.shape[2]

    def _flush_whole_blocks(self) -> None:
        """Packs the window's whole blocks beyond the policy's window, oldest first (the paged
        store's sealing rule, `plan.pages.blocks_left_window`, over the tokens the window
        holds)."""
        unit = self.compressed.body_layout.tokens
        held = self.compressed.window_key.shape[2]
        for _ in range(blocks_left_window(held, unit, self.owner.policy.window)):
            self._flush(unit)

    def _flush(self, unit: int) -> None:
        """Packs the window's oldest `unit` tokens into one more body block per head."""
        layer = self.compressed
        batch, heads = layer.body_count.shape
        first_position = self.seen - layer.window_key.shape[2]  # the window is the newest
        positions = torch.arange(first_position, first_position + unit)
        runs = []
        starts, counts = torch.zeros_like(layer.body_start), layer.body_count.clone()
        used = 0
        for b in range(batch):
            for h in range(heads):
                count = int(layer.body_count[b, h])
                start = int(layer.body_start[b, h])
                old = layer.body_blocks[start:start + -(-count // unit)]
                new = self.owner.packer(layer.window_key[b, h, :unit],
                                        layer.window_value[b, h, :unit], positions,
                                        layer.body_layout)
                runs += [old, new]
                starts[b, h] = used
                used += old.shape[0] + 1
                counts[b, h] = count + unit
        layer.body_blocks = torch.cat(runs)
        layer.body_start, layer.body_count = starts, counts
        layer.window_key = layer.window_key[:, :, unit:].contiguous()
        layer.window_value = layer.window_value[:, :, unit:].contiguous()
        layer.window_len = layer.window_len - unit

    def attend_chunk(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Several new tokens at once (they are the end of the window): query [b, Hq, m, D] →
        [b, Hq, m, D], causal among them. PyTorch path (the kernels take one token)."""
        return dense.attend_chunk(query, self.compressed, scaling)

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """One decode step: query [b, Hq, D] → [b, Hq, D] over the compressed layer."""
        kernels = self.owner.prepared.layer_kernels(self.plan_index)
        if kernels is not None:
            return kernels.decode(query.contiguous(), self.compressed, scaling)
        out, _ = dense.attend(query, self.compressed, scaling)
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def nbytes(self) -> int:
        if self.compressed is None:
            return 0
        plan_layer = self.owner.plan.layers[self.plan_index]
        adapt = self.owner.policy.adapt
        adaptive = adapt is not None and adapt.counts_per_sequence
        return compressor.measured_bytes(self.compressed, plan_layer, adaptive)


class PolicyCache(Cache):
    """A Cache for a Hugging Face causal LM that compresses per a kvpolicy policy.

    policy: what `kvpolicy.prepare.prepare_whole` takes (a .kvp path, a checked Policy, a
    compiled artifact, whose kernels are used) or its result. model: the model (its config
    gives the shape). cache_dtype: dtype of the
    full-precision regions — "bfloat16" (what the plans assume), "float16", or "float32" (exact
    mode for an fp32 model on the CPU). backend: "torch" (PyTorch attention over the packed
    cache), "triton" (the compiled kernels; needs an artifact or compiles one), "auto"
    (`prepare.backend_for`: triton on a GPU, torch otherwise)."""

    def __init__(self, policy, model, cache_dtype: str = "bfloat16", backend: str = "auto"):
        self.shape: ModelShape = model_shape(model, cache_dtype)
        prepared = policy if isinstance(policy, Prepared) else prepare_whole(
            policy, self.shape, next(model.parameters()).device, backend)
        self.prepared = prepared
        self.policy = prepared.policy
        self.backend = prepared.backend
        # the artifact whose kernels attend and pack (None: PyTorch attends, the reference packs)
        self.kernels = prepared.compiled if prepared.kernels is not None else None
        self.packer = prepared.kernels[0].packer if prepared.kernels else pack_blocks
        self.plan = None
        self.model = model  # score expected reads its rotary tables (`rope_tables`)
        held = R.torch_dtype(self.shape.kv_dtype)
        super().__init__(layers=[
            PolicyLayer(self, i, p) if p is not None else
            WindowLayer(self, i, self.shape.sliding_window, held)
            for i, p in enumerate(self.shape.policy_layers())])

    @property
    def policy_layers(self) -> list["PolicyLayer"]:
        """The layers the policy governs, in the plan's order."""
        return [layer for layer in self.layers if isinstance(layer, PolicyLayer)]

    @classmethod
    def from_prefill(cls, policy, model, prefill: list[compressor.PrefillLayer],
                     cache_dtype: str = "bfloat16", backend: str = "torch") -> "PolicyCache":
        """A cache compressed from a recorded prefill (shared by several policies: the records
        are read, not changed). The prompt's forward is not repeated."""
        cache = cls(policy, model, cache_dtype=cache_dtype, backend=backend)
        prompt = prefill[0].keys.shape[2]
        if len(prefill) != len(cache.layers):
            raise ValueError(f"the prefill records {len(prefill)} layers, the model has "
                             f"{len(cache.layers)}")
        for layer, record in zip(cache.layers, prefill):
            if isinstance(layer, WindowLayer):
                layer.load(record, prompt)
                continue
            layer.lazy_initialization(record.keys, record.values)
            layer.prefill, layer.seen = record, prompt
        cache.compress()
        return cache

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        route_to(self.layers[layer_idx])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def compressed(self) -> bool:
        return self.plan is not None

    def compress(self) -> None:
        """Plans the policy for the recorded prompt and packs every layer."""
        if self.plan is not None:
            return
        layers = self.policy_layers
        prompt = layers[0].seen
        self.plan = make_plan(self.policy, self.shape, prompt)
        prefill = [layer.prefill for layer in layers]
        if any(p is None or p.queries is None for p in prefill):
            raise RuntimeError("compress() needs a prefill through attend_through(cache)")
        if self.policy.score.method == "expected":  # records may be shared: copies with tables
            count = prompt + self.policy.score.future
            prefill = [dataclasses.replace(p, rope=rope_tables(self.model, layer.index, count))
                       for layer, p in zip(layers, prefill)]
        for layer, packed in zip(layers, compressor.compress(self.plan, prefill, self.packer)):
            layer.compressed = packed
            layer.prefill = None  # this cache lets go of the full-precision prompt
        for layer in self.layers:
            layer.prefill = None  # sliding-window layers: their record too

    def nbytes(self) -> dict:
        """Bytes held per layer and in total, counted from the tensors (after compress())."""
        per_layer = [layer.nbytes() for layer in self.layers]
        return {"layers": per_layer, "total": sum(per_layer)}


def model_shape(model, cache_dtype: str = "bfloat16") -> ModelShape:
    """The shape of a transformers model, with the cache's full-precision dtype."""
    config = model.config
    return shape_from_config(config.to_dict(), name=getattr(config, "_name_or_path", "") or
                             "model", source="transformers", kv_dtype=cache_dtype)




def rope_tables(model, layer_index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables (cos, sin), fp32 [count, D], that the model's layer `layer_index`
    applies at positions 0 .. count - 1 (the model's own rotary module; a model with
    per-layer-type RoPE, as Gemma 3's local and global layers, gives its layer's type)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"score expected needs the model's rotary embedding, and "
                         f"{type(model).__name__} has none (no `rotary_emb`)")
    device = next(model.parameters()).device
    kwargs = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        kwargs["layer_type"] = model.config.layer_types[layer_index]
    positions = torch.arange(count, device=device)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, device=device), positions, **kwargs)
    return cos[0].float(), sin[0].float()


# ---- routing the model's attention through the cache -------------------------------------------

def route_to(layer) -> None:
    """The cache layer the next attention call serves (set by a cache's update, read right
    after by `kvpolicy_attention`): a PolicyLayer, or a paged layer (hf/paged.py)."""
    _routing.layer = layer


def kvpolicy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):
    """The attention function registered as "kvpolicy". During prefill: SDPA over the prompt,
    recording the last queries; after compression: one step over the compressed layer. Without a
    PolicyCache it is plain SDPA."""
    layer = getattr(_routing, "layer", None)
    _routing.layer = None
    if layer is not None and layer.index != getattr(module, "layer_idx", None):
        raise RuntimeError(f"kvpolicy attention: the cache routed layer {layer.index} but the "
                           f"model's layer {getattr(module, 'layer_idx', None)} is attending")
    if getattr(layer, "paged", False):  # kvpolicy.engines.hf.paged: one store step
        scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        return layer.attend(query, scaling).to(query.dtype), None
    if getattr(layer, "windowed", False):  # a sliding-window layer: no policy governs it
        scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        return layer.attend(query, key, value, scaling), None
    if getattr(layer, "reconstructing", False):  # kvpolicy.engines.hf.reconstruct: a re-read
        scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        return layer.attend(query, key, value, scaling), None
    if not isinstance(layer, PolicyLayer):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if layer.compressed is None:  # prefill: the model's own attention, queries recorded
        observe = max(layer.owner.policy.score.observe, 1)
        layer.prefill.queries = query[:, :, -observe:].detach()
        layer.prefill.scaling = scaling
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    if query.shape[2] > 1:  # a chunk after the prompt (a question, a scored continuation)
        out = layer.attend_chunk(query, scaling)  # [b, Hq, m, D]
        return out.transpose(1, 2).to(query.dtype).contiguous(), None
    out = layer.attend(query[:, :, 0], scaling)  # [b, Hq, D]
    return out[:, None].to(query.dtype), None


AttentionInterface.register(ATTENTION_NAME, kvpolicy_attention)


@contextlib.contextmanager
def attend_through(model):
    """Within the block, the model's attention is kvpolicy's (plain SDPA unless a PolicyCache is
    in use); the previous implementation is restored afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)

