"""Which tokens a compressed cache keeps: the one selection rule of both runtimes (the
whole-prompt runtime's `store.whole.compress` and the paged store's sealing): the most important
tokens are kept, ties to the earlier token; the most important of those are the guards; each
part in position order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.kernels import reference as R
from kvpolicy.lang.ir import Policy
from kvpolicy.plan.pages import PageFormat


@dataclass(frozen=True)
class ScoreRule:
    """How a paged engine ranks staged tokens, as `PageFormat` records it (its field names):
    the score method, snapkv's pooling and kernel, its observed queries and GQA reduction."""

    score: str
    pool: str
    pool_kernel: int
    observe: int
    gqa: str

    @classmethod
    def of(cls, policy: Policy) -> "ScoreRule":
        s = policy.score
        return cls(s.method, s.pool, s.pool_kernel, s.observe, s.gqa)


def group_importance(fmt: PageFormat | ScoreRule, tokens: torch.Tensor,
                     mass: torch.Tensor | None) -> torch.Tensor:
    """Importance of the tokens of g consecutive blocks of one request, as one span, higher kept
    first: tokens [H, g * bs, 2, D] (staged keys and values), mass [H, g * bs] (snapkv: the
    attention received while staged) → [H, g * bs]."""
    heads, n = tokens.shape[0], tokens.shape[1]
    if fmt.score == "keynorm":
        return R.keynorm_importance(tokens[:, :, 0])
    if fmt.score == "recent":
        return R.recent_importance(1, heads, n)[0]
    return R.pool_scores(mass.float(), fmt.pool, fmt.pool_kernel)


def rank(importance: torch.Tensor) -> torch.Tensor:
    """Offsets along the last axis, the most important first (ties: the earlier token)."""
    return torch.argsort(importance, dim=-1, descending=True, stable=True)


def split_ranked(order: torch.Tensor, selected: int,
                 guards: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(guards, body) of a ranking (`rank`): the first `selected` offsets are kept, the first
    `guards` of them are the guards; each part in ascending order, [..., guards] and
    [..., selected - guards]."""
    keep = order[..., :selected]
    return keep[..., :guards].sort(-1).values, keep[..., guards:].sort(-1).values


def select_tokens(importance: torch.Tensor, selected: int,
                  guards: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The offsets a group of sealed blocks keeps: (guards, body), [H, guards] and
    [H, selected - guards], each in ascending order. The `selected` most important tokens are
    kept (ties: the earlier token); the most important `guards` of them are the guards."""
    return split_ranked(rank(importance), selected, guards)


def above_threshold(middles: list[torch.Tensor], keep: int) -> torch.Tensor:
    """KVzip's one threshold, the rule of `adapt threshold` and of `kvpolicy calibrate`'s head
    weights: per (layer, KV head), how many of its middle tokens score at or above the `keep`-th
    largest score of all of them (all, when `keep` exceeds them). middles: per layer [H, M] →
    [layers, H] float64."""
    pooled = torch.cat([m.flatten() for m in middles]).double()
    threshold = pooled.topk(min(keep, pooled.numel())).values[-1]
    return torch.stack([(m.double() >= threshold).sum(-1) for m in middles]).double()

