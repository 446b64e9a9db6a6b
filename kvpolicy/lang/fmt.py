"""Canonical formatting of a policy file.

The formatter prints the AST back, so it changes layout, never meaning: parse(format(x)) has the
same IR as parse(x), and format(format(x)) == format(x). It keeps every comment (own-line comments
stay above the statement they preceded; end-of-line comments stay at the end of their statement's
line) and keeps a blank line wherever the source had one or more.

Canonical layout: one statement per line, four spaces per level, `keys` padded to line up with
`values` (when both are in the block), options in a fixed order (group, per, symmetry, scale;
observe, future, chunk, pool, gqa), numbers without redundant digits (`18.0%` → `18%`, `1e3` → `1000`),
`by score` spelled out, end-of-line comments aligned within a run of consecutive lines. A block
(the policy's or a `layers` block) written on one line with no comment inside stays on one line,
statements separated by "; " — so an ablation stays a one-line file.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from kvpolicy.lang import ast
from kvpolicy.lang.vocabulary import ADAPT_SCOPES

INDENT = "    "
_SCORE_ARG_ORDER = ("observe", "future", "chunk", "pool", "gqa")


def format_policy(tree: ast.PolicyFile) -> str:
    text = tree.source.text
    lines = text.split("\n")
    comments = list(tree.comments)
    header_line = tree.span.line
    out: list[str] = []

    leading = [c for c in comments if c.line < header_line]
    previous_end = 0
    for comment in leading:
        if out and _blank_between(lines, previous_end, comment.line):
            out.append("")
        out.append(comment.text)
        previous_end = comment.line
    if out and _blank_between(lines, previous_end, header_line):
        out.append("")

    header = f"policy {tree.name.text}"
    if tree.extends is not None:
        header += f' extends "{tree.extends.path}"'
    body_comments = [c for c in comments if header_line <= c.line <= tree.span.end_line]
    out += _block_or_line(header, tree.statements, body_comments, tree.span, lines, depth=0)

    trailing = [c for c in comments if c.line > tree.span.end_line]
    previous_end = tree.span.end_line
    for comment in trailing:
        if _blank_between(lines, previous_end, comment.line):
            out.append("")
        out.append(comment.text)
        previous_end = comment.line
    return "\n".join(out) + "\n"


def _blank_between(lines: list[str], after: int, before: int) -> bool:
    """Is any line strictly between 1-based lines `after` and `before` blank?"""
    return any(not lines[i - 1].strip() for i in range(after + 1, before) if 0 < i <= len(lines))


def _block(header: str, statements, comments, span, lines: list[str], depth: int) -> list[str]:
    """`header {`, the statements with their comments, `}` — at `depth` levels of indent."""
    pad = INDENT * depth
    inner = INDENT * (depth + 1)
    open_line, close_line = span.line, span.end_line
    pair = any(isinstance(stmt, ast.ValuesStmt) for stmt in statements)  # pad keys to match
    starts_on_open_line = any(stmt.span.line == open_line for stmt in statements)
    header_comments = [c for c in comments if c.line == open_line and not starts_on_open_line
                       and open_line != close_line]
    close_comments = [c for c in comments if c.line == close_line and c.column >= span.end_column]
    claimed = {id(c) for c in header_comments + close_comments}

    rows: list[tuple[str, str | None, bool]] = []  # (code, end-of-line comment, blank before)
    previous_end = open_line
    for position, stmt in enumerate(statements):
        span = stmt.span
        # A comment belongs to the last statement on its line (`a; b  # about b`).
        next_line = (statements[position + 1].span.line if position + 1 < len(statements)
                     else close_line + 1)
        own = [c for c in comments if id(c) not in claimed and previous_end < c.line < span.line]
        for comment in own:
            rows.append((inner + comment.text, None, _blank_between(lines, previous_end,
                                                                    comment.line)))
            claimed.add(id(comment))
            previous_end = comment.line
        blank = _blank_between(lines, previous_end, span.line)
        mine = [c for c in comments if id(c) not in claimed
                and span.line <= c.line <= span.end_line and c.line < next_line]
        claimed.update(id(c) for c in mine)
        if isinstance(stmt, ast.LayersStmt):
            block = _layers(stmt, mine, lines, depth + 1)
            rows.append((block[0], None, blank))
            rows += [(row, None, False) for row in block[1:]]
        else:
            trailing = " ".join(c.text for c in mine) or None
            rows.append((inner + _statement(stmt, aligned=pair), trailing, blank))
        previous_end = span.end_line
    for comment in comments:
        if id(comment) not in claimed and comment.line < close_line:
            rows.append((inner + comment.text, None, _blank_between(lines, previous_end,
                                                                    comment.line)))
            previous_end = comment.line
            claimed.add(id(comment))

    out = [_with_comment(pad + header + " {", header_comments)]
    out += _align(rows)
    out.append(_with_comment(pad + "}", close_comments))
    return out


def _layers(stmt: ast.LayersStmt, comments, lines: list[str], depth: int) -> list[str]:
    header = "layers " + ", ".join(_layer_range(r) for r in stmt.ranges)
    return _block_or_line(header, stmt.statements, comments, stmt.span, lines, depth)


def _block_or_line(header: str, statements, comments, span, lines: list[str],
                   depth: int) -> list[str]:
    """One line if the block was written on one line, with no comment inside its braces and no
    nested block; otherwise one statement per line."""
    one_line = (span.line == span.end_line and statements
                and not any(isinstance(stmt, ast.LayersStmt) for stmt in statements)
                and not any(c.line == span.line and c.column < span.end_column for c in comments))
    if one_line:
        body = "; ".join(_statement(stmt, aligned=False) for stmt in statements)
        return [_with_comment(f"{INDENT * depth}{header} {{ {body} }}", comments)]
    return _block(header, statements, comments, span, lines, depth)


def _with_comment(code: str, comments) -> str:
    if not comments:
        return code
    return code + "  " + " ".join(c.text for c in comments)


def _align(rows: list[tuple[str, str | None, bool]]) -> list[str]:
    """Aligns end-of-line comments within each run of consecutive statement lines."""
    out: list[str] = []
    run: list[tuple[str, str | None]] = []

    def flush() -> None:
        width = max((len(code) for code, comment in run if comment), default=0)
        for code, comment in run:
            out.append(f"{code.ljust(width)}  {comment}" if comment else code)
        run.clear()

    for code, comment, blank in rows:
        if blank:
            flush()
            out.append("")
        if code.lstrip().startswith("#"):
            flush()
            out.append(code)
            continue
        run.append((code, comment))
    flush()
    return out


# ---- one statement -----------------------------------------------------------------------------

def number(num: ast.Num) -> str:
    """The shortest decimal spelling of a number (`18.0` → `18`, `1e3` → `1000`)."""
    try:
        value = Decimal(num.text)
    except InvalidOperation:
        return num.text
    if not value.is_finite():
        return num.text
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _ratio(ratio: ast.Ratio) -> str:
    return number(ratio.number) + ("%" if ratio.percent else "")


def _layer_ref(ref: ast.LayerRef) -> str:
    if ref.number is None:
        return "last"
    return number(ref.number) + ("%" if ref.percent else "")


def _layer_range(layer_range: ast.LayerRange) -> str:
    text = _layer_ref(layer_range.start)
    if layer_range.end is not None:
        text += ".." + _layer_ref(layer_range.end)
    return text


def _statement(stmt: ast.Stmt, aligned: bool = True) -> str:
    """The canonical text of a statement; `aligned` pads `keys` to line up with `values`."""
    if isinstance(stmt, ast.ModelStmt):
        return f'model "{stmt.model}"'
    if isinstance(stmt, ast.SinksStmt):
        return f"keep sinks {number(stmt.count)}"
    if isinstance(stmt, ast.WindowStmt):
        return f"keep window {number(stmt.count)}"
    if isinstance(stmt, ast.RetainStmt):
        return f"retain {_ratio(stmt.ratio)}"
    if isinstance(stmt, ast.AnchorsStmt):
        return "retain " + ", ".join(f"layer {_layer_ref(a.layer)} {_ratio(a.ratio)}"
                                     for a in stmt.anchors)
    if isinstance(stmt, ast.InterpolateStmt):
        return f"interpolate {stmt.kind.text}"
    if isinstance(stmt, ast.AdaptStmt):
        if stmt.heads is not None:
            return f'adapt heads "{stmt.heads.path}"'
        if stmt.temperature is None and not stmt.threshold:
            return "adapt none"
        text = ("adapt threshold" if stmt.threshold else
                f"adapt temperature {number(stmt.temperature)}")
        if stmt.scopes:
            order = sorted(stmt.scopes, key=lambda w: _order(w.text, ADAPT_SCOPES))
            text += " across " + ", ".join(w.text for w in order)
        return text
    if isinstance(stmt, ast.ScoreStmt):
        text = f"score {stmt.method.text}"
        if stmt.args:
            args = sorted(stmt.args, key=lambda a: _order(a.name.text, _SCORE_ARG_ORDER))
            text += "(" + ", ".join(_score_arg(a) for a in args) + ")"
        return text
    if isinstance(stmt, ast.ClusterStmt):
        if stmt.k is None:
            return "cluster none"
        return f"cluster evicted k {number(stmt.k)}"
    if isinstance(stmt, (ast.KeysStmt, ast.ValuesStmt)):
        keyword = "values" if isinstance(stmt, ast.ValuesStmt) else "keys  " if aligned else "keys"
        return " ".join([keyword, stmt.width.text] + _quant_options(stmt.options))
    if isinstance(stmt, ast.GuardStmt):
        if stmt.fraction is None:
            return "guard none"
        return f"guard {_ratio(stmt.fraction)} of retained at {stmt.width.text} by score"
    raise TypeError(f"no canonical form for {type(stmt).__name__}")


def _order(name: str, order: tuple[str, ...]) -> int:
    return order.index(name) if name in order else len(order)


def _score_arg(arg: ast.ScoreArg) -> str:
    value = " ".join(part for part in (
        arg.word.text if arg.word else None,
        number(arg.number) if arg.number else None) if part)
    return f"{arg.name.text} = {value}"


def _quant_options(options) -> list[str]:
    ranked = {ast.GroupOption: 0, ast.AxisOption: 1, ast.SymmetryOption: 2, ast.ScaleOption: 3}
    words = []
    for option in sorted(options, key=lambda o: ranked[type(o)]):
        if isinstance(option, ast.GroupOption):
            words.append(f"group {number(option.size)}")
        elif isinstance(option, ast.AxisOption):
            words.append(f"per {option.axis.text}")
        elif isinstance(option, ast.SymmetryOption):
            words.append("symmetric" if option.symmetric else "asymmetric")
        else:
            words.append(f"scale {option.dtype.text}")
    return words
