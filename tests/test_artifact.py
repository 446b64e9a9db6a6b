"""`kvpolicy compile` and `kvpolicy.load`: deterministic, atomic, verified artifacts."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

import kvpolicy
from conftest import POLICIES, run_cli
from kvpolicy.compiler import artifact
from kvpolicy.compiler.artifact import ArtifactError, compile_policy
from kvpolicy.compiler.specs import specs_for
from kvpolicy.models import resolve_model
from kvpolicy.runtime import launch, reference as R
from random_layers import random_layer

QWEN, SMOL = resolve_model("qwen2.5-7b"), resolve_model("smollm2-135m")


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_compile_works_exactly_as_typed(tmp_path):
    shutil.copytree(POLICIES, tmp_path / "policies")
    result = run_cli("compile", "policies/aggressive.kvp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "compiled aggressive for qwen2.5-7b into build/aggressive" in result.stdout
    manifest = json.loads((tmp_path / "build/aggressive/manifest.json").read_text())
    assert manifest["model"]["name"] == "qwen2.5-7b" and manifest["policy"]["name"] == "aggressive"
    unnamed = run_cli("compile", "policies/kivi.kvp", "-o", "out/kivi", cwd=tmp_path)
    assert unnamed.returncode == 0
    assert "no model given; using the default, qwen2.5-7b" in unnamed.stderr


def test_identical_input_gives_byte_identical_output(tmp_path):
    policy = kvpolicy.load_policy(POLICIES / "aggressive.kvp")
    first, second = tmp_path / "a", tmp_path / "b"
    assert compile_policy(policy, QWEN, first)
    compile_policy(policy, QWEN, second)
    assert tree(first) == tree(second)
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    assert compile_policy(policy, QWEN, first) == []  # nothing rewritten
    assert stamps == {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}


def test_recompiling_keeps_unchanged_files(tmp_path):
    out = tmp_path / "build"
    compile_policy(kvpolicy.load_policy(POLICIES / "aggressive.kvp"), QWEN, out)
    kernel = next((out / "kernels").glob("pack_*int2*.py"))
    before = kernel.stat()
    # quant_only keeps aggressive's storage (same pack kernels) but evicts nothing (new decode)
    changed = compile_policy(kvpolicy.load_policy(POLICIES / "quant_only.kvp"), QWEN, out)
    assert "manifest.json" in changed and any(c.startswith("kernels/decode_") for c in changed)
    assert str(kernel.relative_to(out)) not in changed
    after = kernel.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]  # no staging left behind


def test_failure_while_rendering_writes_nothing(tmp_path, monkeypatch):
    def broken(spec):
        raise RuntimeError("template exploded")
    monkeypatch.setattr(artifact, "render", broken)
    with pytest.raises(RuntimeError):
        compile_policy(kvpolicy.load_policy(POLICIES / "kivi.kvp"), QWEN, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_directory_that_is_not_an_artifact(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a kvpolicy build directory"):
        compile_policy(kvpolicy.load_policy(POLICIES / "kivi.kvp"), QWEN, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_uris_are_derived_and_stable():
    specs = specs_for(kvpolicy.load_policy(POLICIES / "aggressive.kvp"), QWEN)
    assert [s.uri for s in specs.specs] == [
        "combine_hd128_gqa7",
        "decode_hd128_bf16_gqa7_sinks1_cent1"
        "_guard-b32-kint8.g32.ch.asym.fp16-vint8.g32.tok.asym.fp16-pos1"
        "_body-b32-kint2.g32.ch.asym.fp16-vint2.g32.tok.asym.fp16-pos1",
        "pack_hd128_bf16_b32-kint2.g32.ch.asym.fp16-vint2.g32.tok.asym.fp16-pos1",
        "pack_hd128_bf16_b32-kint8.g32.ch.asym.fp16-vint8.g32.tok.asym.fp16-pos1",
        "unpack_hd128_bf16_b32-kint2.g32.ch.asym.fp16-vint2.g32.tok.asym.fp16-pos1",
        "unpack_hd128_bf16_b32-kint8.g32.ch.asym.fp16-vint8.g32.tok.asym.fp16-pos1",
    ]
    overridden = specs_for(kvpolicy.load_policy(POLICIES / "conservative.kvp"), QWEN)
    assert len({layer.decode for layer in overridden.layers}) == 1


@pytest.fixture
def built(tmp_path):
    out = tmp_path / "aggressive"
    compile_policy(kvpolicy.load_policy(POLICIES / "aggressive.kvp"), SMOL, out)
    return out


def test_load_verifies_and_imports(built):
    compiled = kvpolicy.load(built, model=SMOL)
    assert compiled.policy == kvpolicy.load_policy(POLICIES / "aggressive.kvp")
    assert compiled.model.num_layers == 30
    modules = compiled.layer_kernels(0)
    assert set(modules) == {"decode", "combine", "pack_body", "unpack_body", "pack_guard",
                            "unpack_guard"}
    assert modules["pack_body"].B.value == 32
    assert compiled.plan(4096).compression_ratio > 1


def test_loaded_kernels_attend_like_the_reference(built):
    compiled = kvpolicy.load(built)
    plan = compiled.plan(8192)
    modules = compiled.layer_kernels(0)
    layer = random_layer(seed=11, heads=SMOL.num_kv_heads, head_dim=64, batch=1,
                         guard=(plan.layers[0].guard_layout.keys,
                                plan.layers[0].guard_layout.values),
                         body=(plan.layers[0].keys, plan.layers[0].values))
    q = torch.randn(1, SMOL.num_q_heads, 64)
    got, _ = launch.decode(modules["decode"], modules["combine"], q, layer, num_splits=2)
    want, _ = R.attend(q, layer, 1 / math.sqrt(64))
    assert (got - want).abs().max() <= 1e-2 * want.abs().max() + 1e-3


def test_one_changed_byte_is_refused(built):
    kernel = next((built / "kernels").glob("decode_*.py"))
    data = bytearray(kernel.read_bytes())
    data[len(data) // 2] ^= 0x01
    kernel.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"kernels/decode_.*\.py was modified"):
        kvpolicy.load(built)


def test_other_refusals_list_every_reason(built):
    (built / "kernels" / "extra.py").write_text("x = 1\n")
    next((built / "kernels").glob("pack_*int2*.py")).unlink()
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["kvpolicy_version"] = "0.0.1"
    (built / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as caught:
        artifact.verify(built, model=QWEN)
    message = str(caught.value)
    for reason in ("kernels/extra.py is not listed", "is missing", "compiled by kvpolicy 0.0.1",
                   "num_layers 30, but the model (qwen2.5-7b) has 28"):
        assert reason in message


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        kvpolicy.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError, match="cannot be read"):
        kvpolicy.load(tmp_path)


def test_compile_errors_are_located_and_write_nothing(tmp_path):
    bad = tmp_path / "bad.kvp"
    bad.write_text('policy bad { model "qwen2.5-7b"; retain 20%; retain layer 40 5% }\n')
    result = run_cli("compile", str(bad), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "bad.kvp:1:53: error: layer 40 is beyond qwen2.5-7b's last layer" in result.stderr
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == ["bad.kvp"]
