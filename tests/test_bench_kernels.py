"""bench/kernels.py (the GPU kernel benchmark of issue 7) runs end to end on the CPU in its smoke
mode: Triton's interpreter, one small layer, correctness only. Keeps the prepared GPU script from
rotting between the sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import POLICIES, ROOT
from kvpolicy import load_policy, make_plan, resolve_model


def test_kernel_bench_smoke_runs_and_checks_the_decode_kernel(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--smoke",
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["policy"] == "kivi" and row["context"] == 1024 and not row["nan"]
    assert row["rel_err"] < 1e-2  # fp16 tensor-core operands: ~1e-3 of the output's scale
    # the bytes the decode reads are the plan's bytes for that layer, exactly (2-bit blocks and a
    # 128-token 16-bit window)
    plan = make_plan(load_policy(POLICIES / "kivi.kvp"), resolve_model("smollm2-135m"), 1024)
    assert row["stored_bytes"] == plan.layers[row["layer"]].bytes
    assert "decode_us" not in row  # no timings from the interpreter
    assert "kivi" in done.stdout.splitlines()[-2]
