"""Dtype names, in one place: each storage dtype's size, its short name (the language's words and
the kernels' names use it), and its code in the generated kernels.

Names only, so the front end can plan without torch; torch's own dtypes for these names are
`kvpolicy.kernels.reference.torch_dtype` (and its inverse `dtype_name`).
"""

from __future__ import annotations

DTYPE_BYTES = {"int32": 4, "uint8": 1, "float16": 2, "bfloat16": 2, "float32": 4}
# The dtypes of a cache's full-precision regions (and of the uncompressed baseline): planning
# presets and the compiled kernels take the 16-bit two; the CPU runtime may keep an fp32 model's
# cache in fp32 (exact mode).
HALF_DTYPES = ("bfloat16", "float16")
KV_DTYPES = HALF_DTYPES + ("float32",)
SHORT_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
LONG_NAMES = {short: name for name, short in SHORT_NAMES.items()}
# A float's code in the generated kernels (codegen/: SRC_DTYPE, NEW_DTYPE, kv_code, scale_code)
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}


def short_name(dtype: str) -> str:
    """float16 → fp16, bfloat16 → bf16, float32 → fp32; any other name as it is."""
    return SHORT_NAMES.get(dtype, dtype)
