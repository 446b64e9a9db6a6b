"""AST → checked IR. Every problem is collected before anything is reported.

Order of work for one file:
  1. read and parse it (syntax errors are collected; the statements that parsed carry on);
  2. lower its parent first if it says `extends "…"` (paths are relative to the file);
  3. apply its statements on top of the parent's (or the defaults): a statement replaces the
     parent's statement of the same kind, except `keys`/`values`, which set only the options they
     name, and `layers` blocks, which add to the parent's;
  4. resolve `layers` overrides against the final policy-level storage;
  5. run the checks that involve several statements — skipped for a file with syntax errors,
     whose missing statements would make them report nonsense.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvpolicy.diagnostics import (Diagnostic, Diagnostics, PolicyError, Source, Span, note,
                                  quoted)
from kvpolicy import files, heads
from kvpolicy.lang import ast, ir, vocabulary as vocab
from kvpolicy.lang.parser import parse_source
from kvpolicy.lang.source import read_source

# Token counts and positions are stored as int32 (docs/format.md), so no count may exceed this.
MAX_EXTENDS_DEPTH = 16
MIN_GROUP, MAX_GROUP = 8, 1024
MAX_CLUSTERS = 65536
MAX_OBSERVE = 65536
MAX_CHUNK = 65536
# score arguments that are a number of tokens: (least, most, the example an error shows)
MAX_FUTURE = 65536
TOKEN_ARGS = {"observe": (1, MAX_OBSERVE, 32), "chunk": (16, MAX_CHUNK, 512),
              "future": (1, MAX_FUTURE, 512)}
ADAPTABLE_SCORES = ("snapkv", "reconstruct")  # scores on one scale across layers and heads
# Defaults that differ by score method (the rest are ir.Score's): reconstruct is KVzip's rule,
# the maximum over every reconstructing query and query head, unpooled; expected is Expected
# Attention's, unpooled, from the statistics of the prompt's last 512 queries.
SCORE_DEFAULTS = {"reconstruct": {"pool": "none", "pool_kernel": 1, "gqa": "max"},
                  "expected": {"pool": "none", "pool_kernel": 1, "observe": 512}}
MAX_POOL_KERNEL = 255
MAX_LAYER_INDEX = 65535
MAX_NAME = 64  # characters of a policy name


@dataclass(frozen=True)
class CheckResult:
    """A checked policy (None if it has errors) and every diagnostic found on the way."""

    policy: ir.Policy | None
    diagnostics: tuple[Diagnostic, ...]

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "warning")


def check_file(path: str | os.PathLike[str], shown_as: str | None = None) -> CheckResult:
    diagnostics = Diagnostics()
    shown = shown_as if shown_as is not None else os.fspath(path)
    draft = _Lowering(diagnostics).lower_file(Path(path), shown, chain=())
    return _result(draft, diagnostics)


def check_source(source: Source, directory: str | os.PathLike[str] = ".") -> CheckResult:
    """Checks policy text that need not be in a file; `extends` is relative to `directory`."""
    diagnostics = Diagnostics()
    draft = _Lowering(diagnostics).lower_source(source, Path(directory) / "<text>", chain=())
    return _result(draft, diagnostics)


def _result(draft: "_Draft | None", diagnostics: Diagnostics) -> CheckResult:
    policy = _finish(draft, diagnostics) if draft is not None else None
    if diagnostics.has_errors:
        policy = None
    return CheckResult(policy, _in_reading_order(diagnostics.items))


def _in_reading_order(items: list[Diagnostic]) -> tuple[Diagnostic, ...]:
    """Per file (files in order of first mention), by line and column."""
    files: dict[str, int] = {}
    for item in items:
        files.setdefault(item.span.path if item.span else (item.path or ""), len(files))

    def key(item: Diagnostic):
        if item.span is None:
            return (files[item.path or ""], 0, 0)
        return (files[item.span.path], item.span.line, item.span.column)
    return tuple(sorted(items, key=key))


def load_policy(path: str | os.PathLike[str], shown_as: str | None = None) -> ir.Policy:
    """The checked policy in `path`; raises `PolicyError` listing every error."""
    result = check_file(path, shown_as)
    if result.policy is None:
        raise PolicyError(result.diagnostics)
    return result.policy


# ---- lowering one file (and its parents) -----------------------------------------------------

@dataclass
class _Draft:
    """Policy-level fields set so far, the spans that set them, and unresolved `layers` blocks."""

    fields: dict[str, Any]
    spans: dict[str, Span]
    overrides: list[ast.LayersStmt]
    cross_checks: bool = True  # False once any file in the chain had syntax errors
    header: Span | None = None
    extends: tuple[str, ...] = ()


def _defaults(name: str) -> dict[str, Any]:
    """The policy-level fields a statement can set, at their defaults."""
    default = ir.Policy(name=name)
    return {f.name: getattr(default, f.name) for f in dataclasses.fields(ir.Policy)
            if f.name not in ("layers", "extends") and not f.name.endswith("_span")}


class _Lowering:
    def __init__(self, diagnostics: Diagnostics):
        self.d = diagnostics

    def lower_file(self, path: Path, shown: str, chain: tuple[Path, ...]) -> _Draft | None:
        try:
            source = read_source(path, shown)
        except PolicyError as exc:
            self.d.extend(exc.diagnostics)
            return None
        return self.lower_source(source, path, chain)

    def lower_source(self, source: Source, path: Path, chain: tuple[Path, ...]) -> _Draft | None:
        parsed = parse_source(source)
        self.d.extend(parsed.diagnostics)
        tree = parsed.tree
        if tree is None:
            return None
        draft = _Draft(_defaults(tree.name.text), {}, [], header=tree.name.span)
        if not tree.name.text.isascii():
            self.d.error(f"policy name '{quoted(tree.name.text)}' is not ASCII"
                         f"{vocab.non_ascii_note(tree.name.text)}; a name is ASCII letters, "
                         "digits, '_' and '-'", tree.name.span)
        elif len(tree.name.text) > MAX_NAME:  # it names build directories and report lines
            self.d.error(f"policy name '{quoted(tree.name.text)}' is {len(tree.name.text):,} "
                         f"characters; a name may be at most {MAX_NAME}", tree.name.span)
        if tree.extends is not None:
            parent = self._parent(tree, source, path, chain)
            if parent is None:
                draft.cross_checks = False
            else:
                draft.fields.update(parent.fields)
                draft.spans.update(parent.spans)
                draft.overrides.extend(parent.overrides)
                draft.cross_checks = parent.cross_checks
                draft.extends = parent.extends
        draft.fields["name"] = tree.name.text
        draft.fields["path"] = source.path
        if parsed.has_errors:
            draft.cross_checks = False
        _Statements(self.d, draft, clean=not parsed.has_errors,
                    directory=path.parent).apply(tree.statements)
        return draft

    def _parent(self, tree: ast.PolicyFile, source: Source, path: Path,
                chain: tuple[Path, ...]) -> _Draft | None:
        extends = tree.extends
        assert extends is not None
        shown = os.path.normpath(os.path.join(os.path.dirname(source.path), extends.path))
        if not extends.path:
            self.d.error("`extends` needs a path to a .kvp file", extends.span)
            return None
        try:
            here = path.resolve()
            target = (path.parent / extends.path).resolve()
            is_dir, exists = target.is_dir(), target.exists()
        except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop
            why = files.reason(exc) if isinstance(exc, OSError) else "a symbolic link loop"
            self.d.error(f"cannot read the extended policy '{files.shown_path(shown)}': {why}",
                         extends.span)
            return None
        if target in chain or target == here:
            cycle = " → ".join([*(p.name for p in chain), here.name, target.name])
            self.d.error(f"`extends` makes a cycle: {cycle}", extends.span)
            return None
        if len(chain) >= MAX_EXTENDS_DEPTH:
            self.d.error(f"`extends` chains may be at most {MAX_EXTENDS_DEPTH} files deep",
                         extends.span)
            return None
        if is_dir:
            self.d.error(f"the extended policy '{files.shown_path(shown)}' is a directory; `extends` names "
                         "a .kvp file", extends.span)
            return None
        if not exists:
            self.d.error(f"cannot find the extended policy '{files.shown_path(shown)}'", extends.span)
            return None
        errors_before = len([d for d in self.d.items if d.severity == "error"])
        parent = self.lower_file(target, shown, chain + (here,))
        errors_after = len([d for d in self.d.items if d.severity == "error"])
        if parent is None or errors_after > errors_before:
            self.d.error(f"the extended policy '{files.shown_path(shown)}' has errors (listed above)",
                         extends.span)
            return None
        parent.extends = (shown, *parent.extends)
        return parent


# ---- statements → fields ---------------------------------------------------------------------

_OVERRIDABLE = (ast.KeysStmt, ast.ValuesStmt, ast.GuardStmt)


class _Statements:
    """Applies one file's statements to a draft, checking each on its own."""

    def __init__(self, diagnostics: Diagnostics, draft: _Draft, clean: bool,
                 directory: Path = Path(".")):
        self.d = diagnostics
        self.draft = draft
        self.clean = clean
        self.directory = directory  # the file's: relative paths it names start here

    def apply(self, statements: tuple[ast.Stmt, ...]) -> None:
        first: dict[type, ast.Stmt] = {}
        for stmt in statements:
            kind = type(stmt)
            if kind is ast.LayersStmt:
                if self._check_block(stmt):
                    self.draft.overrides.append(stmt)
                continue
            if kind in first:
                self._duplicate(stmt, first[kind])
                continue
            first[kind] = stmt
            handler = getattr(self, "_" + kind.__name__)
            handler(stmt)

    def _duplicate(self, stmt, earlier) -> None:
        name = ast.STATEMENT_NAMES[type(stmt)]
        self.d.error(f"duplicate '{name}' statement", stmt.span,
                     note(f"'{name}' is first set here", earlier.span))

    def _set(self, field_name: str, value: Any, span: Span) -> None:
        self.draft.fields[field_name] = value
        self.draft.spans[field_name] = span

    # -- one method per statement kind
    def _ModelStmt(self, stmt: ast.ModelStmt) -> None:
        if not stmt.model.strip():
            self.d.error("`model` needs a model name or a path to a config.json", stmt.span)
            return
        self._set("model", stmt.model, stmt.span)

    def _SinksStmt(self, stmt: ast.SinksStmt) -> None:
        count = _Numbers(self.d).whole(stmt.count, "sinks", 0, ir.MAX_TOKENS)
        if count is not None:
            self._set("sinks", count, stmt.span)

    def _WindowStmt(self, stmt: ast.WindowStmt) -> None:
        count = _Numbers(self.d).whole(stmt.count, "window", 0, ir.MAX_TOKENS)
        if count is not None:
            self._set("window", count, stmt.span)

    def _RetainStmt(self, stmt: ast.RetainStmt) -> None:
        ratio = _Numbers(self.d).ratio(stmt.ratio, "retain")
        if ratio is not None:
            self._set("retain", ratio, stmt.span)

    def _AnchorsStmt(self, stmt: ast.AnchorsStmt) -> None:
        numbers = _Numbers(self.d)
        anchors = []
        seen: dict[int, ast.Anchor] = {}
        ok = True
        for anchor in stmt.anchors:
            layer = numbers.layer(anchor.layer)
            ratio = numbers.ratio(anchor.ratio, f"retain for layer {_show_layer(anchor.layer)}")
            if layer is None or ratio is None:
                ok = False
                continue
            if not _first_time(self.d, seen, layer, anchor,
                               f"layer {_show_layer(anchor.layer)} has two anchors",
                               "first anchor for this layer"):
                ok = False
                continue
            anchors.append(ir.Anchor(layer, ratio, anchor.span))
        if ok:
            self._set("anchors", tuple(anchors), stmt.span)

    def _InterpolateStmt(self, stmt: ast.InterpolateStmt) -> None:
        kind = _Words(self.d).pick(stmt.kind, vocab.INTERPOLATIONS, "interpolation")
        if kind is not None:
            self._set("interpolate", kind, stmt.span)

    def _AdaptStmt(self, stmt: ast.AdaptStmt) -> None:
        if stmt.heads is not None:
            weights = self._head_weights(stmt.heads)
            if weights is not None:
                self._set("adapt", ir.Adapt(1.0, rule="heads", head_weights=weights,
                                            heads_file=stmt.heads.path, span=stmt.span),
                          stmt.span)
            return
        if stmt.temperature is None and not stmt.threshold:
            self._set("adapt", None, stmt.span)
            return
        temperature = 1.0 if stmt.threshold else _Numbers(self.d).positive(stmt.temperature,
                                                                           "temperature")
        scopes: dict[str, ast.Word] = {}
        ok = temperature is not None
        for word in stmt.scopes:
            if word.text in scopes:
                self.d.error(f"'{word.text}' is listed twice", word.span)
                ok = False
            scopes[word.text] = word
        if ok:
            layers = not scopes or "layers" in scopes
            heads = not scopes or "heads" in scopes
            self._set("adapt", ir.Adapt(temperature, layers, heads,
                                        "threshold" if stmt.threshold else "mass"), stmt.span)

    def _head_weights(self, named: ast.Extends):
        """The weights of `adapt heads "FILE"` (relative to the policy's file), or None after
        reporting why the file cannot be used."""
        shown = files.shown_path(named.path)
        if not named.path:
            self.d.error("`adapt heads` needs the path of a head-weights file (`kvpolicy "
                         "calibrate` writes one)", named.span)
            return None
        try:
            return heads.read_weights(self.directory / named.path)
        except heads.HeadsFileError as exc:
            self.d.error(f"cannot use the head-weights file '{shown}': {exc}", named.span)
            return None

    def _ScoreStmt(self, stmt: ast.ScoreStmt) -> None:
        words, numbers = _Words(self.d), _Numbers(self.d)
        method = words.pick(stmt.method, vocab.SCORE_METHODS, "score method")
        if method is None:
            return
        allowed = vocab.SCORE_METHODS[method]
        values: dict[str, Any] = {"method": method, **SCORE_DEFAULTS.get(method, {})}
        seen: dict[str, ast.ScoreArg] = {}
        ok = True
        for arg in stmt.args or ():
            name = arg.name.text
            if name not in allowed:
                takes = f"takes {vocab.one_of(allowed)}" if allowed else "takes no arguments"
                self.d.error(f"score {method} has no argument '{quoted(name)}' ({takes})"
                             + (vocab.suggest(name, allowed) if allowed else "")
                             + vocab.non_ascii_note(name), arg.name.span)
                ok = False
                continue
            if not _first_time(self.d, seen, name, arg, f"argument '{name}' is given twice"):
                ok = False
                continue
            if name in TOKEN_ARGS:
                least, most, example = TOKEN_ARGS[name]
                if arg.number is None or arg.word is not None:
                    self.d.error(f"{name} takes a number of tokens, e.g. `{name} = {example}`",
                                 arg.span)
                    ok = False
                    continue
                tokens = numbers.whole(arg.number, name, least, most)
                ok &= tokens is not None
                values[name] = tokens
            elif name == "pool":
                ok &= self._pool(arg, values)
            elif name == "gqa":
                if arg.word is None or arg.number is not None:
                    self.d.error(f"gqa takes {vocab.one_of(vocab.GQA_REDUCTIONS)}", arg.span)
                    ok = False
                    continue
                reduce = words.pick(arg.word, vocab.GQA_REDUCTIONS, "gqa reduction")
                ok &= reduce is not None
                values["gqa"] = reduce
        if ok:
            self._set("score", replace(ir.Score(), **values), stmt.span)

    def _pool(self, arg: ast.ScoreArg, values: dict[str, Any]) -> bool:
        if arg.word is None:
            self.d.error("pool takes a kind and a kernel size, e.g. `pool = max 7`", arg.span)
            return False
        kind = _Words(self.d).pick(arg.word, vocab.POOLINGS, "pooling")
        if kind is None:
            return False
        values["pool"] = kind
        if kind == "none":
            if arg.number is not None:
                self.d.error("pool = none takes no kernel size", arg.number.span)
                return False
            values["pool_kernel"] = 1
            return True
        if arg.number is None:
            self.d.error(f"pool = {kind} needs a kernel size, e.g. `pool = {kind} 7`", arg.span)
            return False
        kernel = _Numbers(self.d).whole(arg.number, "pool kernel", 1, MAX_POOL_KERNEL)
        if kernel is None:
            return False
        if kernel % 2 == 0:
            self.d.error(f"pool kernel must be odd (it is centred on each token), not {kernel}",
                         arg.number.span)
            return False
        values["pool_kernel"] = kernel
        return True

    def _ClusterStmt(self, stmt: ast.ClusterStmt) -> None:
        if stmt.k is None:
            self._set("cluster", None, stmt.span)
            return
        k = _Numbers(self.d).whole(stmt.k, "cluster k", 1, MAX_CLUSTERS)
        if k is not None:
            self._set("cluster", ir.Cluster(k), stmt.span)

    def _KeysStmt(self, stmt: ast.KeysStmt) -> None:
        fmt = _quant_format(self.d, stmt, self.draft.fields["keys"], "keys")
        if fmt is not None:
            self._set("keys", fmt, stmt.span)

    def _ValuesStmt(self, stmt: ast.ValuesStmt) -> None:
        fmt = _quant_format(self.d, stmt, self.draft.fields["values"], "values")
        if fmt is not None:
            self._set("values", fmt, stmt.span)

    def _GuardStmt(self, stmt: ast.GuardStmt) -> None:
        if stmt.fraction is None:
            self._set("guard", None, stmt.span)
            return
        guard = _guard(self.d, stmt)
        if guard is not None:
            self._set("guard", guard, stmt.span)

    def _check_block(self, block: ast.LayersStmt) -> bool:
        """Checks a `layers` block's own content; it is resolved once the policy is complete."""
        ok = True
        numbers = _Numbers(self.d)
        for layer_range in block.ranges:
            start = numbers.layer(layer_range.start)
            stop = numbers.layer(layer_range.end) if layer_range.end is not None else None
            if start is None or (layer_range.end is not None and stop is None):
                ok = False
            elif (isinstance(start, int) and isinstance(stop, int) and start != ir.LAST
                  and stop != ir.LAST and stop < start) or (
                    isinstance(start, ir.Depth) and isinstance(stop, ir.Depth)
                    and stop.fraction < start.fraction):
                self.d.error(f"layer range {_show_layer(layer_range.start)}.."
                             f"{_show_layer(layer_range.end)} runs backwards", layer_range.span)
                ok = False
            elif start == ir.LAST and stop not in (None, ir.LAST, ir.Depth(1.0)):
                # `last` is the highest layer of any model: `last..N` can only run backwards
                self.d.error(f"layer range last..{_show_layer(layer_range.end)} runs backwards "
                             f"(`last` is the last layer; write "
                             f"{_show_layer(layer_range.end)}..last)", layer_range.span)
                ok = False
        first: dict[type, ast.Stmt] = {}
        for stmt in block.statements:
            kind = type(stmt)
            if not isinstance(stmt, _OVERRIDABLE):
                name = ast.STATEMENT_NAMES[kind]
                hint = "; per-layer budgets are `retain layer N R` anchors" if kind in (
                    ast.RetainStmt, ast.AnchorsStmt) else ""
                self.d.error(f"'{name}' cannot be set per layer; a `layers` block sets keys, "
                             f"values and guard{hint}", stmt.span)
                ok = False
            elif kind in first:
                self._duplicate(stmt, first[kind])
                ok = False
            else:
                first[kind] = stmt
        if not block.statements and self.clean:
            self.d.warning("empty `layers` block", block.span)
        return ok


def _quant_format(d: Diagnostics, stmt: ast.KeysStmt | ast.ValuesStmt, base: ir.QuantFormat,
                  role: str) -> ir.QuantFormat | None:
    words, numbers = _Words(d), _Numbers(d)
    ok = True
    bits = words.width(stmt.width, role)
    ok &= bits is not None
    fields: dict[str, Any] = {"bits": bits, "span": stmt.span}
    seen: dict[type, ast.QuantOption] = {}
    for option in stmt.options:
        kind = type(option)
        what = "symmetric/asymmetric" if kind is ast.SymmetryOption else _option_name(option)
        if not _first_time(d, seen, kind, option, f"{role}: '{what}' is given twice"):
            ok = False
            continue
        if isinstance(option, ast.GroupOption):
            group = numbers.whole(option.size, "group", MIN_GROUP, MAX_GROUP)
            if group is not None and group & (group - 1):
                d.error(f"group must be a power of two (the kernels tile by it), not {group}",
                        option.size.span)
                group = None
            ok &= group is not None
            fields["group"] = group
            fields["group_span"] = option.span
        elif isinstance(option, ast.AxisOption):
            axis = words.pick(option.axis, vocab.AXES, "quantization axis")
            ok &= axis is not None
            fields["axis"] = axis
        elif isinstance(option, ast.SymmetryOption):
            fields["symmetric"] = option.symmetric
        else:
            dtype = words.pick(option.dtype, vocab.SCALE_DTYPES, "scale dtype")
            ok &= dtype is not None
            fields["scale_dtype"] = dtype
    if bits == ir.FULL_PRECISION_BITS and stmt.options:
        d.warning(f"{role} fp16 is stored unquantized; its options have no effect",
                  stmt.options[0].span)
    if not ok:
        return None
    if "group" not in fields:
        fields["group_span"] = stmt.span  # the group is implied by this statement
    return replace(base, **fields)


def _option_name(option: ast.QuantOption) -> str:
    return {ast.GroupOption: "group", ast.AxisOption: "per", ast.ScaleOption: "scale"}[type(option)]


def _guard(d: Diagnostics, stmt: ast.GuardStmt) -> ir.Guard | None:
    assert stmt.fraction is not None and stmt.width is not None
    fraction = _Numbers(d).ratio(stmt.fraction, "guard")
    bits = _Words(d).width(stmt.width, "guard")
    if fraction is None or bits is None:
        return None
    if fraction == 0:
        d.warning("guard 0% keeps no guard tokens", stmt.fraction.span)
    return ir.Guard(fraction, bits, stmt.span)


# ---- numbers and words -----------------------------------------------------------------------

def _shown(num: ast.Num) -> str:
    """A number as written, shortened if it is absurdly long."""
    return num.text if len(num.text) <= 24 else num.text[:20] + "…"


class _Numbers:
    def __init__(self, diagnostics: Diagnostics):
        self.d = diagnostics

    def _finite(self, num: ast.Num, what: str) -> bool:
        if not math.isfinite(num.value):
            self.d.error(f"{what} {_shown(num)} is too large", num.span)
            return False
        return True

    def whole(self, num: ast.Num, what: str, minimum: int, maximum: int) -> int | None:
        if not self._finite(num, what):
            return None
        if not num.value.is_integer():
            self.d.error(f"{what} must be a whole number, not {_shown(num)}", num.span)
            return None
        if num.value < minimum:
            self.d.error(f"{what} must be at least {minimum}, not {_shown(num)}", num.span)
            return None
        if num.value > maximum:
            self.d.error(f"{what} must be at most {maximum}, not {_shown(num)}", num.span)
            return None
        return int(num.value)

    def positive(self, num: ast.Num, what: str) -> float | None:
        if not self._finite(num, what):
            return None
        if num.value <= 0:
            self.d.error(f"{what} must be more than 0, not {_shown(num)}", num.span)
            return None
        return num.value

    def ratio(self, ratio: ast.Ratio, what: str) -> float | None:
        number = ratio.number
        if not self._finite(number, what):
            return None
        if ratio.percent:
            if not 0 <= number.value <= 100:
                self.d.error(f"{what} {_shown(number)}% is outside 0%..100%", ratio.span)
                return None
        elif 1 < number.value <= 100:
            self.d.error(f"{what} {_shown(number)} is more than 1; write {_shown(number)}% for a "
                         "percentage", ratio.span)
            return None
        elif not 0 <= number.value <= 1:
            self.d.error(f"{what} {_shown(number)} is outside 0..1", ratio.span)
            return None
        return ratio.value

    def layer(self, ref: ast.LayerRef) -> ir.LayerRef | None:
        if ref.number is None:
            return ir.LAST
        if ref.percent:
            share = self.ratio(ast.Ratio(ref.number, True, ref.span), "layer")
            return None if share is None else ir.Depth(share)
        if self._finite(ref.number, "layer") and not ref.number.value.is_integer():
            self.d.error(f"layer must be a whole number, not {_shown(ref.number)}; for a share "
                         f"of the model's depth write a percentage (`layer 50%`)",
                         ref.number.span)
            return None
        return self.whole(ref.number, "layer", 0, MAX_LAYER_INDEX)


class _Words:
    def __init__(self, diagnostics: Diagnostics):
        self.d = diagnostics

    def pick(self, word: ast.Word, choices, what: str) -> str | None:
        if word.text in choices:
            return word.text
        self.d.error(f"unknown {what} '{quoted(word.text)}'{vocab.suggest(word.text, choices)} "
                     f"(one of {vocab.one_of(choices)}){vocab.non_ascii_note(word.text)}",
                     word.span)
        return None

    def width(self, word: ast.Word, role: str) -> int | None:
        if word.text in vocab.WIDTHS:
            return vocab.WIDTHS[word.text]
        hint = vocab.suggest(word.text, vocab.WIDTHS, vocab.WIDTH_ALIASES)
        self.d.error(f"unsupported {role} bit-width '{quoted(word.text)}'{hint} (supported: "
                     f"{vocab.one_of(vocab.WIDTHS)}){vocab.non_ascii_note(word.text)}",
                     word.span)
        return None


def _first_time(d: Diagnostics, seen: dict, key, node, twice: str,
                first: str = "first given here") -> bool:
    """True, recording `node` under `key`, the first time `key` is seen; after that an error at
    `node` (`twice`) that points at the first, and False."""
    if key in seen:
        d.error(twice, node.span, note(first, seen[key].span))
        return False
    seen[key] = node
    return True


def _show_layer(ref: ast.LayerRef) -> str:
    if ref.number is None:
        return "last"
    return _shown(ref.number) + ("%" if ref.percent else "")


# ---- finishing: overrides and the checks that involve several statements --------------------

def _finish(draft: _Draft, d: Diagnostics) -> ir.Policy | None:
    fields = dict(draft.fields)
    fields["extends"] = draft.extends
    fields["retain_span"] = draft.spans.get("retain") or draft.spans.get("anchors")
    fields["window_span"] = draft.spans.get("window")
    fields["model_span"] = draft.spans.get("model")
    overrides = []
    for block in draft.overrides:
        override = _resolve_override(d, block, fields)
        if override is not None:
            overrides.append(override)
    fields["layers"] = tuple(overrides)
    policy = ir.Policy(**fields)
    if draft.cross_checks and not d.has_errors:
        _cross_checks(d, policy, draft)
    return policy


def _resolve_override(d: Diagnostics, block: ast.LayersStmt,
                      fields: dict[str, Any]) -> ir.LayerOverride | None:
    numbers = _Numbers(Diagnostics())  # already checked in _check_block; stay quiet here
    layers = []
    for layer_range in block.ranges:
        start = numbers.layer(layer_range.start)
        stop = numbers.layer(layer_range.end) if layer_range.end is not None else None
        if start is None:
            return None
        layers.append(ir.LayerSelection(start, stop, layer_range.span))
    values: dict[str, Any] = {}
    for stmt in block.statements:
        if isinstance(stmt, ast.KeysStmt):
            values["keys"] = _quant_format(d, stmt, fields["keys"], "keys")
        elif isinstance(stmt, ast.ValuesStmt):
            values["values"] = _quant_format(d, stmt, fields["values"], "values")
        elif isinstance(stmt, ast.GuardStmt):
            values["guard"] = ir.NO_GUARD if stmt.fraction is None else _guard(d, stmt)
    if any(v is None for v in values.values()):
        return None
    return ir.LayerOverride(tuple(layers), span=block.span, **values)


def _cross_checks(d: Diagnostics, policy: ir.Policy, draft: _Draft) -> None:
    spans = draft.spans
    header = draft.header

    def warn(message: str, span: Span | None) -> None:
        # Only about statements in this file: an ablation that extends a policy and switches
        # eviction off should not be told that the parent's eviction settings are now moot.
        if span is not None and span.path == policy.path:
            d.warning(message, span)

    # a cache must hold something: with no sinks, window or centroids the budget is all there is
    keeps_nothing = policy.retain == 0 or (policy.retain is None and policy.anchors and all(
        anchor.ratio == 0 for anchor in policy.anchors))
    if keeps_nothing and policy.sinks == 0 and policy.window == 0 and policy.cluster is None:
        budget = "retain 0%" if policy.retain == 0 else "every anchor at 0%"
        d.error(f"the policy keeps no token: {budget}, with no `keep sinks`, no `keep window` and "
                "no `cluster evicted`; keep a window (e.g. `keep window 64`) or retain more than "
                "0%", spans.get("retain") or spans.get("anchors") or header)
    # interpolation needs anchors, and some kinds need several
    if "interpolate" in spans:
        where = spans["interpolate"]
        if policy.interpolate == "uniform" and policy.anchors:
            d.error("interpolate uniform gives every layer the global ratio, but the policy has "
                    "per-layer anchors; remove them or interpolate linear/step/pyramid", where,
                    note("anchors are set here", spans.get("anchors")))
        elif policy.interpolate == "pyramid" and len(policy.anchors) < 2:
            d.error("interpolate pyramid fits a straight line through the anchors and needs at "
                    "least two (`retain layer 0 40%, layer last 5%`)", where)
        elif not policy.anchors and policy.interpolate != "uniform":
            warn("interpolate has no effect without `retain layer …` anchors", where)
    if policy.adapt is not None:
        if policy.adapt.static:
            if not policy.evicts:
                warn("adapt has no effect: the policy evicts nothing", spans["adapt"])
        elif policy.score.method not in ADAPTABLE_SCORES:
            d.error(f"adapt redistributes budgets by attention, which score "
                    f"{policy.score.method} does not measure; use score snapkv or reconstruct",
                    spans["adapt"], note("score is set here", spans.get("score")))
        elif not policy.evicts:
            warn("adapt has no effect: the policy evicts nothing", spans["adapt"])
    if policy.cluster is not None and not policy.evicts:
        warn("cluster has nothing to cluster: the policy evicts nothing", spans["cluster"])
    if policy.retain == 1.0 and policy.anchors:
        warn("retain 100% keeps every token in every layer; the anchors have no effect",
             spans.get("anchors"))

    storage = [("", policy.keys, policy.values, policy.guard, spans.get("guard"))]
    for override in policy.layers:
        storage.append((" in this `layers` block", override.keys or policy.keys,
                        override.values or policy.values, override.guard or policy.guard,
                        (override.guard.span if override.guard else spans.get("guard"))
                        or override.span))
    reported: set[tuple] = set()  # an override repeats the policy's formats: report once
    for where, keys, values, guard, guard_span in storage:
        for role, fmt in (("keys", keys), ("values", values)):
            if (guard is not None and guard.fraction > 0 and guard.bits <= fmt.bits
                    and ("guard", role, guard.bits, fmt) not in reported):
                reported.add(("guard", role, guard.bits, fmt))
                d.error(f"guard bits ({_bits(guard.bits)}) must be higher than the {role}' "
                        f"({_bits(fmt.bits)}){where}", guard_span or header,
                        note(f"{role} are set here", fmt.span) if fmt.span else
                        note(f"{role} are fp16 unless a `{role}` statement says otherwise"))
            group = fmt.token_group
            if policy.window % group and ("window", role, group) not in reported:
                reported.add(("window", role, group))
                d.error(f"{role} group {group} per channel does not divide the window of "
                        f"{policy.window} tokens{where}; per-channel groups are whole "
                        f"groups of tokens, so the window must be a multiple of {group}",
                        fmt.group_span or fmt.span or header,
                        note("the window is set here", spans.get("window")))


def _bits(bits: int) -> str:
    return "fp16" if bits == ir.FULL_PRECISION_BITS else f"int{bits}"
