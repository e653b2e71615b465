"""Moving matrix pieces to their owners and updates back: one batched all-to-all each way.

The plan is static for a given set of parameters: every rank derives the same list of transfers
(source rank, destination rank, parameter, piece) from the layouts and owners, so each knows what
to pack for whom and how to cut what it receives, without exchanging sizes at run time.

* gather — each owner needs every distinct piece of its matrices; a piece it holds itself travels
  nowhere, otherwise one holder sends it (replicas take turns, spreading the load);
* return — the owner sends each piece of the update to every rank holding that piece;
* ``redundant`` mode (the way peers do it: every rank assembles every matrix) gathers to all
  ranks and needs no return.

Payloads travel in ``comm_dtype`` and are cast back on arrival. :class:`CommStats` counts bytes
and collectives for benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .layout import ParamLayout, Piece, read_piece, write_piece

Transfer = tuple[str, Piece]  # (fqn, piece) in a deterministic order per (source, destination)


@dataclass
class CommStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0

    def add(self, other: "CommStats") -> None:
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.collectives += other.collectives


@dataclass
class CommPlan:
    """What this rank sends and receives in the gather and the return all-to-alls."""

    rank: int
    world: int
    gather_send: list[list[Transfer]] = field(default_factory=list)  # per destination
    gather_recv: list[list[Transfer]] = field(default_factory=list)  # per source
    return_send: list[list[Transfer]] = field(default_factory=list)
    return_recv: list[list[Transfer]] = field(default_factory=list)
    computes: list[str] = field(default_factory=list)  # fqns whose transform runs here
    # Whether ANY rank sends anything: the same on every rank, so all call the collective or none do.
    gather_any: bool = False
    return_any: bool = False


def build_plan(layouts: list[ParamLayout], owners: dict[str, int], rank: int, world: int,
               redundant: bool = False) -> CommPlan:
    plan = CommPlan(rank, world, *[[[] for _ in range(world)] for _ in range(4)])
    for order, layout in enumerate(layouts):
        recipients = list(range(world)) if redundant else [owners[layout.fqn]]
        if rank in recipients:
            plan.computes.append(layout.fqn)
        for piece, holders in layout.holders():
            for t in recipients:
                if t in holders:
                    continue
                source = holders[(t + order) % len(holders)]
                plan.gather_any = True
                if source == rank:
                    plan.gather_send[t].append((layout.fqn, piece))
                if t == rank:
                    plan.gather_recv[source].append((layout.fqn, piece))
            if redundant:
                continue
            owner = owners[layout.fqn]
            for h in holders:
                if h == owner:
                    continue
                plan.return_any = True
                if owner == rank:
                    plan.return_send[h].append((layout.fqn, piece))
                if h == rank:
                    plan.return_recv[owner].append((layout.fqn, piece))
    return plan


def _exchange(send: list[list[torch.Tensor]], recv_sizes: list[int], dtype: torch.dtype, device: torch.device,
              group: Any, stats: CommStats) -> torch.Tensor:
    """One all_to_all_single of per-destination concatenations; returns the flat received buffer."""
    in_splits = [sum(t.numel() for t in chunks) for chunks in send]
    flat = [t.reshape(-1).to(dtype) for chunks in send for t in chunks]
    send_buf = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    recv_buf = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(recv_buf, send_buf, output_split_sizes=recv_sizes, input_split_sizes=in_splits,
                           group=group)
    me = dist.get_rank(group)
    stats.collectives += 1
    stats.bytes_sent += (send_buf.numel() - in_splits[me]) * send_buf.element_size()
    stats.bytes_received += (recv_buf.numel() - recv_sizes[me]) * recv_buf.element_size()
    return recv_buf


def gather(plan: CommPlan, layouts: dict[str, ParamLayout], local: dict[str, torch.Tensor], dtype: torch.dtype,
           group: Any, stats: CommStats) -> dict[str, torch.Tensor]:
    """Complete tensors (float32) of the matrices this rank computes, assembled from all holders."""
    device = next(iter(local.values())).device if local else torch.device("cpu")
    complete: dict[str, torch.Tensor] = {}
    for fqn in plan.computes:
        layout = layouts[fqn]
        full = torch.empty(layout.shape, dtype=torch.float32, device=device)
        mine = layout.pieces[plan.rank]
        if mine is not None and mine.numel > 0:
            write_piece(full, mine, local[fqn].reshape(-1))
        complete[fqn] = full
    if not plan.gather_any:
        return complete
    send = [[local[fqn] for fqn, _ in transfers] for transfers in plan.gather_send]
    sizes = [sum(p.numel for _, p in transfers) for transfers in plan.gather_recv]
    buf = _exchange(send, sizes, dtype, device, group, stats)
    offset = 0
    for transfers in plan.gather_recv:
        for fqn, piece in transfers:
            write_piece(complete[fqn], piece, buf[offset:offset + piece.numel])
            offset += piece.numel
    return complete


def scatter_back(plan: CommPlan, layouts: dict[str, ParamLayout], updates: dict[str, torch.Tensor],
                 local_shapes: dict[str, torch.Size], dtype: torch.dtype, group: Any,
                 stats: CommStats) -> dict[str, torch.Tensor]:
    """This rank's piece of every update (``updates`` holds the complete ones it computed)."""
    out: dict[str, torch.Tensor] = {}
    for fqn, full in updates.items():
        mine = layouts[fqn].pieces[plan.rank]
        if mine is not None and mine.numel > 0:
            out[fqn] = read_piece(full, mine).reshape(local_shapes[fqn])
    if not plan.return_any:
        return out
    device = next(iter(updates.values())).device if updates else torch.device("cpu")
    send = [[read_piece(updates[fqn], piece) for fqn, piece in transfers] for transfers in plan.return_send]
    sizes = [sum(p.numel for _, p in transfers) for transfers in plan.return_recv]
    buf = _exchange(send, sizes, dtype, device, group, stats)
    offset = 0
    for transfers in plan.return_recv:
        for fqn, piece in transfers:
            out[fqn] = buf[offset:offset + piece.numel].float().reshape(local_shapes[fqn])
            offset += piece.numel
    return out
