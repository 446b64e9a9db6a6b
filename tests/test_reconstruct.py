"""`score reconstruct` (KVzip-style): the language, the reference, the re-reading passes in
transformers, and the engines that cannot run it.

The passes are checked against transformers' own eager attention on a tiny random Llama built
locally: the weight each context token receives while the model re-reads the context is read
from `output_attentions` of ordinary forwards over [context, instruction, chunk]."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from kvpolicy.diagnostics import Source
from kvpolicy.engines.hf import reconstruct
from kvpolicy.eval.whole import record_prefill
from kvpolicy.lang.ir import Policy, Score
from kvpolicy.lang.lower import check_source
from kvpolicy.models import PRESETS
from kvpolicy.plan.pages import UnsupportedConfiguration, page_format, paged_refusals
from kvpolicy.kernels import reference as R
from kvpolicy.store.whole import compress as compressor


def checked(text: str):
    return check_source(Source("test.kvp", text))


# ---- the language -------------------------------------------------------------------------------

def test_reconstruct_defaults_are_kvzips_rule():
    policy = checked("policy p { retain 50%\n score reconstruct }").policy
    assert policy.score == Score(method="reconstruct", pool="none", pool_kernel=1, gqa="max",
                                 chunk=512)
    policy = checked("policy p { retain 50%\n score reconstruct(chunk = 256, pool = max 7, "
                     "gqa = mean) }").policy
    assert (policy.score.chunk, policy.score.pool, policy.score.pool_kernel,
            policy.score.gqa) == (256, "max", 7, "mean")


@pytest.mark.parametrize("text, message", [
    ("score reconstruct(chunk = 8)", "chunk"),
    ("score reconstruct(observe = 32)", "score reconstruct has no argument 'observe'"),
    ("score snapkv(chunk = 512)", "score snapkv has no argument 'chunk'"),
    ("score reconstruct(chunk = max)", "chunk takes a number of tokens"),
    ("score keynorm\n adapt threshold", "adapt redistributes budgets"),
])
def test_reconstruct_arguments_are_checked(text, message):
    result = checked(f"policy p {{ retain 50%\n {text} }}")
    assert result.errors and message in result.errors[0].render(), [
        e.render() for e in result.errors]


def test_fmt_orders_chunk_after_observe(tmp_path):
    path = tmp_path / "p.kvp"
    path.write_text("policy p {\n    retain 50%\n    score reconstruct(gqa = max, chunk = 256)\n}\n")
    out = run_cli("fmt", "--stdout", str(path))
    assert "score reconstruct(chunk = 256, gqa = max)" in out.stdout


# ---- the reference ------------------------------------------------------------------------------

def test_reconstruct_attention_is_attention_over_context_then_causal_self():
    torch.manual_seed(0)
    b, hq, h, m, n, d, first = 2, 6, 2, 7, 11, 16, 3
    query = torch.randn(b, hq, m, d)
    keys, values = torch.randn(b, h, n + m, d), torch.randn(b, h, n + m, d)
    out, received = R.reconstruct_attention(query, keys, values, 0.3, first)
    mask = torch.ones(m, n + m, dtype=torch.bool)
    mask[:, n:] = torch.ones(m, m, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for head in range(hq):  # the largest weight each context token gets, one row at a time
        kv = head // (hq // h)
        for token in range(n):
            best = max(float(torch.softmax((query[0, head, row] @ keys[0, kv].T * 0.3)
                                           .masked_fill(~mask[row], -torch.inf), 0)[token])
                       for row in range(first, m))
            assert abs(float(received[0, head, token]) - best) < 1e-6


def test_reconstruct_importance_reduces_heads_then_pools():
    received = torch.rand(1, 4, 9)
    plain = R.reconstruct_importance(received, 2, "none", 1, "max")
    torch.testing.assert_close(plain, received.reshape(1, 2, 2, 9).amax(2))
    pooled = R.reconstruct_importance(received, 2, "max", 3, "max")
    torch.testing.assert_close(pooled[0, 0, 4], received[0, :2, 3:6].max())


# ---- the passes in transformers, against eager attention ---------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rope_theta=10000.0)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("skip", [frozenset(), frozenset({0, 1})])
@torch.no_grad()
def test_received_weights_are_what_eager_attention_pays(tiny, skip):
    torch.manual_seed(1)
    context = torch.randint(2, 97, (1, 40))
    context[0, [0, 1, 17]] = torch.tensor([0, 1, 0])  # "template markers"
    instruction = torch.tensor([[5, 6, 7, 8, 9]])
    records, _, _ = record_prefill(tiny, context, observe=1)
    reconstruct.record(tiny, instruction, context, records, chunk=16, skip=skip)
    n, k = context.shape[1], instruction.shape[1]
    reread = context[:, [i for i in range(n) if int(context[0, i]) not in skip]]
    assert reread.shape[1] == (37 if skip else 40)
    expected = None
    for start in range(0, reread.shape[1], 16):  # each pass alone, an ordinary forward
        ids = torch.cat([context, instruction, reread[:, start:start + 16]], dim=1)
        attentions = tiny(input_ids=ids, output_attentions=True).attentions
        # [layers, Hq, N]: rows of the re-read tokens, columns of the context
        weights = torch.stack([a[0, :, n + k:, :n].amax(1) for a in attentions])
        expected = weights if expected is None else torch.maximum(expected, weights)
    for layer, record in enumerate(records):
        assert record.keys.shape[2] == n  # nothing of the passes stays
        torch.testing.assert_close(record.received[16][0], expected[layer], atol=1e-6,
                                   rtol=1e-5)


@torch.no_grad()
def test_compression_keeps_the_tokens_the_reconstruction_attends_to(tiny):
    torch.manual_seed(2)
    context = torch.randint(0, 97, (1, 64))
    records, _, _ = record_prefill(tiny, context, observe=1)
    policy = checked("policy p { keep window 16\n retain 50%\n score reconstruct(chunk = 32) }"
                     ).policy
    with pytest.raises(ValueError, match="needs the context's reconstruction passes"):
        compressor.importance(policy, records[0])
    reconstruct.record(tiny, torch.tensor([[3, 4]]), context, records, chunk=32)
    scores = compressor.importance(policy, records[1])
    torch.testing.assert_close(scores, records[1].received[32].reshape(1, 2, 2, 64).amax(2))
    assert scores.shape == (1, 2, 64)


# ---- engines that cannot run it -----------------------------------------------------------------

def test_paged_engines_refuse_a_policy_that_ranks_by_reconstruction():
    ranks = checked("policy p { keep window 64\n retain 50%\n score reconstruct }").policy
    with pytest.raises(UnsupportedConfiguration, match="score reconstruct needs the whole"):
        page_format(ranks, PRESETS["smollm2-135m"], 64)
    guards = checked("policy p { score reconstruct\n keys int2 group 32 per channel\n values int2 "
                     "group 32 per token\n guard 10% of retained at int8 by score }").policy
    assert paged_refusals(guards)
    quantizes = checked("policy p { score reconstruct\n keys int4 }").policy  # ranks nothing
    assert not paged_refusals(quantizes)
    page_format(quantizes, PRESETS["smollm2-135m"], 64)
    assert not paged_refusals(Policy(name="x", retain=0.5))


def test_check_and_plan_say_which_engines_run_it(tmp_path):
    path = tmp_path / "p.kvp"
    path.write_text("policy p {\n    keep window 64\n    retain 50%\n    score reconstruct\n}\n")
    check = run_cli("check", str(path))
    assert check.returncode == 0
    assert "note: vLLM and the paged store cannot run this policy: score reconstruct" in (
        check.stderr)
    plan = run_cli("plan", str(path), "--model", "smollm2-135m", "--context", "4096")
    assert "engines: vLLM and the paged store cannot run it" in plan.stdout
    as_json = json.loads(run_cli("plan", str(path), "--model", "smollm2-135m", "--context",
                                 "4096", "--json").stdout)
    assert as_json["paged_refusals"] and "reconstruct" in as_json["paged_refusals"][0]


# ---- adapt threshold: one threshold on the score across layers and heads -------------------------

def test_adapt_threshold_gives_budget_where_the_important_tokens_are():
    from kvpolicy.plan.planner import make_plan
    policy = checked("policy p { keep sinks 4\n keep window 16\n retain 50%\n score reconstruct\n"
                     " adapt threshold }").policy
    shape = PRESETS["smollm2-135m"]
    plan = make_plan(policy, shape, 200)
    torch.manual_seed(3)
    scores = [torch.rand(1, shape.num_kv_heads, 200) * 0.1 for _ in plan.layers]
    scores[2][0, 1, 20:150] = 0.9  # layer 2, head 1 holds most of what matters
    scores[5][0, 0] = 0.0  # layer 5, head 0 holds nothing that matters
    masses = [compressor.middle_mass(s, layer) for s, layer in zip(scores, plan.layers)]
    selected, guards = compressor.redistribute(plan, masses, scores)
    planned = sum(layer.selected for layer in plan.layers) * shape.num_kv_heads
    assert sum(int(s.sum()) for s in selected) == planned  # the plan's bytes, exactly
    unit = plan.layers[0].token_unit
    assert all(bool((s % unit == 0).all()) for s in selected)
    assert int(selected[2][0, 1]) >= 130  # the 130 important tokens are kept
    assert int(selected[5][0, 0]) < plan.layers[5].selected
    middle = 200 - 4 - 16
    assert all(int(s.max()) <= middle - unit for s in selected)  # every head still evicts


def test_adapt_threshold_keeps_the_pools_top_tokens_in_a_real_compression(tiny):
    torch.manual_seed(4)
    context = torch.randint(0, 97, (1, 96))
    records, _, _ = record_prefill(tiny, context, observe=1)
    reconstruct.record(tiny, torch.tensor([[3, 4]]), context, records, chunk=32)
    from kvpolicy.models import shape_from_config
    from kvpolicy.plan.planner import make_plan
    shape = shape_from_config(tiny.config.to_dict(), name="tiny", source="transformers",
                              kv_dtype="float32")
    policy = checked("policy p { keep window 16\n retain 50%\n score reconstruct(chunk = 32)\n"
                     " adapt threshold }").policy
    plan = make_plan(policy, shape, 96)
    layers = compressor.compress(plan, records)
    kept = sum(int(layer.body_count.sum()) for layer in layers)
    assert kept == sum(layer.selected for layer in plan.layers) * shape.num_kv_heads
    scores = [compressor.importance(policy, r)[0, :, :80] for r in records]  # the middles
    threshold = torch.cat([s.flatten() for s in scores]).topk(kept).values[-1]
    counts = [(s > threshold).sum(-1) for s in scores]  # strictly above the pool's threshold
    unit = plan.layers[0].token_unit
    for layer, count in zip(layers, counts):  # kept, but for budgets rounded to whole units
        assert bool((layer.body_count[0] > count - unit).all()), (layer.body_count, count)
    assert max(int(layer.body_count.max()) for layer in layers) > plan.layers[0].selected
