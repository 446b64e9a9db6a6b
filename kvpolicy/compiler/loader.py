"""Importing rendered kernel files. `@triton.jit` needs real source files (it reads them with
inspect), so generated code is always written to disk and imported from there; the module's code
is compiled from bytes the caller has verified, never from a `__pycache__`."""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def import_kernel_file(path: str | os.PathLike[str]) -> ModuleType:
    """Imports a generated kernel file (unverified: tests and benchmarks that render their own;
    artifacts go through `kvpolicy.load`)."""
    return import_kernel_source(path, Path(path).read_bytes())


class _VerifiedSource(importlib.abc.SourceLoader):
    """Loads a module from bytes already read and verified, never from a bytecode cache."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data = path, data

    def get_filename(self, fullname: str) -> str:
        return str(self.path)

    def get_data(self, path) -> bytes:
        return self.data

    def path_stats(self, path):
        raise OSError("no bytecode for verified sources")  # makes SourceLoader skip the cache


def import_kernel_source(path: str | os.PathLike[str], data: bytes) -> ModuleType:
    """Imports kernel source `data` (the verified bytes of the file at `path`, which @triton.jit
    reads again for its source) under a name derived from the bytes."""
    path = Path(path).resolve()
    name = f"kvpolicy_kernels_{hashlib.sha256(data).hexdigest()[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    loader = _VerifiedSource(path, data)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    writes_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # an artifact directory stays exactly as compiled
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module


def render_and_import(spec, directory: str | os.PathLike[str]) -> ModuleType:
    """Renders `spec` into `directory/<uri>.py` and imports it (tests and benchmarks)."""
    from kvpolicy.compiler.codegen import render
    path = Path(directory) / f"{spec.uri}.py"
    path.write_text(render(spec), encoding="utf-8")
    return import_kernel_file(path)
