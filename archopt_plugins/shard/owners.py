"""Owners: which rank computes each complete matrix.

Each parameter that a whole-matrix rule updates gets one owner rank, chosen by a deterministic
cost model: the kernel's estimate of its transform (Newton–Schulz ~ B·m·n·min(m, n),
eigendecompositions ~ B·(m³ + n³)), largest first onto the least loaded rank (ties: lower rank).
A rank that already holds the complete tensor is preferred when that costs at most one unit of
imbalance, which saves the gather for DDP replicas and whole experts on one rank.

The assignment is computed on every rank from identical inputs and then checked identical; a
mismatch (ranks built different plans) raises naming the first differing parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Unit:
    fqn: str
    cost: float
    full_holders: tuple[int, ...]


def assign_owners(units: list[Unit], world: int) -> dict[str, int]:
    """fqn → owner rank; deterministic for the same inputs."""
    load = [0.0] * world
    owners: dict[str, int] = {}
    order = sorted(range(len(units)), key=lambda i: (-units[i].cost, i))
    for i in order:
        unit = units[i]
        least = min(range(world), key=lambda r: (load[r], r))
        choice = least
        if unit.full_holders:
            local = min(unit.full_holders, key=lambda r: (load[r], r))
            if load[local] <= load[least] + unit.cost:
                choice = local
        owners[unit.fqn] = choice
        load[choice] += unit.cost
    return owners


def check_identical(owners: dict[str, int], group: Any = None) -> None:
    """Raise when ranks disagree on the assignment, naming the first differing parameter."""
    world = dist.get_world_size(group)
    mine = sorted(owners.items())
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    reference = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs == reference:
            continue
        for (fqn_a, owner_a), (fqn_b, owner_b) in zip(reference, theirs):
            if (fqn_a, owner_a) != (fqn_b, owner_b):
                raise RuntimeError(f"owner assignment differs across ranks at parameter {fqn_a!r}: rank 0 assigns "
                                   f"it to rank {owner_a}, rank {rank} has {fqn_b!r} on rank {owner_b}; every rank "
                                   "must plan the same model with the same hyperparameters")
        raise RuntimeError(f"owner assignment differs across ranks: rank 0 has {len(reference)} matrices, "
                           f"rank {rank} has {len(theirs)}")


def loads(owners: dict[str, int], costs: dict[str, float], world: int) -> list[float]:
    """Total assigned cost per rank (for benchmarks and balance checks)."""
    out = [0.0] * world
    for fqn, rank in owners.items():
        out[rank] += costs[fqn]
    return out
