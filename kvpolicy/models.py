"""Model shapes: the numbers a KV-cache plan depends on, from a preset or a `config.json`.

Preset figures are the models' published Hugging Face `config.json` values
(num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim or
hidden_size / num_attention_heads, max_position_embeddings).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kvpolicy.diagnostics import printable, quoted
from kvpolicy.dtypes import DTYPE_BYTES, HALF_DTYPES, KV_DTYPES
from kvpolicy.files import FileProblem, human_size, read_limited, shown_path



@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    kv_dtype: str = "bfloat16"  # dtype of the cache's full-precision regions (dtypes.KV_DTYPES)
    hf_id: str = ""  # where the preset's numbers come from
    source: str = "preset"  # "preset" or the config.json it was read from
    # Sliding-window layers (Gemma 3, Mistral-style local attention): the model's own indices of
    # the layers that only ever attend the last `sliding_window` tokens. Their cache is bounded
    # by the window whatever the context, so a policy does not govern them: they hold their last
    # `sliding_window - 1` tokens at full precision, as the model's own cache does. `num_layers`
    # counts the other (full-attention) layers, whose cache grows with the context: the layers a
    # policy plans, numbered 0..num_layers-1 in model order.
    window_layers: tuple[int, ...] = ()
    sliding_window: int = 0

    @property
    def gqa_group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def kv_bytes(self) -> int:
        return DTYPE_BYTES[self.kv_dtype]

    @property
    def baseline_bytes_per_token(self) -> int:
        """Keys and values of one token in every full-attention layer and KV head, in the cache
        dtype (sliding-window layers: `window_bytes`)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes

    @property
    def model_layers(self) -> int:
        """All the model's decoder layers: full-attention and sliding-window."""
        return self.num_layers + len(self.window_layers)

    def window_tokens(self, context: int) -> int:
        """Tokens a sliding-window layer holds after `context` tokens (the model's own rule:
        the last sliding_window - 1; the next query is the window's last token)."""
        return min(context, self.sliding_window - 1) if self.window_layers else 0

    def window_bytes(self, context: int) -> int:
        """What every sliding-window layer holds after `context` tokens, in the cache dtype:
        the same with and without a policy."""
        return (2 * len(self.window_layers) * self.num_kv_heads * self.head_dim * self.kv_bytes
                * self.window_tokens(context))

    def policy_layers(self) -> list[int | None]:
        """For each model layer: its index among the layers a policy plans, or None for a
        sliding-window layer."""
        sliding, index, out = set(self.window_layers), 0, []
        for layer in range(self.model_layers):
            if layer in sliding:
                out.append(None)
            else:
                out.append(index)
                index += 1
        return out

    def to_json(self) -> dict:
        data = {
            "name": self.name,
            "num_layers": self.num_layers,
            "num_q_heads": self.num_q_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_context": self.max_context,
            "kv_dtype": self.kv_dtype,
            "source": self.source,
        }
        if self.window_layers:  # absent otherwise: the shapes of other models hash as before
            data["window_layers"] = list(self.window_layers)
            data["sliding_window"] = self.sliding_window
        return data


PRESETS: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("qwen2.5-7b", 28, 28, 4, 128, 32768, hf_id="Qwen/Qwen2.5-7B-Instruct"),
    ModelShape("qwen2.5-1.5b", 28, 12, 2, 128, 32768, hf_id="Qwen/Qwen2.5-1.5B-Instruct"),
    ModelShape("qwen2.5-0.5b", 24, 14, 2, 64, 32768, hf_id="Qwen/Qwen2.5-0.5B-Instruct"),
    ModelShape("llama-3.1-8b", 32, 32, 8, 128, 131072, hf_id="meta-llama/Llama-3.1-8B-Instruct"),
    ModelShape("smollm2-135m", 30, 9, 3, 64, 8192, hf_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
    # 18 layers: every 6th attends the whole context, the other 15 a 512-token sliding window
    ModelShape("gemma3-270m", 3, 4, 1, 256, 32768, hf_id="google/gemma-3-270m",
               window_layers=tuple(i for i in range(18) if i % 6 != 5), sliding_window=512),
)}

# The model `kvpolicy` uses when neither the command line nor the policy names one: the seed's
# Qwen2.5-7B for planning and compiling. (The runtime's embedded default is SmolLM2-135M.)
DEFAULT_PLAN_MODEL = "qwen2.5-7b"
DEFAULT_MODEL = "smollm2-135m"  # the embedded model runs use (kvpolicy.engines.hf.model)


class ModelError(ValueError):
    """A model name or config that cannot be used; the message says why."""


# Spellings of a model's name beyond its case, an organisation prefix and a chat suffix
NAME_ALIASES = {"gemma-3-270m": "gemma3-270m"}


def model_key(name: str) -> str:
    """The one normalisation of a model's name, for the presets (PRESETS) and the runtime's
    embedded models: `Qwen/Qwen2.5-7B-Instruct` → `qwen2.5-7b`, `google/gemma-3-270m-it` →
    `gemma3-270m`."""
    key = name.strip().lower()
    key = key.rsplit("/", 1)[-1]
    for suffix in ("-instruct", "-chat", "-it"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return NAME_ALIASES.get(key, key)


# What a model config may say, so that checking and planning stay bounded in time and memory
# (a plan is per layer) and every count fits the int32 fields of the storage format. The deepest
# and widest public decoder LLMs are well inside these (Llama-3.1-405B: 126 layers, 128 heads,
# head_dim 128; context windows up to a few million tokens). docs/language.md lists them.
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_POSITIONS = 2**31 - 1  # token positions are int32 (docs/format.md)
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a config.json is a few KiB
MAX_NAME = 100  # characters of a model's name kept from its config


def model_from_json(data) -> ModelShape:
    """The ModelShape written by `ModelShape.to_json` (an artifact's manifest), checked like a
    config: ModelError names the first value that is not a valid, supported shape."""
    if not isinstance(data, dict):
        raise ModelError("not a JSON object")
    limits = {"num_layers": MAX_LAYERS, "num_q_heads": MAX_HEADS, "num_kv_heads": MAX_HEADS,
              "head_dim": MAX_HEAD_DIM, "max_context": MAX_POSITIONS}
    values = {}
    for key, maximum in limits.items():
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
            raise ModelError(f"'{key}' must be an integer from 1 to {maximum:,}, got "
                             f"{quoted(repr(value))}")
        values[key] = value
    if values["num_q_heads"] % values["num_kv_heads"]:
        raise ModelError("query heads are not a multiple of KV heads")
    if data.get("kv_dtype") not in KV_DTYPES:
        raise ModelError(f"'kv_dtype' must be one of {', '.join(KV_DTYPES)}")
    for key in ("name", "source"):
        if not isinstance(data.get(key), str):
            raise ModelError(f"'{key}' must be a string")
    window = _window_layers(data.get("window_layers", []), data.get("sliding_window", 0),
                            values["num_layers"])
    return ModelShape(name=data["name"], kv_dtype=data["kv_dtype"], source=data["source"],
                      **values, **window)


def _window_layers(layers, width, num_layers: int) -> dict:
    """window_layers and sliding_window as a manifest writes them, checked (ModelError)."""
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int)
                                           for i in layers):
        raise ModelError("'window_layers' must be a list of layer indices")
    total = num_layers + len(layers)
    if total > MAX_LAYERS or sorted(set(layers)) != layers or (layers and not
                                                             0 <= layers[0] <= layers[-1] < total):
        raise ModelError(f"'window_layers' must be increasing layer indices below {total}")
    if layers and (isinstance(width, bool) or not isinstance(width, int)
                   or not 1 <= width <= MAX_POSITIONS):
        raise ModelError(f"'sliding_window' must be an integer from 1 to {MAX_POSITIONS:,}, "
                         f"got {quoted(repr(width))}")
    return {"window_layers": tuple(layers), "sliding_window": width if layers else 0}


def resolve_model(spec: str, relative_to: str | os.PathLike[str] | None = None) -> ModelShape:
    """A preset name (`qwen2.5-7b`, also `Qwen/Qwen2.5-7B-Instruct`), or a path to a config.json
    or to a model directory holding one (relative paths are tried against `relative_to` too)."""
    if isinstance(spec, ModelShape):
        return spec
    spec = os.fspath(spec)
    key = model_key(spec)
    if key in PRESETS:
        return PRESETS[key]
    candidates = [Path(spec)]
    if relative_to is not None and not Path(spec).is_absolute():
        candidates.append(Path(relative_to) / spec)
    for candidate in candidates:
        try:
            is_dir, is_file = candidate.is_dir(), candidate.exists() and not candidate.is_dir()
        except (OSError, ValueError):
            continue
        if is_dir:
            if not (candidate / "config.json").is_file():
                raise ModelError(f"model directory {shown_path(candidate)} has no config.json")
            return load_config(candidate / "config.json")
        if is_file:
            return load_config(candidate)
    close = difflib.get_close_matches(key, PRESETS, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ModelError(f"unknown model '{quoted(spec)}'{hint} (presets: {', '.join(PRESETS)}; or "
                     "give a path to a config.json or a model directory)")


def load_config(path: str | os.PathLike[str]) -> ModelShape:
    shown = shown_path(path)
    try:
        data = read_limited(path, MAX_CONFIG_BYTES)
    except FileProblem as exc:
        if exc.too_large is not None:
            raise ModelError(f"model config {shown} is {human_size(exc.too_large)}; a "
                             f"config.json may be at most {MAX_CONFIG_BYTES // (1024 * 1024)} "
                             "MiB") from None
        raise ModelError(f"cannot read model config {shown}: {exc.reason}") from None
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"cannot read model config {shown}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"cannot read model config {shown}: not valid JSON (line {exc.lineno}, "
                         f"column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise ModelError(f"cannot read model config {shown}: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise ModelError(f"cannot read model config {shown}: not valid JSON "
                         f"({str(exc)[:120]})") from None
    if not isinstance(config, dict):
        raise ModelError(f"model config {shown} is not a JSON object")
    try:
        folder = Path(path).resolve().parent.name
    except (OSError, RuntimeError):
        folder = ""
    name = config.get("_name_or_path")
    name = name if isinstance(name, str) and name.strip() else folder or "model"
    return shape_from_config(config, name=name, source=os.fspath(path))


def shape_from_config(config: dict, name: str, source: str,
                      kv_dtype: str | None = None) -> ModelShape:
    """A ModelShape from a Hugging Face config dict, within the limits above (ModelError says
    which value is out of range). kv_dtype: the cache dtype (default: the config's 16-bit dtype,
    else bfloat16)."""
    path = shown_path(source)
    nested = config.get("text_config", config)  # multimodal configs nest the language model
    if nested is not config and not isinstance(nested, dict):
        raise ModelError(f"model config {path}: 'text_config' must be a JSON object")
    config = nested

    def number(key: str, maximum: int, default: int | None = None) -> int:
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            shown = quoted(repr(value))
            raise ModelError(f"model config {path}: '{key}' must be a positive integer, "
                             f"got {shown}")
        if value > maximum:
            raise ModelError(f"model config {path}: '{key}' is {value}; kvpolicy supports at "
                             f"most {maximum:,}")
        return value

    layers = number("num_hidden_layers", MAX_LAYERS)
    q_heads = number("num_attention_heads", MAX_HEADS)
    kv_heads = number("num_key_value_heads", MAX_HEADS, q_heads)
    if config.get("head_dim") is not None:
        head_dim = number("head_dim", MAX_HEAD_DIM)
    else:
        hidden = number("hidden_size", MAX_HEAD_DIM * MAX_HEADS)
        if hidden % q_heads:
            raise ModelError(f"model config {path}: hidden_size {hidden} is not a multiple of "
                             f"{q_heads} attention heads, and there is no 'head_dim'")
        head_dim = hidden // q_heads
        if head_dim > MAX_HEAD_DIM:
            raise ModelError(f"model config {path}: head_dim (hidden_size / "
                             f"num_attention_heads) is {head_dim}; kvpolicy supports at most "
                             f"{MAX_HEAD_DIM}")
    if q_heads % kv_heads:
        raise ModelError(f"model config {path}: {q_heads} query heads are not a multiple of "
                         f"{kv_heads} KV heads")
    max_context = number("max_position_embeddings", MAX_POSITIONS, 32768)
    if kv_dtype is None:
        dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        kv_dtype = dtype if dtype in HALF_DTYPES else "bfloat16"
    name = printable(name if len(name) <= MAX_NAME else name[:MAX_NAME - 1] + "…")
    sliding = _sliding_layers(config, layers, path)
    window = number("sliding_window", MAX_POSITIONS) if sliding else 0
    if len(sliding) == layers:
        raise ModelError(f"model config {path}: every layer is a sliding-window layer; there is "
                         "no growing cache for a policy to compress")
    return ModelShape(name=name, num_layers=layers - len(sliding), num_q_heads=q_heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, max_context=max_context,
                      kv_dtype=kv_dtype, source=source, window_layers=sliding,
                      sliding_window=window)


LAYER_TYPES = ("full_attention", "sliding_attention")


def _sliding_layers(config: dict, layers: int, path: str) -> tuple[int, ...]:
    """The indices of the config's sliding-window layers, from its `layer_types` (transformers'
    per-layer attention kinds); none when it has no such list."""
    types = config.get("layer_types")
    if types is None:
        return ()
    if not isinstance(types, list) or len(types) != layers:
        raise ModelError(f"model config {path}: 'layer_types' must list one attention kind for "
                         f"each of the {layers} layers")
    for index, kind in enumerate(types):
        if kind not in LAYER_TYPES:
            raise ModelError(f"model config {path}: layer {index} is "
                             f"'{quoted(printable(str(kind))[:40])}'; kvpolicy supports "
                             f"{' and '.join(LAYER_TYPES)} layers")
    return tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
