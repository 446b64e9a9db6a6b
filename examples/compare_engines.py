"""Compares two `kvpolicy eval` runs of the same samples on different engines, sample by sample.

    kvpolicy eval --engine paged --quick POLICIES... --out results/engines-quick/paged
    kvpolicy eval --engine vllm  --quick POLICIES... --out results/engines-quick/vllm
    python examples/compare_engines.py results/engines-quick/paged results/engines-quick/vllm

Prints, per policy: accuracy and compression ratio on each engine, and on how many samples the
two engines' greedy tokens are identical; writes compare.json beside the first run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text(encoding="utf-8"))


def main() -> None:
    first, second = Path(sys.argv[1]), Path(sys.argv[2])
    a, b = load(first), load(second)
    engines = [a["config"].get("engine", "hf"), b["config"].get("engine", "hf")]
    key = lambda line: (line["policy"], line["task"], line["context"], line["sample"])  # noqa
    theirs = {key(line): line for line in b["results"]}
    rows = {}
    for line in a["results"]:
        other = theirs.get(key(line))
        if other is None:
            continue
        row = rows.setdefault(line["policy"], {"samples": 0, "identical_tokens": 0,
                                               "same_score": 0})
        row["samples"] += 1
        row["identical_tokens"] += line.get("token_ids") == other.get("token_ids")
        row["same_score"] += line["score"] == other["score"]
    summary = {(r["policy"], r["context"]): r for r in a["summary"]["rows"]}
    summary_b = {(r["policy"], r["context"]): r for r in b["summary"]["rows"]}
    print(f"{'policy':<14} {'context':>7} " + " ".join(f"{e + ' acc':>10} {e + ' ratio':>11}"
                                                         for e in engines)
          + f" {'identical':>10}")
    for (policy, context), row in summary.items():
        other = summary_b.get((policy, context), {})
        agree = rows.get(policy, {})
        print(f"{policy:<14} {context:>7} "
              f"{100 * (row['accuracy'] or 0):>9.1f}% {row['compression_ratio']:>10.2f}x "
              f"{100 * (other.get('accuracy') or 0):>9.1f}% "
              f"{other.get('compression_ratio') or 0:>10.2f}x "
              f"{agree.get('identical_tokens', 0):>5}/{agree.get('samples', 0)}")
        rows.setdefault(policy, {}).update({
            f"{engines[0]}_accuracy": row["accuracy"], f"{engines[1]}_accuracy":
            other.get("accuracy"), f"{engines[0]}_ratio": row["compression_ratio"],
            f"{engines[1]}_ratio": other.get("compression_ratio"), "context": context})
    (first.parent / "compare.json").write_text(json.dumps(
        {"engines": engines, "runs": [str(first), str(second)], "policies": rows}, indent=2)
        + "\n", encoding="utf-8")
    print(f"wrote {first.parent / 'compare.json'}")


if __name__ == "__main__":
    main()
