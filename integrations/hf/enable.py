"""``enable()``: teach a stock HF Trainer script ``--optim archopt_<name>``.

transformers has no public registry for third-party optimizers (REFERENCES.md §1): ``optim`` is
parsed into the closed enum ``OptimizerNames`` (which ``HfArgumentParser`` turns into argparse
``choices``), and the Trainer looks the name up in the module-private dict
``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``. ``enable()`` therefore

1. adds one ``OptimizerNames`` member per archopt name (``archopt_muon`` …), so the parser's
   choices and ``TrainingArguments(optim="archopt_muon")`` accept them;
2. registers a handler for each that returns a factory; the Trainer calls a factory with the
   whole model (its own two-group weight-decay split is skipped), so archopt plans on the real
   module, and the factory re-applies the Trainer's no-decay convention (``optimizer.py``);
3. wraps ``TrainingArguments.__post_init__`` so that an unknown ``archopt_*`` name, a bad
   ``--optim_args`` value or a conflicting stack (a ds_config ``"optimizer"`` block …) fails when
   the arguments are built, before any model is loaded.

All three touch private names, so ``enable()`` first checks the transformers version against the
range this module was tested with and refuses any other with a message saying what to do.
``disable()`` undoes everything (tests use it; a script never needs to).

Call ``enable()`` before the script builds its ``HfArgumentParser`` (the choices are read then);
``archopt hf-run SCRIPT ARGS…`` does it for a script that cannot be edited.
"""

from __future__ import annotations

from typing import Any

from .arguments import (PREFIX, archopt_name, canonical_optim_args, check_stack, hf_optimizer_names,
                        hparams_from_args, is_archopt, route_to_deepspeed)

# The range enable() was written and tested against (5.23.0). Below it the private names differ
# (the handler registry arrived during 5.x); a new major version may change them again.
SUPPORTED_TRANSFORMERS = ">=5.23,<6"

_state: dict[str, Any] = {"post_init": None, "members": [], "handlers": []}


class UnsupportedTransformersVersion(RuntimeError):
    """``enable()`` was called with a transformers version outside ``SUPPORTED_TRANSFORMERS``."""


def check_transformers_version(version: str | None = None) -> str:
    """The installed (or given) transformers version if ``enable()`` supports it; raises otherwise."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    if Version(version) not in SpecifierSet(SUPPORTED_TRANSFORMERS):
        raise UnsupportedTransformersVersion(
            f"archopt_plugins.integrations.hf.enable() supports transformers {SUPPORTED_TRANSFORMERS}, found "
            f"{version}: it extends private Trainer internals that differ in other versions. Install a "
            "supported version, or use the explicit classes ArchOptTrainingArguments and ArchOptTrainer "
            "(public Trainer API only) instead of enable()")
    return version


class ArchOptTrainerFactory:
    """What the Trainer calls for ``optim=archopt_*``: ``ArchOptTrainerFactory()(model, args=args)``."""

    def __call__(self, model: Any, args: Any) -> Any:
        from .optimizer import build_for_trainer

        return build_for_trainer(model, args)


def _handler(ctx: Any) -> tuple[type, dict[str, Any]]:
    return ArchOptTrainerFactory, {"args": ctx.args}


def _add_member(enum_cls: Any, value: str) -> bool:
    if value in enum_cls._value2member_map_:
        return False
    name = value.upper()
    member = str.__new__(enum_cls, value)
    member._name_, member._value_ = name, value
    type.__setattr__(enum_cls, name, member)  # before _member_map_: EnumType refuses to reassign members
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return True


def _remove_member(enum_cls: Any, value: str) -> None:
    member = enum_cls._value2member_map_.pop(value, None)
    if member is None:
        return
    enum_cls._member_map_.pop(member._name_, None)
    if member._name_ in enum_cls._member_names_:
        enum_cls._member_names_.remove(member._name_)
    if member._name_ in enum_cls.__dict__:
        type.__delattr__(enum_cls, member._name_)


def _checked_post_init(original: Any) -> Any:
    def __post_init__(self: Any) -> None:
        if is_archopt(self.optim):
            archopt_name(self.optim)  # unknown names list the valid ones
            check_stack(self)  # before the Trainer sets up DeepSpeed/FSDP for this config
            hparams_from_args(self)  # --optim_args typos fail now, not after the model loads
            route_to_deepspeed(self)  # with --deepspeed: the ds_config gets the ArchOpt<Name> block
            self.optim_args = canonical_optim_args(self.optim_args)  # readable by the Trainer's splitter
        original(self)

    __post_init__.__wrapped__ = original  # type: ignore[attr-defined]
    __post_init__.__archopt__ = True  # type: ignore[attr-defined]
    return __post_init__


def enable() -> list[str]:
    """Make ``--optim archopt_<name>`` work in any Trainer script of this process; returns the names.

    Idempotent. Must run before ``HfArgumentParser(TrainingArguments)`` is built.
    """
    check_transformers_version()
    from transformers import TrainingArguments
    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames

    registry = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(registry, dict) or not hasattr(OptimizerNames, "_value2member_map_"):
        raise UnsupportedTransformersVersion(
            "this transformers build has no transformers.trainer_optimizer._OPTIMIZER_HANDLERS registry or "
            "no OptimizerNames enum; use ArchOptTrainingArguments and ArchOptTrainer instead of enable()")
    names = hf_optimizer_names()
    for value in names:
        if _add_member(OptimizerNames, value):
            _state["members"].append(value)
        member = OptimizerNames(value)
        if member not in registry:
            registry[member] = _handler
            _state["handlers"].append(member)
    if not getattr(TrainingArguments.__post_init__, "__archopt__", False):
        _state["post_init"] = TrainingArguments.__post_init__
        TrainingArguments.__post_init__ = _checked_post_init(TrainingArguments.__post_init__)
    return names


def is_enabled() -> bool:
    from transformers import TrainingArguments

    return bool(getattr(TrainingArguments.__post_init__, "__archopt__", False))


def disable() -> None:
    """Undo ``enable()``: remove the names, the handlers and the argument check."""
    from transformers import TrainingArguments
    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames

    for member in _state["handlers"]:
        trainer_optimizer._OPTIMIZER_HANDLERS.pop(member, None)
    for value in _state["members"]:
        _remove_member(OptimizerNames, value)
    if _state["post_init"] is not None:
        TrainingArguments.__post_init__ = _state["post_init"]
    _state.update(post_init=None, members=[], handlers=[])


__all__ = ["PREFIX", "SUPPORTED_TRANSFORMERS", "ArchOptTrainerFactory", "UnsupportedTransformersVersion",
           "check_transformers_version", "disable", "enable", "is_enabled"]
