"""Served capacity by block size: what one request holds in the paged engines (vLLM, the paged
store) against the 16-bit cache, beside the whole-prompt plan — for every shipped policy the
paged engines run, on SmolLM2-135M at 4,096 tokens, and the seed's three on Qwen2.5-7B at 32,768.

Exact, from the engines' own accounting (`kvpolicy plan FILE --block-size N [--layout L]
--json`, its `served` rows); nothing is estimated. Two layouts: the stream layout (the stream
plan laid out for sequences up to the context: what vLLM serves with one worker) at blocks
16/32/64, and the page layout (the page plan: tensor and pipeline parallelism) at 16-256.

    python bench/served_capacity.py     # writes bench/results/served_capacity.json, prints the table
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kvpolicy.lang.lower import load_policy  # noqa: E402
from kvpolicy.models import resolve_model  # noqa: E402
from kvpolicy.plan.pages import paged_refusals  # noqa: E402
from kvpolicy.plan.planner import make_plan  # noqa: E402
from kvpolicy.plan.served import served_view  # noqa: E402
from kvpolicy.plan.streams import stream_plan  # noqa: E402

BLOCKS = (16, 32, 64, 128, 256)
STREAM_BLOCKS = (16, 32, 64)
SEED = ("conservative", "aggressive", "extreme")


def cases():
    for path in sorted((ROOT / "policies").glob("*.kvp")):
        if not paged_refusals(load_policy(path)):
            yield path.stem, "smollm2-135m", 4096
    for name in SEED:
        yield name, "qwen2.5-7b", 32768


def main() -> None:
    rows = []
    for name, model_name, context in cases():
        policy, model = load_policy(ROOT / "policies" / f"{name}.kvp"), resolve_model(model_name)
        served = {}
        for block in BLOCKS:
            view = served_view(policy, model, block, [context], layout="pages")
            served[block] = None if view.refused else view.rows[0].ratio
        plan = make_plan(policy, model, context)
        streams = {block: served_view(policy, model, block, [context]).rows[0].ratio
                   for block in STREAM_BLOCKS}
        assert all(streams[block] == plan.baseline_bytes / stream_plan(
            policy, model, block, context).held_bytes(context) for block in STREAM_BLOCKS)
        rows.append({"policy": name, "model": model_name, "context": context,
                     "plan_ratio": plan.compression_ratio, "served_ratio_by_block": served,
                     "stream_plan_ratio_by_block": streams})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = ROOT / "bench" / "results" / "served_capacity.json"
    out.write_text(json.dumps({"commit": commit, "what": "one request's bytes served against "
                               "the 16-bit cache, beside the plan: in the stream layout "
                               "(vLLM with one worker: the stream plan's, "
                               "stream_plan_ratio_by_block) and in the page layout (tensor "
                               "and pipeline parallelism: the page plan's, "
                               "served_ratio_by_block)",
                               "command": "python bench/served_capacity.py",
                               "rows": rows}, indent=2) + "\n")
    print("| policy | model | context | `kvpolicy plan` | "
          + " | ".join(f"streams, block {b}" for b in STREAM_BLOCKS) + " | "
          + " | ".join(f"pages, block {b}" for b in BLOCKS) + " |")
    print("|---|---|---|---|" + "---|" * (len(BLOCKS) + len(STREAM_BLOCKS)))
    for row in rows:
        cells = [f"{r:.2f}x" for r in row["stream_plan_ratio_by_block"].values()]
        cells += ["refused" if r is None else f"{r:.2f}x"
                  for r in row["served_ratio_by_block"].values()]
        print(f"| {row['policy']} | {row['model']} | {row['context']:,} | "
              f"{row['plan_ratio']:.2f}x | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
