"""Greedy generation through a real vLLM engine, one engine per process.

vLLM loads its plugins once per process, and a baseline run must not see kvpolicy's backend, so
every engine runs in a fresh interpreter:

    run = generate(prompts, model="path/to/model", artifact="build/kivi", max_tokens=12)
    run.token_ids      # per prompt, the greedy tokens vLLM produced
    run.sealed_blocks  # per layer, blocks sealed into packed pages in that process
    run.capacity_tokens

`prompts` are token-id lists (both engines of a comparison are fed the same ids). The child is
`python -m kvpolicy.engines.vllm.offline`, which reads one JSON request on stdin and writes
one JSON result as the last line of stdout; it is an interface, documented here, so examples,
eval and tests all use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field


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


@dataclass
class EngineRun:
    token_ids: list[list[int]]
    texts: list[str]
    num_blocks: int
    capacity_tokens: int
    sealed_blocks: list[int] = field(default_factory=list)  # per layer (plugin runs only)
    staging_moves: dict = field(default_factory=dict)  # blocks spilled / restored (plugin runs)
    request: dict = field(default_factory=dict)


class EngineFailed(RuntimeError):
    """The engine process failed; `stderr` holds the end of what it printed."""

    def __init__(self, message: str, stderr: str):
        last = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
        super().__init__(message + "".join(f"\n  {line}" for line in last))
        self.stderr = stderr


def generate(prompts: list[list[int]], model: str, artifact: str | None = None,
             timeout: float | None = 900, **options) -> EngineRun:
    """Runs the prompts through a fresh vLLM engine (see EngineRequest for the options)."""
    request = EngineRequest(prompts=[list(map(int, p)) for p in prompts], model=str(model),
                            artifact=None if artifact is None else str(artifact), **options)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("KVPOLICY_ARTIFACT", None)
    env.pop("KVPOLICY_STAGING_BLOCKS", None)
    if request.artifact is not None:
        env["KVPOLICY_ARTIFACT"] = request.artifact
    if request.staging_blocks is not None:
        env["KVPOLICY_STAGING_BLOCKS"] = str(request.staging_blocks)
    done = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(asdict(request)),
                          env=env, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        what = "kvpolicy's backend" if request.artifact else "vLLM's own attention"
        raise EngineFailed(f"the vLLM engine ({what}) exited with {done.returncode}",
                           done.stderr[-6000:])
    return EngineRun(**json.loads(lines[-1]))


def _serve(request: EngineRequest) -> dict:
    """In the child: one engine, the prompts, greedy decoding."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=request.model, dtype=request.dtype, block_size=request.block_size,
              max_model_len=request.max_model_len, max_num_seqs=request.max_num_seqs,
              max_num_batched_tokens=request.max_num_batched_tokens or request.max_model_len,
              enable_prefix_caching=False, kv_cache_memory_bytes=request.kv_cache_memory_bytes,
              seed=0, enforce_eager=not request.compile)
    outputs = llm.generate([{"prompt_token_ids": p} for p in request.prompts],
                           SamplingParams(temperature=0.0, max_tokens=request.max_tokens,
                                          ignore_eos=True))
    cache = llm.llm_engine.vllm_config.cache_config
    backend = sys.modules.get("kvpolicy.engines.vllm.backend")  # loaded by vLLM, if at all
    sealed = dict(backend.SEALED_BLOCKS) if backend else {}
    return asdict(EngineRun(
        token_ids=[list(o.outputs[0].token_ids) for o in outputs],
        texts=[o.outputs[0].text for o in outputs], num_blocks=cache.num_gpu_blocks,
        capacity_tokens=cache.num_gpu_blocks * request.block_size,
        sealed_blocks=[sealed.get(i, 0) for i in range(len(sealed))],
        staging_moves=dict(backend.STAGING_MOVES) if backend else {},
        request={k: v for k, v in asdict(request).items() if k != "prompts"}))


if __name__ == "__main__":
    result = _serve(EngineRequest(**json.loads(sys.stdin.read())))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
