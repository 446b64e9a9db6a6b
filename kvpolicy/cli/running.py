"""Commands that run a real model (torch, transformers): run and eval."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from kvpolicy.cli.common import (EXIT_ERROR, EXIT_OK, MAX_BLOCK_SIZE, Reporter, loaded_model,
                                 parse_context, unwritable_directory)
from kvpolicy.diagnostics import PolicyError, printable
from kvpolicy.models import DEFAULT_MODEL


MAX_PROMPT_BYTES = 16 * 1024 * 1024  # --prompt-file: far beyond any model's context


def policy_or_artifact(path: str, reporter: Reporter):
    """(policy, artifact directory or None, its verified manifest or None) from a .kvp file or an
    artifact directory; None if it cannot be used (reported)."""
    from kvpolicy.compiler.artifact import ArtifactError, is_artifact, verify
    from kvpolicy.lang.ir import policy_from_json
    from kvpolicy.lang.lower import check_file
    if is_artifact(path):
        try:
            manifest = verify(path)
        except ArtifactError as exc:
            reporter.fail(str(exc))
            return None
        return policy_from_json(manifest["policy"]["ir"]), path, manifest
    result = check_file(path)
    reporter.show(result.diagnostics)
    return None if result.policy is None else (result.policy, None, None)


def run_arguments_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with `kvpolicy run`'s options on their own (before any model is read)."""
    problems = []
    given = [name for name, value in (("--prompt", args.prompt),
                                      ("--prompt-file", args.prompt_file),
                                      ("--needle", args.needle)) if value is not None]
    if len(given) > 1:
        problems.append(f"{' and '.join(given)} both give the prompt; use one")
    elif not given:
        problems.append("give a prompt with --prompt TEXT, --prompt-file FILE or --needle TOKENS")
    if args.needle is not None and args.needle < 1:
        problems.append(f"--needle {args.needle}: a needle prompt needs at least 1 token")
    if args.depth is not None:
        if not (0.0 <= args.depth <= 1.0):  # also NaN
            problems.append(f"--depth {args.depth:g} is outside [0, 1] (0 puts the needle at "
                            "the start of the haystack, 1 at its end)")
        elif args.needle is None:
            problems.append("--depth places the needle of --needle; it has no effect on "
                            "--prompt or --prompt-file")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens}: generate at least 1 token")
    return problems


def cmd_run(args: argparse.Namespace) -> int:
    reporter = Reporter()
    for problem in run_arguments_problems(args):
        reporter.fail(problem)
    if reporter.errors:
        return EXIT_ERROR
    chosen = policy_or_artifact(args.file, reporter)
    if chosen is None:
        return EXIT_ERROR
    policy, artifact, manifest = chosen
    prompt = args.prompt
    if args.prompt_file is not None:
        from kvpolicy.files import FileProblem, read_limited, shown_path
        try:
            prompt = read_limited(args.prompt_file, MAX_PROMPT_BYTES).decode("utf-8")
        except FileProblem as exc:
            reason = "larger than 16 MiB" if exc.too_large else exc.reason
            reporter.fail(f"cannot read the prompt file {shown_path(args.prompt_file)}: {reason}")
            return EXIT_ERROR
        except UnicodeDecodeError:
            reporter.fail(f"the prompt file {shown_path(args.prompt_file)} is not UTF-8 text")
            return EXIT_ERROR
        if not prompt.strip():
            reporter.fail(f"the prompt file {shown_path(args.prompt_file)} is empty")
            return EXIT_ERROR
    elif args.prompt is not None and not prompt.strip():
        reporter.fail("--prompt is empty")
        return EXIT_ERROR
    try:
        from kvpolicy.eval.haystack import DataMissing, needle_sample
        from kvpolicy.engines.hf import ModelLoadError, generate, load_model
        from kvpolicy.engines.hf.model import model_directory
    except ImportError as exc:
        return reporter.needs_extras("run", exc)
    from kvpolicy.compiler.artifact import ArtifactError, check_manifest_model
    from kvpolicy.models import ModelError, load_config
    from kvpolicy.prepare import compiled_fields, resolve
    fields = compiled_fields(args.backend, _cuda())
    name = args.model or f"{DEFAULT_MODEL} (embedded default)"
    try:  # the model's shape first: cheap, and enough to refuse what cannot run on it
        directory = model_directory(args.model)
        shape = replace(load_config(directory / "config.json"),
                        name=args.model or DEFAULT_MODEL, kv_dtype=args.cache_dtype)
        if artifact is not None:
            check_manifest_model(artifact, manifest, shape, fields)
    except (ModelLoadError, ModelError, ArtifactError) as exc:
        reporter.fail(str(exc))
        return EXIT_ERROR
    try:  # a policy that does not fit the model is refused before the weights are read
        from kvpolicy.plan.planner import make_plan
        make_plan(policy, shape, shape.max_context)
    except PolicyError as exc:
        reporter.show(exc.diagnostics)
        return EXIT_ERROR
    if args.needle is not None and args.needle > shape.max_context:
        reporter.fail(f"--needle {args.needle:,} is beyond the model's context of "
                      f"{shape.max_context:,} tokens ({name})")
        return EXIT_ERROR
    if args.max_new_tokens > shape.max_context:
        reporter.fail(f"--max-new-tokens {args.max_new_tokens:,} is beyond the model's context "
                      f"of {shape.max_context:,} tokens ({name})")
        return EXIT_ERROR
    compiled = None
    try:
        model, tokenizer = load_model(directory)
        run_shape = replace(_shape_of(model, args.cache_dtype), name=shape.name)
        if artifact is not None:
            _, compiled = resolve(artifact, run_shape, fields)
        needle = None
        if args.needle is not None:
            needle = needle_sample(tokenizer, args.needle, _depth(args), seed=0)
            prompt = needle.context + "\n" + needle.question
    except ImportError as exc:
        return reporter.needs_extras("run", exc)
    except (ModelLoadError, DataMissing, ArtifactError) as exc:
        reporter.fail(str(exc))
        return EXIT_ERROR
    from kvpolicy.engines.hf.generation import encode
    ids = encode(tokenizer, prompt, chat=not args.raw)
    if ids.shape[1] + args.max_new_tokens > shape.max_context:
        reporter.fail(f"the prompt has {ids.shape[1]:,} tokens; with --max-new-tokens "
                      f"{args.max_new_tokens} that is beyond the model's context of "
                      f"{shape.max_context:,} tokens ({name})")
        return EXIT_ERROR
    _note_model_difference(policy, run_shape, name)
    runs = []
    try:
        runs.append(generate(model, tokenizer, ids, compiled or policy, args.max_new_tokens,
                             cache_dtype=args.cache_dtype, backend=args.backend))
        if args.baseline:
            from kvpolicy.lang.ir import uncompressed
            runs.append(generate(model, tokenizer, ids, uncompressed(), args.max_new_tokens,
                                 cache_dtype=args.cache_dtype, backend="torch"))
    except (PolicyError, ArtifactError) as exc:
        if isinstance(exc, PolicyError):
            reporter.show(exc.diagnostics)
        else:
            reporter.fail(str(exc))
        return EXIT_ERROR
    reporter.show(runs[0].plan.warnings)
    _print_run(runs[0], policy.name, name, args, needle, device_name(model))
    if args.baseline:
        print()
        _print_run(runs[1], "baseline (uncompressed, 16-bit)", name, args, needle,
                   device_name(model))
    return EXIT_OK


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _depth(args) -> float:
    return 0.5 if args.depth is None else args.depth


def _shape_of(model, cache_dtype: str):
    from kvpolicy.engines.hf.cache import model_shape
    return model_shape(model, cache_dtype)


def _note_model_difference(policy, shape, name: str) -> None:
    """The policy names a model (`model "…"`): say so when it runs on another shape."""
    if not policy.model:
        return
    from kvpolicy.compiler.artifact import MODEL_FIELDS, model_mismatches
    from kvpolicy.models import ModelError, resolve_model
    try:
        written = resolve_model(policy.model, relative_to=Path(policy.path or ".").parent)
        differs = bool(model_mismatches(written, shape, fields=MODEL_FIELDS))
    except ModelError:
        differs = True
    if differs:
        print(printable(f"kvpolicy: the policy is written for {policy.model}; running it on "
                        f"{name}"), file=sys.stderr)


def relative_size(ratio: float) -> str:
    """'3.28x smaller than', 'the same size as', '1.05x larger than' (to two decimals)."""
    if f"{ratio:.2f}" == "1.00":
        return "the same size as"
    if ratio > 1:
        return f"{ratio:.2f}x smaller than"
    return f"{1 / ratio:.2f}x larger than"


def _print_run(run, label: str, name: str, args, needle, device: str) -> None:
    plan = run.plan
    measured = run.measured_bytes_after_compress
    final = run.cache.nbytes()["total"]
    total_tokens = run.prompt_tokens + len(run.token_ids)
    shape = run.cache.shape
    baseline_final = (shape.baseline_bytes_per_token * total_tokens
                      + shape.window_bytes(total_tokens))
    print(run.text)
    print()
    if needle is not None:
        found = "found" if needle.answer in run.text else "NOT found"
        print(f"needle at depth {needle.depth:g}: expected {needle.answer} ({found})")
    print(f"model {name}; policy {label}; cache dtype {args.cache_dtype}; attention backend "
          f"{run.cache.backend} on {device}")
    print(f"after the prompt ({run.prompt_tokens:,} tokens): measured {measured:,} bytes, "
          f"planned {plan.compressed_bytes:,} bytes, measured/planned "
          f"{measured / plan.compressed_bytes:.4f}; "
          f"{relative_size(plan.baseline_bytes / measured)} the uncompressed cache "
          f"({plan.baseline_bytes:,} bytes)")
    print(f"at the end ({total_tokens:,} tokens): measured {final:,} bytes, "
          f"{relative_size(baseline_final / final)} uncompressed; generated tokens are kept "
          "(packed once a whole block leaves the window)")
    passes = (f"reconstruction passes {run.timings['reconstruct']:.2f} s, "
              if "reconstruct" in run.timings else "")
    print(f"measured time: prefill {run.timings['prefill']:.2f} s, {passes}compress "
          f"{run.timings['compress']:.2f} s, decode {len(run.token_ids)} tokens "
          f"{run.timings['decode']:.2f} s")


QUICK = {"tasks": "niah_single,niah_multikey,vt,squad,ppl", "contexts": "3000", "samples": 3}


def cmd_eval(args: argparse.Namespace) -> int:
    import hashlib
    reporter = Reporter()
    try:
        from kvpolicy.eval.prompts import EvalPolicy, baseline_policy
        from kvpolicy.eval.runner import EvalConfig, fit_problems, run
        from kvpolicy.eval.tasks import TASKS
        from kvpolicy.engines.hf import ModelLoadError
    except ImportError as exc:
        return reporter.needs_extras("eval", exc)
    if args.tasks is not None and not args.tasks.strip():
        reporter.fail("--tasks is empty; tasks: " + ", ".join(TASKS))
        return EXIT_ERROR
    tasks = (args.tasks or (QUICK["tasks"] if args.quick else ",".join(TASKS))).split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        reporter.fail(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
        return EXIT_ERROR
    served = args.engine != "hf"
    if served:
        if args.tasks is None:
            tasks = [t for t in tasks if t != "ppl"]
        elif "ppl" in tasks:
            reporter.fail(f"--engine {args.engine} scores generation tasks only, not ppl")
            return EXIT_ERROR
        if args.ablation:
            reporter.fail("--ablation runs on --engine hf only")
            return EXIT_ERROR
        if not 1 <= args.block_size <= MAX_BLOCK_SIZE:
            reporter.fail(f"--block-size {args.block_size}: between 1 and {MAX_BLOCK_SIZE:,} "
                          "tokens")
            return EXIT_ERROR
        if args.engine == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError:
                reporter.fail("--engine vllm needs vLLM (pip install 'kvpolicy[vllm]')")
                return EXIT_ERROR
        args.question_aware = True  # a served request's prompt holds its question
    try:
        contexts = [parse_context(c) for c in (
            args.contexts if args.contexts is not None else
            QUICK["contexts"] if args.quick else "2048,4096").split(",")]
    except argparse.ArgumentTypeError as exc:
        reporter.fail(str(exc))
        return EXIT_ERROR
    samples = args.samples if args.samples is not None else (
        QUICK["samples"] if args.quick else 25)
    if samples < 1:
        reporter.fail(f"--samples {samples}: evaluate at least 1 sample per task and context")
        return EXIT_ERROR
    from kvpolicy.compiler.artifact import MODEL_FIELDS, ArtifactError, check_manifest_model
    from kvpolicy.engines.hf.model import model_directory
    from kvpolicy.models import ModelError, load_config
    try:  # the model's shape before its weights: what does not fit is refused at once
        directory = model_directory(args.model)
        shape = load_config(directory / "config.json")
    except (ModelLoadError, ModelError) as exc:
        reporter.fail(str(exc))
        return EXIT_ERROR
    shape = replace(shape, name=args.model or DEFAULT_MODEL, kv_dtype=args.cache_dtype)
    beyond = [c for c in contexts if c > shape.max_context]
    if beyond:
        reporter.fail(f"--contexts {','.join(map(str, beyond))}: beyond the model's context of "
                      f"{shape.max_context:,} tokens")
        return EXIT_ERROR
    entries = [baseline_policy()]
    for path in args.files:
        chosen = policy_or_artifact(path, reporter)
        if chosen is None:
            return EXIT_ERROR
        policy, artifact, manifest = chosen
        if artifact is not None:
            try:  # eval attends with PyTorch: the artifact's policy, for this model
                check_manifest_model(artifact, manifest, shape, MODEL_FIELDS)
            except ArtifactError as exc:
                reporter.fail(str(exc))
                return EXIT_ERROR
        entries.append(EvalPolicy(policy.name, policy, str(path)))
    problems = fit_problems(entries, shape, contexts)
    if problems:
        reporter.show(problems)
        return EXIT_ERROR
    if served:
        from kvpolicy.plan.pages import UnsupportedConfiguration, page_format
        for entry in entries[1:]:
            try:
                page_format(entry.policy, shape, args.block_size)
            except UnsupportedConfiguration as exc:
                reporter.fail(f"{entry.source}: " + "; ".join(exc.reasons))
                return EXIT_ERROR
    if args.out is not None:
        problem = unwritable_directory(Path(args.out))
        if problem:
            reporter.fail(problem)
            return EXIT_ERROR
    loaded = loaded_model(directory, reporter)
    if loaded is None:
        return EXIT_ERROR
    model, tokenizer = loaded
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
                      args.question_aware, args.cache_dtype, args.model]
                     + ([args.engine, args.block_size] if served else []), sort_keys=True)
    out = Path(args.out) if args.out else Path("results") / (
        "eval-" + hashlib.sha256(key.encode()).hexdigest()[:10])
    config = EvalConfig(policies=entries, tasks=tasks, contexts=contexts, samples=samples,
                        seed=args.seed, question_aware=args.question_aware,
                        cache_dtype=args.cache_dtype, model=args.model, out=out, extra=extra,
                        engine=args.engine, block_size=args.block_size)
    if args.ablation:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in extra["ablation"]["policies"].items():
            (out / f"{name}.kvp").write_text(text, encoding="utf-8")
    print(f"kvpolicy eval: {len(entries)} configurations x {len(tasks)} tasks x "
          f"{len(contexts)} contexts x {samples} samples -> {out} "
          f"({'question-aware' if args.question_aware else 'question-agnostic'}; engine "
          f"{args.engine}; " + ("each prompt in one step; " if served else "")
          + "rerun the same command to resume)", file=sys.stderr)
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
