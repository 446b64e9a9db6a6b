"""Compiling generated kernels for Hopper (sm_90) without a GPU: registers, spills, vector loads.

Triton compiles to PTX and cubin for any target on any machine; cuobjdump (shipped in the triton
wheel) reads the cubin's resource usage. A kernel that spills to local memory is reported as a
failure: the compiler issue requires none.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvpolicy.dtypes import short_name

HOPPER = ("cuda", 90, 32)

# Argument types of each generated kernel, by name: "kv" is the model's 16-bit dtype.
_SIGNATURES = {
    "pack_kernel": {"src_key": "*kv", "src_value": "*kv", "stride_key": "i32",
                    "stride_value": "i32", "src_index": "*i32", "positions": "*i32",
                    "blocks": "*u8", "block_ids": "*i32", "SRC_DTYPE": "constexpr"},
    "unpack_kernel": {"blocks": "*u8", "block_ids": "*i32", "counts": "*i32",
                      "out_key": "*fp32", "out_value": "*fp32", "out_positions": "*i32"},
    "decode_kernel": {
        "q": "*kv", "stride_qb": "i32", "stride_qh": "i32", "sm_scale": "fp32",
        "sinks_key": "*kv", "sinks_value": "*kv", "stride_sb": "i32", "stride_sh": "i32",
        "stride_st": "i32", "sink_len": "*i32",
        "window_key": "*kv", "window_value": "*kv", "stride_wb": "i32", "stride_wh": "i32",
        "stride_wt": "i32", "window_len": "*i32",
        "cent_key": "*kv", "cent_value": "*kv", "stride_cb": "i32", "stride_ch": "i32",
        "stride_ct": "i32", "cent_count": "*i32", "cent_capacity": "i32",
        "guard_blocks": "*u8", "guard_start": "*i32", "guard_count": "*i32",
        "body_blocks": "*u8", "body_start": "*i32", "body_count": "*i32",
        "part_m": "*fp32", "part_l": "*fp32", "part_acc": "*fp32",
        "kv_heads": "i32", "num_splits": "i32",
        "BLOCK_T": "constexpr", "GUARD_STEP": "constexpr", "BODY_STEP": "constexpr"},
    "paged_decode_kernel": {
        "q": "*kv", "stride_qb": "i32", "stride_qh": "i32", "sm_scale": "fp32",
        "new_key": "*kv", "new_value": "*kv", "stride_nb": "i32", "stride_nh": "i32",
        "pages": "*u8", "stride_pb": "i32", "stride_ph": "i32",
        "guard_table": "*i32", "stride_gtb": "i32", "stride_gth": "i32",
        "guard_count": "*i32", "stride_gcb": "i32", "stride_gch": "i32",
        "body_table": "*i32", "stride_btb": "i32", "stride_bth": "i32",
        "body_count": "*i32", "body_tail": "*i32", "stride_bcb": "i32", "stride_bch": "i32",
        "body_offset": "i32", "guard_tokens": "i32", "body_tokens": "i32",
        "staging": "*kv", "stride_ss": "i32", "stride_sh": "i32", "stride_st": "i32",
        "stride_sr": "i32", "stage_table": "*i32", "stage_len": "*i32", "stride_sgb": "i32",
        "stride_sgh": "i32", "staged_count": "*i32", "stride_scb": "i32", "stride_sch": "i32",
        "block_size": "i32",
        "part_m": "*fp32", "part_l": "*fp32", "part_acc": "*fp32", "logits": "*fp32",
        "stride_lr": "i32", "kv_heads": "i32", "num_splits": "i32",
        "BLOCK_T": "constexpr", "GUARD_STEP": "constexpr", "BODY_STEP": "constexpr",
        "NEW_DTYPE": "constexpr", "EMIT_MASS": "constexpr"},
    "combine_kernel": {"part_m": "*fp32", "part_l": "*fp32", "part_acc": "*fp32",
                       "out": "*fp32", "lse_m": "*fp32", "lse_l": "*fp32", "num_splits": "i32",
                       "MAX_SPLITS": "constexpr"},
    "mass_kernel": {"logits": "*fp32", "lse_m": "*fp32", "lse_l": "*fp32", "mass": "*fp32",
                    "slots": "i32", "BLOCK_S": "constexpr", "REDUCE": "constexpr"},
}
# Strides that are table widths or counts, not multiples of a head: not assumed divisible by 16.
_UNALIGNED = {"stride_gtb", "stride_gth", "stride_gcb", "stride_gch", "stride_btb", "stride_bth",
              "stride_bcb", "stride_bch", "stride_sgb", "stride_sgh", "stride_scb", "stride_sch",
              "stride_lr"}
_ALIGNED = {"body_offset"}
_KERNELS_BY_KIND = {"pack": ("pack_kernel",), "unpack": ("unpack_kernel",),
                    "decode": ("decode_kernel",), "paged_decode": ("paged_decode_kernel",),
                    "combine": ("combine_kernel", "mass_kernel")}


@dataclass(frozen=True)
class KernelUsage:
    uri: str
    kernel: str
    registers: int
    local_bytes: int  # spills land in local memory
    stack_bytes: int
    shared_bytes: int
    wide_loads: int  # 16-byte global reads in the PTX: ld.global.v4.b32 or cp.async of 16 bytes
    narrow_loads: int  # other global reads

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0


@dataclass(frozen=True)
class HopperReport:
    kernels: tuple[KernelUsage, ...]

    @property
    def ok(self) -> bool:
        return not any(k.spills for k in self.kernels)

    def render(self) -> str:
        lines = [f"sm_90 compile: {len(self.kernels)} kernels, "
                 f"{'no spills' if self.ok else 'SPILLS'}"]
        for k in self.kernels:
            flag = "  SPILLS" if k.spills else ""
            lines.append(f"  {k.kernel:<15} regs {k.registers:>3}  local {k.local_bytes:>5}  "
                         f"shared {k.shared_bytes:>6}  16-byte loads {k.wide_loads:>3}  "
                         f"narrow {k.narrow_loads:>3}  {k.uri[:60]}{flag}")
        return "\n".join(lines)


def _constexprs(kernel: str, module) -> dict:
    """Launch constants as the launchers pass them (kvpolicy.kernels.launch)."""
    if kernel == "pack_kernel":
        return {"SRC_DTYPE": module.KV_DTYPE.value}
    def step(prefix):
        block = getattr(module, f"{prefix}B", None)
        return max(1, 16 // block.value) if block is not None else 1
    if kernel == "decode_kernel":
        return {"BLOCK_T": 32, "GUARD_STEP": step("GUARD_"), "BODY_STEP": step("BODY_")}
    if kernel == "paged_decode_kernel":  # with attention mass: what snapkv policies run
        return {"BLOCK_T": 32, "GUARD_STEP": step("GUARD_"), "BODY_STEP": step("BODY_"),
                "NEW_DTYPE": module.KV_DTYPE.value, "EMIT_MASS": True}
    if kernel == "combine_kernel":
        return {"MAX_SPLITS": 16}
    if kernel == "mass_kernel":
        return {"BLOCK_S": 128, "REDUCE": 1}
    return {}


def compile_kernel(module, kernel: str, uri: str, kv_dtype: str = "bf16") -> KernelUsage:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    function = getattr(module, kernel)
    signature = {name: ("*" + kv_dtype if kind == "*kv" else kind)
                 for name, kind in _SIGNATURES[kernel].items()}
    constexprs = _constexprs(kernel, module)
    # What the JIT specializes at run time for torch allocations and head_dim-multiple strides:
    # pointers, strides and byte offsets (a page's sections are 16-byte aligned) divisible by 16.
    aligned = [i for i, (name, kind) in enumerate(signature.items())
               if kind.startswith("*") or name in _ALIGNED
               or (name.startswith("stride") and name not in _UNALIGNED)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(fn=function, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": module.NUM_WARPS} if hasattr(module, "NUM_WARPS") else {}
    compiled = triton.compile(source, target=GPUTarget(*HOPPER), options=options)
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    wide, narrow = _global_loads(ptx)
    return KernelUsage(uri=uri, kernel=kernel, registers=usage.get("REG", 0),
                       local_bytes=usage.get("LOCAL", 0), stack_bytes=usage.get("STACK", 0),
                       shared_bytes=usage.get("SHARED", 0), wide_loads=wide, narrow_loads=narrow)


def _global_loads(ptx: str) -> tuple[int, int]:
    """(16-byte, narrower) global reads: plain loads and asynchronous copies to shared memory
    (Triton pipelines loop loads on Hopper into cp.async)."""
    wide = narrow = 0
    for match in re.finditer(r"ld\.global((?:\.\w+)*)", ptx):
        suffix = match.group(1)
        vector = re.search(r"\.v(\d)\.[bfu](\d+)", suffix)
        width = int(vector.group(1)) * int(vector.group(2)) // 8 if vector else 0
        wide, narrow = (wide + 1, narrow) if width == 16 else (wide, narrow + 1)
    for match in re.finditer(r"cp\.async\.c[ag]\.shared\.global[^;]*?, (0x[0-9a-f]+|\d+)", ptx):
        size = int(match.group(1), 0)
        wide, narrow = (wide + 1, narrow) if size == 16 else (wide, narrow + 1)
    return wide, narrow


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "kernel.cubin"
        path.write_bytes(cubin)
        output = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True,
                                text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)",
                                                        output)}


def check_artifact(directory: str | os.PathLike[str]) -> HopperReport:
    """Compiles every kernel of a built artifact for sm_90."""
    from kvpolicy.compiler.artifact import load
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    compiled = load(directory)
    kv_dtype = short_name(compiled.model.kv_dtype)
    usages = []
    for kernel in compiled.manifest["kernels"]:
        module = compiled.kernels[kernel["uri"]]
        for name in _KERNELS_BY_KIND[kernel["kind"]]:
            usages.append(compile_kernel(module, name, kernel["uri"], kv_dtype))
    return HopperReport(tuple(usages))


def main(argv: list[str] | None = None) -> int:
    """python -m kvpolicy.compiler.hopper DIR... — sm_90 usage of every kernel of the given
    artifacts (each URI once), as JSON lines; exit status 1 if any kernel spills."""
    import argparse
    import dataclasses
    import sys
    parser = argparse.ArgumentParser(prog="python -m kvpolicy.compiler.hopper")
    parser.add_argument("artifacts", nargs="+")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU", file=sys.stderr)
        return 2
    from kvpolicy.compiler.artifact import ArtifactError, load
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    seen, ok = set(), True
    for directory in args.artifacts:
        try:
            compiled = load(directory)
        except ArtifactError as exc:
            print(exc, file=sys.stderr)
            return 1
        kv_dtype = short_name(compiled.model.kv_dtype)
        for kernel in compiled.manifest["kernels"]:
            if (kernel["uri"], kv_dtype) in seen:
                continue
            seen.add((kernel["uri"], kv_dtype))
            module = compiled.kernels[kernel["uri"]]
            for name in _KERNELS_BY_KIND[kernel["kind"]]:
                usage = compile_kernel(module, name, kernel["uri"], kv_dtype)
                ok &= not usage.spills
                print(json.dumps(dataclasses.asdict(usage) | {"spills": usage.spills}),
                      flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
