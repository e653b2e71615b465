"""ds_config ``"optimizer"`` blocks → an archopt name and hyperparameters, and the settings refused.

DESIGN.md fixes the type names: ``"ArchOpt" + CamelCase(name)`` (``muon`` → ``ArchOptMuon``,
``one_sided_shampoo`` → ``ArchOptOneSidedShampoo``). The block's ``"params"`` are archopt's
keywords (``lr``, ``momentum``, ``adamw_lr``, ``compute_dtype`` …, and ``overrides`` as a nested
object); JSON values may be strings (``"compute_dtype": "float32"``, ``"betas": "0.9,0.95"``): the
planner's converters type them. Nothing here imports deepspeed, so these checks run (and are
tested) anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from archopt_plugins import available_optimizers

PREFIX = "ArchOpt"


def type_name(name: str) -> str:
    """``"one_sided_shampoo"`` → ``"ArchOptOneSidedShampoo"`` (DESIGN.md's DeepSpeed type names)."""
    return PREFIX + "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def type_names() -> dict[str, str]:
    """Every ds_config ``"type"`` this adapter serves → its archopt optimizer name."""
    return {type_name(n): n for n in available_optimizers()}


def is_archopt_type(value: Any) -> bool:
    """Whether a ds_config optimizer type claims to be archopt's (any capitalisation of the prefix)."""
    return isinstance(value, str) and value.lower().startswith(PREFIX.lower())


def archopt_name(value: str) -> str:
    """The archopt name behind a ds_config type; a near miss lists the valid types."""
    names = type_names()
    if value in names:
        return names[value]
    near = [t for t in names if t.lower() == value.lower()]
    hint = f" (did you mean {near[0]!r}? types are case-sensitive)" if near else ""
    raise ValueError(f"ds_config optimizer type {value!r} is not an archopt optimizer{hint}; valid types: "
                     f"{sorted(names)}")


# DeepSpeed-specific keys of its own Adam block, meaningless for archopt: refused rather than dropped,
# so a config copied from an Adam run does not silently lose a setting it meant.
_DEEPSPEED_ONLY = ("torch_adam", "adam_w_mode", "fp32_optimizer_states", "foreach", "max_grad_norm")


def hparams_from_block(block: Any) -> dict[str, Any]:
    """archopt keywords from an ``"optimizer"`` block's ``"params"`` (values as JSON gave them)."""
    params = dict(block.get("params") or {}) if isinstance(block, dict) else {}
    for key in _DEEPSPEED_ONLY:
        if key in params:
            fix = ("use DeepSpeed's \"gradient_clipping\" instead" if key == "max_grad_norm"
                   else "remove it (archopt's AdamW is its own)")
            raise ValueError(f"ds_config optimizer {block.get('type')!r}: params key {key!r} is a DeepSpeed Adam "
                             f"setting that archopt does not use; {fix}")
    if isinstance(params.get("overrides"), str):  # an object written as a JSON string
        try:
            params["overrides"] = json.loads(params["overrides"])
        except json.JSONDecodeError as err:
            raise ValueError(f"ds_config optimizer params 'overrides' is a string that is not JSON ({err}); "
                             "write it as a JSON object: {\"embedding\": {\"lr\": 0.001}}") from None
    return params


def load_config(config: Any) -> dict[str, Any] | None:
    """A ds_config as a dict: a dict, a path to a JSON file, a JSON string, or an object with ``.config``."""
    if config is None or config is False or config == "":
        return None
    if isinstance(config, dict):
        return config
    inner = getattr(config, "config", None)
    if isinstance(inner, dict):
        return inner
    text = str(config)
    try:
        return json.loads(Path(text).read_text()) if Path(text).is_file() else json.loads(text)
    except (json.JSONDecodeError, OSError) as err:
        raise ValueError(f"ds_config {text[:200]!r}: cannot read it as a JSON file or JSON text ({err})") from None


def refusals(config: dict[str, Any], type_value: str) -> None:
    """Settings under which an archopt optimizer would not run exactly: raise naming the key and the fix."""
    zero = config.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") or {}
    device = offload.get("device", "none") if isinstance(offload, dict) else offload
    if str(device).lower() not in ("none", "null", ""):
        raise ValueError(
            f"ds_config optimizer {type_value!r} with zero_optimization.offload_optimizer.device={device!r}: "
            "optimizer offload steps DeepSpeed's CPU Adam/Lion kernels on host memory, which would silently "
            "replace the archopt rules; remove \"offload_optimizer\" (archopt keeps its state beside the "
            "parameters' partitions)")
    if zero.get("elastic_checkpoint"):
        raise ValueError(
            f"ds_config optimizer {type_value!r} with zero_optimization.elastic_checkpoint=true: elastic "
            "checkpoints merge optimizer state as flat Adam-like buffers, which archopt's per-parameter and "
            "whole-matrix state is not; remove it, and continue at another world size with "
            "archopt_plugins.integrations.deepspeed.save_resharded / load_resharded (docs/deepspeed.md)")


__all__ = ["PREFIX", "archopt_name", "hparams_from_block", "is_archopt_type", "load_config", "refusals",
           "type_name", "type_names"]
