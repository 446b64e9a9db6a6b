"""What `kvpolicy tune` writes from its measurements: the rows of front.json (each candidate's
measured ratio, proxy NLL and, for the finalists, accuracy), the ratio-NLL Pareto front, the
choice, front.png and best.kvp. Reads only the lines; imports no torch."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from kvpolicy.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from kvpolicy.eval.prompts import EvalPolicy
    from kvpolicy.tune.config import TuneConfig
    from kvpolicy.tune.space import Candidate

PROXY, ACCURACY, RECORDS, HEADS = "proxy", "accuracy", "records", "heads"


def pareto_front(points: list[dict]) -> list[str]:
    """Names of the points no other point beats on both ratio (higher) and NLL (lower)."""
    front = []
    for p in points:
        dominated = any(q["ratio"] >= p["ratio"] and q["nll"] <= p["nll"]
                        and (q["ratio"] > p["ratio"] or q["nll"] < p["nll"]) for q in points)
        if not dominated:
            front.append(p["name"])
    return front


def choose(rows: list[dict], target: float) -> dict | None:
    """The finalist with the best accuracy (then NLL, then ratio) whose measured ratio reaches
    the target on every calibration prompt."""
    eligible = [r for r in rows if r.get("accuracy") is not None and r["min_ratio"] >= target
                and r["name"] != "baseline"]
    return min(eligible, key=lambda r: (-r["accuracy"], r["nll"], -r["min_ratio"]), default=None)


def means(lines: list[dict], stage: str, field_name: str) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for line in lines:
        if line["stage"] == stage:
            values.setdefault(line["sha256"], []).append(line[field_name])
    return {sha: sum(v) / len(v) for sha, v in values.items()}


def write_front(config: "TuneConfig", entries: list["EvalPolicy"],
                by_name: dict[str, "Candidate"],
                lines: list[dict], chosen: set[str]) -> dict:
    nll = means(lines, PROXY, "nll")
    accuracy = means(lines, ACCURACY, "score")
    rows = []
    for entry in entries:
        ratios = [line["compression_ratio"] for line in lines
                  if line["stage"] == PROXY and line["sha256"] == entry.sha256]
        candidate = by_name.get(entry.name)
        rows.append({"name": entry.name, "nll": nll[entry.sha256],
                     "ratio": sum(ratios) / len(ratios), "min_ratio": min(ratios),
                     "planned_ratio": candidate.planned_ratio if candidate else 1.0,
                     "accuracy": accuracy.get(entry.sha256) if entry.name in chosen else None,
                     "finalist": entry.name in chosen and entry.name != "baseline",
                     "servable": candidate.servable if candidate else True,
                     "policy": candidate.text if candidate else None})
    front = pareto_front([r for r in rows if r["name"] != "baseline"])
    for row in rows:
        row["on_front"] = row["name"] in front
    best = choose(rows, config.target)
    seconds = {stage: sum(line.get("seconds", 0.0) + line.get("prefill_s", 0.0)
                          + line.get("reconstruct_s", 0.0)
                          for line in lines if line["stage"] == stage)
               for stage in (RECORDS, PROXY, ACCURACY)}
    result = {"schema": "kvpolicy.tune/1", "config": config.to_json(),
              "measured_seconds": seconds, "rows": rows,
              "best": best["name"] if best else None}
    (config.out / "front.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(rows, config)
    best_path = config.out / "best.kvp"
    if best:
        best_path.write_text(best_policy_text(best, rows, config), encoding="utf-8")
    elif best_path.exists():
        best_path.unlink()
    return result


def best_policy_text(best: dict, rows: list[dict], config: "TuneConfig") -> str:
    """The chosen policy, formatted, under comments that state what tune measured and how."""
    from kvpolicy.diagnostics import Source
    from kvpolicy.lang.fmt import format_policy
    from kvpolicy.lang.parser import parse_source
    baseline = next(r for r in rows if r["name"] == "baseline")
    share = (f" ({100 * best['accuracy'] / baseline['accuracy']:.0f}% of the baseline's)"
             if baseline["accuracy"] else "")
    header = [
        f"Chosen by kvpolicy tune at target ratio {config.target:g} for "
        f"{config.model or DEFAULT_MODEL}, on calibration samples only:",
        f"{config.samples} per task of {', '.join(config.tasks)}, ~{config.context} tokens, "
        f"seed {config.seed}, question-agnostic.",
        f"Measured there: ratio {best['ratio']:.2f}x (lowest {best['min_ratio']:.2f}x), "
        f"accuracy {100 * best['accuracy']:.1f}%{share}, answer NLL {best['nll']:.3f} "
        f"(baseline {100 * baseline['accuracy']:.1f}%, NLL {baseline['nll']:.3f}).",
        "Held-out quality is not known until kvpolicy eval measures it on other samples.",
    ] + ([f"Command: {config.command}"] if config.command else [])
    text = format_policy(parse_source(Source("best.kvp", best["policy"])).tree)
    return "".join(f"# {line}\n" for line in header) + text


def _plot(rows: list[dict], config: "TuneConfig") -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the eval extras
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        style = dict(marker="*" if row["on_front"] else "o",
                     color="tab:red" if row["finalist"] else
                     "black" if row["name"] == "baseline" else "tab:gray")
        axis.scatter(row["ratio"], row["nll"], s=60, **style)
        if row["finalist"] or row["on_front"] or row["name"] == "baseline":
            label = row["name"] + (f" {100 * row['accuracy']:.0f}%"
                                   if row["accuracy"] is not None else "")
            axis.annotate(label, (row["ratio"], row["nll"]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    axis.axvline(config.target, color="tab:blue", linestyle=":", linewidth=1)
    axis.set_xlabel("measured compression ratio (mean over calibration prompts)")
    axis.set_ylabel("answer NLL (teacher-forced, mean)")
    axis.set_title(f"kvpolicy tune, target {config.target:g}x: red = finalists (accuracy), "
                   "* = front", fontsize=9)
    figure.tight_layout()
    figure.savefig(config.out / "front.png", dpi=120)
    plt.close(figure)
