"""DeepSpeed adapter: ``"optimizer": {"type": "ArchOpt<Name>", "params": {...}}`` in ds_config.json.

One line before ``deepspeed.initialize`` (or before the HF Trainer starts DeepSpeed)::

    import archopt_plugins.integrations.deepspeed as archopt_ds; archopt_ds.enable()

Types are ``"ArchOpt" + CamelCase(name)`` for every name in ``available_optimizers()``
(``ArchOptMuon``, ``ArchOptOneSidedShampoo`` …); ``params`` are archopt's keywords. Updates are
exact under ZeRO stages 0-3 (fp32 and bf16): DeepSpeed's flat partitions are mapped back to each
parameter's piece and whole-matrix rules run on complete matrices on their owner ranks. See
docs/deepspeed.md.
"""

from __future__ import annotations

from typing import Any

from .config import archopt_name, is_archopt_type, type_name, type_names

_LAZY = {  # these import torch / deepspeed when first used
    "enable": ".registration",
    "disable": ".registration",
    "is_enabled": ".registration",
    "check_config": ".registration",
    "SUPPORTED_DEEPSPEED": ".registration",
    "UnsupportedDeepSpeedVersion": ".registration",
    "DeepSpeedArchOpt": ".optimizer",
    "save_resharded": ".checkpoint",
    "load_resharded": ".checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SUPPORTED_DEEPSPEED", "DeepSpeedArchOpt", "UnsupportedDeepSpeedVersion", "archopt_name", "check_config",
           "disable", "enable", "is_archopt_type", "is_enabled", "load_resharded", "save_resharded", "type_name",
           "type_names"]
