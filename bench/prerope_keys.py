"""Keys quantized before RoPE or after it: which keeps more of what retrieval needs?

    .venv/bin/python bench/prerope_keys.py [--samples 2] [--out bench/results/prerope_keys.json]

A measurement to decide whether a pre-RoPE key format (KVQuant, Hooper et al., 2024: per-channel
statistics are stable before the rotation) is worth building into the formats, kernels and
store (issue 14: key precision is what breaks retrieval). Nothing here is a kvpolicy format:
keys are quantized and dequantized in PyTorch with the reference quantizer
(`kvpolicy.kernels.reference.quantize`, asymmetric, per channel, groups of 64 tokens, fp16
scales — the shipped policies' key format), either as the model caches them (after RoPE) or
rotated back first (`reference.unrotate`, the layer's own rotary tables) and rotated again after
dequantization. Sinks (4) and the last tokens that do not fill a group (at least 64) stay at the
model's precision; values are never touched; nothing is evicted.

On the calibration prompts (`kvpolicy tune`'s: seed 1000, never the evaluation samples),
question-agnostic, SmolLM2-135M-Instruct by default, per key format:
- key error: ||K - K^||_F / ||K||_F over the quantized tokens, mean over layers;
- logit error: relative error of the last 64 context queries' attention logits q.k;
- answer NLL: the expected answer fed after the question through a cache holding those keys
  (the `kvpolicy tune` proxy; lower is better), mean over prompts.
A third variant per bit-width keeps the 1% largest-magnitude key entries exact (post-RoPE;
dense-and-sparse, KVQuant): in a real format each costs its value and its index (~0.3 bits per
entry on average), not counted here.
About 4 minutes for 2 samples per task on this 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SINKS, GROUP, WINDOW = 4, 64, 64


def fake_quant(keys: torch.Tensor, bits: int, cos=None, sin=None,
               outliers: float = 0.0) -> torch.Tensor:
    """keys [H, N, D] → dequantized fp32, middle tokens quantized per channel (post-RoPE, or
    pre-RoPE when the tables are given). `outliers`: the share of the middle's entries with the
    largest magnitude kept exact (dense-and-sparse, KVQuant), each replaced by its group's
    median before quantization so that it does not stretch the group's range."""
    from kvpolicy.lang.ir import QuantFormat
    from kvpolicy.kernels import reference as R
    n = keys.shape[1]
    end = SINKS + (n - SINKS - WINDOW) // GROUP * GROUP
    middle = keys[:, SINKS:end].float()
    if cos is not None:
        middle = R.unrotate(middle, cos[SINKS:end], sin[SINKS:end])
    fmt = QuantFormat(bits=bits, group=GROUP, axis="channel")
    exact = middle.clone()
    sparse = torch.zeros_like(middle, dtype=torch.bool)
    if outliers > 0:
        heads, m, d = middle.shape
        count = max(1, round(outliers * middle.numel()))
        flat = middle.abs().flatten()
        sparse = (middle.abs() >= flat.topk(count).values[-1])
        grouped = middle.reshape(heads, m // GROUP, GROUP, d)
        median = grouped.median(dim=2, keepdim=True).values.expand_as(grouped)
        middle = torch.where(sparse, median.reshape(heads, m, d), middle)
    codes, scale, zero = R.quantize(middle, fmt)
    restored = R.dequantize(codes, scale, zero, fmt)
    restored = torch.where(sparse, exact, restored)
    if cos is not None:
        c, s = cos[SINKS:end], sin[SINKS:end]
        restored = restored * c + R.rotate_half(restored) * s
    out = keys.float().clone()
    out[:, SINKS:end] = restored
    return out


def answer_nll(model, keys: list[torch.Tensor], values: list[torch.Tensor],
               follow: torch.Tensor, answer_tokens: int) -> float:
    from transformers import DynamicCache
    cache = DynamicCache()
    dtype = next(model.parameters()).dtype
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k[None].to(dtype), v[None].to(dtype), layer)
    with torch.no_grad():
        logits = model(input_ids=follow, past_key_values=cache, use_cache=True).logits[0].float()
    target = follow[0, -answer_tokens:]
    return float(torch.nn.functional.cross_entropy(logits[-answer_tokens - 1:-1], target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2, help="per task (default 2)")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--out", default=str(ROOT / "bench/results/prerope_keys.json"))
    args = parser.parse_args()
    from kvpolicy.engines.hf import load_model
    from kvpolicy.engines.hf.cache import rope_tables
    from kvpolicy.eval.whole import record_prefill
    from kvpolicy.tune.config import TuneConfig
    from kvpolicy.tune.search import calibration_prompts
    model, tokenizer = load_model()
    prompts = calibration_prompts(tokenizer, TuneConfig(6.0, out=None, context=args.context,
                                                        samples=args.samples))
    bits = [int(b) for b in args.bits.split(",")]
    variants = ["16-bit"] + [f"int{b} {where}" for b in bits
                             for where in ("post", "pre", "post+1%")]
    rows = {v: {"nll": [], "key_error": [], "logit_error": []} for v in variants}
    started = time.perf_counter()
    for prompt in prompts:
        records, _, _ = record_prefill(model, prompt.context_ids, observe=64)
        n = prompt.context_ids.shape[1]
        tables = [rope_tables(model, i, n) for i in range(len(records))]
        follow = torch.cat([prompt.query_ids, prompt.answer_ids], dim=1)
        values = [r.values[0] for r in records]
        for variant in variants:
            keys, key_err, logit_err = [], [], []
            for record, (cos, sin) in zip(records, tables):
                k = record.keys[0]
                if variant == "16-bit":
                    keys.append(k.float())
                    continue
                b, where = variant.split()
                q = fake_quant(k, int(b[3:]), *((cos, sin) if where == "pre" else ()),
                               outliers=0.01 if where == "post+1%" else 0.0)
                keys.append(q)
                key_err.append(float((q - k.float()).norm() / k.float().norm()))
                queries = record.queries[0].float()  # [Hq, w, D]
                group = queries.shape[0] // k.shape[0]
                kk = k.float().repeat_interleave(group, 0)
                qq = q.repeat_interleave(group, 0)
                exact = queries @ kk.transpose(-1, -2)
                logit_err.append(float((queries @ qq.transpose(-1, -2) - exact).norm()
                                       / exact.norm()))
            rows[variant]["nll"].append(answer_nll(model, keys, values, follow,
                                                   prompt.answer_ids.shape[1]))
            if key_err:
                rows[variant]["key_error"].append(sum(key_err) / len(key_err))
                rows[variant]["logit_error"].append(sum(logit_err) / len(logit_err))
        print(f"{prompt.task} {prompt.index}: " + ", ".join(
            f"{v} {rows[v]['nll'][-1]:.3f}" for v in variants), flush=True)

    def mean(xs):
        return sum(xs) / len(xs) if xs else None
    summary = {v: {k: mean(x) for k, x in r.items()} for v, r in rows.items()}
    result = {"schema": "kvpolicy.bench.prerope_keys/1", "model": "smollm2-135m",
              "command": "python bench/prerope_keys.py --samples "
                         f"{args.samples} --context {args.context} --bits {args.bits}",
              "format": f"asymmetric, per channel, groups of {GROUP} tokens, fp16 scales; "
                        f"{SINKS} sinks and >= {WINDOW} last tokens at the model's precision; "
                        "values untouched; nothing evicted",
              "prompts": [{"task": p.task, "sample": p.index,
                           "tokens": int(p.context_ids.shape[1])} for p in prompts],
              "measured_seconds": round(time.perf_counter() - started, 1),
              "summary": summary, "per_prompt": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'variant':<12} {'answer NLL':>10} {'key error':>10} {'logit error':>12}")
    for v, s in summary.items():
        fmt = (lambda x: "-" if x is None else f"{x:.4f}")
        print(f"{v:<12} {s['nll']:>10.3f} {fmt(s['key_error']):>10} {fmt(s['logit_error']):>12}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
