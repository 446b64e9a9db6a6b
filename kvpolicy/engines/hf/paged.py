"""A transformers Cache over kvpolicy's compressed store (`kvpolicy.store`): the same pages,
staging, selection and attention that vLLM's backend runs, so the two engines keep the same
tokens at the same precision and decode the same tokens.

    cache = PagedPolicyCache(policy, model, block_size=32)
    with attend_through(model):                      # the "kvpolicy" attention (hf/cache.py)
        out = model(prompt_ids, past_key_values=cache)   # one step: prefill, then sealing
        out = model(next_id, past_key_values=cache)      # one step per token

Each forward is one engine step for every sequence of the batch (equal lengths, no padding):
its tokens are staged at full precision, its queries attend over the sealed pages, the staged
blocks and themselves, and the blocks that left the window are sealed (selected, quantized,
packed). Sequences get blocks from one pool laid out as vLLM lays its cache out (block-outermost,
every layer's pages side by side). `nbytes()` counts the pool blocks and staging slots in use
from their tensors; the page plan gives the same number (`PageFormat.held_bytes`).
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache

from kvpolicy.engines.hf.cache import RoutedLayer, model_shape
from kvpolicy.kernels.bound import StoreKernels
from kvpolicy.plan.pages import PageFormat
from kvpolicy.prepare import Prepared, prepare_paged
from kvpolicy.store import paged
from kvpolicy.store.paged.staging import StagingTable

POOL_GROWTH = 64  # blocks added to the pool at a time


class PagedLayer(RoutedLayer):
    """One model layer: its staging buffer and attention mass; pages live in the owner's pool."""

    paged = True  # the "kvpolicy" attention runs `attend` for it

    def __init__(self, owner: "PagedPolicyCache", index: int):
        super().__init__(owner, index)
        self.staging: torch.Tensor | None = None
        self.mass: torch.Tensor | None = None
        self.spilled: dict = {}
        self.step_key = self.step_value = None

    def update(self, key_states, value_states, *args, **kwargs):
        """Stages the step's new tokens (key_states [b, H, m, D]); attention comes next."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        if self.index == 0:
            owner.begin_step(key_states.shape[0], key_states.shape[2])
        fmt = owner.fmt
        if self.staging is None:
            self.staging, self.mass = paged.new_staging(fmt, owner.table.slots, fmt.kv_heads,
                                                        key_states.device)
        b, heads, m, d = key_states.shape
        self.step_key = key_states.transpose(1, 2).reshape(b * m, heads, d)
        self.step_value = value_states.transpose(1, 2).reshape(b * m, heads, d)
        paged.write_step(self.staging, self.mass, self.step_key, self.step_value, owner.step,
                         self.spilled)
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [b, Hq, m, D] → [b, m, Hq, D]: the step's attention, then its sealing."""
        b, q_heads, m, d = query.shape
        flat = query.transpose(1, 2).reshape(b * m, q_heads, d)
        output = torch.empty(b * m, q_heads, d, dtype=torch.float32, device=query.device)
        paged.attend_step(self.owner.layer_view(self.index), self.staging, self.mass,
                          self.owner.fmt, self.index, flat, self.step_key, self.step_value,
                          self.owner.step, scaling, output,
                          kernels=self.owner.layer_kernels(self.index))
        self.step_key = self.step_value = None
        return output.reshape(b, m, q_heads, d)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.seen


class PagedPolicyCache(Cache):
    """A Cache holding a policy's KV cache in kvpolicy's compressed store.

    policy: what `kvpolicy.prepare.prepare_paged` takes (a .kvp path, a Policy, or a compiled
    artifact directory, checked against the model) or its result. model: the transformers model. block_size: tokens per block (a multiple of every
    layer's format unit; vLLM's --block-size for a comparison). cache_dtype: the staged window's
    and the pages' 16-bit regions' dtype (an artifact's own; vLLM's backend uses the same).
    backend: "torch" (the store's PyTorch path), "triton" (the artifact's compiled paged decode
    and pack kernels for decode steps; compiles one when given a policy), "cpu" (the artifact's
    C paged decode kernel, `kvpolicy.kernels.cpu`, for a model on the CPU), "auto" (`prepare.backend_for`:
    triton on a GPU, cpu otherwise — as vLLM's backend chooses — falling back to torch, with
    `prepare.FALLBACK` as a warning, when no C compiler can build it)."""

    def __init__(self, policy, model, block_size: int = 32, cache_dtype: str = "bfloat16",
                 backend: str = "auto"):
        self.shape = model_shape(model, cache_dtype)
        parameter = next(model.parameters())
        # staging in cache_dtype; the baseline page (vLLM's own) in the model's dtype
        prepared = policy if isinstance(policy, Prepared) else prepare_paged(
            policy, self.shape, block_size, parameter.device, backend,
            dtype_bytes=parameter.element_size())
        self.prepared = prepared
        self.policy = prepared.policy
        self.fmt: PageFormat = prepared.pages
        self.backend = prepared.backend
        self.notes = list(prepared.notes)
        device = parameter.device
        self.pool = torch.zeros(0, self.shape.num_layers, self.shape.num_kv_heads, 1,
                                self.fmt.page_bytes, dtype=torch.uint8, device=device)
        self.rows: list[list[int]] = []
        self.table: StagingTable | None = None
        self.step: paged.StepMetadata | None = None
        self.seen = 0
        self.sealed_blocks = [0] * self.shape.num_layers
        super().__init__(layers=[PagedLayer(self, i) for i in range(self.shape.num_layers)])

    # ---- one engine step ----------------------------------------------------------------------

    def begin_step(self, batch: int, new: int) -> None:
        """Plans the step for every sequence (called by layer 0's update)."""
        fmt, bs = self.fmt, self.fmt.block_size
        if self.table is None:
            per_sequence = (fmt.sink_blocks + math.ceil(fmt.window / bs) + 2
                            + math.ceil(max(new, 256) / bs))
            self.table = StagingTable(batch * per_sequence, bs, fmt.window, fmt.sink_blocks)
            self.rows = [[] for _ in range(batch)]
        if batch != len(self.rows):
            raise ValueError(f"this cache holds {len(self.rows)} sequences, not {batch}")
        start, end = self.seen, self.seen + new
        for row in self.rows:
            while len(row) < -(-end // bs):
                row.append(self._new_block())
        slots = [row[pos // bs] * bs + pos % bs for row in self.rows for pos in range(start, end)]
        self.step = paged.step_metadata(self.table, [i * new for i in range(batch + 1)],
                                        [end] * batch, self.rows, torch.tensor(slots))
        self.seen = end
        for layer in range(len(self.sealed_blocks)):
            self.sealed_blocks[layer] += self.step.seal_blocks.numel()

    def _new_block(self) -> int:
        used = sum(len(row) for row in self.rows)
        if used == self.pool.shape[0]:
            grown = torch.zeros(POOL_GROWTH, *self.pool.shape[1:], dtype=torch.uint8,
                                device=self.pool.device)
            self.pool = torch.cat([self.pool, grown])
        return used

    def layer_kernels(self, layer: int) -> StoreKernels | None:
        """The store's compiled kernels for `layer` (backend triton or cpu), or None (torch)."""
        return self.prepared.layer_kernels(layer)

    def layer_view(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s view of the pool, as vLLM hands a backend its cache."""
        return self.pool[:, layer]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        from kvpolicy.engines.hf import cache as routing
        routing.route_to(self.layers[layer_idx])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # ---- bytes --------------------------------------------------------------------------------

    def held_bytes(self, seq_len: int) -> int:
        """What the page plan says one sequence of `seq_len` tokens holds."""
        return self.fmt.held_bytes(seq_len)

    def nbytes(self) -> dict:
        """Bytes held, from the tensors: the pool blocks the sequences use (every layer's pages
        of a block) and the staging slots in use (full-precision tokens and attention mass)."""
        blocks = sum(len(row) for row in self.rows)
        pool = blocks * self.pool[0].numel() * self.pool.element_size() if blocks else 0
        staged = len(self.table.slot_of_block) if self.table is not None else 0
        staging = 0
        for layer in self.layers:
            if layer.staging is not None:
                staging += staged * layer.staging[0].numel() * layer.staging.element_size()
                if layer.mass is not None:
                    staging += staged * layer.mass[0].numel() * layer.mass.element_size()
        return {"pool": pool, "staging": staging, "total": pool + staging}
