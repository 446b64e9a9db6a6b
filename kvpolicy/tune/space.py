"""The policies `kvpolicy tune` searches: every combination of a scorer and key/value
bit-widths, each with its `retain` solved so that its planned ratio reaches the target.

A candidate is a .kvp text, checked like any file: the search space is written in the language,
not beside it. Sinks (4) and a 64-token 16-bit window are fixed (a per-channel key group of 64
needs a window that is a multiple of 64); what varies is what the measurements so far say
matters: the scorer (and whether budgets follow it across layers and heads) and the bits of
keys and values. When quantization alone reaches the target, nothing is evicted and the scorer
does not matter: that combination is one candidate, without `retain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvpolicy.diagnostics import Source
from kvpolicy.lang.ir import Policy
from kvpolicy.lang.lower import check_source
from kvpolicy.models import ModelShape
from kvpolicy.plan.pages import paged_refusals
from kvpolicy.plan.planner import make_plan
from kvpolicy.plan.solve import solve_retain

# name → (score statement, adapt statement or "")
SCORERS = {
    "recent": ("score recent", ""),
    "snapkv": ("score snapkv(observe = 64, pool = max 31)", ""),
    "recon": ("score reconstruct(pool = max 7)", ""),
    "recon_thr": ("score reconstruct(pool = max 7)", "adapt threshold"),
}
# (key bits, value bits); 16 is the model's own precision (nothing quantized)
BITS = ((16, 16), (4, 4), (4, 3), (4, 2), (3, 3), (3, 2))
SPACES = {
    "default": (tuple(SCORERS), BITS),
    "small": (("recent", "recon_thr"), ((16, 16), (3, 3))),  # the smoke test's
}


@dataclass(frozen=True)
class Candidate:
    name: str
    text: str  # the .kvp file
    policy: Policy
    planned_ratio: float  # the lowest over the prompt lengths it was solved for
    servable: bool  # the paged engines (vLLM) can run it

    @property
    def evicts(self) -> bool:
        return self.policy.retain is not None


def policy_text(name: str, scorer: str, key_bits: int, value_bits: int,
                retain: float | None) -> str:
    score, adapt = SCORERS[scorer]
    lines = ["keep sinks 4", "keep window 64"]
    if retain is not None:
        lines += [f"retain {retain:.2f}%", score] + ([adapt] if adapt else [])
    if key_bits < 16:
        lines.append(f"keys   int{key_bits} group 64 per channel")
    if value_bits < 16:
        lines.append(f"values int{value_bits} group 64 per token")
    return f"policy {name} {{\n" + "".join(f"    {line}\n" for line in lines) + "}\n"


def parse(name: str, text: str) -> Policy:
    result = check_source(Source(f"{name}.kvp", text))
    if result.policy is None:  # the space is ours: a candidate that does not check is a bug
        raise AssertionError("\n".join(d.render() for d in result.diagnostics))
    return result.policy


def _lowest_ratio(policy: Policy, shape: ModelShape, lengths: Sequence[int]) -> float:
    return min(make_plan(policy, shape, n).compression_ratio for n in lengths)


def candidates(shape: ModelShape, lengths: Sequence[int], target: float,
               space: str = "default", servable_only: bool = False) -> list[Candidate]:
    """Every candidate of `space` whose planned ratio reaches `target` at each prompt length in
    `lengths` (a plan's ratio is what the cache measures, so this holds for every calibration
    prompt), each with the largest `retain` (two decimals) that does. `planned_ratio` is the
    lowest over the lengths."""
    scorers, bits = SPACES[space]
    lengths = sorted(set(lengths))
    found: dict[str, Candidate] = {}
    for key_bits, value_bits in bits:
        suffix = "" if key_bits == 16 else f"_k{key_bits}v{value_bits}"
        whole = f"full{suffix or '_16bit'}"
        text = policy_text(whole, "recent", key_bits, value_bits, None)
        ratio = _lowest_ratio(parse(whole, text), shape, lengths)
        if ratio >= target:  # quantization alone reaches it: nothing to evict
            found[whole] = Candidate(whole, text, parse(whole, text), ratio, True)
            continue
        # the bytes do not depend on the scorer: solve once per length, keep the lowest retain
        solved = [solve_retain(lambda p: parse(whole, policy_text(whole, "recent", key_bits,
                                                                  value_bits, p)),
                               shape, n, target, at_least=True) for n in lengths]
        if any(s is None for s in solved):  # even retain 0% keeps too much (sinks and window)
            continue
        start = min(percent for percent, _ in solved)
        for scorer in scorers:
            name = f"{scorer}{suffix}"
            percent = start
            while True:  # adapt may round budgets differently: step down until every length fits
                text = policy_text(name, scorer, key_bits, value_bits, percent)
                policy = parse(name, text)
                ratio = _lowest_ratio(policy, shape, lengths)
                if ratio >= target or percent <= 0:
                    break
                percent = max(round(percent - 0.01, 2), 0.0)
            if ratio >= target:
                found[name] = Candidate(name, text, policy, ratio, not paged_refusals(policy))
    return [c for c in found.values() if c.servable or not servable_only]
