"""The seed's three policies, planned exactly for Qwen2.5-7B at 32k tokens, beside its claims.

    python examples/seed_table.py      # prints the Markdown table kept in README.md

The seed (shared/seed, Table 1 and Table 5) claims 5.05x / 7.61x / 10.57x. Its baseline is
7,168 MB at 32k context (219.0 "bytes per token", which is KB); Qwen2.5-7B's 16-bit KV cache is
2 (K,V) x 28 layers x 4 KV heads x 128 dims x 2 bytes = 57,344 bytes per token, 1,792 MiB at 32k.
"""

from __future__ import annotations

from pathlib import Path

from kvpolicy import load_policy, make_plan, resolve_model

ROOT = Path(__file__).resolve().parent.parent
SEED_CLAIMS = {  # policy: (compression ratio, compressed MB) from the seed's Tables 1 and 5
    "conservative": (5.05, 1419),
    "aggressive": (7.61, 942),
    "extreme": (10.57, 678),
}
CONTEXT = 32768
MIB = 1024 * 1024


def table() -> str:
    model = resolve_model("qwen2.5-7b")
    rows = [
        "| policy | ratio (planned) | ratio (seed claimed) | MiB at 32k (planned) | MB (seed) "
        "| bytes/token (planned) | tokens kept individually | share of bytes in the 16-bit "
        "sinks + window |",
        "|---|---|---|---|---|---|---|---|",
        f"| baseline (16-bit) | 1.00x | 1.00x | "
        f"{model.baseline_bytes_per_token * CONTEXT / MIB:,.1f} | 7,168 | "
        f"{model.baseline_bytes_per_token:,} | 100% | - |",
    ]
    for name, (ratio, megabytes) in SEED_CLAIMS.items():
        plan = make_plan(load_policy(ROOT / "policies" / f"{name}.kvp"), model, CONTEXT)
        full = sum(t.nbytes for layer in plan.layers for t in layer.tensors
                   if t.region in ("sinks", "window"))
        rows.append(
            f"| {name} | {plan.compression_ratio:.2f}x | {ratio:.2f}x | "
            f"{plan.compressed_bytes / MIB:,.1f} | {megabytes:,} | "
            f"{plan.compressed_bytes / CONTEXT:,.1f} | {100 * plan.effective_retain:.1f}% | "
            f"{100 * full / plan.compressed_bytes:.0f}% |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
