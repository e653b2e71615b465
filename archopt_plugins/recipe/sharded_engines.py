"""Engines of the sharded recipe backends: ``fsdp2``, ``hsdp`` (FSDP2 on a 2-D mesh) and ``deepspeed``.

``backends.py`` registers them; the runner drives them like any ``Engine`` (forward → backward,
``accumulate()`` around all but the last micro-batch → step; checkpoints through the engine).

* **fsdp2 / hsdp** — ``fully_shard`` on every decoder block, then on the root, over a 1-D mesh
  of all ranks (fsdp2) or a (replicate, shard) mesh with shards of ``backend.shard_degree``
  (hsdp); the optimizer is built on the sharded model, so archopt's sharding engine sees the
  DTensor layout and whole-matrix rules run on complete matrices (exact updates, see
  docs/sharding.md). Non-final micro-batches turn gradient sync off
  (``set_requires_gradient_sync(False)``). Checkpoints are ``optim/checkpoint.py``'s DCP folders.
* **deepspeed** — the ds_config is built from the recipe (ZeRO stage, micro batch, accumulation
  steps, ``"type": "ArchOpt<Name>"`` with the run's hyperparameters); DeepSpeed's engine does
  backward and step. The runner's LR schedule writes the ArchOpt's own param groups
  (``engine.basic_optimizer``: DeepSpeed's ZeRO wrappers share those group dicts), so the LR
  reaches the optimizer that steps. Checkpoints are DeepSpeed's ``save_checkpoint`` /
  ``load_checkpoint`` (every rank writes its partition).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .backends import Engine, _build_optimizer
from .distributed import DistContext
from .schema import Recipe


def _prune(folder: Path, keep: int, ctx: DistContext) -> None:
    """Main rank: drop all but the newest ``keep`` ``step_*`` folders (names sort by step)."""
    if not ctx.is_main:
        return
    for old in sorted(p for p in folder.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# -- FSDP2 / HSDP ---------------------------------------------------------------------------------------

def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a recipe model (each becomes one FSDP2 unit)."""
    inner = getattr(model, "model", None)  # Llama, Mixtral
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    inner = getattr(model, "transformer", None)  # GPT-2
    if inner is not None and isinstance(getattr(inner, "h", None), nn.ModuleList):
        return inner.h
    raise ValueError(f"backend.kind fsdp2/hsdp: cannot find the decoder blocks of {type(model).__name__} "
                     "(looked for model.layers and transformer.h); use model.family llama, mixtral or gpt2")


class FSDP2Engine(Engine):
    """FSDP2 over ``mesh`` (1-D: fsdp2; 2-D (replicate, shard): hsdp) with the ArchOpt built after sharding."""

    collective_forward = True  # every forward all-gathers each block's parameters

    def __init__(self, model: nn.Module, optimizer_name: str, hparams: dict[str, Any], mesh: Any,
                 ctx: DistContext) -> None:
        from torch.distributed.fsdp import fully_shard

        for block in decoder_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, (tied) head
        # Built on the sharded model: the plan reads FQNs and shapes from the DTensors and the
        # sharding engine takes the layout from their placements.
        super().__init__(model, _build_optimizer(model, optimizer_name, hparams), ctx)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        # Gradients of these micro-batches stay unreduced on each rank; the final micro-batch's
        # backward reduce-scatters the accumulated sum once.
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("an FSDP2 engine's state is sharded: use save_checkpoint/load_checkpoint "
                                  "(torch.distributed.checkpoint), not state_dict()")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state_dict()  # raises the same explanation

    def latest_checkpoint(self, folder: Path) -> Path | None:
        from ..optim.checkpoint import LATEST, resolve

        return resolve(folder) if (folder / LATEST).exists() else None

    def save_checkpoint(self, folder: Path, step: int, extra: dict[str, Any], keep: int) -> None:
        from ..optim.checkpoint import save_checkpoint

        save_checkpoint(folder, self.module, self.optimizer, step=step, extra=extra)
        _prune(folder, keep, self.ctx)
        self.ctx.barrier()

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        from ..optim.checkpoint import load_checkpoint

        step, extra = load_checkpoint(path.parent, self.module, self.optimizer, step=int(path.name[len("step_"):]))
        if extra is None:
            raise ValueError(f"{path}: checkpoint has no runner record (extra.pt); it was not written by a recipe "
                             "run — start without --resume, or point logging.out_dir elsewhere")
        return extra


def make_fsdp2_engine(model: nn.Module, optimizer_name: str, hparams: dict[str, Any], recipe: Recipe,
                      ctx: DistContext) -> Engine:
    from torch.distributed.device_mesh import init_device_mesh

    if recipe.backend.kind == "hsdp":
        shard = int(recipe.backend.shard_degree or 0)  # validation guarantees a divisor of the world size
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size // shard, shard),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    return FSDP2Engine(model, optimizer_name, hparams, mesh, ctx)


# -- DeepSpeed -----------------------------------------------------------------------------------------

def prepare_deepspeed_cpu() -> None:
    """Before importing deepspeed for a CPU run: its CPU accelerator and no C++ op built.

    DeepSpeed 0.19 JIT-compiles a shared-memory all-reduce op when its communication backend
    starts — minutes of g++ on a small machine, for a fast path of inference all-reduces only;
    marking it incompatible makes DeepSpeed use plain gloo collectives (docs/deepspeed.md).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    import deepspeed.ops as ops

    ops.__compatible_ops__ = {**ops.__compatible_ops__, "deepspeed_shm_comm": False}


def ds_config(recipe: Recipe, optimizer_name: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """The ds_config of a recipe run: its batch split, ZeRO stage and an ArchOpt<Name> optimizer entry."""
    from ..integrations.deepspeed import type_name

    batch = recipe.batch
    return {
        "train_batch_size": batch.global_batch_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": recipe.grad_accum,
        "optimizer": {"type": type_name(optimizer_name), "params": dict(hparams)},
        "zero_optimization": {"stage": int(recipe.backend.zero_stage or 0)},
        "gradient_clipping": 0.0,  # the other backends do not clip; keep the runs comparable
        "steps_per_print": 10**9,  # the runner logs; DeepSpeed's own prints would interleave with it
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine: forward, backward and step are DeepSpeed's, the optimizer archopt's adapter."""

    def __init__(self, ds_engine: Any, zero_stage: int, ctx: DistContext) -> None:
        self.ctx = ctx
        self.ds = ds_engine
        self.module = ds_engine.module
        self.model = ds_engine
        # The ArchOpt that steps. ZeRO wrappers expose the same param-group dicts, so the runner's
        # group["lr"] writes reach it; plan, skipped_steps and the summary are read off it too.
        self.optimizer = ds_engine.basic_optimizer
        self.collective_forward = zero_stage == 3  # ZeRO-3 gathers parameters in every forward

    def forward_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.ds(input_ids=batch, labels=batch).loss

    # evaluation runs through the engine too: under ZeRO-3 its forward gathers the parameters
    eval_loss = forward_loss

    def backward(self, loss: torch.Tensor) -> None:
        # The runner already divided the loss by the accumulation steps; DeepSpeed would again.
        self.ds.backward(loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        yield
        # DeepSpeed counts micro-batches in step(): off its accumulation boundary the call only
        # advances the counter (ZeRO then keeps reducing gradients into its buckets).
        if self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed reached its accumulation boundary inside accumulate(): its "
                               "gradient_accumulation_steps disagrees with the runner's batch.grad_accum")
        self.ds.step()

    def step(self) -> None:
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed is not at its accumulation boundary at the optimizer step: its "
                               "gradient_accumulation_steps disagrees with the runner's batch.grad_accum")
        self.ds.step()  # steps the ArchOpt and zeroes the gradients

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("a DeepSpeed engine's state is partitioned per rank: use "
                                  "save_checkpoint/load_checkpoint (DeepSpeed's own), not state_dict()")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state_dict()

    def latest_checkpoint(self, folder: Path) -> Path | None:
        pointer = folder / "latest"  # DeepSpeed writes it after every rank saved the tag
        return folder / pointer.read_text().strip() if pointer.exists() else None

    def save_checkpoint(self, folder: Path, step: int, extra: dict[str, Any], keep: int) -> None:
        self.ds.save_checkpoint(str(folder), tag=f"step_{step:08d}", client_state={"archopt_runner": extra})
        self.ctx.barrier()  # every rank's files are written before any old tag goes
        _prune(folder, keep, self.ctx)
        self.ctx.barrier()

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        loaded, client = self.ds.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None or "archopt_runner" not in (client or {}):
            raise ValueError(f"{path}: not a DeepSpeed checkpoint written by a recipe run (no runner record); "
                             "start without --resume, or point logging.out_dir elsewhere")
        return client["archopt_runner"]


def make_deepspeed_engine(model: nn.Module, optimizer_name: str, hparams: dict[str, Any], recipe: Recipe,
                          ctx: DistContext) -> Engine:
    if ctx.device.type == "cpu":
        prepare_deepspeed_cpu()
    import deepspeed

    import archopt_plugins.integrations.deepspeed as archopt_ds

    archopt_ds.enable()  # DeepSpeed then accepts "type": "ArchOpt<Name>" (idempotent)
    if not deepspeed.comm.is_initialized():
        # Join DeepSpeed's communication layer to the process group the runner started, with its
        # backend: left to itself DeepSpeed would pick its accelerator's default (ccl on CPU).
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    config = ds_config(recipe, optimizer_name, hparams)
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    return DeepSpeedEngine(engine, int(recipe.backend.zero_stage or 0), ctx)
