"""Importing rendered kernel files. `@triton.jit` needs real source files (it reads them with
inspect), so generated code is always written to disk and imported from there."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def import_kernel_file(path: str | os.PathLike[str]) -> ModuleType:
    """Imports a generated kernel file under a name derived from its path and contents."""
    path = Path(path).resolve()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    name = f"kvpolicy_kernels_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    writes_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # an artifact directory stays exactly as compiled
    try:
        spec.loader.exec_module(module)
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
