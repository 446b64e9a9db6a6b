"""The command line, end to end, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from conftest import POLICIES, ROOT, SHIPPED, run_cli


def test_check_shipped_policies():
    result = run_cli("check", *[str(p.relative_to(ROOT)) for p in SHIPPED])
    assert result.returncode == 0, result.stderr
    assert f"checked {len(SHIPPED)} files: 0 errors" in result.stderr


def test_fmt_check_shipped_policies():
    result = run_cli("fmt", "--check", *[str(p) for p in SHIPPED])
    assert result.returncode == 0, result.stderr


def test_fmt_rewrites_in_place_and_check_reports(tmp_path):
    path = tmp_path / "messy.kvp"
    path.write_text("policy   messy{retain 50%;keys int2}\n")
    checked = run_cli("fmt", "--check", str(path))
    assert checked.returncode == 1 and "not in canonical form" in checked.stderr
    assert path.read_text() == "policy   messy{retain 50%;keys int2}\n"
    assert run_cli("fmt", str(path)).returncode == 0
    assert path.read_text() == "policy messy { retain 50%; keys int2 }\n"
    assert run_cli("fmt", "--check", str(path)).returncode == 0
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_fmt_refuses_a_file_with_errors_and_leaves_it_alone(tmp_path):
    path = tmp_path / "bad.kvp"
    path.write_text("policy bad { retain 150% }\n")
    result = run_cli("fmt", str(path))
    assert result.returncode == 1 and "bad.kvp:1:21: error:" in result.stderr
    assert path.read_text() == "policy bad { retain 150% }\n"


def test_plan_table_for_the_acceptance_command():
    result = run_cli("plan", "policies/aggressive.kvp", "--model", "qwen2.5-7b",
                     "--context", "32768")
    assert result.returncode == 0, result.stderr
    assert "context  32,768 tokens" in result.stdout
    assert "baseline (bf16)" in result.stdout and "57,344.0" in result.stdout
    assert len([line for line in result.stdout.splitlines()
                if line[:5].strip().isdigit()]) == 28  # one row per layer


def test_plan_json_mean_retain_equals_policy_ratio():
    result = run_cli("plan", "policies/aggressive.kvp", "--model", "qwen2.5-7b",
                     "--context", "32768", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    retains = [layer["retain"] for layer in document["layers"]]
    assert abs(sum(retains) / len(retains) - 0.18) < 1e-12
    assert document["context"] == 32768 and document["model"]["name"] == "qwen2.5-7b"


def test_plan_model_selection_is_said_out_loud(tmp_path):
    named = run_cli("plan", "policies/kivi.kvp", "--context", "4k")
    assert named.returncode == 0
    assert "using the default, qwen2.5-7b" in named.stderr
    assert "context  4,096 tokens" in named.stdout
    from_policy = run_cli("plan", "policies/conservative.kvp")
    assert "planning at qwen2.5-7b's maximum, 32768 tokens" in from_policy.stderr


def test_unknown_model_and_missing_file_are_clear_errors():
    unknown = run_cli("plan", "policies/kivi.kvp", "--model", "gpt-5")
    assert unknown.returncode == 1 and "unknown model 'gpt-5'" in unknown.stderr
    missing = run_cli("check", "policies/nope.kvp")
    assert missing.returncode == 1
    assert "policies/nope.kvp: error: cannot read policy file" in missing.stderr
    directory = run_cli("check", "policies")
    assert directory.returncode == 1 and "is a directory" in directory.stderr
    for result in (unknown, missing, directory):
        assert "Traceback" not in result.stderr


def test_models_lists_presets():
    result = run_cli("models")
    assert result.returncode == 0
    for name in ("qwen2.5-7b", "llama-3.1-8b", "smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"):
        assert name in result.stdout


def test_front_end_and_compile_import_neither_torch_nor_triton(tmp_path):
    # Block the heavy packages outright: importing one would raise inside the command.
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'triton', 'numpy', 'transformers', 'vllm'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from kvpolicy.cli import main
codes = [main(['check', {str(POLICIES / 'aggressive.kvp')!r}]),
         main(['fmt', '--check', {str(POLICIES / 'kivi.kvp')!r}]),
         main(['plan', {str(POLICIES / 'extreme.kvp')!r}, '--json']),
         main(['compile', {str(POLICIES / 'aggressive.kvp')!r}, '-o', 'out']),
         main(['models'])]
assert codes == [0, 0, 0, 0, 0], codes
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 0, result.stderr


def test_policy_named_model_path_is_relative_to_the_policy(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_size": 256, "max_position_embeddings": 512}))
    (tmp_path / "p.kvp").write_text('policy p { model "tiny"; keys int4 }\n')
    result = run_cli("plan", str(tmp_path / "p.kvp"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["num_layers"] == 2
    shutil.rmtree(tmp_path / "tiny")
    gone = run_cli("check", str(tmp_path / "p.kvp"))
    assert gone.returncode == 1 and "p.kvp:1:12: error: unknown model 'tiny'" in gone.stderr
