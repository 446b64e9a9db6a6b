"""What the Triton launchers (`launch`) and the C kernels (`cpu`) agree on with their templates:
the codes of the source dtypes a kernel reads (`SRC_DTYPE` / `NEW_DTYPE` in codegen/*.jinja) and
of the reductions of attention mass over a KV group's query heads (`REDUCE`)."""

from __future__ import annotations

from kvpolicy.dtypes import DTYPE_CODES, KV_DTYPES
from kvpolicy.kernels.reference import torch_dtype

SOURCE_DTYPES = {torch_dtype(name): DTYPE_CODES[name] for name in KV_DTYPES}
MASS_REDUCE = {"sum": 0, "mean": 1, "max": 2}
