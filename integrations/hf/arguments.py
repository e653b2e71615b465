"""From the HF Trainer's arguments to an archopt optimizer name and typed hyperparameters.

The Trainer's command line carries the optimizer as ``--optim archopt_<name>`` and its settings as
one string, ``--optim_args "momentum=0.95,ns_steps=5"``, whose values are all strings. This module
parses that string (values may contain commas: ``adamw_betas=0.9,0.95``), adds the Trainer's own
flags under DESIGN.md's names (``--learning_rate`` → ``lr``, ``--weight_decay`` → ``weight_decay``,
``--adam_beta1/2``, ``--adam_epsilon`` → the AdamW's ``betas``/``eps``), and validates everything
against the planner before any model exists, so a typo fails at argument parsing, not after the
model has loaded.

A value must have exactly one source: a key that a Trainer flag already sets is refused in
``--optim_args`` with a message naming the flag.

It also inspects the stack the arguments select (DeepSpeed config, FSDP version) and refuses the
combinations that would otherwise run silently wrong (see ``check_stack``).
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from archopt_plugins import available_optimizers
from archopt_plugins.planner.names import get_name
from archopt_plugins.planner.plan import build_plan
from archopt_plugins.roles.types import RoleMap

PREFIX = "archopt_"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Trainer flag → the AdamW hyperparameter it sets (``adamw_``-prefixed for the AdamW beside a matrix rule).
_ADAM_FLAGS = {"adam_beta1": "betas", "adam_beta2": "betas", "adam_epsilon": "eps"}


def hf_optimizer_names() -> list[str]:
    """Every ``--optim`` value archopt adds to the Trainer: ``archopt_`` + each available name."""
    return [PREFIX + n for n in available_optimizers()]


def optim_value(optim: Any) -> str:
    """The string behind ``TrainingArguments.optim`` (an ``OptimizerNames`` member or a str)."""
    return str(getattr(optim, "value", optim))


def is_archopt(optim: Any) -> bool:
    return optim_value(optim).startswith(PREFIX)


def archopt_name(optim: Any) -> str:
    """``"archopt_muon"`` → ``"muon"``; an unknown ``archopt_*`` name lists the valid ones."""
    value = optim_value(optim)
    if not value.startswith(PREFIX):
        raise ValueError(f"optim {value!r} is not an archopt optimizer (expected one of {hf_optimizer_names()})")
    name = value[len(PREFIX):]
    if name not in available_optimizers():
        raise ValueError(f"unknown archopt optimizer --optim {value!r}; valid archopt names: "
                         f"{hf_optimizer_names()}")
    return name


def parse_optim_args(text: str | None) -> dict[str, str]:
    """``"k=v,k=v"`` → ``{k: v}`` (strings; the planner's converters type them).

    A comma-separated piece without ``=`` continues the previous value, so tuples need no quoting:
    ``"adamw_betas=0.9,0.95,momentum=0.9"`` → ``{"adamw_betas": "0.9,0.95", "momentum": "0.9"}``;
    ``;`` separates tuple items too (``adamw_betas=0.9;0.95``: the form ``canonical_optim_args``
    writes, which transformers' own ``k=v`` splitter can read).
    """
    if text is None or not str(text).strip():
        return {}
    out: dict[str, str] = {}
    last: str | None = None
    for piece in str(text).split(","):
        piece = piece.strip()
        if "=" not in piece:
            if last is None:
                raise ValueError(f"--optim_args {text!r}: {piece!r} is not of the form key=value "
                                 "(write e.g. \"momentum=0.95,ns_steps=5\")")
            out[last] = f"{out[last]},{piece}"
            continue
        key, value = (s.strip() for s in piece.split("=", 1))
        if not _KEY.match(key):
            raise ValueError(f"--optim_args {text!r}: {key!r} is not a hyperparameter name")
        if key in out:
            raise ValueError(f"--optim_args {text!r}: {key!r} is given twice")
        out[key] = value
        last = key
    return {k: v.replace(";", ",") for k, v in out.items()}


def canonical_optim_args(text: str | None) -> str | None:
    """``text`` rewritten so that every comma separates two ``k=v`` pairs (tuple items use ``;``).

    The stock Trainer splits ``optim_args`` on every comma before it asks for the optimizer and
    fails on ``adamw_betas=0.9,0.95``; this form passes through it and parses back identically.
    """
    if text is None or not str(text).strip():
        return text
    pairs = parse_optim_args(text)
    return ",".join(f"{k}={v.strip('()[] ').replace(' ', '').replace(',', ';')}" for k, v in pairs.items())


def _trainer_defaults() -> dict[str, Any]:
    from transformers import TrainingArguments

    return {f.name: f.default for f in fields(TrainingArguments) if f.name in _ADAM_FLAGS}


def _adam_from_flags(args: Any, name: str) -> dict[str, Any]:
    """The Trainer's Adam flags under archopt's names, for the AdamW the name runs.

    AdamW-everywhere takes them always (the Trainer's AdamW does); the AdamW beside a matrix rule
    keeps its own defaults (betas (0.9, 0.95)) unless a flag differs from the Trainer's default.
    """
    opt = get_name(name)
    defaults = _trainer_defaults()
    adamw_everywhere = opt.route("betas") == ("adamw", "betas")
    flags = sorted(_ADAM_FLAGS) if adamw_everywhere else sorted(
        f for f in _ADAM_FLAGS if getattr(args, f, defaults[f]) != defaults[f])
    out: dict[str, Any] = {}
    for flag in flags:
        target = _ADAM_FLAGS[flag]
        key = target if adamw_everywhere else f"adamw_{target}"
        if opt.route(key) is None:
            raise ValueError(f"--{flag} is set but optimizer 'archopt_{name}' runs no AdamW that takes it; "
                             "drop the flag")
        out[key] = (float(args.adam_beta1), float(args.adam_beta2)) if target == "betas" else float(args.adam_epsilon)
    return out


def hparams_from_args(args: Any) -> tuple[str, dict[str, Any]]:
    """(archopt name, hyperparameters) that ``args`` (a ``TrainingArguments``) asks for, validated."""
    name = archopt_name(args.optim)
    opt = get_name(name)
    hp: dict[str, Any] = dict(parse_optim_args(getattr(args, "optim_args", None)))
    if "overrides" in hp:
        raise ValueError("--optim_args cannot carry 'overrides' (a nested mapping); pass "
                         "ArchOptTrainer(..., archopt_overrides={...}) or build the optimizer in Python")
    flag_keys = {"lr": "--learning_rate", "weight_decay": "--weight_decay"}
    adam = _adam_from_flags(args, name)
    flag_keys.update({key: "--adam_beta1/--adam_beta2" if key.endswith("betas") else "--adam_epsilon"
                      for key in adam})
    for key, flag in flag_keys.items():
        if key in hp:
            raise ValueError(f"--optim_args sets {key!r}, which the Trainer flag {flag} sets for "
                             f"'archopt_{name}'; give it with {flag} only")
    hp["lr"] = args.learning_rate
    if opt.route("weight_decay") is not None:
        hp["weight_decay"] = args.weight_decay
    elif args.weight_decay:
        raise ValueError(f"--weight_decay {args.weight_decay} is set but optimizer 'archopt_{name}' has no "
                         "weight_decay hyperparameter; drop the flag")
    hp.update(adam)
    validate(name, hp)
    return name, hp


def validate(name: str, hparams: dict[str, Any]) -> None:
    """Check names and values against the planner without a model (unknown keys list the valid ones)."""
    try:
        build_plan(RoleMap([], "module"), name, **dict(hparams))
    except ValueError as err:
        raise ValueError(f"--optim archopt_{name} --optim_args: {err}") from None


# -- the stack the arguments select -------------------------------------------------------------------

def deepspeed_config(ds: Any) -> dict[str, Any] | None:
    """The ds_config the Trainer would use: a dict, a JSON file path, or a JSON string; None if unset."""
    if ds is None or ds == "" or ds is False:
        return None
    if isinstance(ds, dict):
        return ds
    if hasattr(ds, "config") and isinstance(ds.config, dict):  # an HfDeepSpeedConfig
        return ds.config
    text = str(ds)
    path = Path(text)
    try:
        if path.is_file():
            return json.loads(path.read_text())
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--deepspeed {text!r}: cannot read it as a JSON file or JSON text ({err})") from None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _fsdp_version(args: Any) -> int | None:
    """The FSDP version the arguments select (None: no FSDP); transformers' default is 2."""
    if not getattr(args, "fsdp", None) and not _env_flag("ACCELERATE_USE_FSDP"):
        return None
    config = getattr(args, "fsdp_config", None) or {}
    if isinstance(config, str):
        config = json.loads(Path(config).read_text())
    version = config.get("version", config.get("fsdp_version", os.environ.get("FSDP_VERSION", 2)))
    return int(version)


def check_stack(args: Any) -> None:
    """Refuse stacks where ``--optim archopt_*`` would be ignored or run the wrong math.

    Precedence with DeepSpeed: the ds_config ``"optimizer"`` block and ``--optim archopt_*`` both
    choose the optimizer, and DeepSpeed would silently take its block and ignore ``--optim``; the
    conflict is an error, resolved by removing one of them. (A ds_config ``"scheduler"`` block is
    unaffected.) Without an ``"optimizer"`` block, :func:`route_to_deepspeed` writes the
    ``"ArchOpt<Name>"`` block for ``--optim`` into the ds_config, so DeepSpeed builds archopt
    through its adapter, which maps ZeRO's flat partitions back to matrices. A DeepSpeed config that
    only accelerate's launcher holds (no ``--deepspeed``) cannot be edited here and is refused.
    FSDP2 (transformers' default FSDP) is served by the sharding engine; FSDP1's flat parameters
    are refused.
    """
    if not is_archopt(args.optim):
        return
    value = optim_value(args.optim)
    ds = deepspeed_config(getattr(args, "deepspeed", None))
    if ds is not None and "optimizer" in ds:
        kind = ds["optimizer"].get("type", "?") if isinstance(ds["optimizer"], dict) else "?"
        raise ValueError(
            f"--optim {value} conflicts with the DeepSpeed config's \"optimizer\" block (type {kind!r}): "
            "DeepSpeed would build its own optimizer and silently ignore --optim. Remove the \"optimizer\" "
            f"block from the ds_config to train with {value}, or drop --optim {value} to keep DeepSpeed's")
    if ds is None and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(
            f"--optim {value} with a DeepSpeed config held by accelerate's launcher: archopt cannot add its "
            "optimizer to that config, and ZeRO would step the Trainer's optimizer on flat partitions it "
            "cannot map back to matrices. Pass the ds_config with --deepspeed, or put the optimizer in it, "
            "\"optimizer\": {\"type\": \"ArchOpt<Name>\", \"params\": {...}} (docs/deepspeed.md)")
    if _fsdp_version(args) == 1:
        raise ValueError(
            f"--optim {value} with FSDP1 (fsdp_config version 1) is not supported: FSDP1 hands the optimizer "
            "flat parameters whose matrix structure is lost. Use FSDP2 (fsdp_config version 2, the default)")


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def route_to_deepspeed(args: Any) -> None:
    """``--optim archopt_<name>`` with ``--deepspeed`` and no ``"optimizer"`` block: add the block.

    ``args.deepspeed`` becomes a copy of the ds_config with ``"optimizer": {"type":
    "ArchOpt<Name>", "params": <the hyperparameters --optim, --learning_rate, --weight_decay and
    --optim_args give>}`` and the DeepSpeed adapter is enabled, so DeepSpeed builds archopt's
    optimizer itself (exact under ZeRO) and the Trainer's LR scheduler drives it. Call after
    :func:`check_stack`; a no-op for other settings.
    """
    if not is_archopt(args.optim):
        return
    ds = deepspeed_config(getattr(args, "deepspeed", None))
    if ds is None or "optimizer" in ds:
        return
    import archopt_plugins.integrations.deepspeed as archopt_ds

    name, hp = hparams_from_args(args)
    block = {"type": archopt_ds.type_name(name), "params": {k: _json_value(v) for k, v in hp.items()}}
    archopt_ds.enable()
    args.deepspeed = {**copy.deepcopy(ds), "optimizer": block}
