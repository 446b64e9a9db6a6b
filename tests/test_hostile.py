"""Hostile input, class by class, through the command line as a user types it: every case exits
with status 1 and a message that is located (`file:line:col: error:`) or names the path or option
at fault; never a traceback, an internal error, a raw control character or an unbounded line.

Cases run in-process through `kvpolicy.cli.main` (which turns any unexpected exception into exit
status 70, so a crash cannot pass as a refusal); a sample also runs as a real subprocess.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import POLICIES, run_cli
from kvpolicy.cli import main
from kvpolicy.diagnostics import MAX_MESSAGE


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], list[str]]  # writes what it needs under a directory; → argv
    expect: str  # a fragment the message must hold
    located: bool = False  # the first error is `file:line:col: error:`


CASES: dict[str, Case] = {}


def case(name: str, expect: str, located: bool = False):
    def register(build):
        assert name not in CASES, name
        CASES[name] = Case(build, expect, located)
        return build
    return register


def policy_case(name: str, text: str | bytes, expect: str, filename: str = "p.kvp") -> None:
    data = text.encode() if isinstance(text, str) else text

    def build(root: Path) -> list[str]:
        (root / filename).write_bytes(data)
        return ["check", str(root / filename)]
    case(name, expect, located=True)(build)


# ---- 1. words, names and blocks (item 6) -----------------------------------------------------

for word, right in [("rétain 20%", "retain"), ("kéép window 16", "keep"), ("kêys int4", "keys"),
                    ("valúes int4", "values"), ("guärd none", "guard"), ("scöre recent", "score"),
                    ("clüster none", "cluster"), ("ädapt none", "adapt"),
                    ("interpolaté step", "interpolate"), ("modél \"x\"", "model")]:
    policy_case(f"non_ascii_statement_{right}", f"policy t {{\n    {word}\n}}\n",
                f"did you mean '{right}'?")
for name, text in [("non_ascii_width", "keys ïnt4"), ("non_ascii_axis", "keys int4 per chännel"),
                   ("non_ascii_method", "score snäpkv"), ("non_ascii_argument",
                                                          "score snapkv(öbserve = 3)")]:
    policy_case(name, f"policy t {{ {text} }}\n", "is not an ASCII letter")
policy_case("non_ascii_policy_name", "policy café { retain 20% }\n", "is not ASCII")
for spelling in ("polcy", "Policy", "POLICY", "plicy", "polciy", "poilcy"):
    policy_case(f"misspelt_policy_{spelling}", f"{spelling} t {{\n    retain 20%\n}}\n",
                "did you mean 'policy'?")
for name, header in [("digit_name", "policy 2fast {"), ("number_name", "policy 2 {"),
                     ("decimal_name", "policy 1.5x {"), ("dash_name", "policy -x {"),
                     ("quoted_name", 'policy "x" {'), ("no_name", "policy {")]:
    expect = {"quoted_name": "not a quoted string", "no_name": "a policy needs a name"}.get(
        name, "a policy name starts with a letter or '_'")
    policy_case(name, f"{header}\n    retain 20%\n}}\n", expect)
for name, text in [
        ("nested_layers_one_line", "policy t {\n    layers 0 { layers 1 { keys int4 } }\n}\n"),
        ("nested_layers_lines", "policy t {\n    layers 0 {\n        layers 1 {\n"
                                "            keys int4\n        }\n    }\n}\n"),
        ("nested_layers_after_statement", "policy t { layers 0 { keys int4; layers 1 { } } }\n"),
        ("nested_layers_three_deep", "policy t { layers 0 { layers 1 { layers 2 { } } } }\n")]:
    policy_case(name, text, "override blocks cannot nest")
for name, text, expect in [
        ("keeps_nothing", "policy z { retain 0% }", "keeps no token"),
        ("keeps_nothing_quantized", "policy z { retain 0%; keys int2; values int2 }",
         "keeps no token"),
        ("keeps_nothing_by_anchors", "policy z { retain layer 0 0%, layer last 0% }",
         "keeps no token"),
        ("keeps_nothing_fraction", "policy z { retain 0.0 }", "keeps no token"),
        ("layer_fraction", "policy t { retain 20%; retain layer 0.5 10% }",
         "write a percentage"),
        ("layer_share_over_100", "policy t { retain 20%; retain layer 150% 10% }",
         "outside 0%..100%"),
        ("layer_negative", "policy t { retain 20%; retain layer -1 10% }", "at least 0"),
        ("layer_share_backwards", "policy t { layers 50%..10% { keys int4 } }",
         "runs backwards"),
        ("layer_huge", "policy t { retain 20%; retain layer 1e999 10% }", "too large"),
        ("layer_index_huge", "policy t { retain 20%; retain layer 99999999 10% }",
         "at most 65535")]:
    policy_case(name, text + "\n", expect)

# ---- 2. what a diagnostic may print: control characters, long lines (item 6) -----------------

ESC = "\x1b[2J\x1b[31m"
for name, line in [
        ("escape_in_comment_on_error_line", f"retian 20%  # {ESC} red"),
        ("escape_in_word", f"ret{ESC}ain 20%"),
        ("bidi_override_on_error_line", "retian 20%  # \u202e evil"),
        ("c1_control", "retain 20% \u009b2J"),
        ("zero_width_joiner", "ret\u200dain 20%"),
        ("backspaces", "retain\b\b\b\b\b\bkeep 20%"),
        ("bell", "retian\a 20%"),
        ("escape_in_model_name", f'model "{ESC}x"')]:
    policy_case(name, f"policy t {{\n    {line}\n}}\n", ": error: ")
LONG = 60_000
policy_case("long_unknown_word", f"policy t {{\n    {'r' * LONG} 20%\n}}\n", "unknown statement")
policy_case("long_comment_on_error_line", f"policy t {{\n    retian 20% # {'c' * LONG}\n}}\n",
            "did you mean 'retain'")
policy_case("long_number", f"policy t {{\n    keep window {'9' * LONG}\n}}\n", "too large")
policy_case("long_model_name", f'policy t {{\n    model "{"q" * LONG}"\n}}\n', "unknown model")
policy_case("long_extends_path", f'policy t extends "{"e" * LONG}" {{ }}\n', "too long")
policy_case("long_policy_name", f"policy {'n' * LONG} {{ retain 20% }}\n".replace(
    "retain 20%", "retian 20%"), "did you mean 'retain'")

# ---- 3. extends (item 6) ---------------------------------------------------------------------


@case("extends_directory", "is a directory", located=True)
def _(root):
    (root / "parent").mkdir()
    (root / "p.kvp").write_text('policy t extends "parent" { retain 20% }\n')
    return ["check", str(root / "p.kvp")]


@case("extends_missing", "cannot find the extended policy", located=True)
def _(root):
    (root / "p.kvp").write_text('policy t extends "nowhere.kvp" { retain 20% }\n')
    return ["check", str(root / "p.kvp")]


@case("extends_link_loop", "symbolic link", located=True)
def _(root):
    (root / "a.kvp").symlink_to(root / "b.kvp")
    (root / "b.kvp").symlink_to(root / "a.kvp")
    (root / "p.kvp").write_text('policy t extends "a.kvp" { retain 20% }\n')
    return ["check", str(root / "p.kvp")]


@case("extends_itself", "makes a cycle", located=True)
def _(root):
    (root / "p.kvp").write_text('policy t extends "p.kvp" { retain 20% }\n')
    return ["check", str(root / "p.kvp")]


@case("extends_a_device", "is a device", located=False)
def _(root):
    (root / "p.kvp").write_text('policy t extends "/dev/null" { retain 20% }\n')
    return ["check", str(root / "p.kvp")]


@case("extends_a_pipe_with_no_writer", "empty policy file", located=True)
def _(root):
    os.mkfifo(root / "pipe.kvp")
    (root / "p.kvp").write_text('policy t extends "pipe.kvp" { retain 20% }\n')
    return ["check", str(root / "p.kvp")]


@case("extends_control_characters", "\\x1b", located=True)
def _(root):
    (root / "p.kvp").write_text(f'policy t extends "{ESC}.kvp" {{ retain 20% }}\n')
    return ["check", str(root / "p.kvp")]


@case("extends_parent_with_errors", "has errors", located=True)
def _(root):
    (root / "parent.kvp").write_text("policy parent { retain 150% }\n")
    (root / "p.kvp").write_text('policy t extends "parent.kvp" { keys int4 }\n')
    return ["check", str(root / "p.kvp")]


# ---- 4. the policy file itself -----------------------------------------------------------------

for name, path in [("check_a_directory", "."), ("check_a_device", "/dev/null"),
                   ("check_missing", "missing.kvp"), ("check_long_name", "x" * 5000 + ".kvp")]:
    case(name, "error:")(lambda root, path=path: ["check", str(root / path)])


@case("check_a_pipe_with_no_writer", "empty policy file", located=True)
def _(root):
    os.mkfifo(root / "pipe.kvp")
    return ["check", str(root / "pipe.kvp")]


@case("check_a_link_loop", "link", located=False)
def _(root):
    (root / "a.kvp").symlink_to(root / "b.kvp")
    (root / "b.kvp").symlink_to(root / "a.kvp")
    return ["check", str(root / "a.kvp")]


for command in ("plan", "compile", "fmt"):
    case(f"{command}_a_directory", "is a directory")(
        lambda root, command=command: [command, str(root)])
    case(f"{command}_missing_file", "no such file")(
        lambda root, command=command: [command, str(root / "missing.kvp")])

# ---- 5. model configs: at the `model` statement and through --model (item 4) ------------------

GOOD = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "hidden_size": 512, "max_position_embeddings": 4096}
CONFIGS: dict[str, tuple[bytes, str]] = {}
for key, value, expect in [
        ("num_hidden_layers", 100_000_000, "at most 1,024"),
        ("num_hidden_layers", 0, "positive integer"), ("num_hidden_layers", -1, "positive"),
        ("num_hidden_layers", 1.5, "positive integer"), ("num_hidden_layers", "28", "integer"),
        ("num_hidden_layers", True, "integer"), ("num_hidden_layers", None, "integer"),
        ("num_hidden_layers", 2**40, "at most"), ("num_attention_heads", 0, "positive"),
        ("num_attention_heads", 10**6, "at most"), ("num_key_value_heads", 3, "multiple"),
        ("num_key_value_heads", 10**6, "at most"), ("head_dim", 0, "positive"),
        ("head_dim", 4096, "at most 1,024"), ("head_dim", "x" * 5000, "positive integer"),
        ("hidden_size", 500, "not a multiple"), ("hidden_size", 10**9, "at most"),
        ("max_position_embeddings", 2**40, "at most"),
        ("max_position_embeddings", 0, "positive"), ("text_config", 5, "JSON object")]:
    CONFIGS[f"{key}_{str(value)[:12]}"] = (json.dumps(dict(GOOD, **{key: value})).encode(),
                                           expect)
CONFIGS.update({
    "missing_layers": (json.dumps({"num_attention_heads": 8}).encode(), "num_hidden_layers"),
    "not_an_object": (b"[1, 2, 3]", "not a JSON object"),
    "not_json": (b"{num_hidden_layers: 4}", "not valid JSON"),
    "not_utf8": (b'{"name": "\xff\xfe"}', "not UTF-8"),
    "deeply_nested": (b"[" * 100_000 + b"]" * 100_000, "cannot read model config"),
    "five_megabytes": (b'{"pad": "' + b"x" * (5 << 20) + b'"}', "at most 4 MiB"),
    "empty": (b"", "not valid JSON"),
})


def _config_at_model_statement(root: Path, data: bytes) -> list[str]:
    (root / "cfg.json").write_bytes(data)
    (root / "p.kvp").write_text('policy t {\n    model "cfg.json"\n    retain 20%\n}\n')
    return ["check", str(root / "p.kvp")]


def _config_by_option(root: Path, data: bytes) -> list[str]:
    (root / "cfg.json").write_bytes(data)
    return ["plan", str(POLICIES / "kivi.kvp"), "--model", str(root / "cfg.json")]


for name, (data, expect) in CONFIGS.items():
    case(f"config_{name}_at_model_statement", expect, located=True)(
        lambda root, data=data: _config_at_model_statement(root, data))
    case(f"config_{name}_by_option", expect)(
        lambda root, data=data: _config_by_option(root, data))


@case("model_directory_without_config", "has no config.json", located=True)
def _(root):
    (root / "model").mkdir()
    (root / "p.kvp").write_text('policy t {\n    model "model"\n    retain 20%\n}\n')
    return ["check", str(root / "p.kvp")]


@case("model_config_is_a_pipe_with_no_writer", "not valid JSON")
def _(root):
    os.mkfifo(root / "cfg.json")
    return ["plan", str(POLICIES / "kivi.kvp"), "--model", str(root / "cfg.json")]


# ---- 6. plan and compile options, output directories (items 7, 10) ----------------------------

for value in ("0", "-5", "abc", "1e99", "99999999999", "", "1.5", "nan"):
    case(f"plan_context_{value or 'empty'}", "--context")(
        lambda root, value=value: ["plan", str(POLICIES / "kivi.kvp"), "--context", value])
case("plan_unknown_preset", "unknown model 'qwen9'")(
    lambda root: ["plan", str(POLICIES / "kivi.kvp"), "--model", "qwen9"])
case("plan_layer_beyond_model", "beyond qwen2.5-0.5b's last layer", located=True)(
    lambda root: _write_and(root, "policy t { retain 20%; retain layer 30 5% }",
                            ["plan", "{}", "--model", "qwen2.5-0.5b"]))
case("plan_per_token_group_beyond_head_dim", "does not divide", located=True)(
    lambda root: _write_and(root, "policy t { values int4 group 128 per token }",
                            ["plan", "{}", "--model", "smollm2-135m"]))
case("plan_depth_anchors_collide", "two anchors name layer", located=True)(
    lambda root: _write_and(root, "policy t { retain 20%; retain layer 1 5%, layer 5% 6% }",
                            ["plan", "{}", "--model", "qwen2.5-0.5b"]))


def _write_and(root: Path, text: str, argv: list[str]) -> list[str]:
    (root / "p.kvp").write_text(text + "\n")
    return [str(root / "p.kvp") if a == "{}" else a for a in argv]


@case("compile_onto_a_file", "it exists and is a file")
def _(root):
    (root / "taken").write_text("x")
    return ["compile", str(POLICIES / "kivi.kvp"), "-o", str(root / "taken")]


@case("compile_under_a_file", "cannot write the artifact to")
def _(root):
    (root / "taken").write_text("x")
    return ["compile", str(POLICIES / "kivi.kvp"), "-o", str(root / "taken" / "out")]


@case("compile_into_a_foreign_directory", "not a kvpolicy build directory")
def _(root):
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("x")
    return ["compile", str(POLICIES / "kivi.kvp"), "-o", str(root / "mine")]


case("unknown_command", "invalid choice")(lambda root: ["bogus"])
case("compile_unknown_option", "unrecognized arguments")(
    lambda root: ["compile", str(POLICIES / "kivi.kvp"), "--sm91"])

# ---- 7. run: arguments, models, artifacts (items 2, 5) -----------------------------------------

KIVI = str(POLICIES / "kivi.kvp")
for name, extra, expect in [
        ("depth_below_0", ["--needle", "100", "--depth", "-0.1"], "--depth -0.1 is outside"),
        ("depth_above_1", ["--needle", "100", "--depth", "1.5"], "--depth 1.5 is outside"),
        ("depth_nan", ["--needle", "100", "--depth", "nan"], "--depth nan is outside"),
        ("depth_inf", ["--needle", "100", "--depth", "inf"], "--depth inf is outside"),
        ("depth_not_a_number", ["--needle", "100", "--depth", "half"], "--depth"),
        ("depth_without_needle", ["--prompt", "hi", "--depth", "0.3"], "--depth places"),
        ("needle_zero", ["--needle", "0"], "--needle 0"),
        ("needle_negative", ["--needle", "-3"], "--needle -3"),
        ("needle_beyond_context", ["--needle", "100000"], "beyond the model's context"),
        ("needle_and_prompt", ["--needle", "100", "--prompt", "hi"], "--prompt and --needle"),
        ("prompt_and_prompt_file", ["--prompt", "hi", "--prompt-file", KIVI],
         "--prompt and --prompt-file"),
        ("no_prompt", [], "give a prompt"),
        ("empty_prompt", ["--prompt", "  "], "--prompt is empty"),
        ("max_new_tokens_zero", ["--prompt", "hi", "--max-new-tokens", "0"],
         "--max-new-tokens 0"),
        ("max_new_tokens_negative", ["--prompt", "hi", "--max-new-tokens", "-4"],
         "--max-new-tokens -4"),
        ("max_new_tokens_beyond_context", ["--prompt", "hi", "--max-new-tokens", "100000"],
         "beyond the model's context"),
        ("preset_without_weights", ["--prompt", "hi", "--model", "qwen2.5-7b"],
         "is a preset shape"),
        ("missing_model_directory", ["--prompt", "hi", "--model", "/nonexistent/model"],
         "not a local Hugging Face model directory"),
        ("cache_dtype_unknown", ["--prompt", "hi", "--cache-dtype", "int4"], "--cache-dtype"),
        ("backend_unknown", ["--prompt", "hi", "--backend", "cuda"], "--backend")]:
    case(f"run_{name}", expect)(lambda root, extra=extra: ["run", KIVI, *extra])


@case("run_model_directory_without_weights", "no weights")
def _(root):
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(GOOD))
    return ["run", KIVI, "--prompt", "hi", "--model", str(root / "model")]


@case("run_model_directory_with_a_bad_config", "at most 1,024")
def _(root):
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(dict(GOOD, num_hidden_layers=10**8)))
    (root / "model" / "model.safetensors").write_bytes(b"\0" * 8)
    return ["run", KIVI, "--prompt", "hi", "--model", str(root / "model")]


@case("run_model_directory_with_broken_weights", "cannot load the model")
def _(root):
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(dict(GOOD, model_type="llama")))
    (root / "model" / "model.safetensors").write_bytes(b"not safetensors")
    return ["run", KIVI, "--prompt", "hi", "--model", str(root / "model")]


for name, content, expect in [("prompt_file_missing", None, "no such file"),
                              ("prompt_file_binary", b"\xff\xfe\x00", "not UTF-8"),
                              ("prompt_file_empty", b"", "is empty")]:
    def build(root, content=content):
        if content is not None:
            (root / "prompt.txt").write_bytes(content)
        return ["run", KIVI, "--prompt-file", str(root / "prompt.txt")]
    case(f"run_{name}", expect)(build)
case("run_prompt_file_directory", "is a directory")(
    lambda root: ["run", KIVI, "--prompt-file", str(root)])


def _compiled(root: Path, model: str) -> Path:
    from kvpolicy.compiler.artifact import compile_policy
    from kvpolicy.lang.lower import load_policy
    from kvpolicy.models import resolve_model
    out = root / f"kivi-{model}"
    compile_policy(load_policy(POLICIES / "kivi.kvp"), resolve_model(model), out)
    return out


case("run_artifact_for_another_model", "compiled for qwen2.5-7b with num_layers 28")(
    lambda root: ["run", str(_compiled(root, "qwen2.5-7b")), "--prompt", "hi"])
case("run_artifact_kernels_for_another_cache_dtype", "kv_dtype bfloat16")(
    lambda root: ["run", str(_compiled(root, "smollm2-135m")), "--prompt", "hi",
                  "--cache-dtype", "float16", "--backend", "triton"])


def _tampered(root: Path, how: str) -> Path:
    out = _compiled(root, "smollm2-135m")
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if how == "manifest":
        manifest["policy"]["ir"]["keys"]["bits"] = 3
        manifest_path.write_text(json.dumps(manifest, indent=2))
    elif how == "kernel":
        kernel = out / manifest["kernels"][0]["file"]
        kernel.write_text(kernel.read_text() + "\n# changed\n")
    elif how == "stray":
        (out / "kernels" / "extra.py").write_text("x = 1\n")
    elif how == "missing":
        (out / manifest["kernels"][0]["file"]).unlink()
    return out


for how, expect in [("manifest", "manifest.json was modified"), ("kernel", "was modified"),
                    ("stray", "is not listed in the manifest"), ("missing", "is missing")]:
    case(f"run_tampered_artifact_{how}", expect)(
        lambda root, how=how: ["run", str(_tampered(root, how)), "--prompt", "hi"])
    case(f"eval_tampered_artifact_{how}", expect)(
        lambda root, how=how: ["eval", str(_tampered(root, how)), "--quick"])

# ---- 8. eval: arguments and policies checked before the first prefill (item 10) ----------------

for name, extra, expect in [
        ("unknown_task", ["--tasks", "needle"], "unknown task"),
        ("empty_tasks", ["--tasks", ""], "--tasks is empty"),
        ("empty_contexts", ["--contexts", ""], "not a number of tokens"),
        ("context_zero", ["--contexts", "0"], "at least 1 token"),
        ("context_not_a_number", ["--contexts", "4k,x"], "not a number of tokens"),
        ("context_beyond_model", ["--contexts", "100000"], "beyond the model's context"),
        ("samples_zero", ["--samples", "0"], "--samples 0"),
        ("preset_without_weights", ["--model", "llama-3.1-8b"], "is a preset shape"),
        ("missing_policy", [KIVI + ".missing"], "no such file")]:
    case(f"eval_{name}", expect)(lambda root, extra=extra: ["eval", KIVI, *extra, "--quick"])


@case("eval_policy_beyond_the_models_layers", "beyond smollm2-135m's last layer", located=True)
def _(root):
    (root / "p.kvp").write_text("policy deep { retain 20%; retain layer 40 5% }\n")
    return ["eval", str(root / "p.kvp"), "--quick", "--out", str(root / "out")]


@case("eval_out_is_a_file", "it exists and is a file")
def _(root):
    (root / "out").write_text("x")
    return ["eval", KIVI, "--quick", "--out", str(root / "out")]


# ---- found by an independent pass written from the docs alone ------------------------------------

policy_case("layer_range_from_last_down", "policy t {\n    layers last..0 { keys int4 }\n}\n",
            "runs backwards")
policy_case("thousands_of_duplicates_on_one_line",
            "policy t {\n" + "keep sinks 4;" * 4900 + "\n}\n", "too many problems")
CONFIGS_FOUND = {"integer_of_5000_digits": (b'{"num_hidden_layers": 4, "num_attention_heads": 8, '
                                            b'"hidden_size": 512, "max_position_embeddings": '
                                            + b"9" * 5000 + b"}", "not valid JSON")}
for name, (data, expect) in CONFIGS_FOUND.items():
    case(f"config_{name}_at_model_statement", expect, located=True)(
        lambda root, data=data: _config_at_model_statement(root, data))
    case(f"config_{name}_by_option", expect)(
        lambda root, data=data: _config_by_option(root, data))
case("compile_empty_output", "-o/--output is empty")(
    lambda root: ["compile", str(POLICIES / "kivi.kvp"), "--model", "smollm2-135m", "-o", ""])


policy_case("combining_accent_in_a_word", "policy t {\n    re\u0301tain 5%\n}\n",
            "did you mean 'retain'? (U+0301 is not an ASCII letter")
policy_case("policy_name_of_5000_characters", f"policy {'a' * 5000} {{ retain 20% }}\n",
            "a name may be at most 64")


@case("run_policy_beyond_the_models_layers", "beyond smollm2-135m", located=True)
def _(root):
    (root / "p.kvp").write_text("policy deep { retain 20%; retain layer 40 5% }\n")
    return ["run", str(root / "p.kvp"), "--prompt", "hi"]


@case("run_artifact_with_a_stray_directory", "is not listed in the manifest")
def _(root):
    out = _compiled(root, "smollm2-135m")
    (out / "notes").mkdir()
    return ["run", str(out), "--prompt", "hi"]


# ---- the property every case must have ------------------------------------------------------------

LOCATED = re.compile(r"^(?P<path>[^\n]+?):(\d+):(\d+): error: ", re.M)


def test_there_are_enough_cases():
    assert len(CASES) >= 150, len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_refused_clearly(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostile = CASES[name]
    argv = hostile.build(tmp_path)
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse
        status = exit_.code
    captured = capsys.readouterr()
    err = captured.err
    assert status == 1, (status, err[-2000:])
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    assert hostile.expect in err, (hostile.expect, err[-2000:])
    first = next(line for line in err.splitlines() if "error:" in line)
    if hostile.located:
        match = LOCATED.match(first)
        assert match, first
        assert Path(match["path"]).name.endswith((".kvp", ".json")) or "/" in match["path"]
    else:
        assert re.match(r"^(kvpolicy( \w+)?: error: |[^\s]+: error: |[^\s]+:\d+:\d+: error: )",
                        first), first
    for line in (captured.err + captured.out).splitlines():
        assert "\x1b" not in line and "\u202e" not in line and "\a" not in line, repr(line)
        assert len(line) <= MAX_MESSAGE + 200, len(line)


@pytest.mark.parametrize("name", ["escape_in_comment_on_error_line", "long_unknown_word",
                                  "config_num_hidden_layers_100000000_by_option",
                                  "run_depth_above_1", "compile_onto_a_file"])
def test_a_sample_as_real_processes(name, tmp_path):
    argv = CASES[name].build(tmp_path)
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and CASES[name].expect in result.stderr


def test_a_bug_is_one_line_and_exit_70_not_a_traceback(monkeypatch, capsys):
    from kvpolicy.cli import policies
    monkeypatch.setattr(policies, "cmd_models", None)

    def broken(args):
        raise ZeroDivisionError("division by zero")
    import kvpolicy.cli as cli
    monkeypatch.setattr(cli, "cmd_models", broken)
    assert main(["models"]) == 70
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError" in err and "Traceback" not in err


def test_pipes_are_never_waited_on(tmp_path):
    pipe = tmp_path / "p.kvp"
    os.mkfifo(pipe)
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    result = run_cli("check", str(pipe))  # no writer: read as empty at once, not a hang
    assert result.returncode == 1 and "empty policy file" in result.stderr

