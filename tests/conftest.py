"""Shared helpers. Tests need no GPU and no network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton reads this when @triton.jit runs, so it must be set before any kernel module is imported:
# tests run every generated kernel in Triton's interpreter, on the CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
SHIPPED = sorted(POLICIES.glob("*.kvp"))

# CI runs the property tests with more examples; locally the default profile keeps them quick.
settings.register_profile("ci", max_examples=1000, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# Modules that load a real model, start vLLM engines, compile for sm_90 or build a wheel: marked
# `slow`, so `pytest -m "not slow"` is the fast tier (a few minutes); CI runs everything.
SLOW_MODULES = {"test_vllm_engine", "test_vllm_parallel", "test_vllm_serve", "test_hopper",
                "test_bench_kernels", "test_eval", "test_hf_runtime", "test_wheel", "test_engines_agree",
                "test_gemma"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def write_policy(tmp_path):
    """Writes text to a .kvp file in a temporary directory and returns its path."""
    def write(text: str, name: str = "policy.kvp") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path
    return write


def run_cli(*args: str, cwd: Path | None = None):
    """Runs `python -m kvpolicy ARGS` and returns the CompletedProcess (text mode)."""
    import subprocess
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "kvpolicy", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, env=env, timeout=600)  # hangs only


def calibrated_elsewhere(policy, model) -> bool:
    """Is `policy` calibrated for another model shape (`adapt heads` weights of other
    dimensions than `model`'s)? Planning it on `model` is then an error; tests that run every
    shipped policy on every model assert that error instead (`assert_refused_elsewhere`)."""
    adapt = policy.adapt
    return adapt is not None and adapt.static and (
        len(adapt.head_weights), len(adapt.head_weights[0])) != (model.num_layers,
                                                                  model.num_kv_heads)


def assert_refused_elsewhere(policy, model) -> None:
    from kvpolicy.diagnostics import PolicyError
    from kvpolicy.plan.planner import make_plan
    with pytest.raises(PolicyError, match=f"head weights .* {model.name} has "):
        make_plan(policy, model, 4096)
