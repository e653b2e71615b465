"""Recipe errors: every problem names its key path, the value found and the fix.

``RecipeError`` is a ``ValueError`` holding every issue found (validation does not stop at the first
one, so a user fixes a recipe in one pass). ``archopt validate`` prints them and exits non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_MISSING = object()


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Issue:
    path: str  # dotted key path, e.g. "model.num_heads" or "data.paths[0]"; "(top level)" for the document
    message: str  # what is wrong
    fix: str  # what to do about it
    value: Any = _MISSING  # the offending value, when there is one

    def __str__(self) -> str:
        got = "" if self.value is _MISSING else f" (value: {short_repr(self.value)})"
        return f"{self.path}: {self.message}{got}; fix: {self.fix}"


class RecipeError(ValueError):
    """A recipe that cannot run; ``issues`` lists every problem found."""

    def __init__(self, issues: list[Issue], source: str = "recipe") -> None:
        if not issues:
            raise ValueError("RecipeError needs at least one issue")
        self.issues = list(issues)
        self.source = source
        lines = "\n".join(f"  - {issue}" for issue in self.issues)
        count = f"{len(self.issues)} problem{'s' if len(self.issues) > 1 else ''}"
        super().__init__(f"{source}: {count}\n{lines}")
