"""The house rules of docs/architecture.md, read from the code: an import graph built from every
`import` statement (function-level ones included) of the package, bench, examples and tests."""

from __future__ import annotations

import ast
import sys

import pytest

from conftest import ROOT

PACKAGE = ROOT / "kvpolicy"
FRONT_END = ("kvpolicy.lang", "kvpolicy.plan", "kvpolicy.format", "kvpolicy.models",
             "kvpolicy.diagnostics", "kvpolicy.files", "kvpolicy.heads")
HEAVY = ("torch", "triton", "transformers", "vllm", "numpy")
ENGINES = ("kvpolicy.engines.hf", "kvpolicy.engines.vllm")


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path) -> list[tuple[str, int]]:
    """(imported module or `module.name`, line) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module != "kvpolicy":  # `from kvpolicy import x` names x, not the face
                found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def graph(folder) -> dict[str, list[tuple[str, int]]]:
    return {module_name(p): imports(p) for p in sorted(folder.rglob("*.py"))}


PACKAGE_GRAPH = graph(PACKAGE)


def violations(sources, targets) -> list[str]:
    return [f"{source} imports {target} (line {line})"
            for source, edges in PACKAGE_GRAPH.items() if within(source, sources)
            for target, line in edges if within(target, targets)]


def test_the_graph_sees_the_package():
    assert len(PACKAGE_GRAPH) > 40 and "kvpolicy.plan.planner" in PACKAGE_GRAPH
    assert ("kvpolicy.models", 10) not in PACKAGE_GRAPH["kvpolicy.plan.planner"]
    assert any(t == "kvpolicy.lang.ir.Policy" for t, _ in PACKAGE_GRAPH["kvpolicy.plan.planner"])


def test_the_front_end_never_imports_torch():
    assert violations(FRONT_END, HEAVY) == []


def test_the_front_end_runs_without_torch_loaded():
    """Belt and braces: importing and running the front end loads no heavy module."""
    import subprocess
    code = ("import sys; from kvpolicy import load_policy, make_plan, resolve_model; "
            f"p = load_policy({str(ROOT / 'policies' / 'aggressive.kvp')!r}); "
            "make_plan(p, resolve_model('qwen2.5-7b'), 4096); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_plan_never_imports_the_lowering_pass():
    assert violations(("kvpolicy.plan",), ("kvpolicy.lang.lower", "kvpolicy.lang.parser")) == []


def test_no_stage_imports_the_package_face():
    """`kvpolicy/__init__.py` is the face users import; stages take what they need from the
    module that owns it (the version from kvpolicy._version)."""
    submodules = {p.stem for p in PACKAGE.iterdir() if p.stem != "__init__"}
    bad = [f"{source} imports {target} (line {line})"
           for source, edges in PACKAGE_GRAPH.items() if source != "kvpolicy"
           for target, line in edges
           if target == "kvpolicy" or (target.count(".") == 1 and target.startswith("kvpolicy.")
                                       and target.split(".")[1] not in submodules)]
    assert bad == []


def test_engines_never_import_each_other():
    assert violations((ENGINES[0],), (ENGINES[1],)) == []
    assert violations((ENGINES[1],), (ENGINES[0],)) == []


def test_bench_and_examples_never_import_tests():
    bad = []
    for folder in (ROOT / "bench", ROOT / "examples"):
        for path in sorted(folder.rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if "tests" in text and ('/ "tests"' in text or "tests." in text):
                bad.append(str(path.relative_to(ROOT)))
            test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")}
            bad += [f"{path.relative_to(ROOT)} imports {t}" for t, _ in imports(path)
                    if t.split(".")[0] in test_modules]
    assert bad == []


def test_tests_drive_no_hidden_mode_of_an_example():
    """An example is for reading and running as documented; tests run what its --help shows."""
    bad = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.name == "test_house_rules.py":
            continue
        text = path.read_text(encoding="utf-8")
        if "examples" in text and "--worker" in text:
            bad.append(path.name)
    assert bad == []


@pytest.mark.parametrize("name", ["_TORCH_NAMES", "SUPPORTED_BITS", "REGIONS"])
def test_dead_names_stay_deleted(name):
    for path in PACKAGE.rglob("*.py"):
        assert name not in path.read_text(encoding="utf-8"), path


def test_the_store_is_engine_independent():
    """kvpolicy.store is what both engines run: it imports neither of them, nor their
    frameworks."""
    assert PACKAGE_GRAPH.get("kvpolicy.store.paged")
    assert violations(("kvpolicy.store",), ENGINES + ("transformers", "vllm")) == []
