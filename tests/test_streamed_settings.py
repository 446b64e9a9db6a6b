"""vLLM start-up with the stream layout (engines.vllm.settings, duck-typed: no vLLM needed): one
worker's default, its stream plan at the engine's block size and max_model_len, the staging it
pays out of the KV memory (window slots and pending chunks, counted independently here), what
start-up says, and where it is refused."""

from __future__ import annotations

import math

import pytest

from conftest import POLICIES
from test_vllm_paged import engine_config

from kvpolicy import load_policy
from kvpolicy.compiler.artifact import compile_policy
from kvpolicy.engines.vllm.settings import LAYOUT_ENV, WorkerShare, load_settings
from kvpolicy.models import resolve_model
from kvpolicy.plan.pages import UnsupportedConfiguration
from kvpolicy.plan.streams import stream_plan

SMOL = resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    made = {}
    for name in ("kivi", "heads_8x_keep30"):
        made[name] = tmp_path_factory.mktemp("artifacts") / name
        compile_policy(load_policy(POLICIES / f"{name}.kvp"), SMOL, made[name])
    return made


def test_one_worker_serves_the_stream_layout_and_pays_its_staging(artifacts, monkeypatch):
    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    config = engine_config(block_size=16)  # 4 sequences, 256-token steps, max_model_len 2048
    config.cache_config.kv_cache_memory_bytes = 64 << 20
    s = load_settings(str(artifacts["heads_8x_keep30"]), config)
    policy = load_policy(POLICIES / "heads_8x_keep30.kvp")
    plan = stream_plan(policy, SMOL, 16, 2048)
    assert s.layout == "streams" and s.page_format is None and s.streams == plan
    # a slot per window block, the open block and one more per sequence, and a step's prompt
    assert s.staging_blocks == 4 * (math.ceil(policy.window / 16) + 2) + 256 // 16
    worst = max(sum(plan.pending_rows_at(e)) for e in range(len(plan.kept)))
    assert s.pending_chunks * 16 == 4 * worst  # every sequence's worst case, all layers
    token = 2 * 64 * 2  # keys and values of one KV head, bfloat16
    slot = 3 * 16 * token  # score recent: no attention mass
    assert s.staging_bytes == 30 * s.staging_blocks * slot + s.pending_chunks * 16 * token
    assert s.block_bytes == plan.block_bytes and s.baseline_block_bytes == 30 * 3 * 16 * token
    want = ((64 << 20) - s.staging_bytes) // plan.block_bytes / ((64 << 20) // (30 * 3 * 16 * token))
    assert s.whole_process_ratio() == pytest.approx(want)
    text = s.describe()
    assert "stream layout" in text and f"{plan.block_bytes:,} bytes" in text
    assert "kvpolicy: Served by paged engines (vLLM, kvpolicy's paged store), streams layout, " \
        "blocks of 16" in text
    assert f"{want:.2f}x the tokens of vLLM's own pages in the same memory" in text


def test_the_page_layout_refuses_what_the_stream_layout_serves(artifacts, monkeypatch):
    monkeypatch.setenv(LAYOUT_ENV, "pages")
    with pytest.raises(UnsupportedConfiguration, match="block size 16 is not a multiple"):
        load_settings(str(artifacts["heads_8x_keep30"]), engine_config(block_size=16))
    monkeypatch.setenv(LAYOUT_ENV, "streams")
    assert load_settings(str(artifacts["heads_8x_keep30"]),
                         engine_config(block_size=16)).layout == "streams"
    monkeypatch.setenv(LAYOUT_ENV, "rows")
    with pytest.raises(UnsupportedConfiguration, match="KVPOLICY_LAYOUT='rows': choose one"):
        load_settings(str(artifacts["kivi"]), engine_config())


def test_parallel_workers_hold_the_page_layout(artifacts, monkeypatch):
    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    share = WorkerShare(tensor_rank=1, tensor_size=3)
    s = load_settings(str(artifacts["kivi"]), engine_config(), share)
    assert s.layout == "pages" and s.page_format.kv_heads == 1
    monkeypatch.setenv(LAYOUT_ENV, "streams")
    with pytest.raises(UnsupportedConfiguration, match="lays out one worker's cache"):
        load_settings(str(artifacts["kivi"]), engine_config(), share)
