"""Per-layer retain ratios: interpolation, rescaling to the global ratio, clamping."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from kvpolicy.plan.schedule import layer_shape, retain_schedule


def test_linear_joins_anchors_and_holds_the_ends():
    shape = layer_shape([(2, 0.4), (6, 0.2)], 9, "linear")
    assert shape == pytest.approx([0.4, 0.4, 0.4, 0.35, 0.3, 0.25, 0.2, 0.2, 0.2])


def test_step_takes_the_nearest_anchor_at_or_below():
    shape = layer_shape([(2, 0.4), (5, 0.2)], 7, "step")
    assert shape == [0.4, 0.4, 0.4, 0.4, 0.4, 0.2, 0.2]


def test_pyramid_is_the_least_squares_line():
    # Three collinear anchors: the fit is exact. The line is clipped at 0.
    shape = layer_shape([(0, 0.5), (2, 0.3), (4, 0.1)], 7, "pyramid")
    assert shape == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0])
    # Non-collinear: slope and intercept of ordinary least squares on (0,.4),(1,.4),(2,.1).
    assert layer_shape([(0, 0.4), (1, 0.4), (2, 0.1)], 3, "pyramid") == pytest.approx(
        [0.45, 0.3, 0.15])


def test_no_anchors_or_uniform_means_same_everywhere():
    assert layer_shape([], 4, "linear") is None
    assert layer_shape([(0, 0.3)], 4, "uniform") is None


def test_rescaling_preserves_shape_ratios_when_nothing_clamps():
    schedule = retain_schedule([0.4, 0.2, 0.2, 0.2], 0.1, [0.0] * 4)
    assert schedule.ratios == pytest.approx([0.16, 0.08, 0.08, 0.08])
    assert schedule.feasible and schedule.at_floor == ()


def test_clamping_at_one_redistributes_to_the_others():
    # s * [1, .5, .5, .5] with mean .8: layer 0 saturates at 1, the others share the rest.
    schedule = retain_schedule([1.0, 0.5, 0.5, 0.5], 0.8, [0.0] * 4)
    assert schedule.ratios[0] == 1.0
    assert schedule.ratios[1:] == pytest.approx([2.2 / 3] * 3)


def test_floor_holds_layers_and_the_mean_still_holds():
    schedule = retain_schedule([0.4, 0.3, 0.02, 0.01], 0.2, [0.1] * 4)
    assert schedule.at_floor == (2, 3)
    assert schedule.ratios[2:] == (0.1, 0.1)
    assert sum(schedule.ratios) / 4 == pytest.approx(0.2)
    assert schedule.ratios[0] / schedule.ratios[1] == pytest.approx(0.4 / 0.3)


def test_infeasible_budget_puts_every_layer_at_its_floor():
    schedule = retain_schedule(None, 0.05, [0.25] * 3)
    assert schedule.ratios == (0.25, 0.25, 0.25)
    assert not schedule.feasible


def test_without_global_ratio_anchors_are_taken_as_written():
    assert retain_schedule(None, None, [0.1] * 3).ratios == (1.0, 1.0, 1.0)
    assert retain_schedule([0.3, 0.05], None, [0.1, 0.1]).ratios == (0.3, 0.1)


def test_zero_shape_layers_are_lifted_when_needed():
    schedule = retain_schedule([0.0, 0.0, 1.0, 1.0], 0.75, [0.0] * 4)
    assert sum(schedule.ratios) / 4 == pytest.approx(0.75)
    assert schedule.ratios[2:] == (1.0, 1.0)


@given(shape=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
       target=st.floats(0.0, 1.0), floor=st.floats(0.0, 1.0))
def test_mean_equals_target_whenever_feasible(shape, target, floor):
    floors = [floor] * len(shape)
    schedule = retain_schedule(shape, target, floors)
    assert all(floor - 1e-12 <= r <= 1.0 + 1e-12 for r in schedule.ratios)
    if floor <= target:
        assert sum(schedule.ratios) / len(shape) == pytest.approx(target, abs=1e-9)
    else:
        assert schedule.ratios == tuple(floors)
