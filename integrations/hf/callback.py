"""``GeometryCallback``: the geometry monitor's per-role metrics in the Trainer's logs.

Wraps ``archopt_plugins.monitor.GeometryMonitor`` (the diagnostics live there: update RMS,
gradient norm, effective learning rate η/‖w‖², angular update, weight norm and the theory's
predictions, as ``geometry/<role>/<metric>``) around the Trainer's optimizer step:
``on_pre_optimizer_step`` snapshots, ``on_optimizer_step`` measures. A measured step asks the
Trainer to log at that step, and the metrics join that log entry, so they reach
``trainer.state.log_history``, the console, and every ``report_to`` logger (TensorBoard, W&B …).

Reporters see the metrics only if the callback runs before them; ``install`` (or
``ArchOptTrainer(geometry_every=k)``) puts it first. Passed through ``callbacks=[...]`` it runs
after the ``report_to`` loggers, which then miss the metrics: it says so with a warning at the
start of training instead of staying silent.

The gradient norm is measured after the Trainer's gradient clipping (the gradient the optimizer
steps on). The schedule follows ``state.global_step``, so it stays aligned after a resume.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def _reporting(args: Any) -> list[str]:
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return [r for r in report_to if r not in ("none", None)]


class GeometryCallback(TrainerCallback):
    """Log geometry diagnostics every ``every`` optimizer steps (``per_param`` adds per-FQN metrics)."""

    def __init__(self, every: int = 10, per_param: bool = False, **monitor_options: Any) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"GeometryCallback: every must be a positive integer (log every k-th optimizer "
                             f"step), got {every!r}")
        self.every = every
        self.per_param = per_param
        self.monitor_options = monitor_options
        self.monitor: Any = None
        self.installed_first = False
        self._pending: dict[str, float] = {}
        self._optimizer_id: int | None = None

    @classmethod
    def install(cls, trainer: Any, every: int = 10, per_param: bool = False,
                **monitor_options: Any) -> "GeometryCallback":
        """Add a GeometryCallback to ``trainer`` ahead of its ``report_to`` loggers; returns it."""
        callback = cls(every, per_param, **monitor_options)
        callback.installed_first = True
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    # -- events ---------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.monitor, self._pending = None, {}
        if not self.installed_first and _reporting(args):
            logger.warning(
                "GeometryCallback was added after the report_to loggers %s, which will not receive the geometry "
                "metrics (trainer.state.log_history and the console still do). Use "
                "GeometryCallback.install(trainer, every=...) or ArchOptTrainer(geometry_every=...) instead",
                _reporting(args))

    def _monitor_for(self, optimizer: Any, state: Any) -> Any:
        if self.monitor is None or self._optimizer_id != id(optimizer):
            from archopt_plugins.monitor import GeometryMonitor

            self.monitor = GeometryMonitor(optimizer, every=self.every, per_param=self.per_param,
                                           **self.monitor_options)
            self._optimizer_id = id(optimizer)
            # Measure the steps that end at a multiple of `every` (global_step counts finished
            # steps), also after resuming from a checkpoint.
            self.monitor.steps_seen = state.global_step + 1
        return self.monitor

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        if optimizer is None:
            raise ValueError("GeometryCallback: the Trainer passed no optimizer to on_pre_optimizer_step")
        self._monitor_for(optimizer, state).before_step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.monitor is None:
            return None
        metrics = self.monitor.after_step()
        if metrics:
            self._pending.update(metrics)
            control.should_log = True  # the entry of this very step carries them
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if not self._pending or logs is None:
            return
        if "loss" not in logs and "train_runtime" in logs:
            return  # the end-of-training summary: keep it as the Trainer wrote it
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}
