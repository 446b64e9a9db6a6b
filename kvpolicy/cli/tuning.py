"""`kvpolicy tune`: search the language's space for the policy that keeps the most at a target
compression ratio (kvpolicy/tune/search.py); `kvpolicy calibrate`: the head weights `adapt
heads` reads (kvpolicy/tune/calibrate.py). docs/tune.md"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kvpolicy.cli.common import (EXIT_ERROR, EXIT_OK, Reporter, loaded_model,
                                 unwritable_directory)
from kvpolicy.dtypes import KV_DTYPES
from kvpolicy.models import DEFAULT_MODEL
from kvpolicy.tune.config import CALIBRATION_SEED, DEFAULT_TASKS, TuneConfig

MAX_TARGET = 64.0  # 2-bit keys and values with nearly everything evicted stay below this


def add_parser(commands) -> None:
    tune = commands.add_parser(
        "tune", help="find the policy that keeps the most at a target compression ratio",
        description="Search scorers x key/value bits (retain solved for the target ratio) on "
        "calibration samples, static head budgets among the scorers (their head weights "
        "measured from the same samples, as kvpolicy calibrate does): every candidate ranked "
        "by the teacher-forced NLL of the answer, the best --finalists then generate; writes "
        "the front (front.json, front.png) and the best policy (best.kvp). Resumable: rerun "
        "the same command. docs/tune.md")
    tune.add_argument("--target-ratio", type=float, required=True, metavar="R",
                      help="the compression ratio every candidate must reach (measured)")
    tune.add_argument("--model", help="a local Hugging Face model directory with weights "
                      "(default: the embedded SmolLM2-135M-Instruct)")
    tune.add_argument("--context", type=int, default=4096,
                      help="calibration prompt length in tokens (default 4096)")
    tune.add_argument("--min-prompt", type=int, metavar="TOKENS",
                      help="every candidate reaches the target at every prompt length from this "
                      "one to 1/8 of --context past the longest calibration prompt (default: "
                      "3/4 of --context; 0: the calibration prompts' lengths only)")
    tune.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                      help="comma-separated generation tasks (default: %(default)s)")
    tune.add_argument("--samples", type=int, default=4, help="calibration samples per task "
                      "(default 4)")
    tune.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="calibration seed "
                      "(default %(default)s; kvpolicy eval's default is 0: keep them apart)")
    tune.add_argument("--space", choices=("default", "small"), default="default",
                      help="default: 6 scorers (recency, SnapKV, reconstruct with and without "
                      "budgets across heads, head budgets at two calibration keeps) x 6 "
                      "bit-widths; small: 3 x 2 (a smoke test)")
    tune.add_argument("--finalists", type=int, default=6,
                      help="candidates that generate after the proxy rung (default 6)")
    tune.add_argument("--servable", action="store_true",
                      help="only policies the paged engines (vLLM) can run")
    tune.add_argument("--cache-dtype", choices=KV_DTYPES,
                      default="bfloat16")
    tune.add_argument("--out", metavar="DIR", help="output directory (default: "
                      "results/tune-<model>-r<R>)")
    tune.add_argument("--no-progress", action="store_true")
    tune.set_defaults(run=cmd_tune)

    calibrate = commands.add_parser(
        "calibrate", help="measure per-(layer, KV head) importance for `adapt heads`",
        description="Re-reads calibration prompts (score reconstruct's passes) and writes each "
        "(layer, KV head)'s share of the most important context tokens: a head-weights file "
        "that a policy names with `adapt heads \"FILE\"`. docs/tune.md")
    calibrate.add_argument("--model", help="a local Hugging Face model directory with weights "
                           "(default: the embedded SmolLM2-135M-Instruct)")
    calibrate.add_argument("-o", "--out", metavar="FILE", required=True,
                           help="the head-weights file to write (.json)")
    calibrate.add_argument("--context", type=int, default=4096,
                           help="calibration prompt length in tokens (default 4096)")
    calibrate.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                           help="comma-separated tasks (default: %(default)s)")
    calibrate.add_argument("--samples", type=int, default=4,
                           help="calibration samples per task (default 4)")
    calibrate.add_argument("--seed", type=int, default=CALIBRATION_SEED,
                           help="calibration seed (default %(default)s; kvpolicy eval's "
                           "default is 0: keep them apart)")
    calibrate.add_argument("--keep", type=float, default=0.5,
                           help="share of the middle tokens the one threshold keeps "
                           "(default 0.5)")
    calibrate.add_argument("--no-progress", action="store_true")
    calibrate.set_defaults(run=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from kvpolicy.eval.tasks import ACCURACY_TASKS
    reporter = Reporter()
    problems = []
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ACCURACY_TASKS]
    if not tasks or unknown:
        problems.append(f"--tasks {args.tasks!r}: choose from {', '.join(ACCURACY_TASKS)}")
    if args.samples < 1:
        problems.append(f"--samples {args.samples}: at least 1 per task")
    if args.context < 256:
        problems.append(f"--context {args.context}: at least 256 tokens")
    if not 0.0 < args.keep < 1.0:  # also refuses nan
        problems.append(f"--keep {args.keep:g}: between 0 and 1 (exclusive)")
    out = Path(args.out)
    if out.is_dir():
        problems.append(f"--out {out}: is a directory; name the .json file to write")
    else:
        problem = unwritable_directory(out.parent if str(out.parent) else Path("."))
        if problem:
            problems.append(problem)
    if reporter.failed(problems):
        return EXIT_ERROR
    directory = _calibration_model(args, reporter)
    if directory is None:
        return EXIT_ERROR
    try:
        from kvpolicy.tune.calibrate import CalibrateConfig, calibrate
    except ImportError as exc:
        return reporter.needs_extras("calibrate", exc)
    config = CalibrateConfig(out=out, tasks=tuple(tasks), samples=args.samples, seed=args.seed,
                             context=args.context, keep=args.keep,
                             model=args.model or DEFAULT_MODEL,
                             command=shlex.join(["kvpolicy", *sys.argv[1:]]))
    loaded = loaded_model(directory, reporter)
    if loaded is None:
        return EXIT_ERROR
    model, tokenizer = loaded
    print(f"kvpolicy calibrate: {args.samples} samples x {len(tasks)} tasks at ~{args.context} "
          f"tokens (seed {args.seed}) -> {out}", file=sys.stderr)
    result = calibrate(config, model, tokenizer, progress=not args.no_progress)
    print(f"wrote {out}: {len(result['weights'])} layers x {len(result['weights'][0])} KV heads "
          f"from {result['prompts']} prompts (measured {result['seconds']:.0f} s)")
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    from kvpolicy.eval.tasks import ACCURACY_TASKS
    reporter = Reporter()
    problems = []  # the arguments, then the model's shape: all before torch is imported
    if not 1.0 < args.target_ratio <= MAX_TARGET:  # also refuses nan
        problems.append(f"--target-ratio {args.target_ratio:g}: between 1 (exclusive) and "
                        f"{MAX_TARGET:g}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ACCURACY_TASKS]
    if not tasks or unknown:
        problems.append(f"--tasks {args.tasks!r}: tasks with answers to score: "
                        f"{', '.join(ACCURACY_TASKS)}")
    if args.samples < 1:
        problems.append(f"--samples {args.samples}: at least 1 per task")
    if args.finalists < 1:
        problems.append(f"--finalists {args.finalists}: at least 1")
    if args.context < 256:
        problems.append(f"--context {args.context}: at least 256 tokens (a prompt shorter "
                        "than its sinks, window and question has nothing to compress)")
    if args.min_prompt is not None and not 0 <= args.min_prompt <= args.context:
        problems.append(f"--min-prompt {args.min_prompt}: between 0 and --context "
                        f"({args.context})")
    if reporter.failed(problems):
        return EXIT_ERROR
    directory = _calibration_model(args, reporter)
    if directory is None:
        return EXIT_ERROR
    model_name = args.model or DEFAULT_MODEL
    out = Path(args.out) if args.out else Path("results") / (
        f"tune-{Path(model_name).name}-r{args.target_ratio:g}")
    problem = unwritable_directory(out)
    if problem:
        reporter.fail(problem)
        return EXIT_ERROR
    earlier = _earlier_run(out)
    wanted = {"model": model_name, "context": args.context, "seed": args.seed,
              "cache_dtype": args.cache_dtype}
    changed = [f"{k} {earlier[k]} (now {v})" for k, v in wanted.items()
               if earlier is not None and earlier.get(k) != v]
    if changed:  # its lines are measurements of other prompts: resuming would mix them
        reporter.fail(f"{out} holds a tune run with other calibration prompts "
                      f"({', '.join(changed)}); use another --out")
        return EXIT_ERROR
    try:
        from kvpolicy.tune.search import NoCandidates, tune
    except ImportError as exc:
        return reporter.needs_extras("tune", exc)
    config = TuneConfig(target=args.target_ratio, out=out, context=args.context,
                        min_prompt=args.min_prompt, tasks=tuple(tasks), samples=args.samples,
                        seed=args.seed,
                        space=args.space, finalists=args.finalists,
                        servable_only=args.servable, cache_dtype=args.cache_dtype,
                        model=args.model, command=shlex.join(["kvpolicy", *sys.argv[1:]]))
    loaded = loaded_model(directory, reporter)
    if loaded is None:
        return EXIT_ERROR
    model, tokenizer = loaded
    print(f"kvpolicy tune: target {args.target_ratio:g}x, {args.samples} calibration samples x "
          f"{len(tasks)} tasks at ~{args.context} tokens (seed {config.seed}) -> {out} "
          "(rerun the same command to resume)", file=sys.stderr)
    try:
        result = tune(config, model, tokenizer, progress=not args.no_progress)
    except NoCandidates as exc:
        reporter.fail(str(exc))
        return EXIT_ERROR
    print(f"{'candidate':<20} {'ratio':>7} {'min':>7} {'NLL':>7} {'accuracy':>9}  servable")
    for row in sorted(result["rows"], key=lambda r: (r["accuracy"] is None, r["nll"])):
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        mark = " *" if row["name"] == result["best"] else ""
        print(f"{row['name']:<20} {row['ratio']:>6.2f}x {row['min_ratio']:>6.2f}x "
              f"{row['nll']:>7.3f} {accuracy:>9}  {'yes' if row['servable'] else 'no'}{mark}")
    seconds = result["measured_seconds"]
    print(f"measured time: prefill and passes {seconds['records']:.0f} s, proxy "
          f"{seconds['proxy']:.0f} s, generation {seconds['accuracy']:.0f} s")
    if result["best"] is None:
        reporter.fail(f"no finalist reached {args.target_ratio:g}x on every calibration prompt; "
                      f"see {out / 'front.json'}")
        return EXIT_ERROR
    print(f"best: {result['best']} -> {out / 'best.kvp'}; front: {out / 'front.json'}, "
          f"{out / 'front.png'}")
    return EXIT_OK


def _calibration_model(args: argparse.Namespace, reporter: Reporter) -> Path | None:
    """--model's directory, its shape read (no weights) and --context checked against it; None
    after reporting why not."""
    from kvpolicy.engines.hf.model import ModelLoadError, model_directory
    from kvpolicy.models import ModelError, load_config
    try:
        directory = model_directory(args.model)
        shape = load_config(directory / "config.json")
    except (ModelLoadError, ModelError) as exc:
        reporter.fail(str(exc))
        return None
    if args.context > shape.max_context:
        reporter.fail(f"--context {args.context}: beyond the model's context of "
                      f"{shape.max_context:,} tokens")
        return None
    return directory


def _earlier_run(out: Path) -> dict | None:
    """The configuration of the tune run already in `out`, if any."""
    import json
    try:
        return json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
