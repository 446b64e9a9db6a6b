"""A run's measurements as lines of a JSONL file, written as they are made, so that an
interrupted run resumes where it stopped: `kvpolicy eval`'s `samples.jsonl` (runner.py for the
whole-prompt engine, served.py for the served ones) and `kvpolicy tune`'s `lines.jsonl`
(kvpolicy/tune/search.py).

A run starts with `resume_lines` (what an earlier run wrote, the file rewritten to hold just
that), skips what those lines measured, writes each new line with `append_line` as soon as it is
made, and reads the file again with `load_lines` when it is done. Each line is `json.dumps(line)`
(default separators, the dict's key order) and a newline, UTF-8: what every earlier run wrote."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def load_lines(path: Path) -> list[dict]:
    """The lines of `path` up to the first that does not parse (a line cut short by an
    interruption: it and whatever follows it are redone); [] when there is no file."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            break  # a line cut short by an interruption: redo it
    return lines


def resume_lines(path: Path, keep: Callable[[dict], bool] | None = None) -> list[dict]:
    """The lines an earlier run wrote to `path` (`load_lines`) that `keep` accepts (all when it
    is None), and `path` rewritten to hold just those (created, empty, when it is missing): a
    half-written last line is dropped from the file, so the lines appended next follow whole
    ones."""
    lines = [line for line in load_lines(path) if keep is None or keep(line)]
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    return lines


def append_line(path: Path, line: dict) -> None:
    """Appends one line to `path` and closes the file: on disk as soon as it is made."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")
