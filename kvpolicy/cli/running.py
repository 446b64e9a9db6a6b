"""Commands that run a real model (torch, transformers): run and eval."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kvpolicy.cli.common import EXIT_ERROR, EXIT_OK, Reporter, parse_context
from kvpolicy.diagnostics import PolicyError


def cmd_run(args: argparse.Namespace) -> int:
    from kvpolicy.lang.lower import check_file
    reporter = Reporter()
    result = check_file(args.file)
    reporter.show(result.diagnostics)
    if result.policy is None:
        return EXIT_ERROR
    prompt = args.prompt
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reporter.fail(f"cannot read {args.prompt_file}: {exc}")
            return EXIT_ERROR
    if not prompt and args.needle is None:
        reporter.fail("give a prompt with --prompt TEXT, --prompt-file FILE or --needle TOKENS")
        return EXIT_ERROR
    try:
        from kvpolicy.eval.haystack import DataMissing, needle_sample
        from kvpolicy.hf import ModelLoadError, generate, load_model
    except ImportError as exc:
        reporter.fail(f"kvpolicy run needs the evaluation extras ({exc}); "
                      "pip install 'kvpolicy[eval]'")
        return EXIT_ERROR
    try:
        model, tokenizer = load_model(args.model)
        needle = None
        if args.needle is not None:
            needle = needle_sample(tokenizer, args.needle, args.depth, seed=0)
            prompt = needle.context + "\n" + needle.question
    except ImportError as exc:
        reporter.fail(f"kvpolicy run needs the evaluation extras ({exc}); "
                      "pip install 'kvpolicy[eval]'")
        return EXIT_ERROR
    except (ModelLoadError, DataMissing) as exc:
        reporter.fail(str(exc))
        return EXIT_ERROR
    name = args.model or "smollm2-135m (embedded default)"
    if result.policy.model and args.model is None:
        print(f"kvpolicy: the policy is written for {result.policy.model}; running it on {name}",
              file=sys.stderr)
    try:
        run = generate(model, tokenizer, prompt, result.policy, args.max_new_tokens,
                       cache_dtype=args.cache_dtype, backend=args.backend, chat=not args.raw)
    except PolicyError as exc:
        reporter.show(exc.diagnostics)
        return EXIT_ERROR
    plan = run.plan
    reporter.show(plan.warnings)
    measured = run.measured_bytes_after_compress
    final = run.cache.nbytes()["total"]
    total_tokens = run.prompt_tokens + len(run.token_ids)
    baseline_final = run.cache.shape.baseline_bytes_per_token * total_tokens
    print(run.text)
    print()
    if needle is not None:
        found = "found" if needle.answer in run.text else "NOT found"
        print(f"needle at depth {needle.depth:g}: expected {needle.answer} ({found})")
    print(f"model {name}; policy {result.policy.name}; cache dtype {args.cache_dtype}; "
          f"attention backend {run.cache.backend} on {device_name(model)}")
    print(f"after the prompt ({run.prompt_tokens:,} tokens): measured {measured:,} bytes, "
          f"planned {plan.compressed_bytes:,} bytes, measured/planned "
          f"{measured / plan.compressed_bytes:.4f}; {plan.compression_ratio:.2f}x smaller than "
          f"the uncompressed cache ({plan.baseline_bytes:,} bytes)")
    print(f"at the end ({total_tokens:,} tokens): measured {final:,} bytes, "
          f"{baseline_final / final:.2f}x smaller than uncompressed; generated tokens are kept "
          "(packed once a whole block leaves the window)")
    print(f"measured time: prefill {run.timings['prefill']:.2f} s, compress "
          f"{run.timings['compress']:.2f} s, decode {len(run.token_ids)} tokens "
          f"{run.timings['decode']:.2f} s")
    return EXIT_OK


QUICK = {"tasks": "niah_single,niah_multikey,vt,squad,ppl", "contexts": "3000", "samples": 3}


def cmd_eval(args: argparse.Namespace) -> int:
    import hashlib
    reporter = Reporter()
    try:
        from kvpolicy.eval.runner import EvalConfig, EvalPolicy, baseline_policy, run
        from kvpolicy.eval.tasks import TASKS
        from kvpolicy.hf import ModelLoadError, load_model
    except ImportError as exc:
        reporter.fail(f"kvpolicy eval needs the evaluation extras ({exc}); "
                      "pip install 'kvpolicy[eval]'")
        return EXIT_ERROR
    from kvpolicy.lang.lower import check_file
    tasks = (args.tasks or (QUICK["tasks"] if args.quick else ",".join(TASKS))).split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        reporter.fail(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
        return EXIT_ERROR
    try:
        contexts = [parse_context(c) for c in (args.contexts or (QUICK["contexts"] if args.quick
                                                            else "2048,4096")).split(",")]
    except argparse.ArgumentTypeError as exc:
        reporter.fail(str(exc))
        return EXIT_ERROR
    samples = args.samples or (QUICK["samples"] if args.quick else 25)
    entries = [baseline_policy()]
    for path in args.files:
        result = check_file(path)
        reporter.show(result.diagnostics)
        if result.policy is None:
            return EXIT_ERROR
        entries.append(EvalPolicy(result.policy.name, result.policy, str(path)))
    try:
        model, tokenizer = load_model(args.model)
    except ModelLoadError as exc:
        reporter.fail(str(exc))
        return EXIT_ERROR
    extra = {}
    if args.ablation:
        from kvpolicy.eval.ablation import matched_ablation
        from kvpolicy.lang.lower import check_source
        from kvpolicy.diagnostics import Source
        from kvpolicy.models import shape_from_config
        shape = shape_from_config(model.config.to_dict(), name="model", source="transformers",
                                  kv_dtype=args.cache_dtype)
        extra["ablation"] = {"matched_at_context": max(contexts), "planned_ratios": {}}
        for name, text, ratio in matched_ablation(shape, max(contexts)):
            policy = check_source(Source(f"{name}.kvp", text)).policy
            entries.append(EvalPolicy(name, policy, f"{name}.kvp"))
            extra["ablation"]["planned_ratios"][name] = ratio
            extra["ablation"].setdefault("policies", {})[name] = text
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        reporter.fail(f"two policies share a name: {', '.join(names)}")
        return EXIT_ERROR
    key = json.dumps([[e.sha256 for e in entries], tasks, contexts, samples, args.seed,
                      args.question_aware, args.cache_dtype, args.model], sort_keys=True)
    out = Path(args.out) if args.out else Path("results") / (
        "eval-" + hashlib.sha256(key.encode()).hexdigest()[:10])
    config = EvalConfig(policies=entries, tasks=tasks, contexts=contexts, samples=samples,
                        seed=args.seed, question_aware=args.question_aware,
                        cache_dtype=args.cache_dtype, model=args.model, out=out, extra=extra)
    if args.ablation:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in extra["ablation"]["policies"].items():
            (out / f"{name}.kvp").write_text(text, encoding="utf-8")
    print(f"kvpolicy eval: {len(entries)} configurations x {len(tasks)} tasks x "
          f"{len(contexts)} contexts x {samples} samples -> {out} "
          f"({'question-aware' if args.question_aware else 'question-agnostic'}; "
          "rerun the same command to resume)", file=sys.stderr)
    run(config, model, tokenizer, progress=not args.no_progress)
    summary = json.loads((out / "results.json").read_text(encoding="utf-8"))["summary"]
    print(f"{'context':>8}  {'configuration':<22} {'ratio':>7} {'accuracy':>9} "
          f"{'rel. drop':>9} {'ppl':>7}")
    for row in summary["rows"]:
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        drop = row.get("relative_drop")
        print(f"{row['context']:>8}  {row['policy']:<22} {row['compression_ratio']:>6.2f}x "
              f"{accuracy:>9} {'-' if drop is None else f'{100 * drop:.1f}%':>9} "
              f"{'-' if row['perplexity'] is None else format(row['perplexity'], '.2f'):>7}")
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'pareto.png'}")
    return EXIT_OK


def device_name(model) -> str:
    import platform
    device = next(model.parameters()).device
    if device.type == "cuda":
        import torch
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
