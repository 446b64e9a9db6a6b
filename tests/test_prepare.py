"""`kvpolicy.prepare`: the one step from a policy to what an engine runs — the one rule for what
attends, policy-likes resolved once, and a vLLM worker that reads the page plan its artifact
records and verifies the artifact once."""

from __future__ import annotations

import pytest
import torch

from conftest import POLICIES
from kvpolicy import load_policy
from kvpolicy.compiler import artifact
from kvpolicy.compiler.artifact import MODEL_FIELDS, SHAPE_FIELDS, compile_policy
from kvpolicy.models import PRESETS
from kvpolicy.plan.pages import UnsupportedConfiguration, page_format
from kvpolicy import prepare

SMOL = PRESETS["smollm2-135m"]


@pytest.mark.parametrize("requested, device, paged, chosen", [
    ("auto", "cuda", False, "triton"), ("auto", "cuda", True, "triton"),
    ("auto", "cpu", False, "torch"), ("auto", "cpu", True, "cpu"),
    ("auto", torch.device("cpu"), True, "cpu"), ("auto", "cuda:1", True, "triton"),
    ("auto", None, False, "torch"), ("torch", "cuda", True, "torch"),
    ("triton", "cpu", False, "triton"), ("cpu", "cpu", True, "cpu")])
def test_one_rule_for_what_attends(requested, device, paged, chosen):
    assert prepare.backend_for(requested, device, paged) == chosen
    assert prepare.artifact_fields(chosen) == (MODEL_FIELDS if chosen == "torch" else
                                               SHAPE_FIELDS)


@pytest.mark.parametrize("requested, device, paged, words", [
    ("cpu", "cpu", False, "backend must be auto, torch or triton"),
    ("gpu", "cpu", True, "backend must be auto, torch, triton or cpu"),
    ("cpu", "cuda", True, "backend cpu runs a model on the CPU, not on cuda")])
def test_backends_a_runtime_lacks_are_refused(requested, device, paged, words):
    with pytest.raises(ValueError, match=words):
        prepare.backend_for(requested, device, paged)


def test_a_policy_like_is_resolved_once_and_only_for_its_model(tmp_path):
    policy = load_policy(POLICIES / "kivi.kvp")
    assert prepare.resolve(policy, SMOL) == (policy, None)
    assert prepare.resolve(str(POLICIES / "kivi.kvp"), SMOL)[0] == policy
    out = tmp_path / "kivi"
    compile_policy(policy, SMOL, out)
    resolved, compiled = prepare.resolve(out, SMOL)
    assert resolved == policy and compiled.directory == out
    assert prepare.resolve(compiled, SMOL) == (policy, compiled)
    with pytest.raises(artifact.ArtifactError, match="num_layers"):
        prepare.resolve(compiled, PRESETS["qwen2.5-7b"])
    whole = prepare.prepare_whole(policy, SMOL, "cpu")
    assert whole.backend == "torch" and whole.kernels is None and whole.pages is None
    paged = prepare.prepare_paged(policy, SMOL, 64, "cpu", backend="torch")
    assert paged.pages == page_format(policy, SMOL, 64) and paged.kernels is None
    assert paged.notes == () and paged.layer_kernels(3) is None  # KIVI pages as it runs


def test_paged_preparation_refuses_before_it_compiles(tmp_path, monkeypatch):
    """A policy no paged engine runs is refused with the page plan's reasons before anything is
    compiled."""
    def compile_nothing(*args, **kwargs):
        raise AssertionError("compiled before the page plan refused")
    monkeypatch.setattr(prepare, "compile_to_cache", compile_nothing)
    recon = load_policy(POLICIES / "retrieval_5x.kvp")
    with pytest.raises(UnsupportedConfiguration, match="score reconstruct"):
        prepare.prepare_paged(recon, SMOL, 64, "cpu")


def test_a_vllm_worker_reads_the_recorded_pages_and_verifies_once(tmp_path, monkeypatch):
    """load_settings and the first step's kernels verify the artifact once, and the page plan is
    the manifest's (planning pages again would fail here)."""
    from test_vllm_paged import engine_config
    from kvpolicy.engines.vllm.settings import load_settings
    out = tmp_path / "aggressive"
    policy = load_policy(POLICIES / "aggressive.kvp")
    compile_policy(policy, SMOL, out)
    verified = []
    real = artifact._verified

    def counting(*args, **kwargs):
        verified.append(args[0])
        return real(*args, **kwargs)

    def no_planning(*args, **kwargs):
        raise AssertionError("pages planned again instead of read from the manifest")
    monkeypatch.setattr(artifact, "_verified", counting)
    monkeypatch.setattr(prepare, "page_format", no_planning)
    monkeypatch.delenv("KVPOLICY_KERNELS", raising=False)
    monkeypatch.setenv("KVPOLICY_LAYOUT", "pages")  # the page layout reads the manifest's pages
    settings = load_settings(str(out), engine_config(block_size=64))
    assert settings.page_format == page_format(policy, SMOL, 64, dtype_bytes=2)
    settings.kernels(0, torch.device("cpu"))
    settings.kernels(5, torch.device("cpu"))
    assert verified == [out]
