"""Recipe cases: the sharded recipe backends end to end (``runner.run_recipe``), world 4, CPU + gloo.

One case per backend, all in one world-4 launch (``test_recipe_sharded.py``). The tiny recipe
(``tests/recipe_fixtures.py``) with global batch 8 = micro 1 × 4 ranks × accumulation 2, so the
accumulation path of every engine runs; 2 evaluation batches over 4 ranks, so under FSDP2 and
ZeRO-3 (collective forwards) ranks 2 and 3 only run padding forwards. Batches depend on
(seed, step) only, so every backend trains on the same data from the same initial weights and the
DDP run is the reference.

An interrupted run: the engine's ``step`` raises on every rank at 1-based step 4, after the step-3
checkpoint — what a killed job leaves behind (no result.json, no later checkpoint) — and
``run_recipe(resume=True)`` continues from step 3 in a fresh engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from archopt_plugins.recipe.backends import BACKENDS, Engine, register_backend
from archopt_plugins.recipe.distributed import DistContext
from archopt_plugins.recipe.runner import run_recipe
from archopt_plugins.recipe.schema import Recipe
from archopt_plugins.recipe.validate import validate_data
from harness import case, shared_dir
from parity_util import parity
from recipe_fixtures import tiny

MAIN = "archopt muon"
BASE = {"launch.nproc_per_node": 4, "batch.micro_batch_size": 1, "batch.global_batch_size": 8,
        "logging.tensorboard": False, "logging.geometry_every": 0, "checkpoint.every_steps": 3,
        "evaluation.batches": 2, "baseline.lr_grid": [3e-3]}


class _Interrupted(Exception):
    pass


def _recipe(**edits: Any) -> Recipe:
    return validate_data(tiny(**{**BASE, **edits}))


def _ctx() -> DistContext:
    rank = dist.get_rank()
    return DistContext(rank, dist.get_world_size(), rank, torch.device("cpu"), 0)


@contextlib.contextmanager
def _observed(kind: str, interrupt_at: int | None = None) -> Iterator[list[Engine]]:
    """The backend's own engines, kept for inspection; with ``interrupt_at``, step that many raises."""
    original = BACKENDS[kind]
    engines: list[Engine] = []

    def make(*args: Any) -> Engine:
        engine = original.make_engine(*args)
        engines.append(engine)
        if interrupt_at is not None and len(engines) == 1:  # the first (main) run only
            real_step, calls = engine.step, [0]

            def step() -> None:
                calls[0] += 1
                if calls[0] == interrupt_at:  # every rank at once, so no collective is left waiting
                    raise _Interrupted(f"interrupted at step {interrupt_at}")
                real_step()

            engine.step = step  # type: ignore[method-assign]
        return engine

    register_backend(dataclasses.replace(original, make_engine=make))
    try:
        yield engines
    finally:
        register_backend(original)


def full_params(engine: Engine) -> dict[str, torch.Tensor]:
    """Complete fp32 parameters by FQN (collective): DTensors gathered, ZeRO partitions via DeepSpeed."""
    ds = getattr(engine, "ds", None)
    out = {}
    for name, p in engine.module.named_parameters():
        if ds is not None:
            from deepspeed.utils import safe_get_full_fp32_param

            t = safe_get_full_fp32_param(p)
            t = p if t is None else t
        else:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().float().clone()
    return out


def _run(recipe: Recipe, out: Path, only: list[str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Histories and the main run's final parameters of an uninterrupted run."""
    with _observed(recipe.backend.kind) as engines:
        histories = run_recipe(recipe, _ctx(), out, only=only)
    return histories, full_params(engines[0])


def _resumed(recipe: Recipe, out: Path) -> tuple[dict, dict[str, torch.Tensor], bool]:
    """Interrupt the main run at step 4, resume it; (histories, final parameters, whether it stopped)."""
    stopped = False
    with _observed(recipe.backend.kind, interrupt_at=4):
        try:
            run_recipe(recipe, _ctx(), out, only=[MAIN])
        except _Interrupted:
            stopped = True
    with _observed(recipe.backend.kind) as engines:
        histories = run_recipe(recipe, _ctx(), out, resume=True, only=[MAIN])
    return histories, full_params(engines[0]), stopped


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "archopt_muon" / "checkpoints").iterdir())


def _exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in a if not torch.equal(a[n], b[n])]


@case
def recipe_ddp():
    """The DDP run (main + baseline) every sharded backend is compared with; the launch runs it first."""
    histories, params = _run(_recipe(**{"backend.kind": "ddp"}), shared_dir() / "recipe_ddp")
    record = {label: (h.train_loss, h.val_loss) for label, h in histories.items()}
    if dist.get_rank() == 0:
        torch.save({"record": record, "params": params}, shared_dir() / "recipe_ddp_reference.pt")
    dist.barrier()
    return {"runs": list(record), "eval_steps": histories[MAIN].eval_steps}


def _reference() -> tuple[dict, dict[str, torch.Tensor]]:
    saved = torch.load(shared_dir() / "recipe_ddp_reference.pt", weights_only=False)
    return saved["record"], saved["params"]


def _compare(histories: dict, params: dict[str, torch.Tensor], labels: list[str]) -> dict[str, Any]:
    record, ref = _reference()
    worst, where = parity(ref, params)
    loss_gap = max(abs(a - b) for label in labels
                   for a, b in zip(record[label][0] + record[label][1],
                                   histories[label].train_loss + histories[label].val_loss))
    return {"parity": worst, "worst": where, "loss_gap": loss_gap,
            "eval_steps": histories[labels[0]].eval_steps}


def _parity_and_resume(recipe, folder: str) -> dict[str, Any]:
    """The main run against the reference, then an interrupted run resumed: equal to the straight one."""
    histories, params = _run(recipe, shared_dir() / folder, only=[MAIN])
    result = _compare(histories, params, [MAIN])
    resumed, again, stopped = _resumed(recipe, shared_dir() / f"{folder}_resumed")
    return {**result, "stopped": stopped, "resume_mismatch": _exact(params, again),
            "resume_same_losses": resumed[MAIN].train_loss == histories[MAIN].train_loss,
            "checkpoints": _checkpoints(shared_dir() / f"{folder}_resumed")}


@case
def recipe_fsdp2():
    return _parity_and_resume(_recipe(**{"backend.kind": "fsdp2", "checkpoint.keep_last": 1}), "recipe_fsdp2")


@case
def recipe_hsdp():
    recipe = _recipe(**{"backend.kind": "hsdp", "backend.shard_degree": 2})
    histories, params = _run(recipe, shared_dir() / "recipe_hsdp", only=[MAIN])
    return _compare(histories, params, [MAIN])


@case
def recipe_deepspeed_zero2():
    """ZeRO-2 with the baseline too (an ArchOptAdamw entry from the recipe's baseline section)."""
    recipe = _recipe(**{"backend.kind": "deepspeed", "backend.zero_stage": 2})
    histories, params = _run(recipe, shared_dir() / "recipe_ds2")
    return {**_compare(histories, params, list(histories)), "runs": list(histories)}


@case
def recipe_deepspeed_zero3():
    recipe = _recipe(**{"backend.kind": "deepspeed", "backend.zero_stage": 3, "checkpoint.keep_last": 1})
    return _parity_and_resume(recipe, "recipe_ds3")
