"""Running a policy inside Hugging Face transformers (needs `pip install 'kvpolicy[eval]'`).

`PolicyCache` is a transformers Cache holding the packed format; `generate` is greedy generation
with it; `load_model` loads the embedded SmolLM2-135M-Instruct or a local model directory.
"""

from kvpolicy.engines.hf.model import DEFAULT_MODEL, ModelLoadError, load_model

__all__ = ["DEFAULT_MODEL", "ModelLoadError", "PolicyCache", "attend_through", "generate",
           "load_model"]


def __getattr__(name: str):
    if name in ("PolicyCache", "attend_through"):
        from kvpolicy.engines.hf import cache
        return getattr(cache, name)
    if name == "generate":
        from kvpolicy.engines.hf.generation import generate
        return generate
    raise AttributeError(f"module 'kvpolicy.engines.hf' has no attribute {name!r}")
