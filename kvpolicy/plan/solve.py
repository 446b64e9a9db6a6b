"""The `retain` that gives a compression ratio: the planner's ratio as a function of one policy
parameter, inverted by bisection.

The plan's ratio falls as `retain` grows (more tokens kept, more bytes), in steps of whole token
units, so bisection over the percentage (two decimals, as a policy file writes it) finds either
the closest ratio or the largest `retain` whose ratio still reaches the target.
"""

from __future__ import annotations

import math
from typing import Callable

from kvpolicy.lang.ir import Policy
from kvpolicy.models import ModelShape
from kvpolicy.plan.planner import make_plan

STEPS = 30  # 100% / 2^30: far below the 0.01% a policy file writes


def solve_retain(policy_at: Callable[[float], Policy], shape: ModelShape, context: int,
                 target: float, at_least: bool = False) -> tuple[float, float] | None:
    """(retain percentage with two decimals, its planned ratio at `context`) for the policy that
    `policy_at(percent)` builds. `at_least=False`: the ratio closest to `target`;
    `at_least=True`: the largest retain whose ratio is ≥ `target`, or None when even
    `retain 0%` does not reach it."""
    def ratio(percent: float) -> float:
        return make_plan(policy_at(percent), shape, context).compression_ratio

    low, high = 0.0, 100.0  # ratio(low) ≥ target > ratio(high), as far as bisection knows
    for _ in range(STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if ratio(middle) >= target else (low, middle)
    if not at_least:
        best = min((round(low, 2), round(high, 2)), key=lambda p: abs(ratio(p) - target))
        return best, ratio(best)
    percent = math.floor(low * 100) / 100  # two decimals, at or below low: still ≥ target
    reached = ratio(percent)
    return (percent, reached) if reached >= target else None
