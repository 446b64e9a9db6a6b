"""Concepts with one home (docs/architecture.md, "One home each"), read from the package's code:
the dtype tables, the score defaults, the cache root, the default model, model-name
normalisation. A second definition fails here with the file and line that repeats it."""

from __future__ import annotations

import ast
import dataclasses

from conftest import ROOT

from kvpolicy import dtypes
from kvpolicy.lang.ir import Score
from kvpolicy.models import DEFAULT_MODEL, PRESETS, model_key
from kvpolicy.plan.pages import PageFormat

PACKAGE = ROOT / "kvpolicy"
DTYPE_WORDS = set(dtypes.DTYPE_BYTES) | set(dtypes.LONG_NAMES)
TORCH_DTYPES = {f"torch.{name}" for name in dtypes.DTYPE_BYTES} | {"torch.int16"}
# the language's bit-width words: `fp16`, `bf16`, `float16` are spellings of 16 bits there
WIDTH_WORDS = "kvpolicy/lang/vocabulary.py"


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def _dtype_word(node) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in DTYPE_WORDS or node.value in TORCH_DTYPES
    return isinstance(node, ast.Attribute) and ast.unparse(node) in TORCH_DTYPES


def test_dtype_tables_have_one_home():
    """No dict keyed by two or more dtypes, and no literal list of them, outside kvpolicy.dtypes."""
    found = []
    for where, tree in modules():
        if where in ("kvpolicy/dtypes.py", WIDTH_WORDS):
            continue
        literal_types = {id(node.slice) for node in ast.walk(tree)
                         if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "Literal"}
        for node in ast.walk(tree):
            if id(node) in literal_types:
                continue  # a type's words (ScaleDtype), not a table
            items = (node.keys if isinstance(node, ast.Dict) else
                     node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [])
            if sum(_dtype_word(item) for item in items if item is not None) >= 2:
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)[:70]}")
    assert found == []


def test_the_dtype_home_is_consistent():
    assert set(dtypes.KV_DTYPES) <= set(dtypes.DTYPE_BYTES) >= set(dtypes.SHORT_NAMES)
    assert {dtypes.short_name(dtypes.LONG_NAMES[s]) for s in dtypes.LONG_NAMES} == \
        set(dtypes.LONG_NAMES)
    assert sorted(dtypes.DTYPE_CODES.values()) == list(range(len(dtypes.DTYPE_CODES)))


def test_score_defaults_are_the_languages():
    """Only `lang.ir.Score` spells the score's defaults; the page plan and calibrate take them."""
    names = {field.name for field in dataclasses.fields(Score)}
    found = [f"{where}:{node.lineno}: {ast.unparse(node)}"
             for where, tree in modules() if where != "kvpolicy/lang/ir.py"
             for node in ast.walk(tree)
             if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
             and node.target.id in names - {"method", "chunk"}
             and isinstance(node.value, ast.Constant)]
    assert found == []
    page = {field.name: field.default for field in dataclasses.fields(PageFormat)}
    assert (page["score"], page["pool"], page["pool_kernel"], page["observe"], page["gqa"]) == \
        (Score.method, Score.pool, Score.pool_kernel, Score.observe, Score.gqa)


def _constants(value):
    return [f"{where}:{node.lineno}" for where, tree in modules() for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value == value]


def test_the_cache_root_is_read_in_one_place():
    assert _constants("KVPOLICY_CACHE") == [
        f"kvpolicy/files.py:{next(int(w.split(':')[1]) for w in _constants('KVPOLICY_CACHE'))}"]


def test_the_default_model_is_spelled_once():
    """DEFAULT_MODEL, and the preset of that name beside it: both in kvpolicy/models.py."""
    assert {where.split(":")[0] for where in _constants(DEFAULT_MODEL)} == {"kvpolicy/models.py"}
    assert len(_constants(DEFAULT_MODEL)) == 2


def test_model_names_are_normalised_in_one_place():
    assert {where.split(":")[0] for where in _constants("-instruct")} == {"kvpolicy/models.py"}
    for preset in PRESETS.values():
        if preset.hf_id:
            assert model_key(preset.hf_id) == preset.name
    assert model_key("google/gemma-3-270m-it") == model_key("Gemma3-270M") == "gemma3-270m"
