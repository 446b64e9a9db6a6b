"""A transformers Cache over kvpolicy's stream store (`kvpolicy.store.streamed`): pages laid out by
the stream plan, so one request holds what the whole-prompt plan says at every block size — the
same store vLLM's backend runs when its pages follow the stream plan.

    cache = StreamPolicyCache(policy, model, block_size=16, max_len=4096)
    with attend_through(model):                      # the "kvpolicy" attention (hf/cache.py)
        out = model(prompt_ids, past_key_values=cache)   # one step: prefill, then sealing
        out = model(next_id, past_key_values=cache)      # one step per token

Each forward is one engine step for every sequence of the batch (equal lengths, no padding).
Sequences get blocks from one pool of `StreamPlan.block_bytes`-byte blocks (a block per
`block_size` tokens, as vLLM allocates them); `nbytes()` counts the blocks, window slots and
pending chunks in use from the tensors, and the stream plan gives the same number
(`StreamPlan.request_bytes`).
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache

from kvpolicy.engines.hf.cache import RoutedLayer, model_shape
from kvpolicy.plan.streams import PENDING_ROWS, StreamPlan
from kvpolicy.prepare import Prepared, prepare_streamed
from kvpolicy.store import streamed
from kvpolicy.store.select import ScoreRule

POOL_GROWTH = 64  # blocks added to the pool at a time


class StreamLayer(RoutedLayer):
    """One model layer: its staging buffers; micro-pages live in the owner's pool."""

    paged = True  # the "kvpolicy" attention runs `attend` for it

    def __init__(self, owner: "StreamPolicyCache", index: int):
        super().__init__(owner, index)
        self.buffers: streamed.LayerBuffers | None = None
        self.step_key = self.step_value = None

    def update(self, key_states, value_states, *args, **kwargs):
        """Stages the step's new tokens (key_states [b, H, m, D]); attention comes next."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        if self.index == 0:
            owner.begin_step(key_states.shape[0], key_states.shape[2])
        if self.buffers is None:
            self.buffers = streamed.new_buffers(owner.staging(key_states.device), self.index,
                                                owner.plan.needs_mass)
        self.buffers.staging.grow(owner.table.capacity)
        b, heads, m, d = key_states.shape
        self.step_key = key_states.transpose(1, 2).reshape(b * m, heads, d)
        self.step_value = value_states.transpose(1, 2).reshape(b * m, heads, d)
        streamed.write_layer(self.buffers, self.step_key, self.step_value, owner.step)
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [b, Hq, m, D] → [b, m, Hq, D]: the step's attention, then its sealing."""
        b, q_heads, m, d = query.shape
        owner = self.owner
        flat = query.transpose(1, 2).reshape(b * m, q_heads, d)
        output = torch.empty(b * m, q_heads, d, dtype=torch.float32, device=query.device)
        streamed.attend_layer(owner.pool, self.buffers, owner.plan, owner.rule,
                              owner.streams[self.index], flat, self.step_key, self.step_value,
                              owner.step, scaling, output,
                              kernels=owner.prepared.layer_kernels(self.index))
        self.step_key = self.step_value = None
        return output.reshape(b, m, q_heads, d)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.seen


class StreamPolicyCache(Cache):
    """A Cache holding a policy's KV cache in kvpolicy's stream store.

    policy, model, block_size, cache_dtype, backend: as `PagedPolicyCache` takes them (the
    block size a multiple of 16). max_len: the longest sequence the stream plan lays out (the
    engine's max_model_len; default the model's context)."""

    def __init__(self, policy, model, block_size: int = 16, cache_dtype: str = "bfloat16",
                 backend: str = "auto", max_len: int | None = None):
        self.shape = model_shape(model, cache_dtype)
        parameter = next(model.parameters())
        prepared = policy if isinstance(policy, Prepared) else prepare_streamed(
            policy, self.shape, block_size, max_len or self.shape.max_context,
            parameter.device, backend)
        self.prepared = prepared
        self.policy = prepared.policy
        self.rule = ScoreRule.of(self.policy)
        self.backend = prepared.backend
        self.plan: StreamPlan = prepared.streams
        self.streams = streamed.layer_streams(self.plan)
        self.pool = torch.zeros(0, self.plan.block_bytes, dtype=torch.uint8,
                                device=parameter.device)
        self.rows: list[list[int]] = []
        self.table: streamed.StreamTable | None = None
        self._staging: streamed.Staging | None = None  # every layer's, made by the first
        self.step: streamed.StreamStep | None = None
        self.seen = 0
        self.sealed_blocks = [0] * self.shape.num_layers
        super().__init__(layers=[StreamLayer(self, i) for i in range(self.shape.num_layers)])

    def begin_step(self, batch: int, new: int) -> None:
        """Plans the step for every sequence (called by layer 0's update)."""
        plan, bs = self.plan, self.plan.block_size
        if self.table is None:
            per_sequence = math.ceil(plan.window / bs) + 2 + math.ceil(max(new, 256) / bs)
            self.table = streamed.StreamTable(plan, batch * per_sequence)
            self.rows = [[] for _ in range(batch)]
        if batch != len(self.rows):
            raise ValueError(f"this cache holds {len(self.rows)} sequences, not {batch}")
        start, end = self.seen, self.seen + new
        if end > plan.max_len:
            raise ValueError(f"{end} tokens: this cache's stream plan holds {plan.max_len} "
                             "(max_len)")
        for row in self.rows:
            while len(row) < -(-end // bs):
                row.append(self._new_block())
        slots = [row[pos // bs] * bs + pos % bs for row in self.rows for pos in range(start, end)]
        self.step = streamed.stream_step(self.table, [i * new for i in range(batch + 1)],
                                         [end] * batch, self.rows, torch.tensor(slots))
        self.seen = end
        sealed = sum(r.after - r.before for r in self.step.requests)
        self.sealed_blocks = [n + sealed for n in self.sealed_blocks]

    def staging(self, device) -> streamed.Staging:
        """The staging buffer every layer shares (made on the first step)."""
        if self._staging is None:
            self._staging = streamed.new_staging(self.plan, self.table.window.slots, 0, device)
        return self._staging

    def _new_block(self) -> int:
        used = sum(len(row) for row in self.rows)
        if used == self.pool.shape[0]:
            grown = self.pool.new_zeros(POOL_GROWTH, self.pool.shape[1])
            self.pool = torch.cat([self.pool, grown])
        return used

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        from kvpolicy.engines.hf import cache as routing
        routing.route_to(self.layers[layer_idx])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def held_bytes(self, seq_len: int) -> int:
        """What the stream plan says one sequence of `seq_len` tokens holds."""
        return self.plan.held_bytes(seq_len)

    def nbytes(self) -> dict:
        """Bytes held, from the tensors: the pool blocks the sequences use, the window slots in
        use (full-precision tokens and attention mass) and the pending chunks in use."""
        blocks = sum(len(row) for row in self.rows)
        pool = blocks * self.pool.shape[1]
        staging = chunks = 0
        if self.table is not None and self._staging is not None:
            slots = len(self.table.window.slot_of_block)
            chunks = self.table.chunks_in_use()
            staging = chunks * self._staging.chunk_bytes() + sum(
                layer.buffers.window_bytes(slots) for layer in self.layers)
        return {"pool": pool, "staging": staging, "total": pool + staging,
                "pending_rows": chunks * PENDING_ROWS}
