"""`kvpolicy calibrate`: per-(layer, KV head) retrieval importance on calibration prompts, for
`adapt heads "FILE"` (kvpolicy.heads; docs/tune.md).

For each calibration prompt (the tasks' generators at the calibration seed, never the evaluation
seed), the context is prefilled and re-read (the reconstruct passes, engines/hf/reconstruct.py);
each context token's importance is the largest attention it received while re-read (pooled and
reduced over each KV head's query heads as `score reconstruct` does). One threshold over every
(layer, KV head)'s middle tokens keeps `keep` of them (KVzip's non-uniform budgets); a head's
weight is its share of the tokens at or above that threshold. The file holds the mean share over
the prompts: a static budget for heads that, on calibration text, find far-back tokens while the
model copies the context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpolicy.engines.hf import reconstruct
from kvpolicy.engines.hf.cache import model_shape
from kvpolicy.eval.progress import progress_bar
from kvpolicy.eval.prompts import split_prompt
from kvpolicy.eval.tasks import make_samples
from kvpolicy.eval.whole import record_prefill
from kvpolicy.heads import write_weights
from kvpolicy.kernels import reference as R
from kvpolicy.lang.ir import Score
from kvpolicy.models import DEFAULT_MODEL
from kvpolicy.store.select import above_threshold
from kvpolicy.tune.config import CALIBRATION_CHUNK


@dataclass(frozen=True)
class CalibrateConfig:
    out: Path
    tasks: tuple[str, ...]
    samples: int
    seed: int
    context: int
    keep: float = 0.5  # share of middle tokens the threshold keeps
    sinks: int = 4
    window: int = 64
    pool: str = Score.pool  # the language's defaults for `score reconstruct`
    pool_kernel: int = Score.pool_kernel
    gqa: str = Score.gqa
    chunk: int = CALIBRATION_CHUNK
    model: str = DEFAULT_MODEL
    command: str = ""


def head_shares(scores: list[torch.Tensor], sinks: int, window: int, keep: float) -> torch.Tensor:
    """[layers, KV heads]: each head's share of the middle tokens (after `sinks`, before the
    last `window`) scoring at or above the one threshold that keeps `keep` of all of them
    (`store.select.above_threshold`, the rule of `adapt threshold`). scores: per layer
    [KV heads, N]."""
    n = scores[0].shape[-1]
    middles = [s[:, sinks:n - window] for s in scores]  # [H, M] each
    if middles[0].shape[-1] <= 0:
        raise ValueError(f"a {n}-token prompt has no middle after {sinks} sinks and a "
                         f"{window}-token window")
    above = above_threshold(middles, max(1, round(keep * sum(m.numel() for m in middles))))
    return above / above.sum()


def prompt_shares(records, governed: list[int], heads: int, keeps,
                  config: CalibrateConfig) -> dict[float, torch.Tensor]:
    """One prompt's head shares ([governed layers, KV heads]) for each `keep` (config.keep is
    not read), from records whose reconstruct passes at `config.chunk` have run
    (engines/hf/reconstruct.record): the statistic `kvpolicy calibrate` averages, and `kvpolicy
    tune` too (its records already hold the passes)."""
    scores = [R.reconstruct_importance(records[i].received[config.chunk], heads, config.pool,
                                       config.pool_kernel, config.gqa)[0] for i in governed]
    return {keep: head_shares(scores, config.sinks, config.window, keep) for keep in keeps}


def write_head_weights(config: CalibrateConfig, weights, num_kv_heads: int,
                       lengths: list[int], seconds: float | None = None) -> None:
    """Writes `weights` [governed layers][KV heads] to config.out with what they are and where
    they came from (the calibration prompts, the command)."""
    calibration = {"tasks": list(config.tasks), "samples_per_task": config.samples,
                   "seed": config.seed, "context": config.context, "prompt_tokens": lengths}
    if seconds is not None:
        calibration["measured_seconds"] = round(seconds, 1)
    provenance = {
        "statistic": f"share of the (layer, KV head) middle tokens at or above the one threshold "
                     f"that keeps {config.keep:g} of all middle tokens, by reconstruct importance "
                     f"(pool {config.pool} {config.pool_kernel}, gqa {config.gqa}, chunk "
                     f"{config.chunk}; sinks {config.sinks}, window {config.window}); mean over "
                     "the calibration prompts",
        "calibration": calibration,
        "command": config.command,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    write_weights(config.out, weights, {"name": config.model, "num_layers": len(weights),
                                        "num_kv_heads": num_kv_heads}, provenance)


def governed_layers(shape) -> list[int]:
    """The layers a policy governs (the head weights' rows)."""
    return [i for i, p in enumerate(shape.policy_layers()) if p is not None]


@torch.no_grad()
def calibrate(config: CalibrateConfig, model, tokenizer, progress: bool = True) -> dict:
    """Measures the weights and writes the head-weights file; returns what it wrote about."""
    shape = model_shape(model)
    heads, layers = shape.num_kv_heads, shape.num_layers  # the layers a policy governs
    governed = governed_layers(shape)
    total = torch.zeros(layers, heads, dtype=torch.float64)
    lengths, started, prompts = [], time.perf_counter(), 0
    bar = progress_bar(config.samples * len(config.tasks), 0, progress, "kvpolicy calibrate")
    for task in config.tasks:
        for sample in make_samples(task, tokenizer, config.context, config.samples, config.seed):
            context_ids, _ = split_prompt(tokenizer, sample, question_aware=False)
            records, _, _ = record_prefill(model, context_ids, observe=1)
            reconstruct.record(model, reconstruct.instruction_ids(tokenizer), context_ids,
                               records, config.chunk, reconstruct.special_ids(tokenizer))
            total += prompt_shares(records, governed, heads, (config.keep,),
                                   config)[config.keep]
            lengths.append(int(context_ids.shape[1]))
            prompts += 1
            bar.update(1)
    bar.close()
    weights = (total / prompts).tolist()
    seconds = time.perf_counter() - started
    write_head_weights(config, weights, heads, lengths, seconds)
    return {"prompts": prompts, "seconds": seconds, "weights": weights}
