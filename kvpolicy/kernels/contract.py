"""What the Triton launchers (`launch`) and the C kernels (`cpu`) agree on with their templates:
the codes of the source dtypes a kernel reads (`SRC_DTYPE` / `NEW_DTYPE` in codegen/*.jinja) and
of the reductions of attention mass over a KV group's query heads (`REDUCE`)."""

from __future__ import annotations

import torch

SOURCE_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
MASS_REDUCE = {"sum": 0, "mean": 1, "max": 2}
