"""Source text → AST, reporting every syntax error in one pass.

Lark's LALR parser (positions propagated) reads the grammar in `grammar/kvp.lark`. On a syntax
error the parser does panic-mode recovery: it records a friendly, located message, pops its stack
back to the start of the broken statement, skips the rest of that statement's line and carries on.
So a file with three broken lines reports three errors, and the statements that did parse still
reach the semantic checks.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from kvpolicy import _resources
from kvpolicy.diagnostics import Diagnostic, Source, Span, note, quoted
from kvpolicy.lang import ast, vocabulary as vocab

MAX_SYNTAX_ERRORS = 20

# What a terminal is called in messages, for terminals that are not plain keywords.
_TERMINAL_NAMES = {
    "NUMBER": "a number",
    "NAME": "a word",
    "STRING": 'a quoted string ("…")',
    "_NL": "end of line",
    "SEMICOLON": "';'",
    "$END": "end of file",
}

# Structural mistakes with a better explanation than "unexpected X" (Lark's match_examples).
_EXAMPLES: dict[str, list[str]] = {
    "statements belong inside a policy block: `policy NAME { … }`": [
        "keep sinks 4", "retain 18%", "keys int2", "# c\nscore snapkv",
    ],
    "a policy needs a name: `policy NAME { … }`": ["policy {", "policy extends"],
    "`extends` takes a quoted path, e.g. `extends \"base.kvp\"`": ["policy a extends b {"],
    "override blocks cannot nest; list every layer in one `layers …` header": [
        "policy a {\nlayers 0 {\nlayers",
    ],
    "a file holds one policy": ["policy a {\n}\npolicy"],
    "a percentage needs a number before '%'": ["policy a {\nretain %"],
}


@dataclass
class _ParseState:
    source: Source
    comments: list
    diagnostics: list


_current: _ParseState | None = None


def _collect_comment(token: Token) -> Token:
    if _current is not None:
        _current.comments.append(token)
    return token


@functools.lru_cache(maxsize=None)
def _lark() -> Lark:
    grammar = _resources.grammar_path().read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True,
                lexer_callbacks={"COMMENT": _collect_comment})


@functools.lru_cache(maxsize=None)
def _keyword_texts() -> dict[str, str]:
    """Terminal name → the literal it matches, for keyword terminals ('KEEP' → 'keep')."""
    texts = {}
    for terminal in _lark().terminals:
        if terminal.pattern.type == "str":
            texts[terminal.name] = terminal.pattern.value
    return texts


@dataclass(frozen=True)
class ParseResult:
    """The AST (None if not even the policy header parsed) and every syntax error found."""

    tree: ast.PolicyFile | None
    diagnostics: tuple[Diagnostic, ...]

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.diagnostics)


def parse_source(source: Source) -> ParseResult:
    global _current
    state = _ParseState(source, [], [])
    if not any(line.split("#", 1)[0].strip() for line in source.text.split("\n")):
        message = "empty policy file; a policy file holds `policy NAME { … }`"
        return ParseResult(None, (Diagnostic("error", message, Span.of_file(source)),))
    _current = state
    try:
        tree = _lark().parse(source.text, on_error=lambda e: _recover(e, state))
    except UnexpectedInput as exc:
        # Unrecoverable (usually the end of the file inside a header); already recorded unless
        # recovery gave up before recording.
        if not state.diagnostics or state.diagnostics[-1].span is None or not _same_place(
                state.diagnostics[-1], exc):
            state.diagnostics.append(_describe(exc, source))
        return ParseResult(None, tuple(state.diagnostics))
    finally:
        _current = None
    policy_file = _Builder(source).file(tree, state.comments)
    return ParseResult(policy_file, tuple(state.diagnostics))


def _same_place(diagnostic: Diagnostic, exc: UnexpectedInput) -> bool:
    span = diagnostic.span
    return span is not None and (span.line, span.column) == (getattr(exc, "line", None),
                                                             getattr(exc, "column", None))


# ---- error recovery --------------------------------------------------------------------------

def _recover(exc: UnexpectedInput, state: _ParseState) -> bool:
    """Records `exc`, then resynchronises the parser at the next statement. True to go on."""
    state.diagnostics.append(_describe(exc, state.source))
    if len(state.diagnostics) >= MAX_SYNTAX_ERRORS:
        last = state.diagnostics[-1]
        state.diagnostics[-1] = Diagnostic(last.severity, last.message, last.span, last.notes + (
            note(f"stopped after {MAX_SYNTAX_ERRORS} syntax errors; fix these and check again"),))
        return False
    interactive = exc.interactive_parser
    if interactive is None:
        return False
    try:
        return _resynchronise(exc, interactive)
    except (AttributeError, KeyError, IndexError, UnexpectedInput):
        return False  # the parser's internals moved: report what we have, stop here


def _resynchronise(exc: UnexpectedInput, interactive) -> bool:
    parser_state = interactive.parser_state
    table = parser_state.parse_conf.states
    stack, values = parser_state.state_stack, parser_state.value_stack
    # Pop the half-read statement: back to a state where a statement may start.
    while stack and "KEEP" not in table[stack[-1]]:
        stack.pop()
        if values:
            values.pop()
    if not stack:
        return False
    token = getattr(exc, "token", None)
    token_type = getattr(token, "type", None)
    if token_type == "$END":
        # Close the open block(s) so that what did parse still reaches the semantic checks.
        if "RBRACE" not in table[stack[-1]]:
            return False
        interactive.feed_token(Token("RBRACE", "}"))
        return True
    if token_type == "RBRACE":
        interactive.feed_token(token)  # the brace ends the block; it must not be lost
        return True
    if token_type in ("_NL", "SEMICOLON"):
        return True  # already at the start of the next statement
    _skip_to_statement_end(interactive.lexer_thread.state)
    return True


def _skip_to_statement_end(lexer_state) -> None:
    """Moves the lexer to the end of the broken statement: the next new line or ';' outside
    braces, or a '}' that closes an enclosing block (neither is consumed). A block the broken
    statement opened is skipped whole, so its '}' cannot close the enclosing block."""
    text = getattr(lexer_state.text, "text", lexer_state.text)
    counter = lexer_state.line_ctr
    start = counter.char_pos
    depth = 0
    end = start
    while end < len(text):
        char = text[end]
        if char == "#":
            newline = text.find("\n", end)
            end = newline if newline >= 0 else len(text)
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                break
            depth -= 1
        elif char in "\n;" and depth == 0:
            break
        end += 1
    if end > start:
        counter.feed(text[start:end])


# ---- messages --------------------------------------------------------------------------------

def _describe(exc: UnexpectedInput, source: Source) -> Diagnostic:
    span = _error_span(exc, source)
    notes = _invisible_note(source, span.line)
    if isinstance(exc, UnexpectedCharacters):
        char = source.text[exc.pos_in_stream] if exc.pos_in_stream < len(source.text) else ""
        before = source.line_text(span.line)[:span.column - 1]
        if char == '"':
            message = "unterminated string; a string ends on the line where it starts"
        elif re.search(r"(^|\s)policy\s+$", before):
            message = (f"a policy name starts with a letter or '_', not {char!r} (a name is "
                       "letters, digits, '_' and '-')")
        else:
            message = f"unexpected character {char!r}"
        return Diagnostic("error", message, span, notes)
    assert isinstance(exc, UnexpectedToken)
    message = (_misplaced_message(exc, source) or _match_example(exc)
               or _unexpected_token_message(exc))
    if exc.token.type == "$END":
        opened = _open_brace(exc)
        if opened is not None:
            notes += (note("the block opened here is not closed", Span.point(
                source, opened.line, opened.column)),)
    return Diagnostic("error", message, span, notes)


def _invisible_note(source: Source, line: int) -> tuple[Diagnostic, ...]:
    """A note when the line holds a character that does not show (a zero-width joiner, a bidi
    override, a control character): the likeliest cause of a mistake that looks impossible."""
    text = source.line_text(line)
    for column, char in enumerate(text, start=1):
        if char != "\t" and unicodedata.category(char) in ("Cc", "Cf"):
            return (note(f"line {line} holds an invisible character, U+{ord(char):04X}, at "
                         f"column {column}"),)
    return ()


def _error_span(exc: UnexpectedInput, source: Source) -> Span:
    token = getattr(exc, "token", None)
    if isinstance(token, Token) and token.type != "$END" and token.line is not None:
        end_line = token.end_line or token.line
        end_column = token.end_column or token.column + max(len(token.value), 1)
        if token.type == "_NL":
            end_line, end_column = token.line, token.column + 1
        return Span(source, token.line, token.column, end_line, end_column)
    if isinstance(token, Token) and token.type == "$END":
        lines = source.text.split("\n")
        while len(lines) > 1 and not lines[-1].strip():
            lines.pop()
        return Span.point(source, len(lines), len(lines[-1].rstrip()) + 1)
    line = exc.line if isinstance(exc.line, int) else 1
    column = exc.column if isinstance(exc.column, int) else 1
    return Span.point(source, line, column)


def _misplaced_message(exc: UnexpectedToken, source: Source) -> str | None:
    """Mistakes whose token the generic messages would misname: a misspelt `policy`, a policy
    name that is not a word, a `layers` block inside another."""
    token = exc.token
    expected = _expected(exc)
    is_word = token.type == "NAME" or token.value in _keyword_texts().values()
    if "POLICY" in expected and is_word and token.type != "POLICY":
        if vocab.closest(str(token.value), ["policy"]):
            return (f"unknown word {_show_token(token)}; did you mean 'policy'? A file holds "
                    "`policy NAME { … }`" + vocab.non_ascii_note(str(token.value)))
    if _previous_type(exc) == "POLICY" and token.type not in ("NAME", "LBRACE", "$END"):
        written = _word_at(source, token)
        if token.type == "NUMBER" or written[:1].isdigit():
            return (f"a policy name starts with a letter or '_', not a digit: '{quoted(written)}' "
                    "(a name is letters, digits, '_' and '-')")
        if token.type == "STRING":
            return "a policy name is a bare word, not a quoted string: `policy NAME { … }`"
    if token.type == "LAYERS" and "KEEP" in expected and "LAYERS" not in expected:
        return "override blocks cannot nest; list every layer in one `layers …` header"
    return None


def _expected(exc: UnexpectedToken) -> set[str]:
    try:
        # `accepts` replays the parser per terminal: exact, unlike LALR's merged `expected`.
        expected = set(exc.accepts or exc.expected)
    except Exception:
        expected = set(exc.expected)
    return expected - {"WS", "COMMENT"}


def _previous_type(exc: UnexpectedToken) -> str | None:
    values = getattr(getattr(exc.interactive_parser, "parser_state", None), "value_stack", None)
    if values and isinstance(values[-1], Token):
        return values[-1].type
    return None


def _word_at(source: Source, token: Token) -> str:
    """The run of non-space characters the source has where `token` starts."""
    line = source.line_text(token.line)
    rest = line[token.column - 1:]
    return rest.split(None, 1)[0] if rest.strip() else str(token.value)


def _match_example(exc: UnexpectedInput) -> str | None:
    if getattr(exc, "state", None) is None:
        return None
    try:
        return exc.match_examples(_lark().parse, _EXAMPLES, use_accepts=True)
    except Exception:  # an example that parses or a Lark internal change: no label, plain message
        return None


def _unexpected_token_message(exc: UnexpectedToken) -> str:
    token = exc.token
    expected = _expected(exc)
    keywords = _keyword_texts()
    found = _show_token(token)
    expected_words = sorted(keywords[n] for n in expected
                            if n in keywords and keywords[n].isalpha())
    is_word = token.type == "NAME" or token.value in keywords.values()
    suggestion = None
    if is_word and expected_words:
        suggestion = vocab.closest(str(token.value), expected_words)

    if "KEEP" in expected and is_word:
        message = f"unknown statement {found}"
        hint = vocab.non_ascii_note(str(token.value))
        if suggestion:
            return f"{message}; did you mean '{suggestion}'?{hint}"
        return f"{message}; a statement starts with one of: {', '.join(expected_words)}{hint}"
    if token.type == "$END" and "RBRACE" in expected:
        return "unexpected end of file: a '}' is missing"
    if expected == {"NUMBER"}:
        after = _previous_word(exc)
        return f"expected a number{after}, found {found}"
    if suggestion:
        return f"unexpected {found}; did you mean '{suggestion}'?"
    return f"unexpected {found}; expected {_show_expected(expected)}"


def _show_token(token: Token) -> str:
    if token.type in ("_NL", "$END"):
        return _TERMINAL_NAMES[token.type]
    return f"'{quoted(str(token.value))}'"


def _show_expected(expected: set[str]) -> str:
    keywords = _keyword_texts()
    shown = []
    for name in sorted(expected, key=lambda n: (n not in keywords, keywords.get(n, n))):
        if name in keywords:
            shown.append(f"'{keywords[name]}'")
        else:
            shown.append(_TERMINAL_NAMES.get(name, name.lower()))
    if len(shown) > 1:
        return ", ".join(shown[:-1]) + " or " + shown[-1]
    return shown[0] if shown else "nothing"


def _previous_word(exc: UnexpectedToken) -> str:
    interactive = exc.interactive_parser
    values = getattr(getattr(interactive, "parser_state", None), "value_stack", None) or []
    for value in reversed(values[-1:]):
        if isinstance(value, Token):
            return f" after '{value.value}'"
    return ""


def _open_brace(exc: UnexpectedToken) -> Token | None:
    values = getattr(getattr(exc.interactive_parser, "parser_state", None), "value_stack", [])
    for value in reversed(values or []):
        if isinstance(value, Token) and value.type == "LBRACE":
            return value
    return None


# ---- Lark tree → AST -------------------------------------------------------------------------

class _Builder:
    def __init__(self, source: Source):
        self.source = source

    def span(self, item: Tree | Token) -> Span:
        if isinstance(item, Token):
            return Span(self.source, item.line, item.column, item.end_line, item.end_column)
        meta = item.meta
        return Span(self.source, meta.line, meta.column, meta.end_line, meta.end_column)

    def file(self, tree: Tree, comments: list[Token]) -> ast.PolicyFile:
        policy = next(c for c in tree.children if isinstance(c, Tree) and c.data == "policy")
        name, extends, *rest = policy.children
        statements = tuple(self.statement(s) for s in rest if isinstance(s, Tree))
        return ast.PolicyFile(
            source=self.source,
            name=self.word(name),
            extends=ast.Extends(_unquote(extends.children[0]), self.span(extends.children[0]))
            if extends is not None else None,
            statements=statements,
            comments=tuple(ast.Comment(str(c.value).rstrip(), c.line, c.column) for c in comments),
            span=self.span(policy),
        )

    def statement(self, tree: Tree) -> ast.Stmt:
        return getattr(self, tree.data)(tree, self.span(tree))

    def word(self, token: Token) -> ast.Word:
        return ast.Word(str(token.value), self.span(token))

    def num(self, token: Token) -> ast.Num:
        return ast.Num(str(token.value), float(token.value), self.span(token))

    def ratio(self, tree: Tree) -> ast.Ratio:
        number, percent = tree.children
        return ast.Ratio(self.num(number), percent is not None, self.span(tree))

    def layer_ref(self, tree: Tree) -> ast.LayerRef:
        token, *percent = tree.children
        number = self.num(token) if token.type == "NUMBER" else None
        return ast.LayerRef(number, self.span(tree), percent=bool(percent and percent[0]))

    @staticmethod
    def _items(tree: Tree) -> list:
        return [c for c in tree.children if c is not None]

    # statements, one method per grammar rule
    def model_stmt(self, tree, span):
        return ast.ModelStmt(_unquote(tree.children[0]), span)

    def sinks_stmt(self, tree, span):
        return ast.SinksStmt(self.num(tree.children[0]), span)

    def window_stmt(self, tree, span):
        return ast.WindowStmt(self.num(tree.children[0]), span)

    def retain_stmt(self, tree, span):
        return ast.RetainStmt(self.ratio(tree.children[0]), span)

    def anchors_stmt(self, tree, span):
        anchors = []
        for child in self._items(tree):
            layer, ratio = child.children
            anchors.append(ast.Anchor(self.layer_ref(layer), self.ratio(ratio), self.span(child)))
        return ast.AnchorsStmt(tuple(anchors), span)

    def interpolate_stmt(self, tree, span):
        return ast.InterpolateStmt(self.word(tree.children[0]), span)

    @staticmethod
    def _is_none(tree: Tree) -> bool:
        return any(isinstance(c, Token) and c.type == "NONE" for c in tree.children)

    def adapt_stmt(self, tree, span):
        if self._is_none(tree):
            return ast.AdaptStmt(None, (), span)
        if any(isinstance(c, Token) and c.type == "HEADS" for c in tree.children):
            string = tree.children[-1]
            return ast.AdaptStmt(None, (), span,
                                 heads=ast.Extends(_unquote(string), self.span(string)))
        if any(isinstance(c, Token) and c.type == "THRESHOLD" for c in tree.children):
            scopes = [c for c in self._items(tree) if isinstance(c, Tree)]
            words = tuple(self.word(s.children[0]) for s in scopes)
            return ast.AdaptStmt(None, words, span, threshold=True)
        temperature, *scopes = self._items(tree)
        words = tuple(self.word(s.children[0]) for s in scopes)
        return ast.AdaptStmt(self.num(temperature), words, span)

    def score_stmt(self, tree, span):
        method, args = tree.children
        parsed = None
        if args is not None:
            parsed = tuple(self.score_arg(a) for a in self._items(args))
        return ast.ScoreStmt(self.word(method), parsed, span)

    def score_arg(self, tree: Tree) -> ast.ScoreArg:
        if tree.data == "score_number_arg":
            name, number = tree.children
            return ast.ScoreArg(self.word(name), None, self.num(number), self.span(tree))
        name, word, number = tree.children
        return ast.ScoreArg(self.word(name), self.word(word),
                            self.num(number) if number is not None else None, self.span(tree))

    def cluster_stmt(self, tree, span):
        if self._is_none(tree):
            return ast.ClusterStmt(None, span)
        return ast.ClusterStmt(self.num(tree.children[0]), span)

    def _quant(self, tree):
        width, *options = self._items(tree)
        return self.word(width), tuple(self.quant_option(o) for o in options)

    def keys_stmt(self, tree, span):
        return ast.KeysStmt(*self._quant(tree), span)

    def values_stmt(self, tree, span):
        return ast.ValuesStmt(*self._quant(tree), span)

    def quant_option(self, tree: Tree) -> ast.QuantOption:
        span = self.span(tree)
        (token,) = tree.children
        if tree.data == "group_option":
            return ast.GroupOption(self.num(token), span)
        if tree.data == "axis_option":
            return ast.AxisOption(self.word(token), span)
        if tree.data == "symmetry_option":
            return ast.SymmetryOption(token.value == "symmetric", span)
        return ast.ScaleOption(self.word(token), span)

    def guard_stmt(self, tree, span):
        if self._is_none(tree):
            return ast.GuardStmt(None, None, False, span)
        fraction, width, by_score = tree.children
        return ast.GuardStmt(self.ratio(fraction), self.word(width), by_score is not None, span)

    def layers_stmt(self, tree, span):
        items = self._items(tree)
        ranges = []
        statements = []
        for item in items:
            if item.data == "layer_range":
                start, end = item.children
                ranges.append(ast.LayerRange(self.layer_ref(start),
                                             self.layer_ref(end) if end is not None else None,
                                             self.span(item)))
            else:
                statements.append(self.statement(item))
        return ast.LayersStmt(tuple(ranges), tuple(statements), span)


def _unquote(token: Token) -> str:
    return str(token.value)[1:-1]

