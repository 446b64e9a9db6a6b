"""The checked policy: typed, defaults filled in, independent of any model.

`kvpolicy.lang.lower` builds a `Policy` from the AST after every check has passed; the planner
(`kvpolicy.plan`) is its only reader. Spans are kept (excluded from equality) so that checks that
need a model — a layer index beyond the model's last layer — can still point at the text.
Layer references are resolved against a model only at plan time: `LAST` is -1, and a share of
the model's depth (`layer 50%`) is a `Depth`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Literal, Union

from kvpolicy.diagnostics import Span

Axis = Literal["channel", "token"]
ScaleDtype = Literal["fp16", "bf16", "fp32"]
Interpolation = Literal["linear", "step", "pyramid", "uniform"]
ScoreMethod = Literal["snapkv", "keynorm", "recent", "reconstruct", "expected"]
Pooling = Literal["max", "avg", "none"]
GqaReduce = Literal["mean", "max", "sum"]

FULL_PRECISION_BITS = 16
MAX_TOKENS = 2**31 - 1  # the most tokens any count, window or context may name
LAST = -1  # a layer reference to the model's last layer


@dataclass(frozen=True)
class Depth:
    """`layer 50%`: the layer at this share of the model's depth, counted from layer 0 (0%) to
    the last layer (100%): index = round_half_up(fraction × (num_layers − 1))."""

    fraction: float


LayerRef = Union[int, Depth]  # an index, LAST, or a share of the depth


def _span():
    """A source position kept for messages; not part of the policy's value."""
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class QuantFormat:
    """How one tensor kind (keys or values) of retained tokens is stored.

    `bits == 16` means unquantized, in the model's 16-bit dtype; the other fields then do not
    apply. `axis` names what one scale/zero pair covers: "channel" groups `group` consecutive
    tokens of one channel (KIVI's keys), "token" groups `group` consecutive channels of one token.
    """

    bits: int = FULL_PRECISION_BITS
    group: int = 32
    axis: Axis = "channel"
    symmetric: bool = False
    scale_dtype: ScaleDtype = "fp16"
    span: Span | None = _span()
    group_span: Span | None = _span()

    @property
    def quantized(self) -> bool:
        return self.bits < FULL_PRECISION_BITS

    @property
    def token_group(self) -> int:
        """Tokens that must be stored together: a per-channel group spans `group` tokens."""
        return self.group if self.quantized and self.axis == "channel" else 1

    def with_bits(self, bits: int) -> "QuantFormat":
        return replace(self, bits=bits)


@dataclass(frozen=True)
class Guard:
    """`fraction` of the selected tokens, chosen by score, stored at `bits` for keys and values."""

    fraction: float
    bits: int
    span: Span | None = _span()


# `guard none` inside a `layers` block: no guard tokens in those layers (a fraction of 0).
NO_GUARD = Guard(0.0, FULL_PRECISION_BITS)


@dataclass(frozen=True)
class Score:
    method: ScoreMethod = "snapkv"
    observe: int = 32
    pool: Pooling = "max"
    pool_kernel: int = 7
    gqa: GqaReduce = "mean"
    chunk: int = 512  # reconstruct: context tokens re-read per pass (bounds the extra memory)
    # expected: the future positions whose RoPE rotation the expected query is averaged over
    future: int = field(default=512, metadata={"new": True})

    @property
    def needs_context_pass(self) -> bool:
        """Does ranking need a second pass over the whole context (reconstruct), so only the
        whole-prompt runtime, which holds the context before it compresses, can run it?"""
        return self.method == "reconstruct"

    @property
    def needs_whole_context(self) -> bool:
        """Does ranking read the whole context's keys at once (reconstruct re-reads it; expected
        scores every key from the last queries' statistics), so paged engines, which rank each
        block as it seals, cannot run it?"""
        return self.method in ("reconstruct", "expected")


@dataclass(frozen=True)
class Adapt:
    temperature: float  # the mass rule's; 1.0 (unused) for the threshold and heads rules
    across_layers: bool = True
    across_heads: bool = True
    # `adapt temperature T` / `adapt threshold` / `adapt heads "FILE"`
    rule: Literal["mass", "threshold", "heads"] = "mass"
    # the heads rule: the calibration's weights, [layers][KV heads] (kvpolicy.heads); part of
    # the policy's value, so the checked policy no longer needs the file
    head_weights: tuple[tuple[float, ...], ...] = field(default=(), metadata={"new": True})
    heads_file: str = field(default="", compare=False)  # as written, for messages
    span: Span | None = _span()

    def __post_init__(self) -> None:  # from JSON: lists → tuples (hashable, comparable)
        object.__setattr__(self, "head_weights",
                           tuple(tuple(float(w) for w in row) for row in self.head_weights))

    @property
    def counts_per_sequence(self) -> bool:
        """Does each sequence's cache store its own per-head token counts (budgets that move
        between KV heads at prefill)?"""
        return self.across_heads and not self.static

    @property
    def static(self) -> bool:
        """Are the budgets fixed before any prompt is seen (the heads rule)? Then the plan knows
        every (layer, KV head)'s count and the cache stores none per sequence."""
        return self.rule == "heads"


@dataclass(frozen=True)
class Cluster:
    k: int


@dataclass(frozen=True)
class Anchor:
    layer: LayerRef  # an index, LAST (-1) for the last layer, or a Depth
    ratio: float
    span: Span | None = _span()


@dataclass(frozen=True)
class LayerSelection:
    """Inclusive layer range; `stop` None for a single layer. Either end may be LAST."""

    start: LayerRef
    stop: LayerRef | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class LayerOverride:
    """Storage for some layers; fields left None keep the policy's."""

    layers: tuple[LayerSelection, ...]
    keys: QuantFormat | None = None
    values: QuantFormat | None = None
    guard: Guard | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Policy:
    name: str
    path: str = field(default="", compare=False)
    model: str | None = None
    sinks: int = 0
    window: int = 0
    retain: float | None = None  # None: no global ratio (anchors alone, or keep everything)
    anchors: tuple[Anchor, ...] = ()
    interpolate: Interpolation = "linear"
    adapt: Adapt | None = None
    score: Score = Score()
    cluster: Cluster | None = None
    keys: QuantFormat = QuantFormat(axis="channel")
    values: QuantFormat = QuantFormat(axis="token")
    guard: Guard | None = None
    layers: tuple[LayerOverride, ...] = ()
    extends: tuple[str, ...] = field(default=(), compare=False)  # parent files, nearest first
    retain_span: Span | None = _span()
    window_span: Span | None = _span()
    model_span: Span | None = _span()

    @property
    def evicts(self) -> bool:
        """True if the policy may drop tokens: a global ratio below 100% or, without one,
        per-layer anchors below 100% (with `retain 100%` the anchors rescale to 100%)."""
        if self.retain is not None:
            return self.retain < 1.0
        return any(a.ratio < 1.0 for a in self.anchors)


def uncompressed(name: str = "baseline") -> Policy:
    """The uncompressed cache as a policy: every token kept in the 16-bit window (plain tensors,
    no blocks), what `kvpolicy run --baseline` and `kvpolicy eval` compare against."""
    return Policy(name=name, window=2**31 - 1)


# ---- serialization (artifacts store the checked policy, not its source) ---------------------

_NESTED = {"keys": QuantFormat, "values": QuantFormat, "guard": Guard, "score": Score,
           "adapt": Adapt, "cluster": Cluster}


def _plain(value):
    if dataclasses.is_dataclass(value):
        # spans and paths are not part of a policy's value; a field added later is left out
        # while it holds its default, so the policies written before it keep their hashes
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.compare and not (f.metadata.get("new") and getattr(value, f.name) ==
                                      f.default)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def policy_to_json(policy: Policy) -> dict:
    """The policy's value as JSON-able data (spans and source paths left out)."""
    return _plain(policy)


def _build(cls, data):
    return None if data is None else cls(**data)


def _layer_ref(data) -> LayerRef | None:
    return Depth(**data) if isinstance(data, dict) else data


def policy_from_json(data: dict) -> Policy:
    fields = {key: value for key, value in data.items() if key not in _NESTED}
    for key, cls in _NESTED.items():
        fields[key] = _build(cls, data.get(key))
    fields["anchors"] = tuple(Anchor(_layer_ref(a["layer"]), a["ratio"])
                              for a in data.get("anchors", ()))
    fields["layers"] = tuple(
        LayerOverride(layers=tuple(LayerSelection(_layer_ref(s["start"]),
                                                  _layer_ref(s.get("stop")))
                                   for s in o["layers"]),
                      keys=_build(QuantFormat, o.get("keys")),
                      values=_build(QuantFormat, o.get("values")),
                      guard=_build(Guard, o.get("guard")))
        for o in data.get("layers", ()))
    return Policy(**fields)
