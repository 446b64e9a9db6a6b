"""Per-layer retain ratios: interpolation between anchors, then rescaling to the global ratio.

The rule (docs/language.md, "How per-layer budgets are computed"):

1. Shape. Without anchors every layer has shape 1. With anchors, `linear` joins them with straight
   lines and holds the end values flat beyond the first and last anchor; `step` gives each layer
   the value of the nearest anchor at or below it (the first anchor below that); `pyramid` fits
   one straight line through all anchors by least squares (PyramidKV's arithmetic budgets).
   Negative values of the line are taken as 0.
2. Floors. A layer never keeps fewer than its sinks and window: floor = min(1, (sinks+window)/N).
3. Rescaling, when a global `retain R` is given: ratio_l = min(1, max(floor_l, s * shape_l)) with
   the one scale s >= 0 that makes the mean over layers exactly R. Layers that hit 1 or their
   floor are held there and the others absorb the difference in proportion to their shape. If
   even all floors exceed R, every layer is at its floor (the plan warns and states the effective
   ratio). Without a global ratio, ratio_l = min(1, max(floor_l, shape_l)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvpolicy.lang.ir import Interpolation


@dataclass(frozen=True)
class Schedule:
    ratios: tuple[float, ...]
    at_floor: tuple[int, ...]  # layers held at their sinks+window floor by clamping
    feasible: bool  # False when the floors alone exceed the global ratio


def layer_shape(anchors: Sequence[tuple[int, float]], num_layers: int,
                interpolation: Interpolation) -> list[float] | None:
    """The un-scaled per-layer values the anchors describe; None means "the same everywhere"."""
    if not anchors or interpolation == "uniform":
        return None
    points = sorted(anchors)
    if interpolation == "pyramid":
        return _least_squares_line(points, num_layers)
    shape = []
    for layer in range(num_layers):
        if interpolation == "step":
            below = [ratio for at, ratio in points if at <= layer]
            shape.append(below[-1] if below else points[0][1])
        else:
            shape.append(_piecewise_linear(points, layer))
    return shape


def _piecewise_linear(points: list[tuple[int, float]], layer: int) -> float:
    if layer <= points[0][0]:
        return points[0][1]
    if layer >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= layer <= x1:
            return y0 + (y1 - y0) * (layer - x0) / (x1 - x0)
    raise AssertionError("unreachable: layer lies between two anchors")


def _least_squares_line(points: list[tuple[int, float]], num_layers: int) -> list[float]:
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x if var_x else 0.0
    return [max(0.0, mean_y + slope * (layer - mean_x)) for layer in range(num_layers)]


def retain_schedule(shape: list[float] | None, target: float | None,
                    floors: Sequence[float]) -> Schedule:
    num_layers = len(floors)
    if shape is None:
        shape = [1.0] * num_layers
        if target is None:
            return Schedule(tuple([1.0] * num_layers), (), True)
    if target is None:
        ratios = [min(1.0, max(f, a)) for f, a in zip(floors, shape)]
        at_floor = tuple(i for i, (f, a) in enumerate(zip(floors, shape)) if a < f)
        return Schedule(tuple(ratios), at_floor, True)
    total = target * num_layers
    shape = _normalised(shape)
    if sum(floors) >= total:
        return Schedule(tuple(floors), tuple(range(num_layers)), sum(floors) <= total)
    if target >= 1.0:
        return Schedule(tuple([1.0] * num_layers), (), True)
    scale = _solve_scale(shape, floors, total)
    if scale is None:  # the shaped layers cannot absorb it all: lift the zero-shape layers evenly
        return _with_flat_zero_layers(shape, floors, total)
    ratios = [min(1.0, max(f, scale * a)) for f, a in zip(floors, shape)]
    at_floor = tuple(i for i, (f, a) in enumerate(zip(floors, shape)) if scale * a < f)
    return Schedule(tuple(ratios), at_floor, True)


def _normalised(shape: Sequence[float]) -> list[float]:
    """Shape divided by its maximum, with vanishing values (< 1e-12 of it) taken as 0, so the
    kinks below stay finite. Rescaling makes the overall scale of the shape irrelevant."""
    peak = max(shape, default=0.0)
    if peak <= 0:
        return [0.0] * len(shape)
    return [a / peak if a / peak > 1e-12 else 0.0 for a in shape]


def _solve_scale(shape: Sequence[float], floors: Sequence[float], total: float) -> float | None:
    """The s with sum_l clamp(s * shape_l, floor_l, 1) == total, exactly, or None if none exists.

    The sum is continuous, non-decreasing and piecewise linear in s, with kinks where a layer
    leaves its floor (s = floor/shape) or reaches 1 (s = 1/shape); the answer lies on one piece.
    """
    def filled(s: float) -> float:
        return sum(min(1.0, max(f, s * a)) for f, a in zip(floors, shape))

    kinks = sorted({f / a for f, a in zip(floors, shape) if a > 0} |
                   {1.0 / a for a in shape if a > 0})
    previous_s, previous_total = 0.0, filled(0.0)
    for s in kinks:
        current = filled(s)
        if current >= total:
            if current == previous_total:
                return s
            fraction = (total - previous_total) / (current - previous_total)
            return previous_s + (s - previous_s) * fraction
        previous_s, previous_total = s, current
    return None


def _with_flat_zero_layers(shape, floors, total) -> Schedule:
    ratios = [1.0 if a > 0 else f for f, a in zip(floors, shape)]
    zero = [i for i, a in enumerate(shape) if a <= 0]
    missing = total - sum(ratios)
    # Raise the zero-shape layers by the same amount, each up to 1 (water filling).
    while missing > 1e-15 and zero:
        share = missing / len(zero)
        room = min(1.0 - ratios[i] for i in zero)
        step = min(share, room)
        for i in zero:
            ratios[i] += step
        missing -= step * len(zero)
        zero = [i for i in zero if ratios[i] < 1.0]
    return Schedule(tuple(ratios), (), True)
