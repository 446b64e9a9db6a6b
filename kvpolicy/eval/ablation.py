"""The ablation the seed promised: eviction only, quantization only, and both, at one ratio.

`matched_ablation(shape, context)` writes three policies whose planned compression ratios at
`context` are as close as whole blocks allow: quantization only (KIVI's 2-bit layout, nothing
evicted), eviction only (16-bit, SnapKV selection, `retain` solved for the same ratio), and a
hybrid (4-bit, `retain` solved likewise). Each is a .kvp text, checked like any other.
"""

from __future__ import annotations

from kvpolicy.diagnostics import Source
from kvpolicy.lang.lower import check_source
from kvpolicy.models import ModelShape
from kvpolicy.plan.planner import make_plan
from kvpolicy.plan.solve import solve_retain

COMMON = "keep sinks 4\n    keep window 128\n"
QUANT_ONLY = ("policy quant_only_matched {\n    " + COMMON +
              "    keys   int2 group 32 per channel\n    values int2 group 32 per token\n}\n")
EVICT_ONLY = ("policy evict_only_matched {\n    " + COMMON +
              "    retain RETAIN\n    score snapkv(observe = 32, pool = max 7)\n}\n")
HYBRID = ("policy hybrid_matched {\n    " + COMMON +
          "    retain RETAIN\n    score snapkv(observe = 32, pool = max 7)\n"
          "    keys   int4 group 32 per channel\n    values int4 group 32 per token\n}\n")


def _policy(text: str):
    result = check_source(Source("ablation.kvp", text))
    assert result.policy is not None, [d.render() for d in result.diagnostics]
    return result.policy


def _solve(template: str, shape: ModelShape, context: int, target: float) -> tuple[str, float]:
    """The template with the retain percentage (two decimals) whose plan ratio is closest to
    `target`, and that ratio."""
    percent, ratio = solve_retain(lambda p: _policy(template.replace("RETAIN", f"{p:.2f}%")),
                                  shape, context, target)
    return template.replace("RETAIN", f"{percent:.2f}%"), ratio


def matched_ablation(shape: ModelShape, context: int) -> list[tuple[str, str, float]]:
    """[(name, policy text, planned ratio at `context`)] for the three ablation policies."""
    target = make_plan(_policy(QUANT_ONLY), shape, context).compression_ratio
    evict, evict_ratio = _solve(EVICT_ONLY, shape, context, target)
    hybrid, hybrid_ratio = _solve(HYBRID, shape, context, target)
    return [("quant_only_matched", QUANT_ONLY, target),
            ("evict_only_matched", evict, evict_ratio),
            ("hybrid_matched", hybrid, hybrid_ratio)]
