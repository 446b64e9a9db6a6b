"""Hypothesis strategies shared by the tests: valid policy texts, written in varied ways."""

from __future__ import annotations

from hypothesis import strategies as st


def _number(draw, value: int) -> str:
    """A whole number, spelled one of several equivalent ways."""
    forms = [str(value), f"{value}.0"]
    if value and value % 10 == 0:
        forms.append(f"{value // 10}e1")
    return draw(st.sampled_from(forms))


def _ratio(draw, least: int = 0) -> str:
    percent = draw(st.integers(least, 100))
    return draw(st.sampled_from([f"{percent}%", f"{percent / 100:g}"]))


@st.composite
def policies(draw):
    widths = {2: "int2", 3: "int3", 4: "int4", 8: "int8", 16: "fp16"}
    statements: list[str] = []
    key_bits = draw(st.sampled_from(sorted(widths)))
    value_bits = draw(st.sampled_from(sorted(widths)))
    groups = {}
    for role, bits in (("keys", key_bits), ("values", value_bits)):
        if not draw(st.booleans()):
            groups[role] = 1 if bits == 16 else (32 if role == "keys" else 1)
            if bits != 16 or draw(st.booleans()):
                statements.append(f"{role} {widths[bits]}")
            continue
        group = draw(st.sampled_from([8, 16, 32, 64, 128]))
        axis = draw(st.sampled_from(["channel", "token"]))
        options = [f"group {_number(draw, group)}", f"per {axis}"]
        options += draw(st.sampled_from([[], ["symmetric"], ["asymmetric"]]))
        options += draw(st.sampled_from([[], ["scale fp16"], ["scale fp32"], ["scale bf16"]]))
        options = draw(st.permutations(options)) if bits != 16 else []
        statements.append(" ".join([role, widths[bits], *options]))
        groups[role] = group if (axis == "channel" and bits != 16) else 1
    unit = max(groups.values()) if groups else 1  # powers of two: lcm is the max
    blocks = draw(st.integers(0, 2))
    if blocks:
        unit = 128  # an override's keys may quantize with any inherited group up to 128
    window = sinks = 0
    if draw(st.booleans()):
        window = unit * draw(st.integers(0, 8))
        statements.append(f"keep window {_number(draw, window)}")
    if draw(st.booleans()):
        sinks = draw(st.integers(0, 64))
        statements.append(f"keep sinks {_number(draw, sinks)}")
    least = 0 if window or sinks else 1  # a policy must keep some token (docs/language.md)
    retain = draw(st.booleans())
    if retain:
        statements.append(f"retain {_ratio(draw, least)}")
    depth = st.integers(0, 100).map(lambda p: f"{p}%")  # a share of the model's depth
    anchors = draw(st.lists(st.one_of(st.integers(0, 40), st.just("last"), depth), unique=True,
                            max_size=4))
    if anchors:
        statements.append("retain " + ", ".join(f"layer {a} {_ratio(draw, 0 if retain else least)}"
                                                for a in anchors))
        kinds = ["linear", "step"] + (["pyramid"] if len(anchors) >= 2 else [])
        if draw(st.booleans()):
            statements.append(f"interpolate {draw(st.sampled_from(kinds))}")
    method = draw(st.sampled_from(["snapkv", "keynorm", "recent", "reconstruct", "expected",
                                   None]))
    if method in ("snapkv", "expected"):
        args = []
        if draw(st.booleans()):
            args.append(f"observe = {draw(st.integers(1, 128))}")
        if method == "expected" and draw(st.booleans()):
            args.append(f"future = {draw(st.integers(1, 4096))}")
        if draw(st.booleans()):
            pool = draw(st.sampled_from(["max", "avg", "none"]))
            args.append("pool = none" if pool == "none" else
                        f"pool = {pool} {draw(st.sampled_from([1, 3, 5, 7]))}")
        if draw(st.booleans()):
            args.append(f"gqa = {draw(st.sampled_from(['mean', 'max', 'sum']))}")
        statements.append(f"score {method}({', '.join(draw(st.permutations(args)))})"
                          if args or draw(st.booleans()) else f"score {method}")
    elif method == "reconstruct" and draw(st.booleans()):
        statements.append(f"score reconstruct(chunk = {draw(st.integers(16, 4096))})")
    elif method is not None:
        statements.append(f"score {method}")
    if method in ("snapkv", "reconstruct", None) and draw(st.booleans()):
        temperature = draw(st.sampled_from(["0.5", "1", "0.25", "2.0", None]))
        scopes = draw(st.sampled_from(["", " across layers", " across heads",
                                       " across heads, layers"]))
        statements.append(f"adapt temperature {temperature}{scopes}" if temperature else
                          f"adapt threshold{scopes}")
    if draw(st.booleans()):
        statements.append(f"cluster evicted k {draw(st.integers(1, 64))}")
    higher = [bits for bits in widths if bits > max(key_bits, value_bits)]
    guard_bits = None
    if higher and draw(st.booleans()):
        guard_bits = draw(st.sampled_from(higher))
        by = draw(st.sampled_from(["", " by score"]))
        statements.append(f"guard {_ratio(draw)} of retained at {widths[guard_bits]}{by}")
    if draw(st.booleans()):
        statements.append('model "qwen2.5-7b"')
    for _ in range(blocks):
        ranges = draw(st.lists(st.sampled_from(["0", "1..3", "last", "2..last", "5", "50%..last",
                                                "0%..10%", "90%"]),
                               min_size=1, max_size=3))
        limit = guard_bits if guard_bits is not None else 17
        bits = draw(st.sampled_from([b for b in widths if b < limit]))
        inner = [f"keys {widths[bits]}"]
        if guard_bits is not None and draw(st.booleans()):
            inner.append("guard none")
        statements.append(f"layers {', '.join(ranges)} {{ {'; '.join(inner)} }}")

    statements = draw(st.permutations(statements))
    name = draw(st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True))
    comment = st.from_regex(r"#[ a-z0-9,.()%-]{0,20}", fullmatch=True)
    parts = []
    after_comment = False
    for statement in statements:
        if draw(st.booleans()):
            parts.append("\n" + draw(comment))
            after_comment = True
        separators = ["\n    ", "\n\n  ", ";\n"] + ([] if after_comment else ["; "])
        parts.append(draw(st.sampled_from(separators)) + statement)
        after_comment = draw(st.booleans())
        if after_comment:
            parts.append("   " + draw(comment))
    lead = draw(comment) + "\n" if draw(st.booleans()) else ""
    return f"{lead}policy {name} {{{''.join(parts)}\n}}\n"
