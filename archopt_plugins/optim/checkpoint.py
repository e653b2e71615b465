"""Sharded checkpoints of a model and its ArchOpt: exact resume, any world size, atomic.

Built on ``torch.distributed.checkpoint`` (DCP): ``get_optimizer_state_dict`` re-keys the
optimizer's torch-format ``state_dict()`` by FQN, so

* elementwise state (momentum, Adam moments) is saved in the parameter's own layout — DTensor
  shards under FSDP2, one copy under DDP — and DCP reshards it for another world size or layout;
* state that lives with a complete matrix (Shampoo/SOAP factors) sits in the parameter's state on
  its owner rank only, under the same keys a single process uses; on load, the zero-lr step DCP
  runs to create state makes every new owner create those keys, and DCP fills them from whichever
  rank saved them. A checkpoint therefore loads at another world size, under FSDP2 or DDP, or in
  one process.

``save_checkpoint`` writes into a hidden temporary folder and renames it into place only when
every rank has finished, then moves the ``latest`` pointer with an atomic rename: a run killed
mid-save never replaces the last good checkpoint. ``load_checkpoint`` checks the checkpoint's
plan against the optimizer's (rule, parameter set, shapes) before reading any tensor, and names
the first mismatching parameter.

    save_checkpoint("ckpt", model, optimizer, step=100)
    step, extra = load_checkpoint("ckpt", model, optimizer)        # the latest one
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Collection

import torch
import torch.distributed as dist

from ..planner.rules import get_rule
from .archopt import refuse_retired_state

METADATA = "archopt.json"
EXTRA = "extra.pt"
LATEST = "latest"
FORMAT = 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _broadcast(value: Any) -> Any:
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _plan_record(optimizer: Any) -> dict[str, dict[str, Any]]:
    return {e.fqn: {"rule": e.rule, "shape": list(e.shape), "role": e.role} for e in optimizer.plan.entries}


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, optimizer: Any, step: int,
                    extra: dict[str, Any] | None = None) -> Path:
    """Save model + optimizer as ``directory/step_{step:08d}`` (collective: call on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root = Path(directory)
    final = root / f"step_{step:08d}"
    token = _broadcast(uuid.uuid4().hex[:8] if _rank() == 0 else None)
    tmp = root / f".tmp-step_{step:08d}-{token}"
    if _rank() == 0:
        tmp.mkdir(parents=True, exist_ok=False)
    _barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(tmp))
    if _rank() == 0:
        meta = {"format": FORMAT, "step": step, "world_size": dist.get_world_size() if _distributed() else 1,
                "optimizer": optimizer.plan.name, "plan": _plan_record(optimizer)}
        _fsync_write(tmp / METADATA, json.dumps(meta, indent=1).encode())
        if extra is not None:
            torch.save(extra, tmp / EXTRA)
    _barrier()
    if _rank() == 0:
        if final.exists():  # re-saving a step: move the old one aside first (a folder rename cannot overwrite)
            old = root / f".old-{final.name}-{token}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        pointer = root / f".{LATEST}-{token}"
        _fsync_write(pointer, final.name.encode())
        os.replace(pointer, root / LATEST)
        for stale in root.glob(".tmp-*"):  # folders of saves that were killed
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def resolve(directory: str | os.PathLike, step: int | None = None) -> Path:
    """The checkpoint folder for ``step``, or the one ``latest`` points to."""
    root = Path(directory)
    if step is not None:
        path = root / f"step_{step:08d}"
    else:
        pointer = root / LATEST
        if not pointer.exists():
            raise FileNotFoundError(f"no checkpoint in {root}: {LATEST!r} is missing (nothing was saved there)")
        path = root / pointer.read_text().strip()
    if not (path / METADATA).exists():
        raise FileNotFoundError(f"{path} is not a complete archopt checkpoint (no {METADATA})")
    return path


def check_compatible(meta: dict[str, Any], optimizer: Any) -> None:
    """Refuse a checkpoint of another rule, parameter set or shape, naming the first mismatch."""
    saved, here = meta["plan"], _plan_record(optimizer)
    for fqn in here:
        if fqn not in saved:
            raise ValueError(f"checkpoint has no parameter {fqn!r} (it holds {len(saved)} parameters, e.g. "
                             f"{next(iter(saved), None)!r}): it was saved from another model")
    for fqn in saved:
        if fqn not in here:
            raise ValueError(f"checkpoint parameter {fqn!r} does not exist in this model: saved from another model")
    for fqn, entry in here.items():
        old = saved[fqn]
        if old["shape"] != entry["shape"]:
            raise ValueError(f"parameter {fqn!r}: checkpoint shape {tuple(old['shape'])}, this model "
                             f"{tuple(entry['shape'])}")
        if old["rule"] != entry["rule"]:
            raise ValueError(f"parameter {fqn!r}: checkpoint was saved with rule {old['rule']!r}, this optimizer "
                             f"runs {entry['rule']!r}; build the optimizer with the same name and overrides")


def check_no_retired_state(saved_keys: Collection[str], optimizer: Any) -> None:
    """Refuse state saved under a key its rule has retired (e.g. SOAP's unrotated "exp_avg"), naming it.

    Before any tensor is read: DCP would otherwise fail on the *new* key, missing from the checkpoint.
    Optimizer state is saved flattened as "optim.state.<fqn>.<key>".
    """
    for entry in optimizer.plan.entries:
        prefix = f"optim.state.{entry.fqn}."
        retired = get_rule(entry.rule).kernel.retired_state_keys
        refuse_retired_state(entry.fqn, entry.rule, [key for key in retired if prefix + key in saved_keys])


def load_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, optimizer: Any,
                    step: int | None = None) -> tuple[int, dict[str, Any] | None]:
    """Load model + optimizer (collective); returns (step, extra). Works at any world size or layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    path = resolve(directory, step)
    meta = json.loads((path / METADATA).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT}")
    check_compatible(meta, optimizer)
    check_no_retired_state(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata, optimizer)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    extra = torch.load(path / EXTRA, weights_only=False) if (path / EXTRA).exists() else None
    return int(meta["step"]), extra
