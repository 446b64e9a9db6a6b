"""Policy + model + context → Plan: what every layer keeps, how it stores it, and exact bytes.

The plan describes the cache right after an N-token prompt has been compressed (N = context).
For each layer and KV head, the N tokens split into regions:

    sinks  = min(sinks, N)                       first tokens, 16-bit
    window = min(window, N - sinks)              last tokens, 16-bit
    middle = N - sinks - window                  candidates for selection
    budget = round(ratio_l * N)                  ratio_l from plan/schedule.py
    selected: budget - sinks - window, rounded to a whole number of token units and capped at the
              whole units in the middle; if the budget covers the whole middle, every whole unit is
              selected and the remainder (< one unit) stays in the window, so nothing is evicted
    guard  = round(guard_fraction * selected), in whole units; body = selected - guard
    evicted = middle - selected, folded into `cluster evicted k` centroids if the policy says so
              (k centroid slots in every layer that evicts at least one token)

A token unit is one storage block (`kvpolicy.format.block_tokens`): whole per-channel groups of the
layer's key and value formats, and at least 16 tokens when anything is quantized (when nothing is:
1 token, or 4 with positions, so that blocks need no padding). Rounding is half-up. A layer whose
sinks, window and selected tokens would come to none keeps its most recent token in the window.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from kvpolicy.diagnostics import Diagnostic, Diagnostics, note
from kvpolicy.lang.ir import (LAST, MAX_TOKENS, Depth, Guard, LayerRef, LayerSelection, Policy,
                              QuantFormat)
from kvpolicy.models import ModelShape
from kvpolicy import format as storage
from kvpolicy.plan.schedule import Schedule, layer_shape, retain_schedule


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    retain: float  # the planned ratio for this layer (mean over layers = the global ratio)
    sinks: int
    window: int
    guard_tokens: int
    body_tokens: int
    evicted: int
    centroids: int
    token_unit: int
    keys: QuantFormat
    values: QuantFormat
    guard: Guard | None
    guard_layout: storage.BlockLayout
    body_layout: storage.BlockLayout
    tensors: tuple[storage.TensorSpec, ...]  # every KV head of this layer
    # `adapt heads`: each KV head's own selected and guard tokens (guard_tokens and body_tokens
    # above are then the largest head's); None: every KV head keeps the counts above
    head_selected: tuple[int, ...] | None = None
    head_guards: tuple[int, ...] | None = None

    @property
    def selected(self) -> int:
        """Selected tokens per KV head (the largest head's with `adapt heads`)."""
        return self.guard_tokens + self.body_tokens

    def selected_by_head(self, kv_heads: int) -> tuple[int, ...]:
        """Selected tokens of each KV head (the same for all but with `adapt heads`)."""
        return self.head_selected or (self.selected,) * kv_heads

    @property
    def page_layouts(self) -> tuple[storage.BlockLayout, storage.BlockLayout]:
        """(guard, body): this layer's formats in position-free blocks — what a sealed page holds
        (`plan.pages`) and what the paged store's kernels are specialized for."""
        body = self.body_layout
        return format_layouts(self.keys, self.values, self.guard, body.head_dim, body.kv_dtype,
                              positions=False)

    def guards_by_head(self, kv_heads: int) -> tuple[int, ...]:
        return self.head_guards or (self.guard_tokens,) * kv_heads

    @property
    def kept_tokens(self) -> int:
        """Tokens kept individually per KV head: sinks + window + selected (not centroids)."""
        return self.sinks + self.window + self.selected

    @functools.cached_property  # frozen: computed once (planning and reports ask often)
    def bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bytes_by_kind(self) -> dict[str, int]:
        totals = dict.fromkeys(storage.BYTE_KINDS, 0)
        for tensor in self.tensors:
            for kind, count in tensor.bytes_by_kind().items():
                totals[kind] += count
        return totals


@dataclass(frozen=True)
class Plan:
    policy: Policy
    model: ModelShape
    context: int
    layers: tuple[LayerPlan, ...]
    warnings: tuple[Diagnostic, ...]

    @property
    def baseline_bytes(self) -> int:
        """Keys and values of every token at 16 bits (the uncompressed cache), and the
        sliding-window layers' windows."""
        return self.model.baseline_bytes_per_token * self.context + self.window_bytes

    @property
    def window_bytes(self) -> int:
        """What the model's sliding-window layers hold (`ModelShape.window_bytes`): the same
        in the baseline and under the policy, which does not govern them."""
        return self.model.window_bytes(self.context)

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers) + self.window_bytes

    @property
    def compression_ratio(self) -> float:
        return self.baseline_bytes / self.compressed_bytes

    @property
    def savings(self) -> float:
        return 1.0 - self.compressed_bytes / self.baseline_bytes

    @property
    def mean_retain(self) -> float:
        """Mean of the planned per-layer ratios (equals the policy's `retain` when feasible)."""
        return sum(layer.retain for layer in self.layers) / len(self.layers)

    @property
    def effective_retain(self) -> float:
        """Tokens kept individually (all layers and heads) / tokens in the uncompressed cache."""
        heads = self.model.num_kv_heads
        kept = sum(heads * (layer.sinks + layer.window) + sum(layer.selected_by_head(heads))
                   for layer in self.layers)
        return kept / (len(self.layers) * heads * self.context)

    def bytes_by_kind(self) -> dict[str, int]:
        totals = dict.fromkeys(storage.BYTE_KINDS, 0)
        for layer in self.layers:
            for kind, count in layer.bytes_by_kind().items():
                totals[kind] += count
        return totals


def make_plan(policy: Policy, model: ModelShape, context: int) -> Plan:
    """Raises `PolicyError` when the policy does not fit the model (e.g. an anchor at layer 30 of
    a 28-layer model); warnings are kept on the plan."""
    d = Diagnostics()
    if not 1 <= context <= MAX_TOKENS:
        d.error(f"context must be between 1 and {MAX_TOKENS} tokens, not {context}", None)
        d.raise_if_errors()
    if context > model.max_context:
        d.warning(f"context {context} is beyond {model.name}'s maximum of {model.max_context} "
                  "tokens", None)
    anchors = _resolve_anchors(d, policy, model)
    formats = _layer_formats(d, policy, model)
    d.raise_if_errors()

    sinks = min(policy.sinks, context)
    window = min(policy.window, context - sinks)
    schedule = _schedule(policy, model, context, anchors)
    _budget_warnings(d, policy, model, context, sinks + window, schedule)

    layers = []
    planned: dict[tuple, LayerPlan] = {}  # layers alike but for their index are planned once
    for index, ratio in enumerate(schedule.ratios):
        keys, values, guard = formats[index]
        alike = planned.get((ratio, keys, values, guard))
        if alike is None:
            alike = planned[ratio, keys, values, guard] = _layer_plan(
                policy, model, context, index, ratio, keys, values, guard)
        layers.append(alike if alike.layer == index else dataclasses.replace(alike, layer=index))
    if policy.adapt is not None and policy.adapt.static and policy.evicts:
        layers = _head_budgets(d, policy, model, context, layers)
        d.raise_if_errors()
    newest_only = [layer.layer for layer in layers if layer.sinks + layer.selected == 0
                   and policy.window == 0 and layer.window == 1 and layer.evicted > 0]
    if newest_only:
        many = len(newest_only) > 1
        d.warning(f"at context {context}, the budget of layer{'s' if many else ''} "
                  f"{ranges(newest_only)} rounds to no token; "
                  f"{'each keeps' if many else 'it keeps'} only its most recent token (16-bit)",
                  policy.retain_span)
    return Plan(policy, model, context, tuple(layers), _attributed(d.warnings, policy))


def _schedule(policy: Policy, model: ModelShape, context: int, anchors) -> Schedule:
    """The per-layer retain ratios at `context`: the anchors' shape rescaled to the global ratio,
    no layer below its sinks and window."""
    sinks = min(policy.sinks, context)
    floor = (sinks + min(policy.window, context - sinks)) / context
    shape = layer_shape(anchors, model.num_layers, policy.interpolate)
    return retain_schedule(shape, policy.retain, [floor] * model.num_layers)


def middle_budgets(policy: Policy, model: ModelShape, context: int) -> tuple[float, ...]:
    """Per layer, the middle tokens (neither sinks nor window) the plan wants to keep at
    `context`, before whole format units: ratio x context - sinks - window, within [0, middle].
    What `make_plan` rounds to units, and what the paged store's streams keep as a sequence
    grows (`plan.streams`)."""
    d = Diagnostics()
    anchors = _resolve_anchors(d, policy, model)
    d.raise_if_errors()
    sinks = min(policy.sinks, context)
    window = min(policy.window, context - sinks)
    middle = context - sinks - window
    return tuple(min(max(ratio * context - sinks - window, 0.0), float(middle))
                 for ratio in _schedule(policy, model, context, anchors).ratios)


def _head_budgets(d: Diagnostics, policy: Policy, model: ModelShape, context: int,
                  layers: list[LayerPlan]) -> list[LayerPlan]:
    """`adapt heads`: the evicting layers that share a storage pool their planned token units
    over their KV heads, and each (layer, KV head) gets a share in proportion to the
    calibration's weight, in whole units, at most every whole unit of its middle (largest
    remainders; ties: the lower layer, then head); guards in each head's proportion. Static, so
    the pool's total — and the bytes — are exact per layer."""
    weights = policy.adapt.head_weights
    heads = model.num_kv_heads
    if len(weights) != model.num_layers or len(weights[0]) != heads:
        named = f"'{policy.adapt.heads_file}'" if policy.adapt.heads_file else "`adapt heads`"
        d.error(f"the head weights of {named} are for {len(weights)} layers "
                f"of {len(weights[0])} KV heads; {model.name} has {model.num_layers} layers of "
                f"{heads} KV heads (head weights are one model's: run `kvpolicy calibrate "
                "--model DIR` on this one for its own)", policy.adapt.span)
        return layers
    pools: dict[tuple, list[LayerPlan]] = {}
    for layer in layers:
        if layer.evicted > 0:
            pools.setdefault((layer.keys, layer.values, layer.guard, layer.token_unit),
                             []).append(layer)
    out = list(layers)
    for members in pools.values():
        unit = members[0].token_unit
        per_layer = head_units(weights, [layer.layer for layer in members], heads,
                               sum(layer.selected // unit for layer in members) * heads,
                               [(context - layer.sinks - layer.window) // unit
                                for layer in members])
        for layer, mine in zip(members, per_layer):
            selected = tuple(unit * u for u in mine)
            guarded = tuple(guarded_tokens(layer.guard, n, unit) for n in selected)
            middle = context - layer.sinks - layer.window
            evicted = middle - min(selected)  # the most any head evicts
            centroids = policy.cluster.k if policy.cluster is not None and evicted > 0 else 0
            counts = storage.LayerCounts(
                sinks=layer.sinks, window=layer.window, guard=max(guarded),
                body=max(s - g for s, g in zip(selected, guarded)), centroids=centroids,
                positions=needs_positions(policy), head_counts=False)
            tensors = storage.layer_tensors(
                counts, layer.guard_layout, layer.body_layout, heads, model.head_dim,
                model.kv_dtype, by_head=tuple((g, s - g) for s, g in zip(selected, guarded)))
            widest = max(range(heads), key=lambda h: (selected[h], -h))
            out[layer.layer] = dataclasses.replace(
                layer, guard_tokens=guarded[widest], body_tokens=selected[widest] - guarded[widest],
                evicted=evicted, centroids=centroids, tensors=tuple(tensors),
                head_selected=selected, head_guards=guarded)
    return out


def head_units(weights, members: list[int], heads: int, total: int,
               caps: list[int]) -> list[list[int]]:
    """`adapt heads`' one rule, for the whole context (the plan) and for one sealed block (the
    page plan): a storage pool's `total` whole units split over its (layer, KV head) cells — the
    member layers' heads in order — in proportion to the calibration's `weights[layer][head]`,
    none above its layer's cap (`caps`, one per member; largest remainders, ties: the lower
    layer, then head). → per member layer, each head's units."""
    cells = [(layer, h) for layer in members for h in range(heads)]
    units = largest_remainder(total, [weights[layer][h] for layer, h in cells],
                              [cap for cap in caps for _ in range(heads)])
    return [units[row * heads:(row + 1) * heads] for row in range(len(members))]


def largest_remainder(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """`total` whole units split in proportion to weights, none above its cap: water filling
    (a cell at its cap leaves the split; the rest share what is left), then the largest
    remainders (ties: the earlier cell). Every cell's weight 0: equal shares."""
    split = proportional_split(total, weights, caps)  # water filling, before whole units
    result = [math.floor(share) for share in split]
    left = min(total, sum(caps)) - sum(result)
    order = sorted(range(len(caps)), key=lambda i: (-(split[i] - result[i]), i))
    for i in order[:left]:
        result[i] += 1
    return result


def proportional_split(total: float, weights: list[float], caps: list[float]) -> list[float]:
    """`largest_remainder` without whole units: `total` split in proportion to weights, none
    above its cap (water filling: a cell at its cap leaves the split, the rest share what is
    left). Every open cell's weight 0: equal shares."""
    total = min(total, sum(caps))
    result = [0.0] * len(caps)
    open_cells = [i for i, cap in enumerate(caps) if cap > 0]
    while open_cells:
        left = total - sum(result)
        share = [weights[i] for i in open_cells]
        if sum(share) <= 0:
            share = [1.0] * len(open_cells)
        norm = sum(share)
        ideal = {i: left * w / norm for i, w in zip(open_cells, share)}
        capped = [i for i in open_cells if result[i] + ideal[i] >= caps[i]]
        if not capped:
            for i in open_cells:
                result[i] += ideal[i]
            break
        for i in capped:
            result[i] = caps[i]
        open_cells = [i for i in open_cells if i not in capped]
    return result


def _attributed(warnings, policy: Policy) -> tuple[Diagnostic, ...]:
    """A warning located in a parent file says which policy was being planned."""
    out = []
    for warning in warnings:
        if warning.span is not None and warning.span.path != policy.path:
            warning = Diagnostic(warning.severity, warning.message, warning.span, warning.notes + (
                note(f"while planning '{policy.name}' ({policy.path}), which extends it"),))
        out.append(warning)
    return tuple(out)


def _layer_plan(policy: Policy, model: ModelShape, context: int, index: int, ratio: float,
                keys: QuantFormat, values: QuantFormat, guard: Guard | None) -> LayerPlan:
    unit = storage.block_tokens(keys, values, model.head_dim, model.kv_dtype,
                                needs_positions(policy))
    sinks = min(policy.sinks, context)
    window = min(policy.window, context - sinks)
    middle = context - sinks - window
    whole = unit * (middle // unit)
    budget = _round_half_up(ratio * context)
    wanted = min(max(budget - sinks - window, 0), middle)
    if wanted == middle:  # keep everything: the part of a unit left over stays in the window
        selected = whole
        window += middle - whole
    else:
        selected = min(whole, unit * _round_half_up(wanted / unit))
    if sinks + window + selected == 0:  # never keep nothing: the newest token stays
        window = 1
    guard_tokens = guarded_tokens(guard, selected, unit)
    evicted = context - sinks - window - selected
    centroids = policy.cluster.k if policy.cluster is not None and evicted > 0 else 0
    counts = storage.LayerCounts(
        sinks=sinks, window=window, guard=guard_tokens, body=selected - guard_tokens,
        centroids=centroids, positions=needs_positions(policy),
        head_counts=policy.adapt is not None and policy.adapt.counts_per_sequence
        and evicted > 0)
    guard_layout, body_layout = block_layouts(policy, model, keys, values, guard)
    tensors = storage.layer_tensors(counts, guard_layout, body_layout, model.num_kv_heads,
                                    model.head_dim, model.kv_dtype)
    return LayerPlan(layer=index, retain=ratio, sinks=sinks, window=window,
                     guard_tokens=guard_tokens, body_tokens=selected - guard_tokens,
                     evicted=evicted, centroids=centroids, token_unit=unit, keys=keys,
                     values=values, guard=guard, guard_layout=guard_layout,
                     body_layout=body_layout, tensors=tuple(tensors))


def block_retain_ratios(policy: Policy, model: ModelShape) -> tuple[float, ...]:
    """Each layer's retain ratio applied to a stretch of middle tokens on its own (no sinks or
    window floor): the schedule's shape rescaled so the mean is the global ratio. The vLLM pages
    keep this share of every sealed block (docs/vllm.md); the plan's ratios instead count the
    sinks and window of one context in the ratio."""
    d = Diagnostics()
    anchors = _resolve_anchors(d, policy, model)
    d.raise_if_errors()
    shape = layer_shape(anchors, model.num_layers, policy.interpolate)
    return retain_schedule(shape, policy.retain, [0.0] * model.num_layers).ratios


def block_layouts(policy: Policy, model: ModelShape, keys: QuantFormat, values: QuantFormat,
                  guard: Guard | None, positions: bool | None = None,
                  ) -> tuple[storage.BlockLayout, storage.BlockLayout]:
    """The guard and body block layouts of a layer stored as (keys, values, guard). Blocks carry
    positions when the policy needs them, unless `positions` says otherwise."""
    positions = needs_positions(policy) if positions is None else positions
    return format_layouts(keys, values, guard, model.head_dim, model.kv_dtype, positions)


def format_layouts(keys: QuantFormat, values: QuantFormat, guard: Guard | None, head_dim: int,
                   kv_dtype: str, positions: bool
                   ) -> tuple[storage.BlockLayout, storage.BlockLayout]:
    """(guard, body) block layouts of (keys, values, guard): guards use the body's groups and
    block size at the guard's bits."""
    tokens = storage.block_tokens(keys, values, head_dim, kv_dtype, positions)
    body = storage.block_layout(keys, values, head_dim, kv_dtype, positions, tokens)
    bits = guard.bits if guard is not None and guard.fraction > 0 else None
    guard_layout = storage.block_layout(keys.with_bits(bits) if bits else keys,
                                        values.with_bits(bits) if bits else values,
                                        head_dim, kv_dtype, positions, tokens)
    return guard_layout, body


def needs_positions(policy: Policy) -> bool:
    """Selected tokens carry their positions when their order is not implicit: when tokens can
    be evicted, or guards pull tokens out of order. (Keys are cached after RoPE, so attention does
    not need positions; later compression steps, importance tracking and inspection do.)"""
    return policy.evicts or policy.guard is not None


def guarded_tokens(guard: Guard | None, selected: int, unit: int) -> int:
    """Guards among `selected` tokens: the guard's fraction, in whole units, at most all."""
    if guard is None:
        return 0
    return min(selected, unit * _round_half_up(guard.fraction * selected / unit))


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


# ---- resolving layer references against the model ------------------------------------------

def layer_index(layer: LayerRef, num_layers: int) -> int:
    """The index a layer reference names in a model of `num_layers` layers (may be beyond it)."""
    if isinstance(layer, Depth):
        return _round_half_up(layer.fraction * (num_layers - 1))
    return num_layers - 1 if layer == LAST else layer


def show_layer(layer: LayerRef, model: ModelShape) -> str:
    """How a message names a layer reference: `layer 14`, `layer 50% (14 of qwen2.5-7b)`."""
    if isinstance(layer, Depth):
        return (f"layer {100 * layer.fraction:g}% ({layer_index(layer, model.num_layers)} of "
                f"{model.name})")
    return f"layer {layer_index(layer, model.num_layers)}"


def _layer_index(d: Diagnostics, layer: LayerRef, model: ModelShape, span,
                 what: str) -> int | None:
    if isinstance(layer, Depth) or layer == LAST:
        return layer_index(layer, model.num_layers)
    if layer >= model.num_layers:
        d.error(f"{what} {layer} is beyond {model.name}'s last layer ({model.num_layers - 1}; "
                f"layers count from 0, and `last` names the last one)", span)
        return None
    return layer


def _resolve_anchors(d: Diagnostics, policy: Policy, model: ModelShape) -> list[tuple[int, float]]:
    resolved: dict[int, object] = {}
    anchors = []
    for anchor in policy.anchors:
        layer = _layer_index(d, anchor.layer, model, anchor.span, "layer")
        if layer is None:
            continue
        if layer in resolved:
            depth = (f" (`layer {100 * anchor.layer.fraction:g}%` is the layer nearest that "
                     "share of its depth)" if isinstance(anchor.layer, Depth) else "")
            d.error(f"two anchors name layer {layer} of {model.name}{depth}", anchor.span,
                    note("the other anchor", resolved[layer]))
            continue
        resolved[layer] = anchor.span
        anchors.append((layer, anchor.ratio))
    return anchors


def _selected_layers(d: Diagnostics, selection: LayerSelection, model: ModelShape) -> range:
    start = _layer_index(d, selection.start, model, selection.span, "layer")
    stop = start if selection.stop is None else _layer_index(d, selection.stop, model,
                                                             selection.span, "layer")
    if start is None or stop is None:
        return range(0)
    if stop < start:
        d.error(f"layer range runs backwards on {model.name} ({start}..{stop})", selection.span)
        return range(0)
    return range(start, stop + 1)


def layer_formats(policy: Policy, model: ModelShape) -> list[tuple[QuantFormat, QuantFormat,
                                                                   Guard | None]]:
    """Each layer's (keys, values, guard) after `layers` overrides; PolicyError if the overrides
    or formats do not fit the model."""
    d = Diagnostics()
    formats = _layer_formats(d, policy, model)
    d.raise_if_errors()
    return formats


def _layer_formats(d: Diagnostics, policy: Policy,
                   model: ModelShape) -> list[tuple[QuantFormat, QuantFormat, Guard | None]]:
    formats = [(policy.keys, policy.values, policy.guard)] * model.num_layers
    for override in policy.layers:
        for selection in override.layers:
            for layer in _selected_layers(d, selection, model):
                keys, values, guard = formats[layer]
                formats[layer] = (override.keys or keys, override.values or values,
                                  override.guard or guard)
    # `guard none` (and a guard of 0%) stores no guard tokens: such layers have no guard at all
    formats = [(keys, values, guard if guard is not None and guard.fraction > 0 else None)
               for keys, values, guard in formats]
    reported = set()
    for keys, values, _ in formats:
        for role, fmt in (("keys", keys), ("values", values)):
            if (fmt.quantized and fmt.axis == "token" and model.head_dim % fmt.group
                    and fmt not in reported):
                reported.add(fmt)
                d.error(f"{role} group {fmt.group} per token does not divide {model.name}'s "
                        f"head_dim of {model.head_dim}", fmt.group_span or fmt.span)
    return formats


def _budget_warnings(d: Diagnostics, policy: Policy, model: ModelShape, context: int,
                     floor_tokens: int, schedule) -> None:
    if not schedule.at_floor or policy.retain == 0:
        return
    span = policy.retain_span or policy.window_span
    floor = floor_tokens / context
    if not schedule.feasible:
        budget = _round_half_up((policy.retain or 0) * context)
        d.warning(f"sinks + window ({floor_tokens} tokens) exceed the {_pct(policy.retain)} "
                  f"budget ({budget} tokens) at context {context}: every layer keeps "
                  f"{floor_tokens} tokens, an effective retain of {_pct(floor)}", span)
    elif len(schedule.at_floor) < model.num_layers:
        many = len(schedule.at_floor) > 1
        message = (f"at context {context}, layer{'s' if many else ''} "
                   f"{ranges(schedule.at_floor)} would keep fewer tokens than sinks + window "
                   f"({floor_tokens}); {'they are' if many else 'it is'} held at {_pct(floor)}")
        if policy.retain is not None:
            message += f" and the other layers are scaled to keep the mean at {_pct(policy.retain)}"
        d.warning(message, span)


def _pct(ratio: float | None) -> str:
    return f"{100 * (ratio or 0):.4g}%"


def ranges(indices) -> str:
    """'0–4, 6–10': increasing indices in runs."""
    parts, start, prev = [], None, None
    for i in list(indices) + [None]:
        if start is None:
            start = prev = i
        elif i is not None and i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}" if start == prev else f"{start}–{prev}")
            start = prev = i
    return ", ".join(parts)
