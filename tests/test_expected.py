"""`score expected` (Expected Attention): the language, the reference against the quantities it
stands for, the queries the Hugging Face runtime hands it (rotated back with the model's own
rotary tables, checked against the projections before RoPE), and the engines that cannot run it.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import run_cli
from kvpolicy.diagnostics import Source
from kvpolicy.engines.hf.cache import PolicyCache, attend_through, rope_tables
from kvpolicy.lang.ir import Score, policy_to_json
from kvpolicy.lang.lower import check_source
from kvpolicy.models import PRESETS
from kvpolicy.plan.pages import UnsupportedConfiguration, page_format, paged_refusals
from kvpolicy.plan.planner import make_plan
from kvpolicy.kernels import reference as R
from kvpolicy.store.whole import compress as compressor


def checked(text: str):
    return check_source(Source("test.kvp", text))


# ---- the language -------------------------------------------------------------------------------

def test_expected_defaults_and_arguments():
    policy = checked("policy p { retain 50%\n score expected }").policy
    assert policy.score == Score(method="expected", observe=512, future=512, pool="none",
                                 pool_kernel=1, gqa="mean")
    policy = checked("policy p { retain 50%\n score expected(observe = 64, future = 2048, "
                     "pool = max 7, gqa = max) }").policy
    assert (policy.score.observe, policy.score.future, policy.score.pool,
            policy.score.pool_kernel, policy.score.gqa) == (64, 2048, "max", 7, "max")


@pytest.mark.parametrize("text, message", [
    ("score expected(future = 0)", "future"),
    ("score expected(chunk = 512)", "score expected has no argument 'chunk'"),
    ("score snapkv(future = 512)", "score snapkv has no argument 'future'"),
    ("score expected(future = max)", "future takes a number of tokens"),
    ("score expected\n adapt temperature 0.5", "adapt redistributes budgets"),
])
def test_expected_arguments_are_checked(text, message):
    result = checked(f"policy p {{ retain 50%\n {text} }}")
    assert result.errors and message in result.errors[0].render(), [
        e.render() for e in result.errors]
    assert result.errors[0].span is not None  # located


def test_other_policies_keep_their_json_and_fmt_orders_future(tmp_path):
    snapkv = checked("policy p { retain 50%\n score snapkv }").policy
    assert "future" not in policy_to_json(snapkv)["score"]  # their hashes are unchanged
    path = tmp_path / "p.kvp"
    path.write_text("policy p {\n    retain 50%\n    score expected(gqa = max, future = 256, "
                    "observe = 128)\n}\n")
    out = run_cli("fmt", "--stdout", str(path))
    assert "score expected(observe = 128, future = 256, gqa = max)" in out.stdout


# ---- the reference ------------------------------------------------------------------------------

def tables(count: int, dim: int, theta: float = 10000.0, scaling: float = 1.0):
    """Rotary tables the way Llama builds them, written out here: angle t / theta^(2i / D) for
    the pair (i, i + D/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(count).float()[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scaling, angles.sin() * scaling


def rotate_at(x: torch.Tensor, t: int, cos, sin):
    """x [..., D] as the rotary embedding places it at position t (pairs i, i + D/2)."""
    half = x.shape[-1] // 2
    c, s = cos[t, :half], sin[t, :half]
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * c - second * s, second * c + first * s], dim=-1)


@pytest.mark.parametrize("scaling", [1.0, 1.3])
def test_without_spread_the_score_is_the_future_queries_mean_attention_times_the_value_norm(
        scaling):
    """Every observed query is one vector before RoPE: no covariance, and the expected logit of a
    key is the mean of its actual logits over the future positions (rotation is linear)."""
    torch.manual_seed(0)
    dim, n, w, future, kv_heads, group = 16, 40, 6, 9, 2, 3
    cos, sin = tables(n + future, dim, scaling=scaling)
    base = torch.randn(kv_heads * group, dim)  # one query per query head, before RoPE
    observed = torch.stack([rotate_at(base, t, cos, sin) for t in range(n - w, n)], dim=1)
    keys, values = torch.randn(1, kv_heads, n, dim), torch.randn(1, kv_heads, n, dim)
    scale = 0.25
    got = R.expected_importance(observed[None], keys, values, cos, sin, future, "none", 1,
                                "mean", scale)
    # a scaled table scales the model's queries at every position, the future's included
    futures = torch.stack([rotate_at(base, t, cos, sin) for t in range(n, n + future)])
    logits = torch.einsum("fhd,hnd->hn", futures.reshape(future, kv_heads * group, dim),
                          keys[0].repeat_interleave(group, 0)) * scale / future
    want = torch.softmax(logits, -1) * values[0].norm(dim=-1).repeat_interleave(group, 0)
    want = want.reshape(kv_heads, group, n).mean(1)
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=1e-4)


def test_the_spread_term_is_the_gaussian_expectation_of_the_attention():
    """Queries drawn from a Gaussian, one at each prompt position: with one future position,
    exp(s k.R mu + s^2 k^T R S R^T k / 2) is E[exp(s q.k)] over such queries, so the scores match
    the attention the same queries pay one position later, averaged over them (Monte Carlo)."""
    torch.manual_seed(1)
    dim, n = 8, 5000
    cos, sin = tables(n + 1, dim)
    before = torch.randn(n, dim) @ (torch.randn(dim, dim) * 0.15).T + torch.randn(dim)
    observed = torch.stack([rotate_at(before[t], t, cos, sin) for t in range(n)])
    keys, values = torch.randn(1, 1, n, dim), torch.ones(1, 1, n, dim)
    scale = 0.5
    got = R.expected_importance(observed[None, None], keys, values, cos, sin, 1, "none", 1,
                                "mean", scale)[0, 0]
    future = rotate_at(before, n, cos, sin)  # every drawn query at the next position
    log_mean_exp = torch.logsumexp(future @ keys[0, 0].T * scale, 0) - math.log(n)
    want = torch.softmax(log_mean_exp, 0) * math.sqrt(dim)
    torch.testing.assert_close(got, want, rtol=0.05, atol=0)
    # and the spread term matters: the mean query alone scores them otherwise
    mean_only = torch.softmax(keys[0, 0] @ future.mean(0) * scale, 0) * math.sqrt(dim)
    assert float(((mean_only - want).abs() / want).max()) > 0.2


# ---- what the Hugging Face runtime hands it -----------------------------------------------------

def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rope_theta=500.0)
    return LlamaForCausalLM(config).eval()


def tiny_gemma():
    """Sliding layers with a local RoPE base, full-attention layers with the global one, and a
    norm on the queries after their projection."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, sliding_window=8, layer_types=types,
                              max_position_embeddings=512, query_pre_attn_scalar=16)
    return Gemma3ForCausalLM(config).eval()


POLICY = "policy p { keep sinks 2\n keep window 8\n retain 40%\n score expected(observe = 24, " \
         "future = 64) }"


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma])
@torch.no_grad()
def test_the_recorded_queries_rotated_back_are_the_models_queries_before_rope(build):
    """The runtime records queries after RoPE; rotated back with `rope_tables` (the model's own
    rotary module, each layer's type) they equal what the layer computed before RoPE (its
    projection, or Gemma's normed projection). The check can fail: another base does not."""
    model = build()
    policy = checked(POLICY).policy
    before = {}

    def keep(index):
        return lambda module, inputs, output: before.__setitem__(index, output)
    hooks = []
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        hooks.append(getattr(attention, "q_norm", attention.q_proj).register_forward_hook(
            keep(index)))
    ids = torch.randint(2, 90, (1, 60))
    cache = PolicyCache(policy, model, cache_dtype="float32")
    with attend_through(model):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    for hook in hooks:
        hook.remove()
    n, checked_layers = ids.shape[1], 0
    for layer in cache.policy_layers:
        record = layer.prefill
        w = record.queries.shape[2]
        assert w == 24
        cos, sin = rope_tables(model, layer.index, n + 64)
        heads = record.queries.shape[1]
        want = before[layer.index][0]  # q_proj: [n, Hq * D]; Gemma's q_norm: [Hq, n, D]
        want = (want if want.dim() == 3 else want.reshape(n, heads, -1).transpose(0, 1))[:, -w:]
        torch.testing.assert_close(R.unrotate(record.queries, cos[n - w:n], sin[n - w:n])[0],
                                   want.float(), atol=1e-5, rtol=1e-5)
        wrong = tables(n, cos.shape[1], theta=10.0)
        assert not torch.allclose(R.unrotate(record.queries, wrong[0][n - w:n],
                                             wrong[1][n - w:n])[0], want, atol=1e-3)
        checked_layers += 1
    assert checked_layers == len(cache.policy_layers) >= 2
    cache.compress()  # and the compression reads them: exactly the plan's bytes
    assert cache.nbytes()["total"] == make_plan(policy, cache.shape, n).compressed_bytes


@torch.no_grad()
def test_compression_ranks_by_the_reference_and_not_like_snapkv():
    model = tiny_llama()
    policy = checked(POLICY).policy
    snapkv = checked(POLICY.replace("expected(observe = 24, future = 64)",
                                    "snapkv(observe = 24)")).policy
    ids = torch.randint(2, 90, (1, 80))
    cache = PolicyCache(policy, model, cache_dtype="float32")
    with attend_through(model):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    record = cache.policy_layers[1].prefill
    with pytest.raises(ValueError, match="needs the layer's rotary tables"):
        compressor.importance(policy, record)  # the runtime adds them when it compresses
    cos, sin = rope_tables(model, 1, 80 + 64)
    from dataclasses import replace
    scores = compressor.importance(policy, replace(record, rope=(cos, sin)))
    torch.testing.assert_close(scores, R.expected_importance(
        record.queries, record.keys, record.values, cos, sin, 64, "none", 1, "mean",
        record.scaling))
    assert not torch.equal(scores.argsort(-1), compressor.importance(snapkv, record).argsort(-1))


# ---- engines that cannot run it -----------------------------------------------------------------

def test_paged_engines_refuse_it_and_check_says_so(tmp_path):
    ranks = checked("policy p { keep window 64\n retain 50%\n score expected }").policy
    with pytest.raises(UnsupportedConfiguration, match="score expected needs the whole"):
        page_format(ranks, PRESETS["smollm2-135m"], 64)
    assert not paged_refusals(checked("policy p { score expected\n keys int4 }").policy)
    path = tmp_path / "p.kvp"
    path.write_text("policy p {\n    keep window 64\n    retain 50%\n    score expected\n}\n")
    check = run_cli("check", str(path))
    assert check.returncode == 0
    assert "note: vLLM and the paged store cannot run this policy: score expected" in (
        check.stderr)
