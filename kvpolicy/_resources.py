"""Where the grammar and the kernel templates live, in a checkout or in an installed wheel.

The design card keeps `grammar/` and `codegen/` at the top of the repository. The wheel ships them
inside the package as `kvpolicy/_data/grammar` and `kvpolicy/_data/codegen` (pyproject.toml,
`force-include`); an editable install or a checkout finds them beside the package.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The directory `name` ("grammar" or "codegen"), wherever this copy of kvpolicy keeps it."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"kvpolicy's {name}/ directory is missing from {_PACKAGE}; "
                            "reinstall kvpolicy")


def grammar_path() -> Path:
    return data_dir("grammar") / "kvp.lark"
