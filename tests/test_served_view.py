"""The served view (kvpolicy.plan.served): what one request holds in the paged engines at a block
size, from the page plan's exact accounting, beside the whole-prompt plan — and `kvpolicy plan
--block-size`, which prints it."""

from __future__ import annotations

import json

import pytest

from conftest import POLICIES, SHIPPED, run_cli

from kvpolicy.lang.lower import load_policy
from kvpolicy.models import resolve_model
from kvpolicy.plan.pages import UnsupportedConfiguration, page_format
from kvpolicy.plan.planner import make_plan
from kvpolicy.plan.served import SERVED_CONTEXTS, served_contexts, served_view
from kvpolicy.plan.streams import stream_plan

SMOL = resolve_model("smollm2-135m")
QWEN = resolve_model("qwen2.5-7b")
SEED = ("conservative", "aggressive", "extreme")
CASES = [(path.stem, SMOL) for path in SHIPPED] + [(name, QWEN) for name in SEED]


@pytest.mark.parametrize("block_size", [16, 32, 64, 256])
@pytest.mark.parametrize("name,model", CASES, ids=[f"{n}-{m.name}" for n, m in CASES])
def test_the_view_is_the_page_plans_bytes_beside_the_plans(name, model, block_size):
    policy = load_policy(POLICIES / f"{name}.kvp")
    contexts = served_contexts(None, model.max_context)
    view = served_view(policy, model, block_size, contexts, layout="pages")
    try:
        fmt = page_format(policy, model, block_size)
    except UnsupportedConfiguration as exc:
        assert view.refused == tuple(exc.reasons) and view.rows == ()
        assert len(view.refused) == len(set(view.refused))  # one reason, not one per layer
        return
    assert view.refused == () and [row.context for row in view.rows] == contexts
    for row in view.rows:
        plan = make_plan(policy, model, row.context)
        assert row.held == fmt.held_bytes(row.context) == \
            row.pool + row.window_staging + row.sinks_staging
        assert row.baseline == plan.baseline_bytes  # the same 16-bit cache as the plan's
        assert row.plan_ratio == plan.compression_ratio
        assert row.above_baseline == (row.held > row.baseline)
        blocks = -(-row.context // block_size)
        assert row.pool == blocks * model.num_layers * model.num_kv_heads * fmt.page_bytes
        assert (row.sinks_staging > 0) == (policy.sinks > 0)
    lines = view.lines()
    assert any(line.startswith("warning: one request holds more than the 16-bit cache")
               for line in lines) == any(row.above_baseline for row in view.rows)


def test_the_contexts_are_the_asked_one_and_the_standard_ones_within_the_model():
    assert served_contexts(None, 8192) == [c for c in SERVED_CONTEXTS if c <= 8192]
    assert served_contexts(3000, 4096) == [2048, 3000, 4096]
    assert served_contexts(32768, 32768) == list(SERVED_CONTEXTS)


@pytest.mark.parametrize("name,block_size", [("heads_8x_keep30", 16), ("kivi", 32),
                                             ("retrieval_6x", 16), ("aggressive", 64)])
def test_the_stream_layouts_view_is_the_stream_plans_bytes(name, block_size):
    """One worker's layout: what the stream plan, laid out for the longest context, says one
    request holds (within 10% of the whole-prompt plan: tests/test_streams.py)."""
    policy = load_policy(POLICIES / f"{name}.kvp")
    contexts = [2048, 4096]
    view = served_view(policy, SMOL, block_size, contexts)
    assert view.layout == "streams" and view.to_json()["layout"] == "streams"
    try:
        streams = stream_plan(policy, SMOL, block_size, 4096)
    except UnsupportedConfiguration as exc:
        assert view.refused == tuple(exc.reasons) and view.rows == ()
        return
    for row, context in zip(view.rows, contexts):
        held = streams.request_bytes(context)
        assert (row.pool, row.window_staging, row.pending_staging, row.sinks_staging) == \
            (held.pool, held.window_staging, held.pending_staging, 0)
        assert row.held == streams.held_bytes(context)
        assert row.baseline == make_plan(policy, SMOL, context).baseline_bytes
    assert "pending MiB" in "\n".join(view.lines())


def test_plan_prints_the_served_view_in_text_and_json():
    args = ("plan", "policies/aggressive.kvp", "--model", "qwen2.5-7b", "--context", "32k",
            "--block-size", "64", "--layout", "pages")
    text = run_cli(*args)
    assert text.returncode == 0, text.stderr
    assert ("Served by paged engines (vLLM, kvpolicy's paged store), pages layout, blocks of 64 "
            "tokens") in text.stdout
    document = json.loads(run_cli(*args, "--json").stdout)
    served = document["served"]
    fmt = page_format(load_policy(POLICIES / "aggressive.kvp"), QWEN, 64)
    assert served["block_size"] == 64 and served["refused"] == []
    assert [row["context"] for row in served["rows"]] == list(SERVED_CONTEXTS)
    for row in served["rows"]:
        assert row["held_bytes"] == fmt.held_bytes(row["context"])
        assert f"{row['ratio']:.2f}x" in text.stdout
    assert served["rows"][-1]["plan_ratio"] == document["compression_ratio"]
    assert "served" not in json.loads(run_cli(*args[:-4], "--json").stdout)
    streams = json.loads(run_cli(*args[:-2], "--json").stdout)["served"]  # one worker's layout
    plan = stream_plan(load_policy(POLICIES / "aggressive.kvp"), QWEN, 64, 32768)
    assert streams["layout"] == "streams"
    assert [row["held_bytes"] for row in streams["rows"]] == \
        [plan.held_bytes(row["context"]) for row in streams["rows"]]


def test_plan_says_why_a_block_size_cannot_be_served():
    result = run_cli("plan", "policies/kivi.kvp", "--model", "smollm2-135m", "--context", "4k",
                     "--block-size", "16", "--layout", "pages", "--json")
    assert result.returncode == 0, result.stderr
    refused = json.loads(result.stdout)["served"]["refused"]
    assert refused == ["every layer: block size 16 is not a multiple of the format's 32-token "
                       "unit (per-channel groups need whole blocks; use --block-size 32 or a "
                       "multiple)"]


@pytest.mark.parametrize("value", ["0", "-4", "4097"])
def test_plan_refuses_a_block_size_out_of_range_before_reading_the_policy(value, tmp_path):
    result = run_cli("plan", str(tmp_path / "missing.kvp"), "--block-size", value)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"--block-size {value}: between 1 and 4,096 tokens" in result.stderr
    assert "missing.kvp" not in result.stderr
