"""Front-end timings: `kvpolicy check` on the shipped policies and on hostile files.

The language issue asks that no input take more than a second and that check/fmt/plan start in
well under a second. Unit tests only guard against hangs (a generous bound); this script records
the real wall times, median of several runs of the whole command (process start included).

    python bench/frontend.py            # writes bench/results/frontend.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from hostile_files import HOSTILE  # noqa: E402  (the same hostile inputs the tests use)

RUNS = 5


def wall(args: list[str], cwd: Path) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(args, cwd=cwd, capture_output=True, env=dict(os.environ,
                                                                     PYTHONPATH=str(ROOT)))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    kvpolicy = [sys.executable, "-m", "kvpolicy"]
    rows = {}
    rows["python -c pass (interpreter start, for reference)"] = wall(
        [sys.executable, "-c", "pass"], ROOT)
    rows["kvpolicy models"] = wall(kvpolicy + ["models"], ROOT)
    shipped = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "policies").glob("*.kvp"))
    rows["kvpolicy check policies/*.kvp"] = wall(kvpolicy + ["check", *shipped], ROOT)
    rows["kvpolicy fmt --check policies/*.kvp"] = wall(kvpolicy + ["fmt", "--check", *shipped],
                                                       ROOT)
    rows["kvpolicy plan aggressive --context 32768 --json"] = wall(
        kvpolicy + ["plan", "policies/aggressive.kvp", "--context", "32768", "--json"], ROOT)
    with tempfile.TemporaryDirectory() as directory:
        for name, data in sorted(HOSTILE.items()):
            path = Path(directory) / name
            path.write_bytes(data)
            rows[f"kvpolicy check {name} ({len(data):,} bytes)"] = wall(
                kvpolicy + ["check", str(path)], Path(directory))
    result = {
        "what": "median wall time of whole commands (process start included), seconds",
        "runs_per_command": RUNS,
        "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine()},
        "python": sys.version.split()[0],
        "timings_s": rows,
    }
    out = ROOT / "bench" / "results" / "frontend.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, rows))
    for name, seconds in rows.items():
        print(f"{name:<{width}}  {seconds:6.3f} s")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
