"""Explicit classes for people who prefer code to ``enable()``: public Trainer API only.

``ArchOptTrainingArguments`` accepts ``optim="archopt_<name>"`` (and ``--optim archopt_<name>``
through ``HfArgumentParser``) without touching transformers' enum; ``ArchOptTrainer`` builds the
optimizer for those names by overriding ``create_optimizer`` (the documented extension point) and
uses its own ``get_decay_parameter_names``, so a subclass that changes the decay rule is honoured.
Any other ``optim`` value behaves exactly as in the stock classes.

    from archopt_plugins.integrations.hf import ArchOptTrainer, ArchOptTrainingArguments

    args = ArchOptTrainingArguments("out", optim="archopt_muon", learning_rate=0.02,
                                    optim_args="momentum=0.95,adamw_lr=3e-3")
    trainer = ArchOptTrainer(model=model, args=args, train_dataset=ds,
                             callbacks=[GeometryCallback(every=10)])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import Trainer, TrainingArguments

from .arguments import (archopt_name, check_stack, hf_optimizer_names, hparams_from_args, is_archopt,
                        route_to_deepspeed)
from .optimizer import build_for_trainer

_PLACEHOLDER = "adamw_torch"  # what the stock __post_init__ sees while an archopt name is set


@dataclass
class ArchOptTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose ``optim`` also accepts ``archopt_<name>`` (validated here)."""

    optim: str = field(
        default=TrainingArguments.default_optim,
        metadata={"help": "The optimizer to use: a transformers name (see OptimizerNames) or archopt_<name>, "
                          "one of " + ", ".join(hf_optimizer_names())},
    )

    def __post_init__(self) -> None:
        value = getattr(self.optim, "value", self.optim)
        if not is_archopt(value):
            super().__post_init__()
            return
        archopt_name(value)
        check_stack(self)
        hparams_from_args(self)
        route_to_deepspeed(self)
        # The stock __post_init__ converts optim into the closed OptimizerNames enum; let it check
        # a stock name and keep the archopt one as a plain string afterwards.
        self.optim = _PLACEHOLDER
        try:
            super().__post_init__()
        finally:
            self.optim = value


class ArchOptTrainer(Trainer):
    """A ``Trainer`` that builds archopt optimizers for ``optim="archopt_<name>"``.

    ``archopt_overrides`` are archopt's per-role / per-FQN overrides
    (``{"embedding": {"lr": 1e-3}}``), which a command line cannot carry. ``geometry_every=k``
    installs a ``GeometryCallback`` that logs the geometry diagnostics every k optimizer steps.
    """

    def __init__(self, *args: Any, archopt_overrides: dict[str, dict[str, Any]] | None = None,
                 geometry_every: int | None = None, **kwargs: Any) -> None:
        self.archopt_overrides = archopt_overrides
        super().__init__(*args, **kwargs)
        if archopt_overrides and not is_archopt(self.args.optim):
            raise ValueError(f"archopt_overrides given but optim is {self.args.optim!r}, not an archopt name "
                             f"({hf_optimizer_names()})")
        if archopt_overrides:
            _overrides_into_deepspeed(self.args, archopt_overrides)
        if geometry_every is not None:
            from .callback import GeometryCallback

            GeometryCallback.install(self, every=geometry_every)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        if self.optimizer is not None or not is_archopt(self.args.optim):
            return super().create_optimizer(*args, **kwargs)
        model = args[0] if args else kwargs.get("model")
        model = self.model if model is None else model
        self.optimizer = build_for_trainer(model, self.args, decay_names=self.get_decay_parameter_names,
                                           overrides=self.archopt_overrides, log_plan=self.is_world_process_zero())
        return self.optimizer


def _overrides_into_deepspeed(args: Any, overrides: dict[str, dict[str, Any]]) -> None:
    """Under DeepSpeed, DeepSpeed builds the optimizer from the ds_config block, not ``create_optimizer``:
    the overrides go into that block's params, or the run would silently go without them."""
    ds = getattr(args, "hf_deepspeed_config", None)
    block = ds.config.get("optimizer") if ds is not None else None
    if not isinstance(block, dict):
        return
    params = block.setdefault("params", {})
    if params.get("overrides") not in (None, overrides):
        raise ValueError("archopt_overrides given and the ds_config optimizer block has different 'overrides'; "
                         "keep one of them")
    params["overrides"] = overrides
