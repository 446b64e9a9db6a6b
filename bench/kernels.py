"""The generated packed-KV kernels against bf16 attention: correctness against the PyTorch
reference, then median times of the fused decode kernel and of the quantize+pack write path,
next to bf16 `scaled_dot_product_attention(enable_gqa=True)` in the same run, with the effective
TB/s over the bytes each must move. JSON to bench/results/, a table printed last.

    python bench/kernels.py                                  # a GPU: the issue-7 grid
    TRITON_INTERPRET=1 python bench/kernels.py --smoke --out /tmp/k.json   # CPU: tiny, checks only

Per (model, policy) one layer is measured (the middle one; its plan at context T decides how many
tokens sit in sinks, window, guards, body and centroids). For each batch B and context T:
- correctness (at the smallest B of the grid): the decode kernel's output against
  `reference.attend` on fresh random inputs, relative error max|got - want| / max|want|; the
  launchers poison every output buffer (NaN) first, so an unwritten element fails;
- decode: `launch.decode` (fused split-sequence kernel + combine) over the layer, median of
  `triton.testing.do_bench`; bytes = every stored tensor of the layer + q + out;
- bf16 SDPA: q [B, Hq, 1, D] over K, V [B, H, T, D]; bytes = K + V + q + out;
- write: the pack kernel quantizing and packing every selected token of the layer (B x H x
  (guard + body) tokens, what compressing a prefill writes); bytes = bf16 rows read + blocks
  written.
The prefill's attention itself is full-precision SDPA for both (kvpolicy compresses after it), so
it is not a separate row. No timing is taken under the interpreter (--smoke).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvpolicy.compiler.artifact import compile_policy, load  # noqa: E402
from kvpolicy.dtypes import DTYPE_BYTES  # noqa: E402
from kvpolicy.models import resolve_model  # noqa: E402
from kvpolicy.kernels import launch  # noqa: E402
from kvpolicy.kernels import reference as R  # noqa: E402
from kvpolicy.kernels.compressed import CompressedLayer  # noqa: E402

GRID = {"models": ["qwen2.5-7b", "llama-3.1-8b"],
        "policies": ["kivi", "conservative", "aggressive", "extreme"],
        "batch": [1, 8, 32], "context": [4096, 16384, 32768]}
SMOKE = {"models": ["smollm2-135m"], "policies": ["kivi"], "batch": [1], "context": [1024]}


def load_artifact(policy: str, model_name: str, directory: Path):
    from kvpolicy.lang.lower import load_policy  # the front end: lark, only when compiling
    out = directory / f"{model_name}-{policy}"
    if not (out / "manifest.json").exists():
        compile_policy(load_policy(ROOT / "policies" / f"{policy}.kvp"),
                       resolve_model(model_name), out)
    return load(out, model=model_name)  # refused unless compiled for this model's shape


def pack_region(kernels, layout, batch: int, heads: int, count: int, device, generator):
    """count tokens per (sequence, head), packed by the pack kernel: → (blocks, start, counts,
    seconds-callable, bytes moved). Rows are random bf16; positions are distinct."""
    head_dim = layout.head_dim
    per = count // layout.tokens
    rows = batch * heads * count
    keys = (torch.randn(rows, head_dim, generator=generator) * 2).to(torch.bfloat16).to(device)
    values = torch.randn(rows, head_dim, generator=generator).to(torch.bfloat16).to(device)
    src_index = torch.arange(rows, dtype=torch.int32, device=device).reshape(-1, layout.tokens)
    positions = (torch.arange(rows, dtype=torch.int32, device=device) % max(count, 1) * 3 + 5)
    positions = positions.reshape(-1, layout.tokens)
    blocks = torch.zeros(batch * heads * per, layout.nbytes, dtype=torch.uint8, device=device)
    block_ids = torch.arange(batch * heads * per, dtype=torch.int32, device=device)

    def write():
        launch.pack_rows(kernels, keys, values, src_index, positions, blocks, block_ids)

    write()
    start = (torch.arange(batch * heads, dtype=torch.int32) * per).reshape(batch, heads)
    counts = torch.full((batch, heads), count, dtype=torch.int32)
    moved = keys.nbytes + values.nbytes + blocks.nbytes
    return blocks, start.to(device), counts.to(device), write, moved


def build_layer(loaded, layer: int, batch: int, context: int, device, seed: int):
    """The layer's compressed cache at `context` tokens for `batch` sequences, random contents,
    guard and body packed by the artifact's own pack kernels."""
    plan = loaded.plan(context).layers[layer]
    model = loaded.model
    heads, head_dim = model.num_kv_heads, model.head_dim
    generator = torch.Generator().manual_seed(seed)
    modules = loaded.layer_kernels(layer)

    def dense(n, scale=1.0):
        return (torch.randn(batch, heads, n, head_dim, generator=generator) * scale).to(
            torch.bfloat16).to(device)

    writes, moved = [], 0
    regions = {}
    for name, layout, count in (("guard", plan.guard_layout, plan.guard_tokens),
                                ("body", plan.body_layout, plan.body_tokens)):
        kernels = modules.get(f"pack_{name}")
        if count and kernels is not None:
            blocks, start, counts, write, nbytes = pack_region(kernels, layout, batch, heads,
                                                               count, device, generator)
            writes.append(write)
            moved += nbytes
        else:
            blocks = torch.zeros(0, layout.nbytes, dtype=torch.uint8, device=device)
            start = torch.zeros(batch, heads, dtype=torch.int32, device=device)
            counts = torch.zeros(batch, heads, dtype=torch.int32, device=device)
        regions[name] = (blocks, start, counts)
    centroids = plan.centroids
    layer_cache = CompressedLayer(
        guard_layout=plan.guard_layout, body_layout=plan.body_layout,
        sinks_key=dense(plan.sinks, 2), sinks_value=dense(plan.sinks),
        sink_len=torch.full((batch,), plan.sinks, dtype=torch.int32, device=device),
        window_key=dense(plan.window, 2), window_value=dense(plan.window),
        window_len=torch.full((batch,), plan.window, dtype=torch.int32, device=device),
        guard_blocks=regions["guard"][0], guard_start=regions["guard"][1],
        guard_count=regions["guard"][2], body_blocks=regions["body"][0],
        body_start=regions["body"][1], body_count=regions["body"][2],
        centroid_key=dense(centroids, 2), centroid_value=dense(centroids),
        centroid_count=torch.full((batch, heads, centroids),
                                  max(1, plan.evicted // max(centroids, 1)), dtype=torch.int32,
                                  device=device))

    def write_all():
        for write in writes:
            write()

    return layer_cache, modules, write_all, moved


def stored_bytes(layer: CompressedLayer) -> int:
    return sum(t.nbytes for t in (layer.sinks_key, layer.sinks_value, layer.window_key,
                                  layer.window_value, layer.guard_blocks, layer.body_blocks,
                                  layer.centroid_key, layer.centroid_value,
                                  layer.centroid_count))


def to_cpu(layer: CompressedLayer) -> CompressedLayer:
    return CompressedLayer(**{k: v.cpu() if isinstance(v, torch.Tensor) else v
                              for k, v in vars(layer).items()})


def median_us(fn, device) -> float | None:
    if device.type != "cuda":
        return None  # the interpreter's times mean nothing
    import triton.testing
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def splits_for(batch: int, heads: int, device) -> int:
    """Enough split programs to fill the GPU twice over (at least 1, at most 64)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 4
    return max(1, min(64, math.ceil(2 * sms / (batch * heads))))


def measure(loaded, model_name: str, policy: str, batch: int, context: int, device,
            check: bool) -> dict:
    model = loaded.model
    layer_index = model.num_layers // 2
    layer, modules, write_all, write_bytes = build_layer(loaded, layer_index, batch, context,
                                                         device, seed=batch * 7 + context)
    q_heads, heads, head_dim = model.num_q_heads, model.num_kv_heads, model.head_dim
    generator = torch.Generator().manual_seed(context)
    q = (torch.randn(batch, q_heads, head_dim, generator=generator)).to(torch.bfloat16)
    q = q.to(device)
    scale = 1 / math.sqrt(head_dim)
    splits = splits_for(batch, heads, device)
    block_t = loaded.launch.get("block_t", 32)

    def decode():
        return launch.decode(modules["decode"], modules["combine"], q, layer, scale,
                             num_splits=splits, block_t=block_t)

    row = {"model": model_name, "policy": policy, "layer": layer_index, "batch": batch,
           "context": context, "num_splits": splits, "block_t": block_t,
           "stored_bytes": stored_bytes(layer)}
    if check:
        got = decode().float().cpu()
        want, _ = R.attend(q.float().cpu(), to_cpu(layer), scale)
        row["rel_err"] = float((got - want).abs().max() / want.abs().max())
        row["nan"] = bool(torch.isnan(got).any())
    kv_bytes = DTYPE_BYTES[model.kv_dtype]
    io_bytes = 2 * batch * q_heads * head_dim * 2  # q in, out (16-bit equivalent)
    k = torch.randn(batch, heads, context, head_dim, generator=generator).to(torch.bfloat16)
    v = torch.randn(batch, heads, context, head_dim, generator=generator).to(torch.bfloat16)
    k, v = k.to(device), v.to(device)
    q4 = q.unsqueeze(2)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q4, k, v, scale=scale,
                                                                enable_gqa=True)

    if check:
        full = sdpa().float().cpu()
        row["sdpa_finite"] = bool(torch.isfinite(full).all())
    decode_us, sdpa_us, write_us = (median_us(decode, device), median_us(sdpa, device),
                                    median_us(write_all, device) if write_bytes else None)
    decode_moved = row["stored_bytes"] + io_bytes
    sdpa_moved = 2 * batch * heads * context * head_dim * kv_bytes + io_bytes
    row.update(decode_bytes=decode_moved, sdpa_bytes=sdpa_moved, write_bytes=write_bytes,
               byte_ratio=sdpa_moved / decode_moved)
    if decode_us is not None:
        row.update(decode_us=decode_us, sdpa_us=sdpa_us, speedup=sdpa_us / decode_us,
                   decode_tbps=decode_moved / decode_us / 1e6,
                   sdpa_tbps=sdpa_moved / sdpa_us / 1e6)
    if write_us is not None:
        row.update(write_us=write_us, write_tbps=write_bytes / write_us / 1e6)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU interpreter, tiny grid, correctness only")
    parser.add_argument("--models", default=None)
    parser.add_argument("--policies", default=None)
    parser.add_argument("--batch", default=None)
    parser.add_argument("--context", default=None)
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="compiled artifacts to reuse (MODEL-POLICY folders)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    grid = dict(SMOKE if args.smoke else GRID)
    for key in ("models", "policies"):
        if getattr(args, key):
            grid[key] = getattr(args, key).split(",")
    for key in ("batch", "context"):
        if getattr(args, key):
            grid[key] = [int(x) for x in getattr(args, key).split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 and --smoke")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    out = args.out or ROOT / "bench" / "results" / (
        "kernels_" + name.lower().replace(" ", "_") + ".json")
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.artifacts or Path(tmp)
        for model_name in grid["models"]:
            for policy in grid["policies"]:
                loaded = load_artifact(policy, model_name, folder)
                for context in grid["context"]:
                    for batch in grid["batch"]:
                        check = batch == min(grid["batch"])
                        rows.append(measure(loaded, model_name, policy, batch, context, device,
                                            check))
                        print(json.dumps(rows[-1]), flush=True)
    import triton
    result = {"what": "kvpolicy's generated decode and pack kernels vs bf16 SDPA",
              "device": name, "torch": torch.__version__, "triton": triton.__version__,
              "host": platform.node(), "command": "python bench/kernels.py "
              + " ".join(sys.argv[1:]), "seconds": time.perf_counter() - started,
              "grid": grid, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'model':14} {'policy':13} {'B':>3} {'T':>6} {'rel.err':>8} {'decode us':>10} "
          f"{'bf16 us':>9} {'speed-up':>9} {'bytes x':>8} {'TB/s':>6} {'write TB/s':>10}")
    def cell(row: dict, key: str, spec: str) -> str:
        return format(row[key], spec) if row.get(key) is not None else "-"

    for r in rows:
        print(f"{r['model']:14} {r['policy']:13} {r['batch']:>3} {r['context']:>6} "
              f"{cell(r, 'rel_err', '.1e'):>8} {cell(r, 'decode_us', '.1f'):>10} "
              f"{cell(r, 'sdpa_us', '.1f'):>9} {cell(r, 'speedup', '.2f'):>9} "
              f"{cell(r, 'byte_ratio', '.2f'):>8} {cell(r, 'decode_tbps', '.2f'):>6} "
              f"{cell(r, 'write_tbps', '.2f'):>10}")
    print(f"({name}; written to {out})")


if __name__ == "__main__":
    main()
