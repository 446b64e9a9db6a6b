"""The joints between stages: what `check` accepts, `plan` plans and the compiler specializes, at
every context from 1 token to the model's maximum; what a later stage refuses, it refuses with a
located error, never an exception from inside."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, strategies as st

from conftest import SHIPPED, assert_refused_elsewhere, calibrated_elsewhere, run_cli
from strategies import policies
from kvpolicy.compiler.artifact import build_files
from kvpolicy.compiler.specs import specs_for
from kvpolicy.diagnostics import PolicyError, Source
from kvpolicy.plan.pages import (UnsupportedConfiguration, model_refusals, page_format,
                                 paged_refusals)
from kvpolicy.lang.lower import check_source, load_policy
from kvpolicy.models import MAX_HEAD_DIM, MAX_POSITIONS, PRESETS, ModelShape
from kvpolicy.plan.planner import make_plan
from kvpolicy.plan.report import render_table, to_json


def assert_plans(policy, model, context):
    plan = make_plan(policy, model, context)
    assert plan.compressed_bytes > 0
    assert math.isfinite(plan.compression_ratio) and plan.compression_ratio > 0
    assert all(layer.kept_tokens >= 1 for layer in plan.layers)
    render_table(plan)
    to_json(plan)
    return plan


@given(policies(), st.data())
def test_what_check_accepts_plans_and_specializes_on_every_model_and_context(text, data):
    result = check_source(Source("t.kvp", text))
    assume(result.policy is not None)
    policy = result.policy
    for model in PRESETS.values():
        try:  # what `kvpolicy check --model M` does: plan at the model's maximum context
            make_plan(policy, model, model.max_context)
        except PolicyError as exc:  # the policy does not fit this model: said where, not crashed
            assert exc.errors and all(error.span is not None for error in exc.errors)
            continue
        contexts = {1, 2, 3, 16, 31, 33, model.max_context,
                    data.draw(st.integers(1, 4096), label="short context"),
                    data.draw(st.integers(1, model.max_context), label="context")}
        for context in contexts:
            assert_plans(policy, model, context)
        compiled = specs_for(make_plan(policy, model, model.max_context))
        assert len(compiled.layers) == model.num_layers
        # e.g. score reconstruct with eviction, or a model with sliding-window layers: refused
        # by name, never half-built
        refusals = paged_refusals(policy) + model_refusals(model)
        if refusals:
            with pytest.raises(UnsupportedConfiguration) as refused:
                page_format(policy, model, 256)
            assert refused.value.reasons[:len(refusals)] == refusals
            continue
        pages = page_format(policy, model, 256)
        assert pages.page_bytes > 0 and math.isfinite(pages.capacity_ratio)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
@pytest.mark.parametrize("model", sorted(PRESETS))
def test_shipped_policies_plan_at_one_token_and_at_the_maximum(path, model):
    policy, shape = load_policy(path), PRESETS[model]
    if calibrated_elsewhere(policy, shape):  # head weights of another model: refused, located
        return assert_refused_elsewhere(policy, shape)
    for context in (1, 2, 17, shape.max_context):
        assert_plans(policy, shape, context)


@pytest.mark.parametrize("text", [
    "policy z { retain 0% }",
    "policy z { retain layer 0 0%, layer last 0% }",
    "policy z { retain 0%; keys int2; values int2 }",
])
def test_a_policy_that_keeps_nothing_is_an_error_at_check(write_policy, text):
    path = write_policy(text + "\n")
    result = run_cli("check", str(path))
    assert result.returncode == 1
    assert f"{path}:1:" in result.stderr and "keeps no token" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text", [
    "policy z { retain 0%; keep window 16 }",
    "policy z { retain 0%; keep sinks 1 }",
    "policy z { retain 0%; cluster evicted k 4 }",
    "policy z { retain 1% }",
    "policy z { retain 1%; keys int2 group 128 per channel; values int4 }",
])
@pytest.mark.parametrize("command", ["plan", "compile"])
def test_policies_check_accepts_plan_and_compile_at_any_context(write_policy, tmp_path, text,
                                                                command):
    path = write_policy(text + "\n")
    assert run_cli("check", str(path), "--model", "smollm2-135m").returncode == 0
    for context in ("1", "5", "40"):
        if command == "plan":
            result = run_cli("plan", str(path), "--model", "smollm2-135m", "--context", context)
        else:
            result = run_cli("compile", str(path), "--model", "smollm2-135m", "-o",
                             str(tmp_path / f"out{context}"))
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr


def test_a_budget_that_rounds_to_nothing_keeps_the_newest_token():
    policy = check_source(Source("t.kvp", "policy t { retain 1%; keys int2; values int2 }")).policy
    plan = make_plan(policy, PRESETS["smollm2-135m"], 20)
    assert all((layer.sinks, layer.window, layer.selected, layer.evicted) == (0, 1, 0, 19)
               for layer in plan.layers)
    assert any("rounds to no token" in warning.message for warning in plan.warnings)


shapes = st.builds(
    lambda layers, kv, group, head_dim, context, dtype: ModelShape(
        "m", layers, kv * group, kv, head_dim, context, kv_dtype=dtype),
    st.integers(1, 64), st.integers(1, 16), st.integers(1, 16),
    st.one_of(st.sampled_from([64, 80, 96, 128, 256]), st.integers(1, MAX_HEAD_DIM)),
    st.one_of(st.integers(1, 1 << 20), st.just(MAX_POSITIONS)),
    st.sampled_from(["bfloat16", "float16"]))


@given(policies(), shapes, st.data())
def test_what_check_accepts_for_any_supported_model_compiles(text, model, data):
    """Model shapes anywhere within the documented limits (docs/language.md): check with the
    model (plan at its maximum) OK ⇒ plans at any context and the whole artifact renders."""
    result = check_source(Source("t.kvp", text))
    assume(result.policy is not None)
    try:
        make_plan(result.policy, model, model.max_context)
    except PolicyError as exc:
        assert exc.errors and all(error.span is not None for error in exc.errors)
        return
    for context in {1, model.max_context, data.draw(st.integers(1, model.max_context))}:
        assert_plans(result.policy, model, context)
    files = build_files(result.policy, model)
    assert "manifest.json" in files and any(name.startswith("kernels/") for name in files)
