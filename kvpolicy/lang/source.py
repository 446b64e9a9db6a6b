"""Reading a policy file: bounded in size, UTF-8, never binary.

Any input must end in a located error or a policy within a second, so the text is checked before
the parser sees it: at most `MAX_POLICY_BYTES`, no NUL bytes, valid UTF-8 (the first bad byte is
reported with its line and column).
"""

from __future__ import annotations

import os

from kvpolicy.diagnostics import Diagnostic, PolicyError, Source, Span
from kvpolicy.files import FileProblem, human_size, read_limited, shown_path

# A policy is a few dozen lines; 64 KiB leaves room for long override lists while bounding the
# parser's time (~4 µs per byte measured for Lark's LALR parser on this grammar).
MAX_POLICY_BYTES = 64 * 1024


def read_source(path: str | os.PathLike[str], shown_as: str | None = None) -> Source:
    shown = shown_as if shown_as is not None else shown_path(path)
    try:
        data = read_limited(path, MAX_POLICY_BYTES)
    except FileProblem as exc:
        if exc.too_large is not None:
            message = (f"file is {exc.too_large:,} bytes ({human_size(exc.too_large)}); a policy "
                       f"file may be at most {MAX_POLICY_BYTES:,} bytes "
                       f"({MAX_POLICY_BYTES // 1024} KiB)")
            raise PolicyError([Diagnostic("error", message,
                                          Span.of_file(Source(shown, "")))]) from None
        if exc.reason.startswith("is a directory"):
            message = "is a directory, not a policy file"
        else:
            message = f"cannot read policy file: {exc.reason}"
        raise PolicyError([Diagnostic("error", message, path=shown)]) from None
    return decode_source(shown, data)


def decode_source(shown: str, data: bytes) -> Source:
    """Checks raw bytes and returns them as a `Source`; `PolicyError` if they are not text."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    nul = data.find(b"\x00")
    if nul >= 0:
        _refuse_at(shown, data, nul, "file is binary (NUL byte); a policy file is UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _refuse_at(shown, data, exc.start,
                   f"file is not UTF-8 text (byte 0x{data[exc.start]:02x})")
    return Source(shown, text)


def _refuse_at(shown: str, data: bytes, offset: int, message: str):
    before = data[:offset]
    line = before.count(b"\n") + 1
    line_start = before.rfind(b"\n") + 1
    column = len(before[line_start:].decode("utf-8", errors="replace")) + 1
    # Show the line with undecodable bytes replaced so the caret has something to point at.
    shown_text = data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    source = Source(shown, shown_text)
    raise PolicyError([Diagnostic("error", message, Span.point(source, line, column))])
