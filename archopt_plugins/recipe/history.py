"""What a run records: its losses by step, evaluation results, and the clock; saved as result.json.

The report and the convergence benchmark read these; checkpoints carry them so a resumed run's
record is the uninterrupted run's record.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def slug(label: str) -> str:
    """A folder name for a run label ("adamw lr=0.001" → "adamw_lr=0.001")."""
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", label).strip("_") or "run"


@dataclass
class RunSpec:
    """One optimizer run of a recipe: the recipe's optimizer, or one baseline learning rate."""

    label: str
    optimizer: str
    hparams: dict[str, Any]
    overrides: dict[str, Any]
    kind: str  # "main" | "baseline"

    @property
    def folder(self) -> str:
        return slug(self.label)


@dataclass
class RunHistory:
    label: str
    optimizer: str
    kind: str
    tokens_per_step: int
    hparams: dict[str, Any] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)  # 1-based optimizer steps done
    train_loss: list[float] = field(default_factory=list)  # mean over the global batch
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    ood_loss: dict[str, list[float]] = field(default_factory=dict)  # per OOD set, at eval_steps
    train_seconds: list[float] = field(default_factory=list)  # training time (no eval/checkpoints) at eval_steps
    skipped_steps: int = 0
    geometry: dict[str, float] = field(default_factory=dict)  # the last GeometryMonitor measurement
    finished: bool = False

    def first_step_reaching(self, target: float) -> int | None:
        for step, loss in zip(self.eval_steps, self.val_loss):
            if loss <= target:
                return step
        return None

    def seconds_at(self, step: int) -> float:
        return self.train_seconds[self.eval_steps.index(step)]

    @property
    def final_val(self) -> float:
        return self.val_loss[-1] if self.val_loss else float("nan")

    def truncate(self, step: int) -> None:
        """Drop what was recorded after ``step`` (a resume from the checkpoint at ``step``)."""
        keep = sum(1 for s in self.steps if s <= step)
        self.steps, self.train_loss = self.steps[:keep], self.train_loss[:keep]
        keep = sum(1 for s in self.eval_steps if s <= step)
        self.eval_steps, self.val_loss = self.eval_steps[:keep], self.val_loss[:keep]
        self.train_seconds = self.train_seconds[:keep]
        self.ood_loss = {k: v[:keep] for k, v in self.ood_loss.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunHistory":
        return cls(**data)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "RunHistory":
        return cls.from_dict(json.loads(path.read_text()))
