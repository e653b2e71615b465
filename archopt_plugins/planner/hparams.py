"""Hyperparameter specs: a default, a converter that validates, and one line of documentation.

Values arrive from Python (floats, tuples, torch dtypes) and as strings from the stacks' config
surfaces (HF ``--optim_args "momentum=0.95"``, DeepSpeed JSON ``"compute_dtype": "float32"``), so
every converter accepts both and returns one canonical, serialisable form (dtypes become names).
A bad value raises ``ValueError`` naming the hyperparameter, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..update.kernel import DTYPE_NAMES


@dataclass(frozen=True)
class HParam:
    default: Any
    convert: Callable[[str, Any], Any]
    doc: str

    def resolve(self, name: str, value: Any) -> Any:
        return self.convert(name, value)


def _bad(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"hyperparameter {name!r}: invalid value {value!r}; expected {expected}")


def to_float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
             low_open: bool = False, high_open: bool = False) -> float:
    expected = "a number"
    if low is not None or high is not None:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        expected = f"a number in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    if isinstance(value, bool):
        raise _bad(name, value, expected)
    try:
        x = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise _bad(name, value, expected) from None
    if not math.isfinite(x):
        raise _bad(name, value, expected)
    if low is not None and (x < low or (low_open and x == low)):
        raise _bad(name, value, expected)
    if high is not None and (x > high or (high_open and x == high)):
        raise _bad(name, value, expected)
    return x


def nonnegative(name: str, value: Any) -> float:
    return to_float(name, value, low=0.0)


def positive(name: str, value: Any) -> float:
    return to_float(name, value, low=0.0, low_open=True)


def unit_interval(name: str, value: Any) -> float:
    """A decay rate in [0, 1)."""
    return to_float(name, value, low=0.0, high=1.0, high_open=True)


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _bad(name, value, "a positive integer")
    try:
        x = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise _bad(name, value, "a positive integer") from None
    if not isinstance(x, int) or x < 1:
        if isinstance(x, float) and x.is_integer() and x >= 1:
            return int(x)
        raise _bad(name, value, "a positive integer")
    return x


def to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _bad(name, value, "true or false")


def betas(name: str, value: Any) -> tuple[float, float]:
    """Two decay rates in [0, 1); strings like "0.9,0.95" or "(0.9, 0.95)" are accepted."""
    items = value
    if isinstance(value, str):
        items = [v for v in value.strip().strip("()[]").replace(" ", "").split(",") if v]
    try:
        pair = tuple(items)
    except TypeError:
        raise _bad(name, value, "two numbers in [0, 1), e.g. (0.9, 0.95)") from None
    if len(pair) != 2:
        raise _bad(name, value, "two numbers in [0, 1), e.g. (0.9, 0.95)")
    return (unit_interval(f"{name}[0]", pair[0]), unit_interval(f"{name}[1]", pair[1]))


def choice(*options: str) -> Callable[[str, Any], str]:
    def convert(name: str, value: Any) -> str:
        v = value.strip() if isinstance(value, str) else value
        if v not in options:
            raise _bad(name, value, f"one of {list(options)}")
        return v

    return convert


_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64",
                  "float": "float32", "double": "float64", "half": "float16"}


def dtype_name(name: str, value: Any) -> str:
    """``"auto"``, a dtype name, or a torch.dtype; stored as its name so state_dict stays plain."""
    if isinstance(value, torch.dtype):
        for key, dt in DTYPE_NAMES.items():
            if dt == value:
                return key
        raise _bad(name, value, f"'auto' or one of {list(DTYPE_NAMES)}")
    if isinstance(value, str):
        v = value.strip().removeprefix("torch.")
        v = _DTYPE_ALIASES.get(v, v)
        if v == "auto" or v in DTYPE_NAMES:
            return v
    raise _bad(name, value, f"'auto' or one of {list(DTYPE_NAMES)}")
