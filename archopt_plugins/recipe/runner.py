"""Running a validated recipe in this process (one of the ranks under torchrun).

``run_recipe`` trains the recipe's optimizer and then each baseline learning rate, every run from
the same initial weights on the same batches (``dataset.train_batch`` depends on (seed, step)
only), and the main process writes the report. Per run, under ``OUT/<run>/``: ``metrics.jsonl``,
``checkpoints/`` (in the engine's format: ``step_*.pt`` for single/ddp, DCP ``step_*/`` folders for
fsdp2/hsdp, DeepSpeed's own for deepspeed) and ``result.json`` (the finished record); TensorBoard
events go to ``OUT/tensorboard/<run>/``.

Resuming (``--resume``, or a worker restarted by torchrun's elastic agent) skips finished runs and
continues the others from their last checkpoint: model, optimizer state, step and the record so
far, so the final parameters equal an uninterrupted run's.

Fault injection for tests of that restart: ``ARCHOPT_FAULT_INJECT="RANK:STEP"`` makes the process
of that rank SIGKILL itself when it reaches 0-based step STEP, on the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` = 0).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

from .backends import Engine, make_engine
from .dataset import TokenData, eval_batches, prepare_token_data, train_batch
from .distributed import DistContext
from .history import RunHistory, RunSpec
from .models import build_meta_model, build_model, parameter_count
from .schema import Recipe, ScheduleSection

FAULT_ENV = "ARCHOPT_FAULT_INJECT"


def run_specs(recipe: Recipe) -> list[RunSpec]:
    opt = recipe.optimizer
    specs = [RunSpec(f"archopt {opt.name}", opt.name, dict(opt.hparams), dict(opt.overrides), "main")]
    if recipe.baseline.enabled:
        for lr in recipe.baseline.lr_grid:
            specs.append(RunSpec(f"{recipe.baseline.name} lr={lr:g}", recipe.baseline.name,
                                 {**recipe.baseline.hparams, "lr": lr}, {}, "baseline"))
    return specs


def lr_factor(step: int, s: ScheduleSection) -> float:
    """Multiplier of every group's peak LR at 0-based ``step``: linear warmup, then the decay shape."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps))
    if s.decay == "constant":
        return 1.0
    if s.decay == "linear":
        return 1.0 - (1.0 - s.final_lr_fraction) * progress
    return s.final_lr_fraction + (1 - s.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def eval_indices(n: int, rank: int, world: int, collective_forward: bool) -> list[int]:
    """Batch indices rank ``rank`` evaluates: every world-th one from ``rank``.

    Where forward is a collective (FSDP2, ZeRO-3) every rank must run the same number of forwards,
    so the list is padded to ceil(n / world) entries with indices ≥ n: a padding forward runs
    batch ``i % n`` and its loss is not counted. The counted batches, and so the mean, are the same.
    """
    stop = -(-n // world) * world if collective_forward else n
    return list(range(rank, stop, world))


@torch.no_grad()
def evaluate(engine: Engine, batches: list[torch.Tensor], ctx: DistContext) -> float:
    """Mean loss over ``batches``; ranks take every world_size-th batch and the sums are all-reduced."""
    model = engine.module
    was_training = model.training
    model.eval()
    total, n = 0.0, len(batches)
    for i in eval_indices(n, ctx.rank, ctx.world_size, engine.collective_forward):
        loss = engine.eval_loss(batches[i % n].to(ctx.device))
        if i < n:
            total += float(loss)
    model.train(was_training)
    return ctx.sum_floats([total])[0] / n


def _maybe_inject_fault(step: int, ctx: DistContext) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or ctx.restart_count > 0:
        return
    rank, _, at = spec.partition(":")
    if int(rank) == ctx.rank and int(at) == step:
        print(f"[rank {ctx.rank}] {FAULT_ENV}: killing this process at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


class _Metrics:
    """metrics.jsonl and TensorBoard scalars of one run (main rank only)."""

    def __init__(self, recipe: Recipe, run_dir: Path, tb_dir: Path, resume_step: int, enabled: bool) -> None:
        self.jsonl = run_dir / "metrics.jsonl" if enabled and recipe.logging.jsonl else None
        self.tb = None
        if self.jsonl is not None and self.jsonl.exists():  # keep the lines up to the checkpoint resumed from
            kept = [line for line in self.jsonl.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        if enabled and recipe.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tb_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, row: dict[str, Any]) -> None:
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "tokens") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def open_run_dir(out_dir: Path, spec: RunSpec, ctx: DistContext, resume: bool) -> tuple[Path, RunHistory | None]:
    """The run's folder, with ``checkpoints/`` in it, ready on every rank; when resuming a run that
    already finished, also its record (nothing is left to train). Shared by every backend's loop."""
    run_dir = out_dir / spec.folder
    result_path = run_dir / "result.json"
    if resume and result_path.exists():
        history = RunHistory.load(result_path)
        if history.finished:
            return run_dir, history
    if ctx.is_main and not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh start must not leave an older run's checkpoints to resume from
    ctx.barrier()
    if ctx.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    return run_dir, None


def train_run(recipe: Recipe, spec: RunSpec, data: TokenData, ctx: DistContext, out_dir: Path, resume: bool,
              progress: bool = True) -> RunHistory:
    """Train one run (resuming from its last checkpoint when asked); returns its record."""
    from tqdm.auto import tqdm

    run_dir, finished = open_run_dir(out_dir, spec, ctx, resume)
    if finished is not None:
        return finished
    result_path, ckpt_dir = run_dir / "result.json", run_dir / "checkpoints"

    model = build_model(recipe.model, recipe.vocab_size, recipe.seed).to(ctx.device)
    hparams = {**spec.hparams, **({"overrides": spec.overrides} if spec.overrides else {})}
    engine = make_engine(model, spec.optimizer, hparams, recipe, ctx)
    for group in engine.optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    history = RunHistory(spec.label, spec.optimizer, spec.kind, recipe.tokens_per_step,
                         {k: v for k, v in spec.hparams.items()})
    start, seconds = 0, 0.0
    latest = engine.latest_checkpoint(ckpt_dir) if resume else None  # in the engine's own format
    if latest is not None:
        state = engine.load_checkpoint(latest)  # collective for sharded engines
        history = RunHistory.from_dict(state["history"])
        start, seconds = int(state["step"]), float(state["train_seconds"])
        history.truncate(start)
    plan = getattr(engine.optimizer, "plan", None)
    if ctx.is_main and spec.kind == "main" and start == 0 and plan is not None:
        print(plan.summary())
    if ctx.is_main and start:
        print(f"{spec.label}: resumed from {latest} at step {start}")
    metrics = _Metrics(recipe, run_dir, out_dir / "tensorboard" / spec.folder, start, ctx.is_main)
    monitor = None
    if recipe.logging.geometry_every:
        from ..monitor import GeometryMonitor

        monitor = GeometryMonitor(engine.optimizer, every=recipe.logging.geometry_every)
        # measure on the steps whose 1-based number divides by `every` (as evaluation), also after a resume
        monitor.steps_seen = start + 1

    sets = ["val"] + [f"ood/{name}" for name in recipe.evaluation.ood]
    batch = recipe.batch
    evals = {s: eval_batches(data, s, recipe.evaluation.batches, batch.micro_batch_size, batch.seq_len, recipe.seed)
             for s in sets}
    accum, micro = recipe.grad_accum, batch.micro_batch_size
    rows = slice(ctx.rank * accum * micro, (ctx.rank + 1) * accum * micro)  # data-parallel ranks = all ranks here
    bar = tqdm(range(start, recipe.schedule.steps), desc=spec.label, disable=not (progress and ctx.is_main),
               dynamic_ncols=True, initial=start, total=recipe.schedule.steps)
    engine.model.train()
    for step in bar:
        _maybe_inject_fault(step, ctx)
        factor = lr_factor(step, recipe.schedule)
        for group in engine.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        began = time.perf_counter()
        local = train_batch(data, recipe.seed, step, batch.global_batch_size, batch.seq_len)[rows]
        loss_sum = 0.0
        for m in range(accum):
            mb = local[m * micro:(m + 1) * micro].to(ctx.device)
            with engine.accumulate() if m < accum - 1 else contextlib.nullcontext():
                loss = engine.forward_loss(mb)
                engine.backward(loss / accum)
            loss_sum += float(loss.detach())
        if monitor is not None:
            monitor.before_step()
        engine.step()
        seconds += time.perf_counter() - began  # the monitor's own work is outside the measured time
        geometry = monitor.after_step() if monitor is not None else {}
        done = step + 1
        train_loss = ctx.sum_floats([loss_sum / accum])[0] / ctx.world_size
        history.steps.append(done)
        history.train_loss.append(train_loss)
        row: dict[str, Any] = {"step": done, "tokens": done * recipe.tokens_per_step, "train_loss": train_loss,
                               "lr_factor": factor}
        if done % recipe.evaluation.every_steps == 0 or done == recipe.schedule.steps:
            losses = {s: evaluate(engine, evals[s], ctx) for s in sets}
            history.eval_steps.append(done)
            history.val_loss.append(losses["val"])
            history.train_seconds.append(seconds)
            for s in sets[1:]:
                history.ood_loss.setdefault(s[4:], []).append(losses[s])
            row.update({"val_loss": losses["val"], "train_seconds": seconds,
                        **{f"ood_loss/{s[4:]}": losses[s] for s in sets[1:]}})
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{losses['val']:.3f}")
        if geometry:
            history.geometry = {k: float(v) for k, v in geometry.items()}
            row.update(history.geometry)
        if done % recipe.logging.log_every == 0 or "val_loss" in row or geometry:
            metrics.log(row)
        every = recipe.checkpoint.every_steps
        if (every and done % every == 0) or done == recipe.schedule.steps:
            history.skipped_steps = int(getattr(engine.optimizer, "skipped_steps", 0))
            history.finished = done == recipe.schedule.steps
            engine.save_checkpoint(ckpt_dir, done, {"step": done, "train_seconds": seconds,
                                                    "history": history.to_dict()}, recipe.checkpoint.keep_last)
            ctx.barrier()  # every rank past this point knows the checkpoint is complete
    bar.close()
    metrics.close()
    history.finished = True
    if ctx.is_main:
        history.save(result_path)
    ctx.barrier()
    return history


def select_runs(recipe: Recipe, only: list[str] | None = None) -> list[RunSpec]:
    """The recipe's runs, or those labelled in ``only`` (e.g. "adamw lr=0.001"); an unknown label is an error."""
    specs = run_specs(recipe)
    if not only:
        return specs
    labels = [s.label for s in specs]
    unknown = [label for label in only if label not in labels]
    if unknown:
        raise ValueError(f"--only {unknown[0]!r}: no such run in this recipe; its runs: {labels}")
    return [s for s in specs if s.label in only]


def run_recipe(recipe: Recipe, ctx: DistContext, out_dir: Path, resume: bool = False,
               progress: bool | None = None, only: list[str] | None = None) -> dict[str, RunHistory]:
    """Every run of the recipe (or those in ``only``), then (main rank) the report. A restarted elastic
    worker resumes."""
    from .report import write_report

    resume = resume or ctx.restart_count > 0
    progress = recipe.logging.progress if progress is None else progress
    data = prepare_token_data(recipe, out_dir / "cache", ctx.is_main, ctx.barrier)
    if ctx.is_main:
        n = parameter_count(build_meta_model(recipe.model, recipe.vocab_size))
        print(f"recipe {recipe.name!r}: {recipe.model.family} {n / 1e6:.2f}M parameters, {data.description}; "
              f"{ctx.world_size} process(es), backend {recipe.backend.kind}, {recipe.schedule.steps} steps × "
              f"{recipe.tokens_per_step} tokens (grad accumulation {recipe.grad_accum})", flush=True)
    histories = {}
    from .backends import BACKENDS

    train = BACKENDS[recipe.backend.kind].train_run or train_run  # megatron trains each run itself
    for spec in select_runs(recipe, only):
        histories[spec.label] = train(recipe, spec, data, ctx, out_dir, resume, progress)
    if ctx.is_main:
        write_report(recipe, histories, out_dir)
    return histories
