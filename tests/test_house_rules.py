"""The house rules of docs/architecture.md, read from the code: an import graph built from every
`import` statement (function-level ones included) of the package, bench, examples and tests."""

from __future__ import annotations

import ast
import sys

import pytest

from conftest import ROOT

PACKAGE = ROOT / "kvpolicy"
FRONT_END = ("kvpolicy.lang", "kvpolicy.plan", "kvpolicy.format", "kvpolicy.models",
             "kvpolicy.diagnostics", "kvpolicy.files", "kvpolicy.heads", "kvpolicy.dtypes")
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


# ---- the back half: kernels ← store ← prepare ← engines ← eval ← tune ← cli -------------------

# The stages in order, lowest first: a module imports only from its own stage or those below.
STAGES = (
    ("front end", FRONT_END + ("kvpolicy._version", "kvpolicy._resources")),
    ("compiler", ("kvpolicy.compiler",)),
    ("kernels", ("kvpolicy.kernels",)),
    ("store", ("kvpolicy.store",)),
    ("prepare", ("kvpolicy.prepare",)),
    ("engines", ENGINES + ("kvpolicy.engines",)),
    ("eval", ("kvpolicy.eval",)),
    ("tune", ("kvpolicy.tune",)),
    ("cli", ("kvpolicy.cli", "kvpolicy.__main__")),
)


def stage_of(name: str) -> int | None:
    found = [(len(prefix), index) for index, (_, prefixes) in enumerate(STAGES)
             for prefix in prefixes if name == prefix or name.startswith(prefix + ".")]
    return max(found)[1] if found else None


def module_edges() -> dict[str, set[str]]:
    """Module → the package modules it imports (`from package import module` is an edge to the
    module, not to the package's face)."""
    modules = set(PACKAGE_GRAPH)
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source, targets = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in
                         modules else node.module for alias in node.names]
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != "kvpolicy" and name != source:
                    targets.add(name)
        edges[source] = targets
    return edges


def test_every_stage_imports_only_from_itself_and_below():
    assert stage_of("kvpolicy.store.paged.step") == 3 and stage_of("kvpolicy.plan.pages") == 0
    unplaced = [m for m in PACKAGE_GRAPH if m != "kvpolicy" and stage_of(m) is None]
    assert unplaced == []
    bad = [f"{source} ({STAGES[stage_of(source)][0]}) imports {target} "
           f"({STAGES[stage_of(target)][0]})"
           for source, targets in module_edges().items() if source != "kvpolicy"
           for target in targets if stage_of(target) > stage_of(source)]
    assert bad == []


def test_no_import_circle():
    """Nothing climbs back up: no module imports, directly or not, a module that imports it."""
    edges = module_edges()
    circles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_kernels_import_no_store_engine_or_framework():
    assert violations(("kvpolicy.kernels",), ("kvpolicy.store", "kvpolicy.prepare") + ENGINES +
                      ("kvpolicy.eval", "kvpolicy.tune", "kvpolicy.cli", "transformers",
                       "vllm")) == []


def test_engines_never_compile_nor_read_policies():
    """Engines run what `kvpolicy.prepare` hands them: they never import the compiler or the
    language's reader (a policy's text, an artifact's files and the choice of kernels are
    prepare's)."""
    assert violations(ENGINES, ("kvpolicy.compiler", "kvpolicy.lang.lower",
                                "kvpolicy.lang.parser")) == []


def test_one_prepare():
    """Outside the compiler's own room, compiling a policy and loading an artifact happen in
    `kvpolicy.prepare` (and in `kvpolicy compile`, whose job it is, and the package face's
    `kvpolicy.load`)."""
    allowed = {"kvpolicy.prepare", "kvpolicy", "kvpolicy.cli.policies"}
    bad = [f"{source} imports {target} (line {line})"
           for source, edges in PACKAGE_GRAPH.items()
           if source not in allowed and not within(source, ("kvpolicy.compiler",))
           for target, line in edges
           if target in ("kvpolicy.compiler.artifact.compile_policy",
                         "kvpolicy.compiler.artifact.load")]
    assert bad == []
