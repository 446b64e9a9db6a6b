"""Model shapes: presets and config.json files."""

from __future__ import annotations

import json

import pytest

from kvpolicy.models import PRESETS, ModelError, load_config, resolve_model


@pytest.mark.parametrize("name, layers, q, kv, head_dim", [
    ("qwen2.5-7b", 28, 28, 4, 128),
    ("llama-3.1-8b", 32, 32, 8, 128),
    ("smollm2-135m", 30, 9, 3, 64),
    ("qwen2.5-0.5b", 24, 14, 2, 64),
    ("qwen2.5-1.5b", 28, 12, 2, 128),
])
def test_presets(name, layers, q, kv, head_dim):
    model = resolve_model(name)
    assert (model.num_layers, model.num_q_heads, model.num_kv_heads, model.head_dim) == \
        (layers, q, kv, head_dim)
    assert model.baseline_bytes_per_token == 2 * layers * kv * head_dim * 2


def test_hub_style_names_resolve_to_presets():
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct") is PRESETS["qwen2.5-7b"]
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") is PRESETS["smollm2-135m"]


def test_unknown_model_suggests_a_preset():
    with pytest.raises(ModelError, match="did you mean 'qwen2.5-7b'"):
        resolve_model("qwen2.5-7")


def test_config_json_and_model_directory(tmp_path):
    config = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
              "hidden_size": 512, "max_position_embeddings": 4096, "torch_dtype": "float16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = resolve_model(str(tmp_path))
    assert (model.num_layers, model.num_q_heads, model.num_kv_heads, model.head_dim,
            model.max_context, model.kv_dtype) == (4, 8, 2, 64, 4096, "float16")
    assert resolve_model(str(tmp_path / "config.json")) == model
    explicit = dict(config, head_dim=128)
    (tmp_path / "explicit.json").write_text(json.dumps(explicit))
    assert load_config(tmp_path / "explicit.json").head_dim == 128


@pytest.mark.parametrize("content, fragment", [
    ("not json", "cannot read model config"),
    ("[1, 2]", "not a JSON object"),
    ('{"num_attention_heads": 8}', "'num_hidden_layers' must be a positive integer"),
    ('{"num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 4, '
     '"hidden_size": 384}', "not a multiple"),
])
def test_bad_configs_are_refused_clearly(tmp_path, content, fragment):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ModelError, match=fragment):
        load_config(path)
