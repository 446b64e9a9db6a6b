"""Shared by the `kvpolicy` subcommands: reporting, picking a model, small helpers."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from kvpolicy.diagnostics import Diagnostic, PolicyError, printable

EXIT_OK, EXIT_ERROR, EXIT_INTERNAL = 0, 1, 70
MAX_TOKENS = 2**31 - 1  # kvpolicy.lang.ir.MAX_TOKENS, without importing the front end
MAX_BLOCK_SIZE = 4096  # tokens per block of a paged engine, as --block-size takes it


class Reporter:
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
        print(printable(f"kvpolicy: error: {message}", lines=True), file=sys.stderr)

    def failed(self, problems: Sequence[str]) -> bool:
        """Reports each problem; whether there were any."""
        for problem in problems:
            self.fail(problem)
        return bool(problems)

    def needs_extras(self, command: str, exc: ImportError) -> int:
        """EXIT_ERROR, after saying that `kvpolicy command` needs the evaluation extras."""
        self.fail(f"kvpolicy {command} needs the evaluation extras ({exc}); "
                  "pip install 'kvpolicy[eval]'")
        return EXIT_ERROR

    def summary(self, what: str) -> str:
        def count(n: int, word: str) -> str:
            return f"{n} {word}{'' if n == 1 else 's'}"
        return f"{what}: {count(self.errors, 'error')}, {count(self.warnings, 'warning')}"


# ---- model selection ------------------------------------------------------------------------


def model_for(policy, option: str | None, reporter: Reporter, quiet_default: bool = False):
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


def plan_or_report(policy, model, context: int | None, reporter: Reporter):
    from kvpolicy.plan.planner import make_plan
    try:
        plan = make_plan(policy, model, context or model.max_context)
    except PolicyError as exc:
        reporter.show(exc.diagnostics)
        return None
    reporter.show(plan.warnings)
    return plan


# ---- commands -------------------------------------------------------------------------------


def policy_and_model(args: argparse.Namespace, reporter: Reporter):
    """The checked policy in args.file and the model to use, or None (reported)."""
    from kvpolicy.lang.lower import check_file
    result = check_file(args.file)
    reporter.show(result.diagnostics)
    if result.policy is None:
        return None
    model = model_for(result.policy, args.model, reporter)
    return None if model is None else (result.policy, model)


def write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def unwritable_directory(path: Path) -> str | None:
    """Why results cannot be written into directory `path` (created if missing), or None."""
    from kvpolicy.files import reason, shown_path
    shown = shown_path(path)
    try:
        if path.exists() and not path.is_dir():
            return f"cannot write results to {shown}: it exists and is a file, not a directory"
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            return f"cannot write results to {shown}: {shown_path(existing)} is a file"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"cannot write results to {shown}: permission denied"
    except OSError as exc:
        return f"cannot write results to {shown}: {reason(exc)}"
    return None


# ---- argument parsing -----------------------------------------------------------------------


def loaded_model(directory: Path, reporter: Reporter):
    """(model, tokenizer) from a model directory, or None after reporting why it cannot load."""
    from kvpolicy.engines.hf.model import ModelLoadError, load_model
    try:
        return load_model(directory)
    except ModelLoadError as exc:
        reporter.fail(str(exc))
        return None


def parse_context(text: str) -> int:
    """Tokens: `4096`, `4,096`, `4_096`, `4k` (4,096), or a whole number written like the
    language's numbers (`4e3`)."""
    cleaned = text.strip().replace("_", "").replace(",", "")
    try:
        if cleaned.lower().endswith("k") and cleaned[:-1].isdigit():
            value = int(cleaned[:-1]) * 1024
        elif cleaned.lstrip("-").isdigit() and cleaned.count("-") <= 1:
            digits = cleaned.lstrip("-")
            value = int(digits) if len(digits) <= 12 else MAX_TOKENS + 1  # beyond any limit
            value = -value if cleaned.startswith("-") else value
        else:
            number = float(cleaned)
            if not number.is_integer():
                raise ValueError(cleaned)
            value = int(number) if abs(number) <= MAX_TOKENS + 1 else MAX_TOKENS + 1
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a number of tokens: {printable(repr(text[:40]))}"
                                         ) from None
    if value < 1:
        raise argparse.ArgumentTypeError("context must be at least 1 token")
    if value > MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"context must be at most {MAX_TOKENS:,} tokens "
                                         "(token positions are int32)")
    return value
