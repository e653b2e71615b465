"""Adapter for accelerate (thin: host objects in, archopt_plugins calls out).

``build_optimizer(accelerator, model, name, **hparams)`` for plain Accelerate loops; the HF
Trainer (which runs on Accelerate) is served by ``archopt_plugins.integrations.hf``.
"""

from .optimizer import build_optimizer, check_accelerator

__all__ = ["build_optimizer", "check_accelerator"]
