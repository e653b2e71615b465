"""``Plan.summary()``: the plan as a table a person reads before a long run.

One row per parameter (or per run of layers that differ only in their layer index, shown as
``layers.{0..31}``), its shape, role, rule, the hyperparameters that differ between rows, and the
matrix structure; then a total per rule with parameter counts and optimizer-state bytes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .plan import Plan, PlanEntry

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
_SHOWN = ("lr", "weight_decay", "momentum", "betas", "lr_scaling", "ns_coefficients", "ns_steps",
          "scale", "block")  # scale: Scion's per-role radius; block: blockwise Adam's second-moment block


def entry_state_bytes(e: PlanEntry) -> int:
    """fp32 optimizer-state bytes the entry's rule keeps for it."""
    from ..update.matrix_view import matrix_shape
    from .rules import get_rule

    mshape = matrix_shape(e.shape, e.structure) if len(e.shape) >= 2 else None
    return get_rule(e.rule).kernel.state_bytes(e.shape, mshape, dict(e.hparams))


def entry_layout(e: PlanEntry) -> str:
    """What the rule's kernel says about the parameter (e.g. Shampoo's blocks); often empty."""
    from ..update.matrix_view import matrix_shape
    from .rules import get_rule

    mshape = matrix_shape(e.shape, e.structure) if len(e.shape) >= 2 else None
    return get_rule(e.rule).kernel.describe(mshape, dict(e.hparams))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ",".join(_fmt(v) for v in value) + ")"
    return str(value)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}T"


def _row_key(e: PlanEntry) -> tuple:
    return (_INDEX.sub("#", e.fqn), e.shape, e.role, e.rule, tuple(sorted(e.hparams.items())), e.structure,
            e.invariant_block_rows)


def _collapse(entries: tuple[PlanEntry, ...]) -> list[tuple[str, list[PlanEntry]]]:
    """Group entries equal up to their layer indices; keep first-appearance order."""
    groups: dict[tuple, list[PlanEntry]] = {}
    for e in entries:
        groups.setdefault(_row_key(e), []).append(e)
    rows = []
    for members in groups.values():
        first = members[0]
        if len(members) == 1:
            rows.append((first.fqn, members))
            continue
        indices = [tuple(int(x) for x in _INDEX.findall(m.fqn)) for m in members]
        varying = [i for i in range(len(indices[0])) if len({ix[i] for ix in indices}) > 1]
        parts = _INDEX.split(first.fqn)
        label = parts[0]
        for i, part in enumerate(parts[1:]):
            values = sorted({ix[i] for ix in indices})
            if i in varying:
                contiguous = values == list(range(values[0], values[-1] + 1))
                label += f"{{{values[0]}..{values[-1]}}}" if contiguous else "{" + ",".join(map(str, values)) + "}"
            else:
                label += str(values[0])
            label += part
        rows.append((label, members))
    return rows


def _invariance(e: PlanEntry) -> str:
    """The scale-invariance cell: blocks of rows the loss is invariant to scaling, or '-'."""
    if not e.scale_invariant:
        return "-"
    from ..update.matrix_view import matrix_shape

    rows = matrix_shape(e.shape, dataclasses.replace(e.structure, per_head=False))[1]
    return "whole" if e.invariant_block_rows in (0, rows) else f"per {e.invariant_block_rows} rows"


def render_summary(plan: Plan, collapse_layers: bool = True) -> str:
    rows = _collapse(plan.entries) if collapse_layers else [(e.fqn, [e]) for e in plan.entries]
    shown_keys = [k for k in _SHOWN if any(k in e.hparams for e in plan.entries)]
    invariant = [e for e in plan.entries if e.scale_invariant]
    table = [["parameter", "shape", "role", "rule", *shown_keys, "structure", "state"]]
    if invariant:
        table[0].append("scale-invariant")
    for label, members in rows:
        e = members[0]
        name = label if not e.aliases else f"{label} (= {', '.join(e.aliases)})"
        count = f" x{len(members)}" if len(members) > 1 else ""
        cells = [name, "x".join(map(str, e.shape)) + count, e.role, e.rule]
        cells += [_fmt(e.hparams[k]) if k in e.hparams else "-" for k in shown_keys]
        layout = ", ".join(d for d in (e.structure.describe(), entry_layout(e)) if d)
        cells += [layout or "-", _human(entry_state_bytes(e)) + "B" + (" each" if len(members) > 1 else "")]
        if invariant:
            cells.append(_invariance(e))
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))

    total = sum(e.numel for e in plan.entries)
    header = (f"ArchOpt plan {plan.name!r}: {len(plan.entries)} tensors, {_human(total)} parameters; "
              f"{plan.source_note}")
    footer = []
    for rule in plan.rules():
        members = [e for e in plan.entries if e.rule == rule]
        numel = sum(e.numel for e in members)
        state = sum(entry_state_bytes(e) for e in members)
        footer.append(f"  {rule:8s} {len(members):4d} tensors  {_human(numel):>7s} params "
                      f"({100 * numel / max(total, 1):.1f}%)  state {_human(state)}B (fp32)")
    opts = ", ".join(f"{k}={_fmt(v)}" for k, v in plan.options.items())
    if invariant:
        numel = sum(e.numel for e in invariant)
        footer.append(f"  scale-invariant {len(invariant)} tensors  {_human(numel)} params "
                      f"({100 * numel / max(total, 1):.1f}%): the loss ignores their scale (per block of rows)")
    notes = [f"note: {n}" for n in getattr(plan, "notes", ())]
    return "\n".join([header, *lines, "totals:", *footer, f"options: {opts}", *notes])
