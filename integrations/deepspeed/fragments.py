"""DeepSpeed's flat partitions mapped back to the pieces of each parameter (the engine's flat fragments).

Under ZeRO-1/2/3 DeepSpeed hands its optimizer flat fp32 buffers, not parameters. Each wrapper keeps
its own record of where every parameter's elements sit in them, and the adapter reads exactly that:

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ZeRO-1 with bf16 (``BF16_Optimizer``): one flat fp32
  partition per param group and rank; each low-precision parameter that has elements in this rank's
  partition carries ``_hp_mapping`` (``utils/tensor_fragment.py``): ``lp_fragment_address`` is the
  range of the parameter's flattened elements, ``hp_fragment_address`` where they sit in the
  partition. Ranges cut parameters anywhere, mid-row included.
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is split evenly, rank r holding flat
  elements [r·p, (r+1)·p) of it (``partition_numel() = p``, the last rank padded), and each
  sub-group's fp32 buffer concatenates its parameters' partitions in ``fp16_groups`` order. The
  offsets are checked against where DeepSpeed put each ``ds_tensor`` (its storage), so a layout this
  code does not understand raises instead of updating the wrong elements.

Each rank's piece becomes a ``FlatRange`` hint (an empty one where it holds nothing) and each step a
(param view, grad view) pair into DeepSpeed's buffers, which ``ArchOpt.step_pieces`` updates in place.

DeepSpeed steps its optimizer once per param group (ZeRO-1/2) or sub-group (ZeRO-3), moving each
one's result into the low-precision copy right after. A whole-matrix step needs every gradient at
once, so the bridge collects the units as they arrive, steps them all together when the last one
does, and then redoes the low-precision copy of the units DeepSpeed had already copied (the same
``copy_`` DeepSpeed makes). The cost: every unit's fp32 gradient partition stays alive until the
last unit arrives (one fp32 gradient partition per rank, as ZeRO-1 keeps anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from archopt_plugins.shard.layout import FlatRange


@dataclass
class Unit:
    """One flat fp32 buffer DeepSpeed steps by itself: a param group's partition, or a ZeRO-3 sub-group's."""

    flat: torch.Tensor
    # fqn -> (offset in ``flat``, FlatRange of the parameter's elements)
    members: dict[str, tuple[int, FlatRange]] = field(default_factory=dict)
    low_precision: torch.Tensor | None = None  # DeepSpeed's copy of ``flat`` to refresh after a late step


def _unmappable(fqn: str, wrapper: Any, why: str) -> ValueError:
    return ValueError(f"parameter {fqn!r}: cannot map DeepSpeed's flat partition back to it ({why}) under "
                      f"{type(wrapper).__name__}; the archopt adapter supports DeepSpeed's ZeRO-1/2 fragment "
                      "mappings and ZeRO-3's even per-parameter partitions. Report the DeepSpeed version and "
                      "config, or train this model with ZeRO stage 0")


class FragmentBridge:
    """Collects DeepSpeed's per-unit optimizer calls into one archopt step over all pieces."""

    kind = "fragments"

    def __init__(self, wrapper: Any, units: list[Unit], fqns: list[str], numels: dict[str, int]) -> None:
        self.wrapper = wrapper
        self.units = units
        self.pending: dict[int, torch.Tensor] = {}
        self.ranges: dict[str, FlatRange] = {}
        self.views: dict[str, tuple[int, int, int]] = {}  # fqn -> (unit, offset, numel)
        for u, unit in enumerate(units):
            for fqn, (offset, piece) in unit.members.items():
                if fqn in self.ranges:
                    raise _unmappable(fqn, wrapper, "it appears in two flat buffers")
                if piece.stop > numels[fqn] or offset + piece.numel > unit.flat.numel():
                    raise _unmappable(fqn, wrapper, f"fragment {piece.describe()} at offset {offset} lies outside "
                                                    "the parameter or the buffer")
                self.ranges[fqn] = piece
                self.views[fqn] = (u, offset, piece.numel)
        for fqn in fqns:  # parameters with no elements on this rank
            self.ranges.setdefault(fqn, FlatRange(0, 0))

    def unit_of(self, flat: torch.Tensor) -> int:
        for u, unit in enumerate(self.units):
            if unit.flat is flat:
                return u
        raise RuntimeError(f"{type(self.wrapper).__name__} stepped a flat buffer of {flat.numel()} elements that "
                           "the archopt adapter did not map at start-up; DeepSpeed re-created its partitions")

    def collect(self, stepped: list[torch.Tensor]) -> bool:
        """Record the buffers DeepSpeed steps in this call; True once every unit of the step is in."""
        for flat in stepped:
            u = self.unit_of(flat)
            if u in self.pending:
                raise RuntimeError(f"{type(self.wrapper).__name__} stepped flat buffer {u} twice before the others "
                                   "of the step; the archopt adapter needs every buffer once per step")
            if flat.grad is None:
                raise RuntimeError(f"{type(self.wrapper).__name__} stepped flat buffer {u} without a gradient")
            self.pending[u] = flat.grad
        return len(self.pending) == len(self.units)

    def pieces(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        empty = self.units[0].flat.new_empty(0) if self.units else torch.empty(0)
        out = {}
        for fqn in self.ranges:
            view = self.views.get(fqn)
            if view is None:
                out[fqn] = (empty, empty)
                continue
            u, offset, numel = view
            out[fqn] = (self.units[u].flat.detach().narrow(0, offset, numel),
                        self.pending[u].narrow(0, offset, numel))
        return out

    def pieces_of_masters(self) -> dict[str, torch.Tensor]:
        """fqn -> this rank's fp32 master elements (a flat view into DeepSpeed's buffer; empty if none)."""
        empty = self.units[0].flat.new_empty(0) if self.units else torch.empty(0)
        out = {}
        for fqn in self.ranges:
            view = self.views.get(fqn)
            out[fqn] = empty if view is None else self.units[view[0]].flat.detach().narrow(0, view[1], view[2])
        return out

    def finish(self, last: list[torch.Tensor]) -> None:
        """Refresh DeepSpeed's low-precision copies of the units it copied before their late update."""
        done = {self.unit_of(f) for f in last}
        for u, unit in enumerate(self.units):
            if u not in done and unit.low_precision is not None and unit.low_precision is not unit.flat:
                unit.low_precision.data.copy_(unit.flat.data)
        self.pending.clear()


def _hp_mapped_units(wrapper: Any, lp_groups: list[list[torch.Tensor]], flats: list[torch.Tensor],
                     names: dict[int, str], low_precision: list[torch.Tensor | None]) -> list[Unit]:
    units = []
    for i, (params, flat) in enumerate(zip(lp_groups, flats)):
        unit = Unit(flat, low_precision=low_precision[i])
        for lp in params:
            fqn = names.get(id(lp))
            if fqn is None:
                continue
            mapping = getattr(lp, "_hp_mapping", "missing")
            if mapping == "missing":
                raise _unmappable(fqn, wrapper, "it has no _hp_mapping")
            if mapping is None:
                continue  # none of its elements are in this rank's partition
            if mapping.param_group_index != i:
                raise _unmappable(fqn, wrapper, f"its mapping points at group {mapping.param_group_index}, not {i}")
            hp, lp_addr = mapping.hp_fragment_address, mapping.lp_fragment_address
            if hp.numel != lp_addr.numel:
                raise _unmappable(fqn, wrapper, "its fragment sizes disagree")
            unit.members[fqn] = (hp.start, FlatRange(lp_addr.start, lp_addr.start + lp_addr.numel))
        units.append(unit)
    return units


def zero12_units(wrapper: Any, names: dict[int, str]) -> list[Unit]:
    """ZeRO-1/2 (``DeepSpeedZeroOptimizer``): one unit per param group, this rank's partition."""
    import torch.distributed as dist

    lows = []
    for i, parts in enumerate(wrapper.parallel_partitioned_bit16_groups):
        rank = dist.get_rank(group=wrapper.real_dp_process_group[i])
        lows.append(parts[rank])
    return _hp_mapped_units(wrapper, wrapper.bit16_groups, wrapper.single_partition_of_fp32_groups, names, lows)


def bf16_units(wrapper: Any, names: dict[int, str]) -> list[Unit]:
    """ZeRO-1 with bf16 and fp32 gradient accumulation (``BF16_Optimizer``): stepped once for all groups."""
    flats = wrapper.fp32_groups_flat_partition
    return _hp_mapped_units(wrapper, wrapper.bf16_groups, flats, names, [None] * len(flats))


def zero3_units(wrapper: Any, names: dict[int, str]) -> list[Unit]:
    """ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): one unit per sub-group of partitioned parameters."""
    units = []
    for j, params in enumerate(wrapper.fp16_groups):
        flat = wrapper.fp32_partitioned_groups_flat[j]
        low = wrapper.fp16_partitioned_groups_flat[j]
        rank = wrapper._get_sub_group_partition_rank(j)
        unit = Unit(flat, low_precision=low)
        offset = 0
        for p in params:
            fqn = names.get(id(p))
            part = int(p.partition_numel())
            if fqn is None:
                offset += part
                continue
            numel = int(p.ds_numel)
            if low is not None:  # where DeepSpeed put this parameter's partition must be where we look
                expected = low.data_ptr() + offset * low.element_size()
                if p.ds_tensor.data_ptr() != expected or p.ds_tensor.numel() != part:
                    raise _unmappable(fqn, wrapper, "its partition is not where the sub-group's layout puts it")
            start = min(rank * part, numel)
            stop = min(start + part, numel)
            if stop > start:
                unit.members[fqn] = (offset, FlatRange(start, stop))
            offset += part
        if offset != flat.numel():
            raise _unmappable(next(iter(unit.members), "?"), wrapper,
                              f"sub-group {j} holds {flat.numel()} elements, its parameters' partitions {offset}")
        units.append(unit)
    return units
