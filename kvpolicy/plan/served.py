"""The served view: what one request holds in a paged engine (vLLM's backend, the paged store in
transformers) at a block size, beside what the whole-prompt plan promises for the same context.

Both numbers are exact, from the same storage format: the plan's `compressed_bytes` (the
whole-prompt runtime) and the engine layout's: the stream plan's `StreamPlan.request_bytes`
(the request's blocks holding its micro-pages, the staging of the blocks not yet sealed, the
sinks and pending kept tokens; vLLM's default for one worker) or the page plan's
`PageFormat.request_bytes` (pool pages of every block, the staging of the blocks not yet sealed,
the sinks' blocks; tensor and pipeline parallelism) — the figure the engine tests hold vLLM's
measured capacity to. `kvpolicy plan --block-size N` prints it; vLLM's start-up logs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpolicy.diagnostics import PolicyError
from kvpolicy.lang.ir import Policy
from kvpolicy.models import ModelShape
from kvpolicy.plan.pages import PageFormat, UnsupportedConfiguration, page_format
from kvpolicy.plan.planner import make_plan
from kvpolicy.plan.report import MIB
from kvpolicy.plan.streams import StreamPlan, stream_plan

SERVED_CONTEXTS = (2048, 4096, 8192, 32768)  # the lengths every served view shows (≤ the model's)
ENGINES = "paged engines (vLLM, kvpolicy's paged store)"


@dataclass(frozen=True)
class ServedRow:
    """One request of `context` tokens, in bytes (all layers and KV heads the view covers)."""

    context: int
    pool: int  # pool pages of every block, sealed or staged
    window_staging: int  # full-precision staging of the blocks not sealed yet
    sinks_staging: int  # full-precision staging of the sinks' blocks (page layout)
    baseline: int  # the 16-bit cache of `context` tokens
    plan_ratio: float | None  # the whole-prompt plan's ratio at this context (None: not planned)
    pending_staging: int = 0  # the sinks and pending kept tokens' rows (stream layout)

    @property
    def held(self) -> int:
        return self.pool + self.window_staging + self.sinks_staging + self.pending_staging

    @property
    def ratio(self) -> float:
        return self.baseline / self.held

    @property
    def above_baseline(self) -> bool:
        """Does the request hold more than the uncompressed 16-bit cache would?"""
        return self.held > self.baseline

    def to_json(self) -> dict:
        return {"context": self.context, "pool_bytes": self.pool,
                "window_staging_bytes": self.window_staging,
                "sinks_staging_bytes": self.sinks_staging,
                "pending_staging_bytes": self.pending_staging, "held_bytes": self.held,
                "baseline_bytes": self.baseline, "ratio": self.ratio,
                "plan_ratio": self.plan_ratio, "above_baseline": self.above_baseline}


@dataclass(frozen=True)
class ServedView:
    block_size: int
    rows: tuple[ServedRow, ...] = ()
    refused: tuple[str, ...] = ()  # why the paged engines cannot run it at this block size
    layout: str = "pages"  # "streams" (`plan.streams`) or "pages" (`plan.pages`)

    def to_json(self) -> dict:
        return {"engines": ENGINES, "layout": self.layout, "block_size": self.block_size,
                "refused": list(self.refused), "rows": [row.to_json() for row in self.rows]}

    def lines(self) -> list[str]:
        """The view as text: a header, a row per context, and what a reader must not miss."""
        head = (f"Served by {ENGINES}, {self.layout} layout, blocks of {self.block_size} "
                "tokens: what one request holds")
        if self.refused:
            return [f"{head}: refused —", *(f"  {reason}" for reason in self.refused)]
        streams = self.layout == "streams"
        where = ("the stream plan; staging is the full-precision window and open block, and the "
                 "sinks and pending kept tokens" if streams else "the page plan; staging is the "
                 "full-precision window, open block and sinks' blocks")
        rows = "pending MiB" if streams else "sinks MiB"
        lines = [f"{head} (exact, from {where}):",
                 f"{'context':>9} {'pool MiB':>10} {'window MiB':>11} {rows:>11} "
                 f"{'total MiB':>10} {'served':>8} {'plan':>8}"]
        for row in self.rows:
            plan = "-" if row.plan_ratio is None else f"{row.plan_ratio:.2f}x"
            lines.append(f"{row.context:>9,} {row.pool / MIB:>10.1f} "
                         f"{row.window_staging / MIB:>11.1f} "
                         f"{(row.sinks_staging + row.pending_staging) / MIB:>11.2f} "
                         f"{row.held / MIB:>10.1f} {row.ratio:>7.2f}x {plan:>8}")
        above = [row for row in self.rows if row.above_baseline]
        if above:
            lines.append(
                "warning: one request holds more than the 16-bit cache at "
                + ", ".join(f"{row.context:,} tokens ({row.ratio:.2f}x)" for row in above)
                + f" with blocks of {self.block_size}")
        return lines


def served_contexts(context: int | None, max_context: int) -> list[int]:
    """The context asked for (if any) and SERVED_CONTEXTS, within the model's, ascending."""
    chosen = {c for c in SERVED_CONTEXTS if c <= max_context}
    if context is not None:
        chosen.add(context)
    return sorted(chosen)


def served_view(policy: Policy, model: ModelShape, block_size: int, contexts: list[int],
                fmt: PageFormat | None = None, streams: StreamPlan | None = None,
                layout: str = "streams") -> ServedView:
    """One request of each context served at `block_size` in `layout`, beside the whole-prompt
    plan: "streams" (`streams`: a stream plan holding the contexts, e.g. an engine's at its
    max_model_len; by default one laid out for the longest context) or "pages" (`fmt`: a page
    plan already built, e.g. one worker's share; by default the whole model's)."""
    if fmt is None and streams is None and layout == "streams":
        try:
            streams = stream_plan(policy, model, block_size, max(contexts))
        except UnsupportedConfiguration as exc:
            return ServedView(block_size, refused=tuple(exc.reasons), layout="streams")
    if streams is not None:
        return ServedView(block_size, tuple(_stream_row(policy, model, streams, context)
                                            for context in contexts), layout="streams")
    if fmt is None:
        try:
            fmt = page_format(policy, model, block_size)
        except UnsupportedConfiguration as exc:
            return ServedView(block_size, refused=tuple(exc.reasons))
    rows = []
    for context in contexts:
        held = fmt.request_bytes(context)
        rows.append(ServedRow(context, held.pool, held.window_staging, held.sinks_staging,
                              fmt.baseline_bytes(context), _plan_ratio(policy, model, context)))
    return ServedView(block_size, tuple(rows))


def _plan_ratio(policy: Policy, model: ModelShape, context: int) -> float | None:
    try:
        return make_plan(policy, model, context).compression_ratio
    except PolicyError:  # e.g. a context shorter than the policy's sinks and window
        return None


def _stream_row(policy: Policy, model: ModelShape, streams: StreamPlan,
                context: int) -> ServedRow:
    held = streams.request_bytes(context)
    return ServedRow(context, held.pool, held.window_staging, 0,
                     context * model.baseline_bytes_per_token,
                     _plan_ratio(policy, model, context), pending_staging=held.pending_staging)
