"""Compressing a full-precision prefill into the packed format, per policy and plan.

Model-agnostic (plain tensors): the Hugging Face cache and the evaluation runner call it with the
keys, values and observation-window queries they recorded during prefill.

For each layer and (sequence, KV head), following docs/language.md:
  1. importance of every prompt token (score: snapkv / keynorm / recent / expected — the last
     queries' statistics and the layer's rotary tables, `PrefillLayer.rope` — or reconstruct
     from the passes the recorder ran, `PrefillLayer.received`);
  2. budgets: the plan's selected tokens, or — with `adapt` — the pooled budget of each storage
     class redistributed by attention mass (`redistribute`), in whole blocks, totals unchanged;
  3. sinks and window kept in 16 bits; the most important middle tokens selected; the top
     `guard` fraction of them (by importance) stored at the guard's bits, the rest in the body;
     both in ascending position order, packed into blocks;
  4. evicted middle tokens folded into `cluster evicted k` centroids (k-means on keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpolicy.lang.ir import Policy
from kvpolicy.kernels import reference as R
from kvpolicy.kernels.compressed import CompressedLayer
from kvpolicy.plan.planner import LayerPlan, Plan, largest_remainder
from kvpolicy.store.select import above_threshold, rank, split_ranked

KMEANS_ITERATIONS = 6


@dataclass
class PrefillLayer:
    """What one layer's prefill leaves behind for compression (batch b, N prompt tokens)."""

    keys: torch.Tensor  # [b, H, N, D], after RoPE, in the model's dtype
    values: torch.Tensor  # [b, H, N, D]
    queries: torch.Tensor  # [b, Hq, w, D]: the last w prompt tokens' queries (w >= observe)
    scaling: float  # the attention's softmax scale
    # score reconstruct: chunk size → [b, Hq, N], the largest attention weight each prompt token
    # received while the model re-read the context in passes of that many tokens
    # (kvpolicy.engines.hf.reconstruct)
    received: dict[int, torch.Tensor] = field(default_factory=dict)
    # score expected: the layer's rotary tables (cos, sin), [P, D] each, positions 0 .. P - 1
    # with P >= N + future (kvpolicy.engines.hf.cache.rope_tables)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None


def importance(policy: Policy, layer: PrefillLayer) -> torch.Tensor:
    """[b, H, N] importance of every prompt token (higher is kept first)."""
    batch, heads, n, _ = layer.keys.shape
    score = policy.score
    if score.method == "recent":
        return R.recent_importance(batch, heads, n)
    if score.method == "keynorm":
        return R.keynorm_importance(layer.keys)
    if score.method == "reconstruct":
        if score.chunk not in layer.received:
            raise ValueError(f"score reconstruct(chunk = {score.chunk}) needs the context's "
                             "reconstruction passes before compressing "
                             "(kvpolicy.engines.hf.reconstruct.record)")
        return R.reconstruct_importance(layer.received[score.chunk], heads, score.pool,
                                        score.pool_kernel, score.gqa)
    observe = min(score.observe, n, layer.queries.shape[2])
    queries = layer.queries[:, :, -observe:]
    if score.method == "expected":
        if layer.rope is None or layer.rope[0].shape[0] < n + score.future:
            raise ValueError(f"score expected(future = {score.future}) needs the layer's rotary "
                             f"tables for positions 0 .. {n + score.future - 1} "
                             "(PrefillLayer.rope)")
        return R.expected_importance(queries, layer.keys, layer.values, *layer.rope,
                                     score.future, score.pool, score.pool_kernel, score.gqa,
                                     layer.scaling)
    positions = torch.arange(n - observe, n)
    return R.snapkv_importance(queries, layer.keys, positions, score.pool, score.pool_kernel,
                               score.gqa, layer.scaling)


# ---- budgets ----------------------------------------------------------------------------------

def _largest_remainder(total: int, weights: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """`plan.planner.largest_remainder` — the one rule that splits whole units in proportion to
    weights under caps — over tensors: `total` units over the cells of `caps` (any shape)."""
    units = largest_remainder(total, weights.flatten().tolist(), caps.flatten().tolist())
    return torch.tensor(units, dtype=caps.dtype).reshape(caps.shape)


def redistribute(plan: Plan, masses: list[torch.Tensor], scores: list[torch.Tensor] | None = None):
    """Selected and guard tokens per (layer, sequence, KV head): two lists of [b, H] tensors.

    Without `adapt`, every head gets the plan's counts. With it, layers that share a storage and
    evict pool their planned units (per layer instead, without `across layers`), and each
    (layer, head) gets a share of the pool, in whole units, at most its middle minus one unit (so
    it keeps evicting, and keeps its centroid slots):
    - `adapt temperature T`: in proportion to mass^(1/T); masses[l] [b, H] is the importance on
      layer l's middle tokens;
    - `adapt threshold`: in proportion to how many of its middle tokens score at or above one
      threshold for the whole pool, the one that would keep the pool's planned tokens (KVzip's
      non-uniform budgets); scores[l] [b, H, N] is layer l's importance.
    Without `across heads` the heads of a layer get equal shares. The pool's guard units are then
    split in proportion to the selected units. `adapt heads` is static: the plan's counts
    (`LayerPlan.selected_by_head`: each head's share of its pool in proportion to the
    calibration's weights). Pool totals — and so the plan's bytes — are unchanged."""
    policy = plan.policy
    batch, heads = masses[0].shape
    selected = [torch.full((batch, heads), layer.selected, dtype=torch.long)
                for layer in plan.layers]
    guards = [torch.full((batch, heads), layer.guard_tokens, dtype=torch.long)
              for layer in plan.layers]
    adapt = policy.adapt
    if adapt is None or not policy.evicts:
        return selected, guards
    if adapt.static:  # adapt heads: the plan's per-head counts, the same for every sequence
        selected = [torch.tensor(layer.selected_by_head(heads)).expand(batch, -1).clone()
                    for layer in plan.layers]
        guards = [torch.tensor(layer.guards_by_head(heads)).expand(batch, -1).clone()
                  for layer in plan.layers]
        return selected, guards
    pools: dict[tuple, list[int]] = {}
    for layer in plan.layers:
        if layer.evicted > 0:
            key = (layer.keys, layer.values, layer.guard, layer.token_unit)
            pools.setdefault(key if adapt.across_layers else key + (layer.layer,),
                             []).append(layer.layer)
    for members in pools.values():
        unit = plan.layers[members[0]].token_unit
        planned = torch.tensor([plan.layers[i].selected // unit for i in members])
        planned_guard = sum(plan.layers[i].guard_tokens // unit for i in members)
        middle = torch.tensor([plan.context - plan.layers[i].sinks - plan.layers[i].window
                               for i in members])
        caps = torch.maximum(middle // unit - 1, planned)  # [layers]
        for b in range(batch):
            if adapt.rule == "threshold":
                weight = _above_threshold(plan, members, [scores[i][b] for i in members],
                                          int(planned.sum()) * unit * heads) / unit + 1e-9
            else:
                mass = torch.stack([masses[i][b] for i in members]).double().clamp_min(1e-12)
                weight = mass ** (1.0 / adapt.temperature)  # [layers, heads]
            if adapt.across_heads:
                units = _largest_remainder(int(planned.sum()) * heads, weight.flatten(),
                                           caps[:, None].expand(-1, heads).flatten())
                units = units.reshape(len(members), heads)
                guard_units = _largest_remainder(planned_guard * heads,
                                                 units.flatten().double() + 1e-9,
                                                 units.flatten()).reshape(len(members), heads)
            else:
                per_layer = _largest_remainder(int(planned.sum()), weight.mean(1), caps)
                guard_per_layer = _largest_remainder(planned_guard, per_layer.double() + 1e-9,
                                                     per_layer)
                units = per_layer[:, None].expand(-1, heads)
                guard_units = guard_per_layer[:, None].expand(-1, heads)
            for row, index in enumerate(members):
                selected[index][b] = units[row] * unit
                guards[index][b] = guard_units[row] * unit
    return selected, guards


def _above_threshold(plan: Plan, members: list[int], scores: list[torch.Tensor],
                     keep: int) -> torch.Tensor:
    """[layers, heads]: middle tokens per (layer, head) scoring at or above the `keep`-th largest
    middle score of the pool (scores: [H, N] per member layer; `select.above_threshold`)."""
    return above_threshold([s[:, plan.layers[i].sinks:plan.context - plan.layers[i].window]
                            for i, s in zip(members, scores)], keep)


# ---- one layer ----------------------------------------------------------------------------------

def kmeans_centroids(keys: torch.Tensor, values: torch.Tensor, k: int):
    """Folds n evicted tokens into k centroids: (key means [k, D], value means [k, D],
    counts [k] int32). Deterministic: initial centres are evenly spaced tokens."""
    n, d = keys.shape
    centre_k = torch.zeros(k, d)
    centre_v = torch.zeros(k, d)
    counts = torch.zeros(k, dtype=torch.int32)
    if n == 0:
        return centre_k, centre_v, counts
    if n <= k:
        centre_k[:n], centre_v[:n], counts[:n] = keys, values, 1
        return centre_k, centre_v, counts
    start = torch.linspace(0, n - 1, k).round().long()
    centres = keys[start].clone()
    for _ in range(KMEANS_ITERATIONS):
        assign = torch.cdist(keys, centres).argmin(1)
        sums = torch.zeros(k, d).index_add_(0, assign, keys)
        sizes = torch.bincount(assign, minlength=k)
        centres = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None], centres)
    assign = torch.cdist(keys, centres).argmin(1)
    sizes = torch.bincount(assign, minlength=k)
    centre_k = torch.zeros(k, d).index_add_(0, assign, keys) / sizes.clamp_min(1)[:, None]
    centre_v = torch.zeros(k, d).index_add_(0, assign, values) / sizes.clamp_min(1)[:, None]
    return centre_k, centre_v, sizes.to(torch.int32)


def compress_layer(prefill: PrefillLayer, scores: torch.Tensor, plan_layer: LayerPlan,
                   selected: torch.Tensor, guards: torch.Tensor, packer=None) -> CompressedLayer:
    """Packs one layer. selected, guards: [b, H] tokens per head. `packer(keys, values,
    positions, layout) → blocks` defaults to the PyTorch reference; the runtime may pass the
    compiled pack kernel."""
    packer = packer or R.pack_blocks
    keys, values = prefill.keys, prefill.values
    batch, heads, n, d = keys.shape
    dtype = R.torch_dtype(plan_layer.body_layout.kv_dtype)  # the cache's full-precision dtype
    sinks, window = plan_layer.sinks, plan_layer.window
    middle = torch.arange(sinks, n - window)
    centroids = plan_layer.centroids
    regions = {"guard": ([], [], []), "body": ([], [], [])}  # blocks, starts, counts
    cent = [torch.zeros(batch, heads, centroids, d) for _ in range(2)]
    cent_count = torch.zeros(batch, heads, centroids, dtype=torch.int32)
    used = {"guard": 0, "body": 0}
    for b in range(batch):
        for h in range(heads):
            order = rank(scores[b, h, middle])  # the one selection rule (`store.select`)
            guard, body = (middle[part] for part in split_ranked(
                order, int(selected[b, h]), int(guards[b, h])))
            evicted = middle[order[int(selected[b, h]):]]
            for region, index, layout in (("guard", guard, plan_layer.guard_layout),
                                          ("body", body, plan_layer.body_layout)):
                blocks, starts, counts = regions[region]
                starts.append(used[region])
                counts.append(len(index))
                if len(index):
                    packed = packer(keys[b, h, index], values[b, h, index], index, layout)
                    blocks.append(packed)
                    used[region] += packed.shape[0]
            if centroids:
                ck, cv, cc = kmeans_centroids(keys[b, h, evicted].float(),
                                              values[b, h, evicted].float(), centroids)
                cent[0][b, h], cent[1][b, h], cent_count[b, h] = ck, cv, cc

    def stacked(region: str, layout):
        blocks, starts, counts = regions[region]
        data = torch.cat(blocks) if blocks else torch.zeros(0, layout.nbytes, dtype=torch.uint8)
        shape = (batch, heads)
        return (data, torch.tensor(starts, dtype=torch.int32).reshape(shape),
                torch.tensor(counts, dtype=torch.int32).reshape(shape))

    guard_blocks, guard_start, guard_count = stacked("guard", plan_layer.guard_layout)
    body_blocks, body_start, body_count = stacked("body", plan_layer.body_layout)
    return CompressedLayer(
        guard_layout=plan_layer.guard_layout, body_layout=plan_layer.body_layout,
        sinks_key=keys[:, :, :sinks].to(dtype, copy=True),
        sinks_value=values[:, :, :sinks].to(dtype, copy=True),
        sink_len=torch.full((batch,), sinks, dtype=torch.int32),
        window_key=keys[:, :, n - window:].to(dtype, copy=True),
        window_value=values[:, :, n - window:].to(dtype, copy=True),
        window_len=torch.full((batch,), window, dtype=torch.int32),
        guard_blocks=guard_blocks, guard_start=guard_start, guard_count=guard_count,
        body_blocks=body_blocks, body_start=body_start, body_count=body_count,
        centroid_key=cent[0].to(dtype), centroid_value=cent[1].to(dtype),
        centroid_count=cent_count)


def middle_mass(scores: torch.Tensor, plan_layer: LayerPlan) -> torch.Tensor:
    """[b, H]: importance that falls on the middle tokens (what adaptation redistributes by)."""
    n = scores.shape[-1]
    middle = scores[..., plan_layer.sinks:n - plan_layer.window]
    return middle.sum(-1) if middle.numel() else torch.zeros(scores.shape[:2])


def compress(plan: Plan, prefill: list[PrefillLayer], packer=None) -> list[CompressedLayer]:
    """Every layer of a prefill, compressed per `plan` (whose context is the prompt length)."""
    n = prefill[0].keys.shape[2]
    if plan.context != n:
        raise ValueError(f"the plan is for {plan.context} tokens, the prefill has {n}")
    scores = [importance(plan.policy, layer) for layer in prefill]
    masses = [middle_mass(s, layer) for s, layer in zip(scores, plan.layers)]
    selected, guards = redistribute(plan, masses, scores)
    return [compress_layer(prefill[i], scores[i], layer, selected[i], guards[i], packer)
            for i, layer in enumerate(plan.layers)]


def measured_bytes(layer: CompressedLayer, plan_layer: LayerPlan, adaptive_heads: bool) -> int:
    """Bytes of the format's tensors a compressed layer holds (docs/format.md): 16-bit sinks and
    window, blocks, centroids, and per-head counts when budgets differ per head. The start index
    of each head's run of blocks is runtime bookkeeping (derivable from the counts): not counted."""
    total = sum(t.numel() * t.element_size() for t in (
        layer.sinks_key, layer.sinks_value, layer.window_key, layer.window_value,
        layer.guard_blocks, layer.body_blocks, layer.centroid_key, layer.centroid_value,
        layer.centroid_count))
    if adaptive_heads and plan_layer.evicted > 0:
        total += 2 * layer.guard_count.numel() * 4  # selected.head_counts [2, H] per sequence
    return total
