"""What a `kvpolicy tune` run is asked for (no torch: the command line checks it before any
model loads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvpolicy.models import DEFAULT_MODEL

CALIBRATION_SEED = 1000
DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "squad")
CALIBRATION_CHUNK = 512  # the re-reading passes' chunk from which head weights are measured


def min_prompt_or_default(context: int, min_prompt: int | None) -> int:
    """The shortest prompt length the target must hold at: 3/4 of the context by default."""
    return context * 3 // 4 if min_prompt is None else min_prompt


@dataclass
class TuneConfig:
    target: float  # the compression ratio every candidate reaches
    out: Path
    context: int = 4096
    min_prompt: int | None = None  # the target holds from this length on (space.checked_lengths)
    tasks: tuple[str, ...] = DEFAULT_TASKS
    samples: int = 4  # per task
    seed: int = CALIBRATION_SEED
    space: str = "default"
    finalists: int = 6
    servable_only: bool = False
    cache_dtype: str = "bfloat16"
    model: str | None = None
    command: str = ""  # the command line, recorded in the outputs
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"target_ratio": self.target, "context": self.context,
                "min_prompt": min_prompt_or_default(self.context, self.min_prompt),
                "tasks": list(self.tasks),
                "samples_per_task": self.samples, "seed": self.seed, "space": self.space,
                "finalists": self.finalists, "servable_only": self.servable_only,
                "cache_dtype": self.cache_dtype, "model": self.model or DEFAULT_MODEL,
                "command": self.command, **self.extra}
