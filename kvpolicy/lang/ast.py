"""The syntax tree of a policy file: one dataclass per grammar rule, each with its `Span`.

Nodes record what was written, not what it means: numbers keep their text, words are not yet
checked against the vocabulary, defaults are not filled in. `kvpolicy.lang.lower` turns this tree
into the checked IR; `kvpolicy.lang.fmt` prints it back canonically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from kvpolicy.diagnostics import Source, Span


@dataclass(frozen=True)
class Num:
    """A number as written (`2048`, `0.6`, `1e3`); `value` is its float value."""

    text: str
    value: float
    span: Span


@dataclass(frozen=True)
class Word:
    text: str
    span: Span


@dataclass(frozen=True)
class Ratio:
    """`18%` or `0.18`."""

    number: Num
    percent: bool
    span: Span

    @property
    def value(self) -> float:
        return self.number.value / 100.0 if self.percent else self.number.value


@dataclass(frozen=True)
class LayerRef:
    """A layer index (`14`), a share of the model's depth (`50%`, percent True), or `last`
    (number is None)."""

    number: Num | None
    span: Span
    percent: bool = False


@dataclass(frozen=True)
class LayerRange:
    start: LayerRef
    end: LayerRef | None  # inclusive; None for a single layer
    span: Span


# ---- token selection -------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelStmt:
    model: str
    span: Span


@dataclass(frozen=True)
class SinksStmt:
    count: Num
    span: Span


@dataclass(frozen=True)
class WindowStmt:
    count: Num
    span: Span


@dataclass(frozen=True)
class RetainStmt:
    ratio: Ratio
    span: Span


@dataclass(frozen=True)
class Anchor:
    layer: LayerRef
    ratio: Ratio
    span: Span


@dataclass(frozen=True)
class AnchorsStmt:
    anchors: tuple[Anchor, ...]
    span: Span


@dataclass(frozen=True)
class InterpolateStmt:
    kind: Word
    span: Span


@dataclass(frozen=True)
class AdaptStmt:
    temperature: Num | None  # None: `adapt none` or `adapt threshold`
    scopes: tuple[Word, ...]  # empty: the default scope
    span: Span
    threshold: bool = False  # `adapt threshold`
    heads: "Extends | None" = None  # `adapt heads "FILE"`: the calibration file, as written


@dataclass(frozen=True)
class ScoreArg:
    """`observe = 32` (number), `gqa = mean` (word) or `pool = max 7` (word and number)."""

    name: Word
    word: Word | None
    number: Num | None
    span: Span


@dataclass(frozen=True)
class ScoreStmt:
    method: Word
    args: tuple[ScoreArg, ...] | None  # None: written without parentheses
    span: Span


@dataclass(frozen=True)
class ClusterStmt:
    k: Num | None  # None: `cluster none`
    span: Span


# ---- storage ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupOption:
    size: Num
    span: Span


@dataclass(frozen=True)
class AxisOption:
    axis: Word
    span: Span


@dataclass(frozen=True)
class SymmetryOption:
    symmetric: bool
    span: Span


@dataclass(frozen=True)
class ScaleOption:
    dtype: Word
    span: Span


QuantOption = Union[GroupOption, AxisOption, SymmetryOption, ScaleOption]


@dataclass(frozen=True)
class KeysStmt:
    width: Word
    options: tuple[QuantOption, ...]
    span: Span


@dataclass(frozen=True)
class ValuesStmt:
    width: Word
    options: tuple[QuantOption, ...]
    span: Span


@dataclass(frozen=True)
class GuardStmt:
    fraction: Ratio | None  # None (and width None): `guard none`
    width: Word | None
    by_score: bool
    span: Span


@dataclass(frozen=True)
class LayersStmt:
    ranges: tuple[LayerRange, ...]
    statements: tuple["Stmt", ...]
    span: Span


Stmt = Union[ModelStmt, SinksStmt, WindowStmt, RetainStmt, AnchorsStmt, InterpolateStmt,
             AdaptStmt, ScoreStmt, ClusterStmt, KeysStmt, ValuesStmt, GuardStmt, LayersStmt]

# The word a statement starts with, for messages ("duplicate 'keep window'").
STATEMENT_NAMES: dict[type, str] = {
    ModelStmt: "model",
    SinksStmt: "keep sinks",
    WindowStmt: "keep window",
    RetainStmt: "retain",
    AnchorsStmt: "retain layer",
    InterpolateStmt: "interpolate",
    AdaptStmt: "adapt",
    ScoreStmt: "score",
    ClusterStmt: "cluster",
    KeysStmt: "keys",
    ValuesStmt: "values",
    GuardStmt: "guard",
    LayersStmt: "layers",
}


# ---- the file --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Extends:
    path: str
    span: Span


@dataclass(frozen=True)
class Comment:
    text: str
    line: int
    column: int


@dataclass(frozen=True)
class PolicyFile:
    source: Source = field(repr=False)
    name: Word
    extends: Extends | None
    statements: tuple[Stmt, ...]
    comments: tuple[Comment, ...]
    span: Span
