"""results.json → report.md (the seed's Tables 1, 5 and 6, measured) and pareto.png.

The report is rendered from results.json alone (`render_report(json.load(...))`), so every number
it shows can be traced to the per-sample lines that made it.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import defaultdict
from pathlib import Path

from kvpolicy._version import __version__
from kvpolicy.eval.tasks import ACCURACY_TASKS

SCHEMA = "kvpolicy.eval/1"
MIB = 1024 * 1024
PASS_RELATIVE_DROP = 0.10  # the seed's criterion: PASS if the accuracy drop is below 10%
RESAMPLES = 1000  # the paired bootstrap of accuracy relative to the baseline

# The seed's Tables 1, 5 and 6 (Qwen2.5-7B-Instruct, LongBench v2, estimated accuracy).
SEED_CLAIMED = {
    "baseline": {"ratio": 1.00, "memory_mb": 7168, "accuracy": 0.3534, "bytes_per_token_kb": 219.0,
                 "relative_drop": None},
    "conservative": {"ratio": 5.05, "memory_mb": 1419, "accuracy": 0.3357,
                     "bytes_per_token_kb": 43.4, "relative_drop": 0.050},
    "aggressive": {"ratio": 7.61, "memory_mb": 942, "accuracy": 0.3357,
                   "bytes_per_token_kb": 28.8, "relative_drop": 0.050},
    "extreme": {"ratio": 10.57, "memory_mb": 678, "accuracy": 0.3251,
                "bytes_per_token_kb": 20.7, "relative_drop": 0.080},
}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _task_mean_accuracy(scores: dict[tuple, float], draw: dict[str, list[tuple]]) -> float:
    """The accuracy as summarize computes it (a mean of task means), over a bootstrap draw."""
    return _mean([_mean([scores[key] for key in keys]) for keys in draw.values()])


def relative_interval(policy_lines: list[dict], baseline_lines: list[dict],
                      resamples: int = RESAMPLES, seed: int = 0) -> list[float] | None:
    """95% paired bootstrap interval of accuracy(policy) / accuracy(baseline): the prompts
    (task, sample) both were scored on are resampled with replacement within each task (the
    accuracy is a mean of task means), the same draw for both. None with fewer than two prompts
    per task or a baseline at zero. Seeded: the same lines give the same interval."""
    def scores(lines):
        return {(line["task"], line["sample"]): line["score"] for line in lines
                if line["task"] in ACCURACY_TASKS and "error" not in line}
    ours, base = scores(policy_lines), scores(baseline_lines)
    by_task: dict[str, list[tuple]] = defaultdict(list)
    for key in sorted(ours.keys() & base.keys()):
        by_task[key[0]].append(key)
    if not by_task or min(len(keys) for keys in by_task.values()) < 2:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        draw = {task: [keys[rng.randrange(len(keys))] for _ in keys]
                for task, keys in by_task.items()}
        reference = _task_mean_accuracy(base, draw)
        if reference > 0:
            ratios.append(_task_mean_accuracy(ours, draw) / reference)
    if len(ratios) < resamples // 2:
        return None
    ratios.sort()
    return [ratios[int(0.025 * len(ratios))], ratios[math.ceil(0.975 * len(ratios)) - 1]]


def summarize(lines: list[dict], order: list[str] | None = None) -> dict:
    """Per (policy, context): task means, accuracy (mean over accuracy tasks), perplexity,
    bytes, ratio, timings; plus relative drops against the baseline."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for line in lines:
        if "error" not in line:
            groups[(line["policy"], line["context"])].append(line)
    rank = {name: i for i, name in enumerate(order or [])}
    rows = []
    for (policy, context), members in sorted(
            groups.items(), key=lambda kv: (kv[0][1], rank.get(kv[0][0], len(rank)), kv[0][0])):
        tasks = defaultdict(list)
        for line in members:
            tasks[line["task"]].append(line["score"])
        task_means = {task: _mean(scores) for task, scores in sorted(tasks.items())}
        accuracy = _mean([task_means[t] for t in ACCURACY_TASKS if t in task_means])
        measured = _mean([line["measured_bytes"] for line in members])
        baseline = _mean([line["baseline_bytes"] for line in members])
        tokens = _mean([line["prompt_tokens"] for line in members])
        tpots = [line.get("tpot_s") for line in members]
        rows.append({
            "policy": policy, "context": context, "samples": len(members),
            "tasks": task_means, "accuracy": accuracy, "perplexity": task_means.get("ppl"),
            "measured_bytes": measured, "baseline_bytes": baseline,
            "compression_ratio": baseline / measured if measured else None,
            "lowest_ratio": min((line["baseline_bytes"] / line["measured_bytes"]
                                 for line in members if line["measured_bytes"]), default=None),
            "savings": 1 - measured / baseline if measured and baseline else None,
            "bytes_per_token": measured / tokens if tokens else None,
            "prompt_tokens": tokens,
            "planned_equals_measured": all(line["measured_bytes"] == line["planned_bytes"]
                                           for line in members),
            "prefill_s": _mean([line["prefill_s"] for line in members]),
            "compress_s": _mean([line["compress_s"] for line in members]),
            "ttft_s": _mean([line.get("ttft_s") for line in members]),
            "tpot_s": _mean(tpots),
        })
    baselines = {row["context"]: row for row in rows if row["policy"] == "baseline"}
    for row in rows:
        base = baselines.get(row["context"])
        if base and base["accuracy"] and row["accuracy"] is not None:
            row["absolute_drop"] = base["accuracy"] - row["accuracy"]
            row["relative_drop"] = row["absolute_drop"] / base["accuracy"]
            row["pass"] = row["relative_drop"] < PASS_RELATIVE_DROP
            row["of_baseline"] = row["accuracy"] / base["accuracy"]
            row["of_baseline_interval"] = relative_interval(
                groups[(row["policy"], row["context"])], groups[("baseline", row["context"])])
        if base and base["perplexity"] and row["perplexity"] is not None:
            row["perplexity_increase"] = row["perplexity"] / base["perplexity"] - 1
    return {"rows": rows}


def _f(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _pct(value, missing: str = "-") -> str:
    return missing if value is None else f"{100 * value:.1f}%"


def _seed(policy: str, key: str, spec: str) -> str:
    claims = SEED_CLAIMED.get(policy)
    if claims is None or claims.get(key) is None:
        return "-"
    value = claims[key]
    return f"{100 * value:.1f}%" if spec == "%" else format(value, spec)


def render_report(results: dict) -> str:
    config, summary, hw = results["config"], results["summary"], results["hardware"]
    rows = summary["rows"]
    contexts = sorted({row["context"] for row in rows})
    lines = [
        f"# kvpolicy eval: {', '.join(p['name'] for p in config['policies'])}",
        "",
        f"Model **{results['model']['name']}** ({_layers(results['model'])}, "
        f"{results['model']['num_kv_heads']} KV heads, head_dim {results['model']['head_dim']}); "
        f"**{config['setting']}**; {config['samples_per_task']} samples per task and context "
        f"(seed {config['seed']}); tasks {', '.join(config['tasks'])}; cache dtype "
        f"{config['cache_dtype']}.",
        "",
        f"Hardware: **{hw['device'].upper() if hw['device'] == 'cpu' else hw['device']}** "
        f"({hw.get('cpu', '')}, {hw.get('cores')} cores), torch {hw['torch']}; engine: "
        f"{hw['engine']}. Times are measured on this hardware and engine — a CPU run, not "
        "comparable with the seed's H100/vLLM figures.",
        "",
        f"Engine **{config.get('engine', 'hf')}**"
        + (f" (blocks of {config['block_size']} tokens; each prompt, question included, in "
           "one step)" if config.get("engine", "hf") != "hf" else "") + ".",
        "",
        "Every number below is computed from `results.json` (per-sample lines). Memory is the "
        "bytes the cache holds right after compressing the prompt, counted from its tensors"
        + ("; for vLLM, which does not expose one request's blocks, its layout's exact "
           "count for the same tokens (`bytes_source`)" if any(
               line.get("bytes_source") in ("page plan", "stream plan")
               for line in results["results"]) else "")
        + "; "
        "the uncompressed baseline keeps every token in "
        f"{config['cache_dtype']}. \"Seed claimed\" columns repeat the draft's Tables 1, 5, 6 — "
        "estimates for Qwen2.5-7B on LongBench v2, a different model and benchmark — for "
        "reference only.",
    ]
    for entry in config["policies"]:
        for why in entry.get("paged_refusals", ()):  # what serving engines cannot run
            lines += ["", f"**{entry['name']}**: vLLM and the paged store cannot run it: {why}."]
    if any("reconstruct_s" in line for line in results["results"]):
        lines += ["", "TTFT of a `score reconstruct` policy includes the model's re-reading "
                  "passes of the context (`reconstruct_s` in each line)."]
    for context in contexts:
        here = [row for row in rows if row["context"] == context]
        tokens = _mean([row["prompt_tokens"] for row in here])
        lines += ["", f"## Context ≈ {context} tokens (mean prompt {tokens:,.0f} tokens)", "",
                  "### Table 1: compression performance overview (measured)", "",
                  "| Configuration | Compression Ratio | Memory (MiB) | Savings | Decode tok/s "
                  "| TTFT (ms) | TPOT (ms) | Accuracy | Relative Drop | Quality Status | Seed "
                  "claimed: ratio / accuracy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in here:
            status = "-" if row.get("pass") is None else ("PASS" if row["pass"] else "FAIL")
            tps = 1 / row["tpot_s"] if row["tpot_s"] else None
            lines.append(
                f"| {row['policy']} | {_f(row['compression_ratio'], '.2f')}x | "
                f"{_f(row['measured_bytes'] / MIB, ',.1f')} | {_pct(row['savings'])} | "
                f"{_f(tps, '.1f')} | {_f(row['ttft_s'] and row['ttft_s'] * 1000, ',.0f')} | "
                f"{_f(row['tpot_s'] and row['tpot_s'] * 1000, '.1f')} | "
                f"{_pct(row['accuracy'])} | {_pct(row.get('relative_drop'))} | {status} | "
                f"{_seed(row['policy'], 'ratio', '.2f')}x / "
                f"{_seed(row['policy'], 'accuracy', '%')} |")
        lines += ["", "### Table 5: memory efficiency (measured)", "",
                  "| Configuration | Original (MiB) | Compressed (MiB) | Reduction | Bytes per "
                  "Token | Measured = planned | Seed claimed: bytes per token |",
                  "|---|---|---|---|---|---|---|"]
        for row in here:
            lines.append(
                f"| {row['policy']} | {_f(row['baseline_bytes'] / MIB, ',.1f')} | "
                f"{_f(row['measured_bytes'] / MIB, ',.1f')} | "
                f"{_f(row['compression_ratio'], '.2f')}x | "
                f"{_f(row['bytes_per_token'], ',.1f')} | "
                f"{'yes' if row['planned_equals_measured'] else 'NO'} | "
                f"{_seed(row['policy'], 'bytes_per_token_kb', '.1f')} KB |")
        lines += ["", "### Table 6: quality preservation (measured)", "",
                  "| Configuration | Baseline Acc | Acc | Absolute Drop | Relative Drop | "
                  "Acceptable? | Efficiency Score* | Seed claimed: relative drop |",
                  "|---|---|---|---|---|---|---|---|"]
        base = next((row for row in here if row["policy"] == "baseline"), None)
        for row in here:
            if row["policy"] == "baseline":
                continue
            relative = row.get("relative_drop")
            efficiency = (row["compression_ratio"] / (100 * relative)
                          if relative and relative > 0 else None)
            acceptable = "-" if row.get("pass") is None else ("Yes" if row["pass"] else "No")
            lines.append(
                f"| {row['policy']} | {_pct(base and base['accuracy'])} | "
                f"{_pct(row['accuracy'])} | {_pct(row.get('absolute_drop'))} | "
                f"{_pct(relative)} | {acceptable} | {_f(efficiency, '.1f')} | "
                f"{_seed(row['policy'], 'relative_drop', '%')} |")
        lines += ["", "*Efficiency Score = compression ratio / relative drop in percent (the "
                  "seed's definition; empty when the drop is not positive).", "",
                  "### Against the baseline, with uncertainty", "",
                  "| Configuration | Ratio: mean (lowest prompt) | Of baseline's accuracy | "
                  f"95% interval (paired bootstrap, {RESAMPLES:,} resamples) |",
                  "|---|---|---|---|"]
        for row in here:
            if row["policy"] == "baseline":
                continue
            share, interval = row.get("of_baseline"), row.get("of_baseline_interval")
            lines.append(
                f"| {row['policy']} | {_f(row['compression_ratio'], '.2f')}x "
                f"({_f(row.get('lowest_ratio'), '.2f')}x) | "
                + ("- | " if share is None else f"{100 * share:.0f}% | ")
                + (f"{100 * interval[0]:.0f}–{100 * interval[1]:.0f}% |" if interval else "- |"))
        lines += ["", "The interval resamples the prompts within each task, the same draw for the "
                  "configuration and the baseline; it says how far the samples, not the method, "
                  "move the number.", "",
                  "### Scores per task", "",
                  "| Configuration | " + " | ".join(here[0]["tasks"]) + " |",
                  "|---|" + "---|" * len(here[0]["tasks"])]
        for row in here:
            cells = [(_f(v, ".2f") if task == "ppl" else _pct(v))
                     for task, v in row["tasks"].items()]
            lines.append(f"| {row['policy']} | " + " | ".join(cells) + " |")
    lines += ["", "Scores: needle tasks and variable tracking count the expected strings found in "
              "the answer; squad and hotpotqa are token F1; ppl is the perplexity of the next "
              "128 tokens (lower is better; not part of Accuracy). Accuracy is the mean over the "
              "other tasks.", "", "![quality vs compression](pareto.png)", ""]
    return "\n".join(lines)


def plot_pareto(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in results["summary"]["rows"]
            if r["accuracy"] is not None and r["compression_ratio"]]
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = "osD^v"
    for index, context in enumerate(sorted({r["context"] for r in rows})):
        here = sorted((r for r in rows if r["context"] == context),
                      key=lambda r: r["compression_ratio"])
        xs = [r["compression_ratio"] for r in here]
        ys = [100 * r["accuracy"] for r in here]
        axis.scatter(xs, ys, marker=markers[index % len(markers)], label=f"~{context} tokens",
                     zorder=3)
        for r, x, y in zip(here, xs, ys):
            axis.annotate(r["policy"], (x, y), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
        front, best = [], -math.inf  # non-dominated: no other point is smaller and better
        for r in sorted(here, key=lambda r: -r["compression_ratio"]):
            if 100 * r["accuracy"] > best:
                front.append(r)
                best = 100 * r["accuracy"]
        front.sort(key=lambda r: r["compression_ratio"])
        axis.plot([r["compression_ratio"] for r in front], [100 * r["accuracy"] for r in front],
                  linestyle="--", linewidth=1, alpha=0.7)
    axis.set_xscale("log")
    axis.set_xlabel("compression ratio (measured bytes, log scale)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title(f"{results['model']['name']}, {results['config']['setting']} "
                   f"(dashed: Pareto front)", fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _layers(model: dict) -> str:
    """'30 layers', or for a model with sliding-window layers what the policy governs and what
    it does not (docs/runtime.md)."""
    windows = model.get("window_layers") or []
    if not windows:
        return f"{model['num_layers']} layers"
    return (f"{model['num_layers']} full-attention layers, which the policies govern, and "
            f"{len(windows)} sliding-window layers of {model['sliding_window']} tokens, held "
            "at 16 bits in the baseline and under every policy and counted in every ratio")


def write_outputs(config, lines: list[dict], shape, hardware: dict, model_name: str) -> dict:
    results = {
        "schema": SCHEMA,
        "kvpolicy_version": __version__,
        "model": shape.to_json() | {"name": model_name},
        "hardware": hardware,
        "config": config.to_json(),
        "results": lines,
        "summary": summarize(lines, [p["name"] for p in config.to_json()["policies"]]),
    }
    out = Path(config.out)
    _write(out / "results.json", json.dumps(results, indent=2) + "\n")
    loaded = json.loads((out / "results.json").read_text(encoding="utf-8"))
    _write(out / "report.md", render_report(loaded))
    plot_pareto(loaded, out / "pareto.png")
    return results


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
