"""Hostile policy files: what tests/test_robustness.py checks `kvpolicy check` answers with located
errors, and what bench/frontend.py times. Data only (bench never imports tests)."""

from __future__ import annotations

from kvpolicy.lang.source import MAX_POLICY_BYTES

HOSTILE = {
    "ten_megabytes.kvp": b"policy big {\n" + b"    keep sinks 4\n" * 700_000 + b"}\n",
    "just_under_limit.kvp": (b"policy long {\n" + b"    layers 0 { keys int4 }\n"
                             * ((MAX_POLICY_BYTES - 20) // 27) + b"}\n"),
    "deep_nesting.kvp": b"policy deep " + b"{" * 30_000 + b"}" * 30_000,
    "binary.kvp": bytes(range(256)) * 4,
    "latin1.kvp": "policy caf\u00e9 { retain 50% }".encode("latin-1"),
    "nan.kvp": b"policy n { retain nan%; keep window inf; adapt temperature NaN }",
    "huge_numbers.kvp": b"policy h { keep window 1" + b"0" * 5000 + b"; retain 1e308%; "
                        b"cluster evicted k 1e-400 }",
    "many_errors.kvp": b"policy m {\n" + b"    keep sinks x\n" * 3000 + b"}\n",
    "empty.kvp": b"",
    "only_comments.kvp": b"# nothing here\n" * 100,
    "crlf.kvp": b"policy w {\r\n    retain 50%\r\n    keys int5\r\n}\r\n",
}
