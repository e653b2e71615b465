"""The process a recipe runs in: rank, world size, device, and the few collectives the runner needs.

Under torchrun (``WORLD_SIZE`` > 1 in the environment) ``init_distributed`` joins the process
group (gloo on CPU, NCCL on CUDA unless the recipe says otherwise); a single process runs without
one. ``restart_count`` is torchrun's elastic restart counter: a restarted worker resumes from the
last checkpoint on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .schema import Recipe


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum_floats(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (evaluation splits its batches across ranks)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def resolve_device(recipe: Recipe, local_rank: int = 0) -> torch.device:
    wanted = recipe.backend.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("backend.device is 'cuda' but this machine has no CUDA device; set "
                               "backend.device: cpu (or auto) to run here")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def init_distributed(recipe: Recipe) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if world != recipe.world_size:
        raise RuntimeError(f"launched with WORLD_SIZE={world} but the recipe asks for launch.nproc_per_node × "
                           f"launch.nodes = {recipe.world_size} processes; launch it with `archopt run`")
    device = resolve_device(recipe, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if recipe.backend.threads:
        torch.set_num_threads(recipe.backend.threads)
    if world > 1 and not dist.is_initialized():
        backend = recipe.backend.dist_backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=_attempt_store(rank, world, restarts), rank=rank,
                                world_size=world)
    return DistContext(rank, world, local_rank, device, restarts)


def _attempt_store(rank: int, world: int, restarts: int) -> dist.Store:
    """The rendezvous store torchrun set up, under a prefix of its own for this restart attempt.

    Under c10d rendezvous the workers of every attempt share the agent's store, and a restarted
    group's gloo mesh then reads the dead workers' addresses ("Connection refused" in
    connectFullMesh) when its peer has not yet overwritten them. A per-attempt prefix keeps each
    attempt's keys apart.
    """
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not use_agent_store and rank == 0)
    return dist.PrefixStore(f"archopt/attempt{restarts}", store)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
