"""``enable()``: make DeepSpeed build archopt optimizers from ``"type": "ArchOpt<Name>"`` ds_config entries.

DeepSpeed has no optimizer registry (REFERENCES.md §1): ``DeepSpeedEngine`` accepts its own names
or attributes of ``torch.optim``, and builds them in ``_configure_basic_optimizer`` from the
parameters alone. ``enable()`` wraps three engine methods, each falling through to DeepSpeed's own
code for every other type:

1. ``_is_supported_optimizer`` also accepts ``ArchOpt*`` types (the sanity check at start-up);
2. ``_configure_basic_optimizer`` builds a ``DeepSpeedArchOpt`` for them, planned on
   ``engine.module`` — the model given to ``deepspeed.initialize`` — so roles come from its
   structure and names, whatever shapes ZeRO-3 / ``zero.Init`` show (``planning.py``);
3. ``_configure_optimizer`` refuses settings archopt cannot honour (``offload_optimizer``, elastic
   checkpoints, a plain ArchOpt passed as a client optimizer under ZeRO) before DeepSpeed acts on
   them, and after DeepSpeed has wrapped the optimizer maps its partitions (``optimizer.attach``).

It also lists ``DeepSpeedArchOpt`` among ZeRO's supported optimizers, since the adapter maps ZeRO's
partitions exactly (no ``zero_allow_untested_optimizer`` needed). Private names are touched, so
``enable()`` first checks the DeepSpeed version against the range this was tested with.

The one line a training script needs, before ``deepspeed.initialize`` (or before the HF Trainer
starts DeepSpeed)::

    import archopt_plugins.integrations.deepspeed as archopt_ds; archopt_ds.enable()
"""

from __future__ import annotations

import sys
from typing import Any

from .config import archopt_name, hparams_from_block, is_archopt_type, load_config, refusals, type_names

SUPPORTED_DEEPSPEED = ">=0.19,<0.20"

_state: dict[str, Any] = {"originals": {}}


class UnsupportedDeepSpeedVersion(RuntimeError):
    """``enable()`` was called with a DeepSpeed version outside ``SUPPORTED_DEEPSPEED``."""


def check_deepspeed_version(version: str | None = None) -> str:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        import deepspeed

        version = deepspeed.__version__
    if Version(Version(version).base_version) not in SpecifierSet(SUPPORTED_DEEPSPEED):
        raise UnsupportedDeepSpeedVersion(
            f"archopt_plugins.integrations.deepspeed.enable() supports deepspeed {SUPPORTED_DEEPSPEED}, found "
            f"{version}: it reads DeepSpeed's private ZeRO partition records, which differ between versions. "
            f"Install a supported version (pip install 'deepspeed{SUPPORTED_DEEPSPEED}')")
    return version


def _engine_config(engine: Any) -> dict[str, Any]:
    return load_config(getattr(engine._config, "_param_dict", None)) or {}


def build_for_engine(engine: Any, model_parameters: Any) -> Any:
    """The DeepSpeedArchOpt for the engine's ds_config entry, planned on ``engine.module``."""
    from .optimizer import DeepSpeedArchOpt
    from .planning import check_no_foreign_flags, plan_for_engine

    config = _engine_config(engine)
    type_value = engine.optimizer_name()
    name = archopt_name(type_value)
    refusals(config, type_value)
    hparams = hparams_from_block(config.get("optimizer"))
    try:
        plan, tensors = plan_for_engine(engine.module, model_parameters, name, hparams)
    except ValueError as err:
        raise ValueError(f"ds_config optimizer {type_value!r}: {err}") from None
    optimizer = DeepSpeedArchOpt.from_plan(plan, tensors)
    check_no_foreign_flags(optimizer)
    if getattr(engine, "global_rank", 0) == 0:
        print(plan.summary(), file=sys.stdout, flush=True)
    return optimizer


def _wrap(engine_cls: Any) -> None:
    originals = _state["originals"]
    originals.update(supported=engine_cls._is_supported_optimizer, basic=engine_cls._configure_basic_optimizer,
                     configure=engine_cls._configure_optimizer)

    def _is_supported_optimizer(self: Any, optimizer_name: str) -> bool:
        return is_archopt_type(optimizer_name) or originals["supported"](self, optimizer_name)

    def _configure_basic_optimizer(self: Any, model_parameters: Any) -> Any:
        if not is_archopt_type(self.optimizer_name()):
            return originals["basic"](self, model_parameters)
        return build_for_engine(self, model_parameters)

    def _configure_optimizer(self: Any, client_optimizer: Any, model_parameters: Any) -> None:
        from archopt_plugins.optim.archopt import ArchOpt

        from .optimizer import DeepSpeedArchOpt

        if client_optimizer is None and is_archopt_type(self.optimizer_name()):
            refusals(_engine_config(self), self.optimizer_name())
        elif (isinstance(client_optimizer, ArchOpt) and not isinstance(client_optimizer, DeepSpeedArchOpt)
              and self.zero_optimization_stage() > 0):
            raise ValueError(
                "deepspeed.initialize(optimizer=<ArchOpt>) under ZeRO stage "
                f"{self.zero_optimization_stage()}: ZeRO would step it on flat partitions it cannot map. Put the "
                "optimizer in the ds_config instead: \"optimizer\": {\"type\": \"ArchOpt<Name>\", \"params\": {...}} "
                f"(types: {sorted(type_names())})")
        originals["configure"](self, client_optimizer, model_parameters)
        if isinstance(self.basic_optimizer, DeepSpeedArchOpt):
            self.basic_optimizer.attach(self.optimizer)

    for attr, fn in (("_is_supported_optimizer", _is_supported_optimizer),
                     ("_configure_basic_optimizer", _configure_basic_optimizer),
                     ("_configure_optimizer", _configure_optimizer)):
        fn.__archopt__ = True  # type: ignore[attr-defined]
        setattr(engine_cls, attr, fn)


def enable() -> list[str]:
    """Let ds_config ``"optimizer": {"type": "ArchOpt<Name>"}`` build archopt optimizers; returns the types.

    Idempotent; call it before ``deepspeed.initialize`` in every process (the ``deepspeed`` launcher
    and torchrun start the script once per rank, so one line in the script does it).
    """
    check_deepspeed_version()
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import utils as zero_utils

    from .optimizer import DeepSpeedArchOpt

    if not is_enabled():
        _wrap(DeepSpeedEngine)
    if DeepSpeedArchOpt not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(DeepSpeedArchOpt)
    return sorted(type_names())


def is_enabled() -> bool:
    if "deepspeed.runtime.engine" not in sys.modules:
        return False
    engine_cls = sys.modules["deepspeed.runtime.engine"].DeepSpeedEngine
    return bool(getattr(engine_cls._configure_basic_optimizer, "__archopt__", False))


def disable() -> None:
    """Undo ``enable()`` (tests use it; a script never needs to)."""
    if not is_enabled():
        return
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import utils as zero_utils

    from .optimizer import DeepSpeedArchOpt

    originals = _state["originals"]
    DeepSpeedEngine._is_supported_optimizer = originals["supported"]
    DeepSpeedEngine._configure_basic_optimizer = originals["basic"]
    DeepSpeedEngine._configure_optimizer = originals["configure"]
    if DeepSpeedArchOpt in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.remove(DeepSpeedArchOpt)
    originals.clear()


def check_config(config: Any) -> None:
    """Raise, saying what to add, when a ds_config asks for an ArchOpt type but ``enable()`` was not called.

    DeepSpeed's own message for that case ("... is not a supported DeepSpeed Optimizer") comes from
    code archopt does not run; callers that see the config first (the HF adapter, recipes) call this.
    """
    ds = load_config(config)
    block = (ds or {}).get("optimizer")
    kind = block.get("type") if isinstance(block, dict) else None
    if not is_archopt_type(kind):
        return
    archopt_name(kind)
    hparams_from_block(block)
    refusals(ds or {}, kind)
    if not is_enabled():
        raise RuntimeError(
            f"the ds_config asks for optimizer type {kind!r}, but the archopt DeepSpeed adapter is not enabled in "
            "this process, so DeepSpeed would reject the type. Add this line before deepspeed.initialize (or "
            "before the Trainer is built):\n    import archopt_plugins.integrations.deepspeed as archopt_ds; "
            "archopt_ds.enable()")
