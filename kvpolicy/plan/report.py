"""A plan for people (a table with the seed's Table 5 columns) and for programs (JSON).

The JSON schema is documented in docs/plan-schema.md; bump `SCHEMA` when a field changes meaning.
"""

from __future__ import annotations

from kvpolicy.diagnostics import printable
from kvpolicy.dtypes import short_name
from kvpolicy.format import BlockLayout
from kvpolicy.lang.ir import QuantFormat
from kvpolicy.plan.pages import paged_refusals
from kvpolicy.plan.planner import LayerPlan, Plan, ranges

SCHEMA = "kvpolicy.plan/1"
MIB = 1024 * 1024

_KIND_LABELS = {"full": "16-bit keys/values", "codes": "packed codes",
                "scales": "scales/zeros", "index": "positions", "centroids": "centroids",
                "padding": "alignment padding", "sliding windows": "sliding-window layers"}


def format_label(fmt: QuantFormat) -> str:
    if not fmt.quantized:
        return "fp16"
    axis = "ch" if fmt.axis == "channel" else "tok"
    symmetry = " sym" if fmt.symmetric else ""
    scale = "" if fmt.scale_dtype == "fp16" else f" {fmt.scale_dtype}"
    return f"int{fmt.bits} g{fmt.group}/{axis}{symmetry}{scale}"


def _guard_label(layer: LayerPlan) -> str:
    if layer.guard is None:
        return "-"
    return "fp16" if layer.guard.bits == 16 else f"int{layer.guard.bits}"


def render_table(plan: Plan) -> str:
    model, policy, context = plan.model, plan.policy, plan.context
    lines = [
        f"policy   {policy.name}" + (f"  ({printable(policy.path)})" if policy.path else ""),
        f"model    {model.name}: {model.num_layers} layers, {model.num_q_heads} query / "
        f"{model.num_kv_heads} KV heads, head_dim {model.head_dim}, {model.kv_dtype} cache",
        *([f"         + {len(model.window_layers)} sliding-window layers (model layers "
           f"{ranges(model.window_layers)}), each holding its last {model.sliding_window - 1:,} "
           "tokens at full precision: not governed by the policy, counted in both totals"]
          if model.window_layers else []),
        f"context  {context:,} tokens",
        f"retain   {100 * plan.mean_retain:.2f}% planned (mean of the per-layer ratios); "
        f"{100 * plan.effective_retain:.2f}% of tokens kept individually "
        "(sinks + window + selected)",
        "",
    ]
    header = (f"{'layer':>5}  {'retain':>7}  {'kept/head':>9}  {'sinks':>5}  {'window':>7}  "
              f"{'guard':>7}  {'body':>7}  {'evicted':>8}  {'centr.':>6}  {'keys':<14}  "
              f"{'values':<14}  {'guard at':<8}  {'MiB':>8}")
    lines.append(header)
    for layer in plan.layers:
        lines.append(
            f"{layer.layer:>5}  {100 * layer.retain:>6.2f}%  {layer.kept_tokens:>9,}  "
            f"{layer.sinks:>5,}  {layer.window:>7,}  {layer.guard_tokens:>7,}  "
            f"{layer.body_tokens:>7,}  {layer.evicted:>8,}  {layer.centroids:>6,}  "
            f"{format_label(layer.keys):<14}  {format_label(layer.values):<14}  "
            f"{_guard_label(layer):<8}  {layer.bytes / MIB:>8.2f}")
    lines += [
        "",
        "Memory at this context (computed exactly from the storage format, docs/format.md; "
        "not measured):",
        f"{'':<22}{'bytes/token':>12}  {'MiB':>10}  {'ratio':>7}  {'savings':>8}",
        f"{'baseline (' + short_name(plan.model.kv_dtype) + ')':<22}"
        f"{plan.baseline_bytes / context:>12,.1f}  "
        f"{plan.baseline_bytes / MIB:>10,.1f}  {'1.00x':>7}  {'-':>8}",
        f"{policy.name[:21]:<22}{plan.compressed_bytes / context:>12,.1f}  "
        f"{plan.compressed_bytes / MIB:>10,.1f}  {plan.compression_ratio:>6.2f}x  "
        f"{100 * plan.savings:>7.1f}%",
        "",
        "where the bytes go: " + ", ".join(
            f"{_KIND_LABELS[kind]} {100 * count / plan.compressed_bytes:.1f}%"
            for kind, count in [*plan.bytes_by_kind().items(),
                                ("sliding windows", plan.window_bytes)] if count),
    ]
    for reason in paged_refusals(policy):
        lines.append(f"engines: vLLM and the paged store cannot run it: {reason}")
    if policy.adapt is not None and policy.adapt.static and policy.evicts:
        heads = plan.model.num_kv_heads
        lines.append(
            "head budgets (adapt heads: the calibration's weights, held in the policy): static, in "
            "proportion to them, so every row's bytes are exact; the guard and body "
            "columns are the largest head's. Selected tokens per KV head:")
        for layer in plan.layers:
            if layer.head_selected is not None:
                lines.append(f"  layer {layer.layer:>3}: "
                             + " ".join(f"{n:>6,}" for n in layer.selected_by_head(heads)))
    elif policy.adapt is not None and policy.evicts:
        scope = " and ".join(s for s, on in (("layers", policy.adapt.across_layers),
                                             ("KV heads", policy.adapt.across_heads)) if on)
        rule = ("by one threshold on the score (the one that keeps the pooled total)"
                if policy.adapt.rule == "threshold" else
                f"by attention mass (temperature {policy.adapt.temperature:g})")
        lines.append(
            f"adaptive: at prefill, budgets move between {scope} {rule} in whole token units, "
            "only among layers with the same storage; the rows above are the prior, the totals "
            "are exact either way")
    return "\n".join(lines)


def _format_json(fmt: QuantFormat) -> dict:
    return {"bits": fmt.bits, "group": fmt.group if fmt.quantized else None,
            "axis": fmt.axis if fmt.quantized else None,
            "symmetric": fmt.symmetric if fmt.quantized else None,
            "scale_dtype": fmt.scale_dtype if fmt.quantized else None}


def _layout_json(layout: BlockLayout) -> dict:
    return {"tokens": layout.tokens, "bytes": layout.nbytes,
            "sections": [{"name": s.name, "offset": s.offset, "shape": list(s.shape),
                          "dtype": s.dtype, "bytes": s.nbytes} for s in layout.sections]}


def to_json(plan: Plan) -> dict:
    policy = plan.policy
    return {
        "schema": SCHEMA,
        "policy": policy.name,
        "policy_path": policy.path,
        "model": plan.model.to_json(),
        "context": plan.context,
        "baseline_bytes": plan.baseline_bytes,
        "compressed_bytes": plan.compressed_bytes,
        "compression_ratio": plan.compression_ratio,
        "savings": plan.savings,
        "baseline_bytes_per_token": plan.model.baseline_bytes_per_token,
        "compressed_bytes_per_token": plan.compressed_bytes / plan.context,
        "retain": policy.retain,
        "mean_retain": plan.mean_retain,
        "effective_retain": plan.effective_retain,
        "bytes_by_kind": plan.bytes_by_kind(),
        "window_bytes": plan.window_bytes,  # the sliding-window layers' (ModelShape.window_bytes)
        "adaptive": None if policy.adapt is None or not policy.evicts else {
            "rule": policy.adapt.rule,
            "temperature": policy.adapt.temperature if policy.adapt.rule == "mass" else None,
            "across_layers": policy.adapt.across_layers,
            "across_heads": policy.adapt.across_heads,
        },
        "layers": [
            {
                "layer": layer.layer,
                "retain": layer.retain,
                "kept_tokens": layer.kept_tokens,
                "sinks": layer.sinks,
                "window": layer.window,
                "selected": layer.selected,
                "selected_by_head": list(layer.selected_by_head(plan.model.num_kv_heads)),
                "guard_tokens": layer.guard_tokens,
                "body_tokens": layer.body_tokens,
                "evicted": layer.evicted,
                "centroids": layer.centroids,
                "token_unit": layer.token_unit,
                "key_bits": layer.keys.bits,
                "value_bits": layer.values.bits,
                "guard_bits": layer.guard.bits if layer.guard else None,
                "keys": _format_json(layer.keys),
                "values": _format_json(layer.values),
                "bytes": layer.bytes,
                "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                             "bytes": t.nbytes} for t in layer.tensors],
                "blocks": {"guard": _layout_json(layer.guard_layout),
                           "body": _layout_json(layer.body_layout)},
            }
            for layer in plan.layers
        ],
        "warnings": [w.message for w in plan.warnings],
        "paged_refusals": paged_refusals(policy),  # empty: vLLM and the paged store run it
    }
