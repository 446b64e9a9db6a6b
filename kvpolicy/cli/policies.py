"""Commands that need neither torch nor triton: check, fmt, plan, compile, models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvpolicy.cli.common import (EXIT_ERROR, EXIT_OK, MAX_BLOCK_SIZE, Reporter, model_for,
                                 plan_or_report, policy_and_model, write_atomically)
from kvpolicy.diagnostics import PolicyError, printable
from kvpolicy.files import reason, shown_path


def cmd_check(args: argparse.Namespace) -> int:
    from kvpolicy.lang.lower import check_file
    from kvpolicy.plan.pages import paged_refusals
    reporter = Reporter()
    for path in args.files:
        result = check_file(path)
        reporter.show(result.diagnostics)
        policy = result.policy
        if policy is None:
            continue
        for why in paged_refusals(policy):
            print(printable(f"{path}: note: vLLM and the paged store cannot run this policy: {why}"), file=sys.stderr)
        if args.model is not None or policy.model is not None or args.context is not None:
            model = model_for(policy, args.model, reporter)
            if model is not None:
                plan_or_report(policy, model, args.context, reporter)
    print(reporter.summary(f"checked {len(args.files)} file{'s' * (len(args.files) != 1)}"),
          file=sys.stderr)
    return EXIT_ERROR if reporter.errors else EXIT_OK


def cmd_fmt(args: argparse.Namespace) -> int:
    from kvpolicy.lang.fmt import format_policy
    from kvpolicy.lang.lower import check_file
    from kvpolicy.lang.parser import parse_source
    from kvpolicy.lang.source import read_source
    reporter = Reporter()
    changed = []
    for path in args.files:
        result = check_file(path)
        if result.errors:
            reporter.show(result.diagnostics)
            continue
        source = read_source(path)
        formatted = format_policy(parse_source(source).tree)
        if args.stdout:  # the file's text; on a terminal, its control characters escaped
            sys.stdout.write(printable(formatted, lines=True) if sys.stdout.isatty()
                             else formatted)
            continue
        if formatted == source.text:
            continue
        changed.append(path)
        if args.check:
            print(printable(f"{path}: not in canonical form (run `kvpolicy fmt {path}`)"),
                  file=sys.stderr)
        else:
            try:  # through a symbolic link, to the file it names
                write_atomically(Path(path).resolve(), formatted)
            except (OSError, RuntimeError) as exc:
                why = reason(exc) if isinstance(exc, OSError) else "a symbolic link loop"
                reporter.fail(f"cannot rewrite {shown_path(path)}: {why}")
                continue
            print(printable(f"formatted {path}"), file=sys.stderr)
    if reporter.errors:
        return EXIT_ERROR
    return EXIT_ERROR if args.check and changed else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from kvpolicy.plan.report import render_table, to_json
    from kvpolicy.plan.served import served_contexts, served_view
    reporter = Reporter()
    if args.block_size is not None and not 1 <= args.block_size <= MAX_BLOCK_SIZE:
        reporter.fail(f"--block-size {args.block_size}: between 1 and {MAX_BLOCK_SIZE:,} tokens")
        return EXIT_ERROR
    chosen = policy_and_model(args, reporter)
    if chosen is None:
        return EXIT_ERROR
    policy, model = chosen
    if args.context is None:
        print(f"kvpolicy: no --context given; planning at {model.name}'s maximum, "
              f"{model.max_context} tokens", file=sys.stderr)
    plan = plan_or_report(policy, model, args.context, reporter)
    if plan is None:
        return EXIT_ERROR
    served = None
    if args.block_size is not None:
        served = served_view(policy, model, args.block_size,
                             served_contexts(plan.context, model.max_context),
                             layout=args.layout)
    if args.json:
        record = to_json(plan)
        if served is not None:
            record["served"] = served.to_json()
        json.dump(record, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_table(plan))
        if served is not None:
            print("\n" + "\n".join(served.lines()))
    return EXIT_OK


def cmd_compile(args: argparse.Namespace) -> int:
    from kvpolicy.compiler.artifact import ArtifactError, compile_policy
    reporter = Reporter()
    chosen = policy_and_model(args, reporter)
    if chosen is None:
        return EXIT_ERROR
    policy, model = chosen
    if args.output is not None and not args.output.strip():
        reporter.fail("-o/--output is empty; name the build directory (default: "
                      f"build/{policy.name})")
        return EXIT_ERROR
    out = Path(args.output) if args.output is not None else Path("build") / policy.name
    try:
        changed = compile_policy(policy, model, out)
    except PolicyError as exc:
        reporter.show(exc.diagnostics)
        return EXIT_ERROR
    except (ArtifactError, OSError) as exc:
        reporter.fail(str(exc))
        return EXIT_ERROR
    state = f"{len(changed)} file{'s' * (len(changed) != 1)} written" if changed else \
        "unchanged"
    print(printable(f"compiled {policy.name} for {model.name} into {out} ({state})"))
    if args.sm90:
        from kvpolicy.compiler.hopper import check_artifact
        report = check_artifact(out)
        print(report.render())
        if not report.ok:
            return EXIT_ERROR
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from kvpolicy.models import DEFAULT_PLAN_MODEL, PRESETS
    print(f"{'name':<14} {'layers':>6} {'q heads':>7} {'kv heads':>8} {'head_dim':>8} "
          f"{'max context':>11} {'16-bit KV bytes/token':>21}  from")
    for model in PRESETS.values():
        default = "  (default)" if model.name == DEFAULT_PLAN_MODEL else ""
        layers = (f"{model.num_layers}+{len(model.window_layers)}w" if model.window_layers
                  else str(model.num_layers))
        print(f"{model.name:<14} {layers:>6} {model.num_q_heads:>7} "
              f"{model.num_kv_heads:>8} {model.head_dim:>8} {model.max_context:>11,} "
              f"{model.baseline_bytes_per_token:>21,}  {model.hf_id}{default}")
    print("\nN+Mw layers: N full-attention layers (the policy's) and M sliding-window layers, "
          "which hold\ntheir window at 16 bits whatever the policy (not in bytes/token).")
    print("Any model: --model path/to/config.json or a model directory that holds one.")
    return EXIT_OK
