"""Head weights: a calibration's per-(layer, KV head) retrieval importance, as a file.

`kvpolicy calibrate` writes one for a model (kvpolicy.calibrate); a policy reads it with
`adapt heads "FILE"` (path relative to the .kvp file), and the planner splits each storage
pool's planned token units over its (layer, KV head) cells in proportion to their weights, in
whole units, none above its middle (largest remainders; `plan.planner.head_units`; pages split
each sealed block's units the same way, docs/language.md). The weights become
part of the checked policy (its IR, hash and artifacts), so a compiled policy does not depend on
the file afterwards. Front end: no torch.

    {"kvpolicy": "head-weights", "version": 1,
     "model": {"name": "smollm2-135m", "num_layers": 30, "num_kv_heads": 3},
     "weights": [[w, w, w], ...],            # one row per layer, one weight per KV head, >= 0
     "statistic": "...", "calibration": {...}, "command": "..."}   # provenance, free-form
"""

from __future__ import annotations

import json
import math
import os

from kvpolicy import files

KIND = "head-weights"
VERSION = 1
MAX_BYTES = 4 * 2**20  # a 1,024-layer model with 64 KV heads is ~1.5 MiB of JSON
MAX_LAYERS = 1024
MAX_HEADS = 1024


class HeadsFileError(ValueError):
    """A head-weights file that cannot be used; str() is the reason, without the path."""


def read_weights(path: str | os.PathLike[str]) -> tuple[tuple[float, ...], ...]:
    """The weights of a head-weights file, [layers][KV heads]; HeadsFileError with the reason."""
    try:
        raw = files.read_limited(path, MAX_BYTES)
    except OSError as exc:
        raise HeadsFileError(files.reason(exc)) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise HeadsFileError("it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise HeadsFileError(f"it is not JSON (line {exc.lineno}, column {exc.colno}: "
                             f"{exc.msg})") from None
    return weights_from_json(data)


def weights_from_json(data) -> tuple[tuple[float, ...], ...]:
    if not isinstance(data, dict) or data.get("kvpolicy") != KIND:
        raise HeadsFileError(f'it is not a head-weights file (no "kvpolicy": "{KIND}"; '
                             "`kvpolicy calibrate` writes one)")
    if data.get("version") != VERSION:
        raise HeadsFileError(f"it is version {data.get('version')!r}; this kvpolicy reads "
                             f"version {VERSION}")
    rows = data.get("weights")
    if not isinstance(rows, list) or not rows or len(rows) > MAX_LAYERS:
        raise HeadsFileError(f'"weights" must be a list of 1 to {MAX_LAYERS} layers')
    width = None
    out = []
    for layer, row in enumerate(rows):
        if not isinstance(row, list) or not row or len(row) > MAX_HEADS:
            raise HeadsFileError(f'"weights"[{layer}] must be a list of 1 to {MAX_HEADS} '
                                 "KV heads' weights")
        if width is not None and len(row) != width:
            raise HeadsFileError(f'"weights"[{layer}] has {len(row)} KV heads, layer 0 has '
                                 f"{width}")
        width = len(row)
        values = []
        for head, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise HeadsFileError(f'"weights"[{layer}][{head}] is {value!r}; weights are '
                                     "finite numbers >= 0")
            values.append(float(value))
        out.append(tuple(values))
    return tuple(out)


def write_weights(path: str | os.PathLike[str], weights, model: dict, provenance: dict) -> None:
    """Writes a head-weights file (weights [layers][KV heads]; model: name, num_layers,
    num_kv_heads; provenance: statistic, calibration, command, ...)."""
    data = {"kvpolicy": KIND, "version": VERSION, "model": model, **provenance,
            "weights": [[round(float(w), 6) for w in row] for row in weights]}
    weights_from_json(json.loads(json.dumps(data)))  # what is written can be read
    text = json.dumps(data, indent=1)
    # one layer per line: readable, and diffs show which layer moved
    lines = ",\n  ".join(json.dumps(row) for row in data["weights"])
    text = text[:text.index('"weights"')] + f'"weights": [\n  {lines}\n ]\n}}\n'
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
