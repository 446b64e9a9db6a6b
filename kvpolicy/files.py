"""Reading files a user names (policies, model configs, prompts, manifests): bounded and safe.

Whatever path is given, reading it ends quickly with its bytes or a one-line reason: a directory,
a missing file, a name too long, a symlink loop, a device, a file beyond the size limit. A named
pipe is read without waiting for a writer that never comes (opened non-blocking: with no writer
it reads as empty), so `kvpolicy check <(cat a.kvp)` works and `kvpolicy check some.fifo` cannot
hang. Reasons never repeat the path (the caller names it once, shortened by `shown_path`).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from kvpolicy.diagnostics import elided, printable

MAX_SHOWN_PATH = 160  # characters of a path repeated in a message


def cache_root() -> Path:
    """Where kvpolicy keeps what it builds for itself (converted models, compiled policies,
    CPU kernels): $KVPOLICY_CACHE, else ~/.cache/kvpolicy."""
    return Path(os.environ.get("KVPOLICY_CACHE") or Path.home() / ".cache" / "kvpolicy")


class FileProblem(OSError):
    """A file that cannot be read as asked; str() is the reason, without the path."""

    def __init__(self, reason: str, too_large: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large  # the file's size, when that is the reason

    def __str__(self) -> str:
        return self.reason


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path for a message: control characters escaped, its middle elided past
    MAX_SHOWN_PATH characters."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return printable(elided(text, MAX_SHOWN_PATH))


def reason(exc: OSError) -> str:
    """A short reason for an OSError, without the path it names."""
    if isinstance(exc, FileProblem):
        return exc.reason
    if exc.errno == errno.ENOENT:
        return "no such file"
    if exc.errno == errno.ENAMETOOLONG:
        return "the file name is too long"
    if exc.errno == errno.ELOOP:
        return "too many levels of symbolic links (a link loop?)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOTDIR:
        return "a part of the path is not a directory"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return exc.strerror or type(exc).__name__


def read_limited(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of the regular file (or pipe) at `path`, at most `limit` of them; raises
    FileProblem with a reason (too large: `too_large` holds the size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as exc:  # ValueError: a NUL character in the path
        raise FileProblem(reason(exc) if isinstance(exc, OSError) else "not a valid path") \
            from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise FileProblem("is a directory, not a file")
        if stat.S_ISFIFO(info.st_mode):
            os.set_blocking(fd, True)  # a writer that exists now is waited for; none: empty
        elif not stat.S_ISREG(info.st_mode):
            raise FileProblem("is a device or socket, not a file")
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise FileProblem("too large", too_large=info.st_size)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileProblem("too large", too_large=max(size, info.st_size))
        return b"".join(chunks)
    except FileProblem:
        raise
    except OSError as exc:
        raise FileProblem(reason(exc)) from None
    finally:
        os.close(fd)


def human_size(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MiB"
    return f"{size / 1024:.1f} KiB"
