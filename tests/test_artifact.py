"""`kvpolicy compile` and `kvpolicy.load`: deterministic, atomic, verified artifacts."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import kvpolicy
from conftest import POLICIES, run_cli
from kvpolicy.compiler import artifact
from kvpolicy.compiler.artifact import ArtifactError, compile_policy
from kvpolicy.compiler.specs import specs_for
from kvpolicy.models import resolve_model
from kvpolicy.plan.planner import make_plan
from kvpolicy.kernels import launch, reference as R
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
    specs = specs_for(make_plan(kvpolicy.load_policy(POLICIES / "aggressive.kvp"), QWEN, 4096))
    assert [s.uri for s in specs.specs] == [
        "combine_hd128_gqa7",
        "decode_hd128_bf16_gqa7_sinks1_cent1"
        "_guard-b32-kint8.g32.ch.asym.fp16-vint8.g32.tok.asym.fp16-pos1"
        "_body-b32-kint2.g32.ch.asym.fp16-vint2.g32.tok.asym.fp16-pos1",
        # the page plan's position-free layouts (paged engines) and the whole-prompt runtime's
        "pack_hd128_bf16_b32-kint2.g32.ch.asym.fp16-vint2.g32.tok.asym.fp16-pos0",
        "pack_hd128_bf16_b32-kint2.g32.ch.asym.fp16-vint2.g32.tok.asym.fp16-pos1",
        "pack_hd128_bf16_b32-kint8.g32.ch.asym.fp16-vint8.g32.tok.asym.fp16-pos0",
        "pack_hd128_bf16_b32-kint8.g32.ch.asym.fp16-vint8.g32.tok.asym.fp16-pos1",
        "paged_decode_hd128_bf16_gqa7"
        "_guard-b32-kint8.g32.ch.asym.fp16-vint8.g32.tok.asym.fp16-pos0"
        "_body-b32-kint2.g32.ch.asym.fp16-vint2.g32.tok.asym.fp16-pos0",
        "unpack_hd128_bf16_b32-kint2.g32.ch.asym.fp16-vint2.g32.tok.asym.fp16-pos1",
        "unpack_hd128_bf16_b32-kint8.g32.ch.asym.fp16-vint8.g32.tok.asym.fp16-pos1",
    ]
    overridden = specs_for(make_plan(kvpolicy.load_policy(POLICIES / "conservative.kvp"), QWEN,
                                     4096))
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
                            "unpack_guard", "paged_decode", "pack_page_body", "pack_page_guard"}
    assert modules["pack_body"].B.value == 32
    assert compiled.plan(4096).compression_ratio > 1


def test_the_manifest_records_the_page_plan_at_every_block_size_that_fits(built):
    """What a paged engine's pages keep at each block size (aggressive: 32-token format units,
    so 16 does not fit), exactly as kvpolicy.plan.pages computes it."""
    from kvpolicy.plan.pages import page_format
    manifest = json.loads((built / "manifest.json").read_text())
    assert sorted(map(int, manifest["pages"])) == [32, 64, 128, 256, 512]
    policy = kvpolicy.load_policy(POLICIES / "aggressive.kvp")
    for size, recorded in manifest["pages"].items():
        assert recorded == page_format(policy, SMOL, int(size)).to_json()
    assert "block 256: 6,768 bytes (16-bit: 65,536)" in (built / "report.txt").read_text()


def test_loaded_kernels_attend_like_the_reference(built):
    compiled = kvpolicy.load(built)
    plan = compiled.plan(8192)
    modules = compiled.layer_kernels(0)
    layer = random_layer(seed=11, heads=SMOL.num_kv_heads, head_dim=64, batch=1,
                         guard=(plan.layers[0].guard_layout.keys,
                                plan.layers[0].guard_layout.values),
                         body=(plan.layers[0].keys, plan.layers[0].values))
    q = torch.randn(1, SMOL.num_q_heads, 64)
    got = launch.decode(modules["decode"], modules["combine"], q, layer, num_splits=2)
    want, _ = R.attend(q, layer, 1 / math.sqrt(64))
    assert (got - want).abs().max() <= 1e-2 * want.abs().max() + 1e-3


def test_a_policy_no_paged_engine_runs_gets_no_paged_kernels(tmp_path):
    """`score reconstruct` needs the whole prompt, so vLLM and the paged store refuse it: its
    artifact carries only the whole-prompt runtime's kernels (no paged decode, no page packs,
    no C sources), still loads and attends like the reference, and asking it for the store's
    kernels names the reason."""
    from kvpolicy.kernels import bound
    source = tmp_path / "recon.kvp"
    source.write_text("policy recon {\n    keep sinks 4\n    keep window 64\n    retain 60%\n"
                      "    score reconstruct(pool = max 7)\n"
                      "    keys int4 group 64 per channel\n"
                      "    values int3 group 64 per token\n}\n")
    out = tmp_path / "artifact"
    compile_policy(kvpolicy.load_policy(source), SMOL, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {kernel["kind"] for kernel in manifest["kernels"]} == {"combine", "decode", "pack",
                                                                  "unpack"}
    assert manifest["pages"] == {}
    assert not any(name.endswith(".c") for name in manifest["files"])
    compiled = kvpolicy.load(out)
    modules = compiled.layer_kernels(0)
    assert set(modules) == {"decode", "combine", "pack_body", "unpack_body"}
    plan = compiled.plan(4096)
    formats = (plan.layers[0].keys, plan.layers[0].values)  # no guard tokens, no centroids
    layer = random_layer(seed=5, heads=SMOL.num_kv_heads, head_dim=64, batch=1, centroids=0,
                         guard=formats, body=formats, guard_counts=[[0] * SMOL.num_kv_heads])
    q = torch.randn(1, SMOL.num_q_heads, 64)
    got = launch.decode(modules["decode"], modules["combine"], q, layer, num_splits=2)
    want, _ = R.attend(q, layer, 1 / math.sqrt(64))
    assert (got - want).abs().max() <= 1e-2 * want.abs().max() + 1e-3
    for kernels_for in (bound.kernels_for, bound.cpu_kernels_for):
        with pytest.raises(ValueError, match="no paged kernels: .*reconstruct"):
            kernels_for(compiled, 0)


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


# ---- the whole artifact is verified (issue 12, item 1) -------------------------------------------

def _edit(value, path=""):
    """A different value of the same kind (the first leaf of a container is changed)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [_edit(value[0])] + value[1:] if value else [1]
    if isinstance(value, dict):
        key = sorted(value)[0]
        return dict(value, **{key: _edit(value[key])})
    return 1


def _write_manifest(directory, manifest, digest=False):
    if digest:
        manifest = dict(manifest, manifest_sha256=artifact.manifest_digest(manifest))
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


TOP_LEVEL = ["files", "format", "kernels", "kvpolicy_version", "launch", "layers",
             "manifest_sha256", "model", "pages", "plan_at_max_context", "policy",
             "template_sha256"]


def test_the_manifest_has_the_fields_the_tampering_tests_edit(built):
    assert sorted(json.loads((built / "manifest.json").read_text())) == TOP_LEVEL


@pytest.mark.parametrize("field", TOP_LEVEL)
@pytest.mark.parametrize("digest", [False, True], ids=["edited", "edited-and-redigested"])
def test_a_tampered_manifest_field_is_refused_with_the_reason(built, field, digest):
    manifest = json.loads((built / "manifest.json").read_text())
    manifest[field] = _edit(manifest[field])
    _write_manifest(built, manifest, digest=digest and field != "manifest_sha256")
    with pytest.raises(ArtifactError) as caught:
        kvpolicy.load(built)
    message = str(caught.value)
    assert f"refusing artifact {built}" in message or "manifest" in message, message
    assert "manifest" in message or "recompile" in message or "kernels/" in message, message


@pytest.mark.parametrize("path, value", [
    (("policy", "ir", "keys", "bits"), 3),
    (("policy", "ir", "retain"), 0.5),
    (("model", "head_dim"), 128),
    (("model", "num_layers"), 28),
    (("launch", "num_splits"), 1),
    (("policy", "source_sha256"), "0" * 64),
    (("plan_at_max_context", "compressed_bytes"), 1),
    (("layers", 0, "decode"), "decode_other"),
])
def test_edits_the_runtime_would_act_on_are_refused(built, path, value):
    manifest = json.loads((built / "manifest.json").read_text())
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _write_manifest(built, manifest)
    with pytest.raises(ArtifactError, match="manifest.json was modified"):
        kvpolicy.load(built)
    if path[-1] != "source_sha256":  # provenance only: what the runtime never reads
        _write_manifest(built, manifest, digest=True)  # a careful forger: still refused
        with pytest.raises(ArtifactError, match="is not what compiling its policy for its "
                           "model gives"):
            kvpolicy.load(built)


def test_every_file_is_covered_and_nothing_else_may_be_there(built):
    (built / "report.txt").write_text((built / "report.txt").read_text() + " ")
    with pytest.raises(ArtifactError, match="report.txt was modified"):
        artifact.verify(built)
    shutil.copy(built / "manifest.json", built / "stray.json")
    (built / "kernels" / "__pycache__").mkdir()
    (built / "kernels" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0" * 16)
    with pytest.raises(ArtifactError) as caught:
        artifact.verify(built)
    for name in ("stray.json", "kernels/__pycache__/x.cpython-311.pyc"):
        assert f"{name} is not listed in the manifest" in str(caught.value)


def test_kernels_are_imported_from_the_verified_bytes(built, monkeypatch):
    from kvpolicy.compiler import loader
    seen = []
    real = loader.import_kernel_source
    monkeypatch.setattr(loader, "import_kernel_source",
                        lambda path, data: seen.append(data) or real(path, data))
    compiled = kvpolicy.load(built)
    manifest = compiled.manifest
    assert sorted(artifact._sha256(d) for d in seen) == sorted(k["sha256"]
                                                              for k in manifest["kernels"])


def test_a_manifest_from_another_format_or_not_json_is_refused(built, tmp_path):
    manifest = json.loads((built / "manifest.json").read_text())
    _write_manifest(built, dict(manifest, format="kvpolicy.artifact/1"))
    with pytest.raises(ArtifactError, match="compiled by an older kvpolicy; recompile it"):
        kvpolicy.load(built)
    (built / "manifest.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        kvpolicy.load(built)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="it is a file, not a directory"):
        kvpolicy.load(tmp_path / "file")
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        kvpolicy.load(tmp_path / "missing")


# ---- only on the model it was compiled for (item 2) ----------------------------------------------

def test_an_artifact_compiled_for_a_config_json_loads_anywhere(tmp_path):
    config = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_size": 256, "max_position_embeddings": 512}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    model = resolve_model(str(tmp_path / "model"))
    compile_policy(kvpolicy.load_policy(POLICIES / "kivi.kvp"), model, tmp_path / "art")
    shutil.move(tmp_path / "art", tmp_path / "moved")
    assert kvpolicy.load(tmp_path / "moved", model=tmp_path / "model").model.num_layers == 2
    assert str(tmp_path) not in (tmp_path / "moved" / "manifest.json").read_text()


def test_load_takes_the_model_as_users_name_it(built, tmp_path):
    config = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "hidden_size": 576, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}
    (tmp_path / "smol").mkdir()
    (tmp_path / "smol" / "config.json").write_text(json.dumps(config))
    for model in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", SMOL,
                  str(tmp_path / "smol"), str(tmp_path / "smol" / "config.json")):
        assert kvpolicy.load(built, model=model).model.num_layers == 30
    with pytest.raises(ArtifactError) as caught:
        kvpolicy.load(built, model="qwen2.5-7b")
    for field in ("num_layers 30, but the model (qwen2.5-7b) has 28", "num_q_heads 9",
                  "num_kv_heads 3", "head_dim 64"):
        assert field in str(caught.value)
    with pytest.raises(ArtifactError, match="unknown model 'qwen9'"):
        kvpolicy.load(built, model="qwen9")


# ---- output directories (item 7) -----------------------------------------------------------------

def test_compile_onto_a_file_names_the_users_path(tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine")
    result = run_cli("compile", "policies/kivi.kvp", "--model", "smollm2-135m", "-o", str(target))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot write the artifact to {target}: it exists and is a file" in result.stderr
    under = run_cli("compile", "policies/kivi.kvp", "--model", "smollm2-135m", "-o",
                    str(target / "out"))
    assert under.returncode == 1 and f"cannot write the artifact to {target / 'out'}" in \
        under.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and target.read_text() == "mine"


def _as_nobody():
    """A command prefix that runs as an unprivileged user (root ignores file modes)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file modes cannot be tested")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_compile_into_a_read_only_directory_names_it_and_leaves_nothing(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    import tempfile
    locked = Path(tempfile.mkdtemp(prefix="kvpolicy-locked-"))  # pytest's tmp is root-only
    os.chmod(locked, 0o555)
    try:
        done = subprocess.run(
            [*_as_nobody(), sys.executable, "-m", "kvpolicy", "compile",
             str(ROOT / "policies" / "kivi.kvp"), "--model", "smollm2-135m", "-o",
             str(locked / "deep" / "out")],
            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
            cwd=tmp_path, timeout=600)
        left = list(locked.iterdir())
    finally:
        os.chmod(locked, 0o755)
        shutil.rmtree(locked)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot write the artifact to {locked / 'deep' / 'out'}: permission denied" in \
        done.stderr
    assert ".staging" not in done.stderr and left == []


def test_recompiling_over_read_only_parts_leaves_no_old_copy(tmp_path):
    out = tmp_path / "art"
    compile_policy(kvpolicy.load_policy(POLICIES / "kivi.kvp"), SMOL, out)
    os.chmod(out / "kernels", 0o555)
    compile_policy(kvpolicy.load_policy(POLICIES / "aggressive.kvp"), SMOL, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert kvpolicy.load(out).policy.name == "aggressive"


def test_an_interrupted_swap_puts_the_old_artifact_back(tmp_path, monkeypatch):
    out = tmp_path / "art"
    compile_policy(kvpolicy.load_policy(POLICIES / "kivi.kvp"), SMOL, out)
    before = tree(out)
    renames = []
    real = os.rename

    def interrupted(source, target):
        renames.append(target)
        if len(renames) == 2:  # between moving the old directory away and the new one in
            raise KeyboardInterrupt
        real(source, target)
    monkeypatch.setattr(artifact.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compile_policy(kvpolicy.load_policy(POLICIES / "aggressive.kvp"), SMOL, out)
    monkeypatch.undo()
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_compile_through_a_symbolic_link_writes_where_it_points(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    compile_policy(kvpolicy.load_policy(POLICIES / "kivi.kvp"), SMOL, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_terminated_compile_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """SIGTERM (a `timeout`, a cancelled job) unwinds like Ctrl-C: no staging directory stays."""
    import signal
    from kvpolicy.cli import main
    out = tmp_path / "art"
    compile_policy(kvpolicy.load_policy(POLICIES / "kivi.kvp"), SMOL, out)
    before = tree(out)

    def terminated_mid_swap(staging, target):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(artifact, "_swap", terminated_mid_swap)
    handler = signal.getsignal(signal.SIGTERM)
    status = main(["compile", str(POLICIES / "aggressive.kvp"), "--model", "smollm2-135m",
                   "-o", str(out)])
    assert status == 128 + signal.SIGTERM
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert signal.getsignal(signal.SIGTERM) is handler  # main() puts the caller's back
