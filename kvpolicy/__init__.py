"""kvpolicy: KV-cache compression policies you can check, plan, compile and measure.

The front end (`load_policy`, `make_plan`) imports neither torch nor triton; `load` (a compiled
artifact, with its kernels) needs both.
"""

from kvpolicy._version import __version__
from kvpolicy.diagnostics import Diagnostic, PolicyError

__all__ = ["Diagnostic", "PolicyError", "__version__", "load", "load_policy", "make_plan",
           "resolve_model"]


def __getattr__(name: str):
    # Imported on first use so that `import kvpolicy` stays cheap.
    if name == "load_policy":
        from kvpolicy.lang.lower import load_policy
        return load_policy
    if name == "make_plan":
        from kvpolicy.plan.planner import make_plan
        return make_plan
    if name == "load":
        from kvpolicy.compiler.artifact import load
        return load
    if name == "resolve_model":
        from kvpolicy.models import resolve_model
        return resolve_model
    raise AttributeError(f"module 'kvpolicy' has no attribute {name!r}")
