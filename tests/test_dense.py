"""store/whole/dense.py (the runtime's CPU attention) against the reference it vectorizes: every
region populated, uneven counts per head, GQA, empty regions, chunks of several queries."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvpolicy.kernels import reference as R

from kvpolicy.store.whole import dense
from random_layers import random_layer

CASES = [dict(seed=0), dict(seed=1, heads=3, batch=1, centroids=0),
         dict(seed=2, sinks=0, guard_counts=[[0, 0], [0, 0]]),
         dict(seed=3, body_counts=[[0, 31], [64, 1]], window=8),
         dict(seed=4, kv_dtype=torch.float16)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c['seed']}")
@pytest.mark.parametrize("group", [1, 3])
def test_one_step_equals_the_reference_with_its_attention_mass(case, group):
    layer = random_layer(**case)
    torch.manual_seed(case["seed"])
    q = torch.randn(layer.batch, layer.kv_heads * group, layer.head_dim)
    want, want_mass = R.attend(q, layer, 0.125, with_mass=True)
    got, _ = dense.attend(q, layer, 0.125)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    got, mass = dense.attend(q, layer, 0.125, with_mass=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mass, want_mass, atol=2e-6, rtol=1e-4)
    assert bool((mass.sum(-1) - group).abs().max() < 1e-4)  # each query's mass sums to 1


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"seed{c['seed']}")
def test_a_chunk_is_each_query_over_the_window_up_to_itself(case):
    """Query i of an m-token chunk (the window's last m tokens) sees what one decode step sees
    with the window cut just after token i."""
    layer = random_layer(**case)
    m = int(layer.window_len.min())
    m = min(m, 5)
    torch.manual_seed(case["seed"])
    q = torch.randn(layer.batch, layer.kv_heads * 2, m, layer.head_dim)
    got = dense.attend_chunk(q, layer, 0.125)
    for i in range(m):
        cut = dataclasses.replace(layer, window_len=layer.window_len - (m - 1 - i))
        want, _ = R.attend(q[:, :, i], cut, 0.125)
        torch.testing.assert_close(got[:, :, i], want, atol=2e-5, rtol=1e-4)


def test_a_sequence_with_nothing_stored_attends_to_nothing():
    layer = random_layer(seed=5, sinks=0, centroids=0, guard_counts=[[0, 0], [0, 0]],
                         body_counts=[[0, 0], [0, 0]])
    layer = dataclasses.replace(layer, window_len=torch.tensor([0, 3], dtype=torch.int32))
    q = torch.randn(2, 2, layer.head_dim)
    got, _ = dense.attend(q, layer, 0.125)
    assert bool((got[0] == 0).all()) and bool(got[1].abs().sum() > 0)
