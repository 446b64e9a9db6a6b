"""The policies `kvpolicy tune` searches: every combination of a scorer and key/value
bit-widths, each with its `retain` solved so that its planned ratio reaches the target.

A candidate is a .kvp text, checked like any file: the search space is written in the language,
not beside it. Sinks (4) and a 64-token 16-bit window are fixed (a per-channel key group of 64
needs a window that is a multiple of 64); what varies is what the measurements so far say
matters: the scorer (and whether budgets follow it across layers and heads) and the bits of
keys and values. When quantization alone reaches the target, nothing is evicted and the scorer
does not matter: that combination is one candidate, without `retain`.

The `heads*` scorers are static head budgets (`score recent` + `adapt heads "FILE"`): their
weights are measured by the search itself from its calibration prompts (search.py, the heads
stage; the statistic of `kvpolicy calibrate --keep K`), so a candidate of theirs exists only once
those files do (`heads_files`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from kvpolicy.diagnostics import Source
from kvpolicy.lang.ir import Policy
from kvpolicy.lang.lower import check_source
from kvpolicy.models import ModelShape
from kvpolicy.plan.pages import paged_refusals
from kvpolicy.plan.planner import make_plan
from kvpolicy.tune.config import CALIBRATION_CHUNK, min_prompt_or_default

# name → (score statement, adapt statement or "")
SCORERS = {
    "recent": ("score recent", ""),
    "snapkv": ("score snapkv(observe = 64, pool = max 31)", ""),
    "recon": ("score reconstruct(pool = max 7)", ""),
    "recon_thr": ("score reconstruct(pool = max 7)", "adapt threshold"),
    "heads30": ("score recent", "adapt heads"),  # + the file of the weights at keep 0.3
    "heads50": ("score recent", "adapt heads"),
}
# a heads scorer's calibration keep (kvpolicy calibrate --keep): the share of all middle tokens
# the one threshold keeps; a lower keep sends the budget to fewer heads
HEADS_KEEP = {"heads30": 0.3, "heads50": 0.5}
# (key bits, value bits); 16 is the model's own precision (nothing quantized)
BITS = ((16, 16), (4, 4), (4, 3), (4, 2), (3, 3), (3, 2))
SPACES = {
    "default": (tuple(SCORERS), BITS),
    "small": (("recent", "recon_thr", "heads30"), ((16, 16), (3, 3))),  # the smoke test's
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


def heads_keeps(space: str) -> dict[str, float]:
    """The heads scorers of `space` and their calibration keeps."""
    return {s: HEADS_KEEP[s] for s in SPACES[space][0] if s in HEADS_KEEP}


def heads_file_name(keep: float) -> str:
    """The head-weights file the search writes for `keep` (in its output directory)."""
    return f"heads-keep{round(100 * keep):02d}.json"


def record_needs(space: str) -> tuple[int, set[int]]:
    """What the prefill records must hold for every candidate of `space`: the largest
    observation window of its scorers, and the chunk sizes of the re-reading passes (its
    reconstruct scorers' and, for heads scorers, the one their weights are measured from)."""
    observe, chunks = 1, set()
    for scorer in SPACES[space][0]:
        if scorer in HEADS_KEEP:
            chunks.add(CALIBRATION_CHUNK)
            continue
        score = parse(scorer, policy_text(scorer, scorer, 16, 16, 50.0)).score
        observe = max(observe, score.observe)
        if score.needs_context_pass:
            chunks.add(score.chunk)
    return observe, chunks


def policy_text(name: str, scorer: str, key_bits: int, value_bits: int,
                retain: float | None, heads_file: str = "") -> str:
    score, adapt = SCORERS[scorer]
    if scorer in HEADS_KEEP:
        if not heads_file:
            raise ValueError(f"the {scorer} scorer needs its head-weights file")
        adapt = f'{adapt} "{heads_file}"'
    lines = ["keep sinks 4", "keep window 64"]
    if retain is not None:
        lines += [f"retain {retain:.2f}%", score] + ([adapt] if adapt else [])
    if key_bits < 16:
        lines.append(f"keys   int{key_bits} group 64 per channel")
    if value_bits < 16:
        lines.append(f"values int{value_bits} group 64 per token")
    return f"policy {name} {{\n" + "".join(f"    {line}\n" for line in lines) + "}\n"


def parse(name: str, text: str, directory: str | Path = ".") -> Policy:
    """`directory`: where the policy's relative paths (head-weights files) start."""
    result = check_source(Source(f"{name}.kvp", text), directory)
    if result.policy is None:  # the space is ours: a candidate that does not check is a bug
        raise AssertionError("\n".join(d.render() for d in result.diagnostics))
    return result.policy


def checked_lengths(calibration: Sequence[int], context: int,
                    min_prompt: int | None = None) -> list[int]:
    """The prompt lengths a candidate must reach the target at: every calibration prompt's, and
    every length from `min_prompt` (default 3/4 of `context`: `config.min_prompt_or_default`) to
    1/8 of `context` past the longest calibration prompt — held-out prompts are a little shorter
    or longer than the calibration ones, and with sinks and a window of fixed size (and budgets
    in whole token units) the ratio moves with the length. `min_prompt=0`: the calibration
    lengths only."""
    lengths = set(calibration)
    low = min_prompt_or_default(context, min_prompt)
    if low != 0:
        high = max([context, *calibration]) + context // 8
        lengths.update(range(low, max(low, high) + 1))
    return sorted(lengths)


class _Lengths:
    """Whether a policy's plan reaches the target at every length, checked cheaply: bisections
    probe a sample of the lengths (the calibration ones, every 64th, the ends, and each length
    that has failed a full check), and only their answer is checked at every length."""

    def __init__(self, shape: ModelShape, lengths: Sequence[int], target: float,
                 calibration: Sequence[int] = ()):
        self.shape, self.lengths, self.target = shape, sorted(set(lengths)), target
        self.sample = {*calibration, *self.lengths[::64], self.lengths[0], self.lengths[-1]}

    def ratios(self, policy: Policy) -> dict[int, float]:
        """The plan's ratio at every length."""
        return {n: make_plan(policy, self.shape, n).compression_ratio for n in self.lengths}

    def failing(self, ratios: dict[int, float]) -> list[int]:
        return [n for n, ratio in ratios.items() if ratio < self.target]

    def reaches_on_sample(self, policy: Policy) -> bool:
        return all(make_plan(policy, self.shape, n).compression_ratio >= self.target
                   for n in sorted(self.sample))

    def largest_retain(self, policy_at: Callable[[float], Policy]) -> tuple[float, float] | None:
        """(the largest retain (two decimals) whose policy reaches the target at every length,
        its lowest ratio over them) — by bisection over hundredths of a percent on the sample (a
        plan keeps no fewer tokens at a larger retain), then the whole range, the lengths that
        fail joining the sample; None when even retain 0% does not reach it (sinks and window
        alone keep too much)."""
        if self.failing(self.ratios(policy_at(0.0))):
            return None
        high = 10001  # not known to reach at high/100
        while True:
            low = 0
            while high - low > 1:
                middle = (low + high) // 2
                if self.reaches_on_sample(policy_at(middle / 100)):
                    low = middle
                else:
                    high = middle
            ratios = self.ratios(policy_at(low / 100))
            missed = self.failing(ratios)
            if not missed:
                return low / 100, min(ratios.values())
            self.sample.update(missed)
            high = low


def candidates(shape: ModelShape, lengths: Sequence[int], target: float,
               space: str = "default", servable_only: bool = False,
               calibration: Sequence[int] = (), heads_files: Mapping[str, str] | None = None,
               directory: str | Path = ".") -> list[Candidate]:
    """Every candidate of `space` whose planned ratio reaches `target` at each prompt length in
    `lengths` (a plan's ratio is what the cache measures, so this holds for every prompt of
    those lengths; `checked_lengths` says which), each with the largest `retain` (two
    decimals) that does. `planned_ratio` is the lowest over the lengths. `calibration`: lengths
    worth probing first (the calibration prompts'). `heads_files`: each heads scorer's
    head-weights file, relative to `directory`; without them the heads scorers are left out."""
    scorers, bits = SPACES[space]
    heads_files = dict(heads_files or {})
    scorers = tuple(s for s in scorers if s not in HEADS_KEEP or s in heads_files)
    lengths = sorted(set(lengths))
    check = _Lengths(shape, lengths, target, calibration)
    found: dict[str, Candidate] = {}
    for key_bits, value_bits in bits:
        suffix = "" if key_bits == 16 else f"_k{key_bits}v{value_bits}"
        whole = f"full{suffix or '_16bit'}"
        text = policy_text(whole, "recent", key_bits, value_bits, None)
        policy = parse(whole, text)
        ratios = check.ratios(policy)
        if not check.failing(ratios):  # quantization alone reaches it: nothing to evict
            found[whole] = Candidate(whole, text, policy, min(ratios.values()), True)
            continue
        # the bytes depend on the scorer only through adapt: solved once for each
        solved: dict[str, tuple[float, float] | None] = {}
        for scorer in scorers:
            name = f"{scorer}{suffix}"
            heads = heads_files.get(scorer, "")
            adapt = SCORERS[scorer][1] + heads
            if adapt not in solved:
                solved[adapt] = check.largest_retain(lambda p: parse(
                    name, policy_text(name, scorer, key_bits, value_bits, p, heads), directory))
            if solved[adapt] is None:
                continue
            percent, ratio = solved[adapt]
            text = policy_text(name, scorer, key_bits, value_bits, percent, heads)
            policy = parse(name, text, directory)
            found[name] = Candidate(name, text, policy, ratio, not paged_refusals(policy))
    return [c for c in found.values() if c.servable or not servable_only]
