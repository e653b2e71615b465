"""Tiny recipes shared by the recipe tests (seconds on CPU)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "seed": 0,
    "model": {"family": "llama", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
              "intermediate_size": 32, "max_seq_len": 32},
    "data": {"source": "stdlib", "max_bytes": 200_000},
    "optimizer": {"name": "muon", "hparams": {"lr": 0.02, "adamw_lr": 3e-3, "compute_dtype": "float32"}},
    "schedule": {"steps": 6, "warmup_steps": 2},
    "batch": {"micro_batch_size": 4, "global_batch_size": 4, "seq_len": 16},
    "backend": {"kind": "single", "device": "cpu", "threads": 1},
    "checkpoint": {"every_steps": 3, "keep_last": 2},
    "logging": {"out_dir": "runs/tiny", "progress": False, "geometry_every": 3},
    "evaluation": {"every_steps": 3, "batches": 2, "ood": ["licenses"]},
    "baseline": {"name": "adamw", "hparams": {"betas": [0.9, 0.95]}, "lr_grid": [1e-3, 3e-3]},
}


def tiny(**edits) -> dict:
    """TINY with dotted-path edits, e.g. tiny(**{"schedule.steps": 4})."""
    data = copy.deepcopy(TINY)
    for path, value in edits.items():
        node = data
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
