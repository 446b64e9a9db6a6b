"""Located diagnostics: where a problem is, what it is, and how it is printed.

Every error kvpolicy reports about a policy points at the text that caused it::

    policies/x.kvp:12:9: error: unsupported key bit-width 'int5'; use int2, int3, int4, int8 or fp16
        keys int5 group 32
             ^~~~

Checks collect diagnostics instead of raising at the first problem; `PolicyError` carries all of
them at once.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Literal

Severity = Literal["error", "warning", "note"]

# A diagnostic echoes the user's text; it must never carry raw control characters to a terminal
# (an ESC sequence in a comment could clear it) nor a line of unbounded length.
MAX_EXCERPT = 120  # characters of a source line shown around the caret
MAX_WORD = 40  # characters of a user's word quoted in a message
MAX_MESSAGE = 600  # characters of one message line


def _invisible(char: str) -> bool:
    """Control and format characters (C0/C1 controls, bidi overrides, zero-width joiners)."""
    return unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")


def printable(text: str, lines: bool = False) -> str:
    """`text` with every control or format character written as an escape (`\\x1b`,
    `\\u202e`) and capped at MAX_MESSAGE characters: safe to print on any terminal.
    `lines`: keep the text's line breaks (each line is made safe and capped on its own)."""
    if lines:
        return "\n".join(printable(line) for line in text.split("\n"))
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE - 1] + "…"
    if not any(_invisible(c) for c in text):
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if _invisible(c) else c
                   for c in text)


def elided(text: str, limit: int = 160) -> str:
    """`text` with its middle replaced by '…' past `limit` characters (paths in messages)."""
    if len(text) <= limit:
        return text
    keep = limit // 2 - 1
    return text[:keep] + "…" + text[-keep:]


def quoted(word: str) -> str:
    """A user's word for a message: escaped like `printable`, shortened past MAX_WORD."""
    if len(word) > MAX_WORD:
        word = word[:MAX_WORD - 4] + "…"
    return printable(word)


@dataclass(frozen=True)
class Source:
    """The text of one policy file and the path it is shown under."""

    path: str
    text: str = field(repr=False)

    @functools.cached_property
    def _lines(self) -> list[str]:
        return self.text.split("\n")  # once per source, not once per diagnostic

    def line_text(self, line: int) -> str:
        if 1 <= line <= len(self._lines):
            return self._lines[line - 1].rstrip("\r")
        return ""


@dataclass(frozen=True)
class Span:
    """A 1-based, end-exclusive range of text in a `Source` (Lark's convention)."""

    source: Source = field(compare=False, repr=False, hash=False)
    line: int
    column: int
    end_line: int
    end_column: int

    @property
    def path(self) -> str:
        return self.source.path

    def __str__(self) -> str:
        return f"{elided(self.source.path)}:{self.line}:{self.column}"

    @classmethod
    def point(cls, source: Source, line: int, column: int) -> "Span":
        return cls(source, line, column, line, column + 1)

    @classmethod
    def of_file(cls, source: Source) -> "Span":
        return cls.point(source, 1, 1)


@dataclass(frozen=True)
class Diagnostic:
    severity: Severity
    message: str
    span: Span | None = None
    notes: tuple["Diagnostic", ...] = ()
    path: str | None = None  # for problems with a file but no position (cannot read it)

    def render(self) -> str:
        lines = [printable(f"{self._where()}{self.severity}: {self.message}")]
        if self.span is not None:
            lines.extend(_excerpt(self.span))
        for note in self.notes:
            lines.append(note.render())
        return "\n".join(lines)

    def _where(self) -> str:
        if self.span is not None:
            return f"{self.span}: "
        if self.path is not None:
            return f"{elided(self.path)}: "
        return ""


def _excerpt(span: Span) -> list[str]:
    text = span.source.line_text(span.line)
    if not text.strip():
        return []
    start = max(span.column - 1, 0)
    if span.end_line == span.line:
        width = max(span.end_column - span.column, 1)
    else:
        width = max(len(text) - start, 1)
    width = min(width, max(len(text) - start, 1), MAX_EXCERPT // 2)
    if len(text) > MAX_EXCERPT:  # a long line: a window around the caret, cut ends marked
        first = max(0, min(start - MAX_EXCERPT // 3, len(text) - MAX_EXCERPT))
        last = first + MAX_EXCERPT
        text = ("…" if first else "") + text[first:last] + ("…" if last < len(text) else "")
        start = start - first + (1 if first else 0)
    # One character shown per character of the line, so that the caret lines up with the
    # column: tabs as spaces, control and format characters as U+FFFD.
    shown = "".join(" " if c == "\t" else "\ufffd" if _invisible(c) else c for c in text)
    return ["    " + shown, "    " + " " * start + "^" + "~" * (width - 1)]


class PolicyError(Exception):
    """A policy (or its use with a model) has errors; `diagnostics` lists every one of them."""

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        self.diagnostics = tuple(diagnostics)
        super().__init__(self.render())

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


MAX_DIAGNOSTICS = 100  # per check: past this, one more error says the rest were not listed


class Diagnostics:
    """Collects diagnostics during a check, in the order they are found (at most
    MAX_DIAGNOSTICS: a file of thousands of repeated mistakes is reported in bounded time)."""

    def __init__(self) -> None:
        self.items: list[Diagnostic] = []
        self.dropped = 0

    def _add(self, diagnostic: Diagnostic) -> None:
        if len(self.items) < MAX_DIAGNOSTICS:
            self.items.append(diagnostic)
            return
        if not self.dropped:
            self.items.append(Diagnostic(
                "error", f"too many problems: only the first {MAX_DIAGNOSTICS} are listed; fix "
                "these and check again", diagnostic.span, path=diagnostic.path))
        self.dropped += 1

    def error(self, message: str, span: Span | None, *notes: Diagnostic) -> None:
        self._add(Diagnostic("error", message, span, tuple(notes)))

    def warning(self, message: str, span: Span | None, *notes: Diagnostic) -> None:
        self._add(Diagnostic("warning", message, span, tuple(notes)))

    def extend(self, diagnostics: Iterable[Diagnostic]) -> None:
        for diagnostic in diagnostics:
            self._add(diagnostic)

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.items)

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.items if d.severity == "warning")

    def raise_if_errors(self) -> None:
        if self.has_errors:
            raise PolicyError(self.items)


def note(message: str, span: Span | None = None) -> Diagnostic:
    return Diagnostic("note", message, span)
