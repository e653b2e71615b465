"""HF Trainer adapter: ``--optim archopt_<name>`` for Trainer scripts (host objects in, archopt calls out).

Two ways in:

1. ``enable()`` before the script builds its ``HfArgumentParser`` (or ``archopt hf-run SCRIPT ARGS…``
   for a script you cannot edit): the stock ``TrainingArguments``/``Trainer`` accept
   ``--optim archopt_<name>`` and ``--optim_args "k=v,…"``;
2. ``ArchOptTrainingArguments`` / ``ArchOptTrainer``: explicit subclasses, public Trainer API only.

``GeometryCallback`` logs per-role geometry diagnostics through the Trainer's loggers. The example
pretraining script is ``run_clm_pretraining.py`` in this folder.
"""

from __future__ import annotations

from typing import Any

from .arguments import hf_optimizer_names, parse_optim_args
from .enable import SUPPORTED_TRANSFORMERS, UnsupportedTransformersVersion, disable, enable, is_enabled

_LAZY = {  # these import transformers (and torch) when first used
    "ArchOptTrainer": ".trainer",
    "ArchOptTrainingArguments": ".trainer",
    "GeometryCallback": ".callback",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SUPPORTED_TRANSFORMERS", "ArchOptTrainer", "ArchOptTrainingArguments", "GeometryCallback",
           "UnsupportedTransformersVersion", "disable", "enable", "hf_optimizer_names", "is_enabled",
           "parse_optim_args"]
