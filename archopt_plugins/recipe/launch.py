"""Launching a recipe: in this process, under torchrun, per node with rendezvous, or as a Slurm job.

``launch`` writes the fully resolved recipe (``--set`` edits applied, every default spelled out) to
``OUT/recipe.yaml`` — what every worker reads, so all ranks and a later ``--resume`` run the same
thing — then:

- one process (``launch.nproc_per_node`` × ``launch.nodes`` = 1): runs here, no torchrun;
- one node, several processes: ``python -m torch.distributed.run --standalone`` with
  ``--max-restarts`` (elastic: a failed worker group restarts and resumes from the last checkpoint);
- several nodes: without ``--node-rank`` it prints the torchrun command each node runs (c10d
  rendezvous at ``launch.rdzv_endpoint``); with ``--node-rank K`` it runs node K's command here.
  ``OUT`` must be on a filesystem every node sees (checkpoints, the resolved recipe).

``slurm_script`` writes the same launch as an sbatch script (one torchrun per node via srun).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from .schema import Recipe
from .validate import recipe_to_yaml

WORKER_MODULE = "archopt_plugins.recipe.worker"


def write_resolved(recipe: Recipe, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "recipe.yaml"
    tmp = out_dir / f".recipe.yaml.{os.getpid()}"
    tmp.write_text("# resolved by archopt: every default written out; the workers read this file\n"
                   + recipe_to_yaml(recipe))
    os.replace(tmp, path)  # each node's launcher writes it: never let a worker read half a file
    return path


def worker_args(resolved: Path, out_dir: Path, resume: bool, only: list[str] | None = None) -> list[str]:
    selected = [a for label in only or [] for a in ("--only", label)]
    return ["-m", WORKER_MODULE, str(resolved), "--out", str(out_dir)] + (["--resume"] if resume else []) + selected


def torchrun_args(recipe: Recipe, node_rank: int | None = None, python: str | None = None) -> list[str]:
    """The torchrun part of a launch (without the worker), for one node."""
    run = [python or sys.executable, "-m", "torch.distributed.run"]
    launch = recipe.launch
    common = [f"--nproc-per-node={launch.nproc_per_node}", f"--max-restarts={launch.max_restarts}"]
    if launch.nodes == 1:
        return run + ["--standalone", "--nnodes=1"] + common
    # c10d assigns ranks in order of arrival; what a node rank decides is who serves the rendezvous
    # store (node 0), said explicitly so two "nodes" on one machine do not both try to.
    host = [] if node_rank is None else [f"--rdzv-conf=is_host={1 if node_rank == 0 else 0}"]
    return run + [f"--nnodes={launch.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}",
                  f"--rdzv-id={launch.rdzv_id}", *host] + common


def node_commands(recipe: Recipe, resolved: Path, out_dir: Path, resume: bool,
                  only: list[str] | None = None) -> list[str]:
    """The shell command node K runs, for every K."""
    return [shlex.join(torchrun_args(recipe, k) + worker_args(resolved, out_dir, resume, only))
            for k in range(recipe.launch.nodes)]


def launch(recipe: Recipe, out_dir: Path, resume: bool = False, node_rank: int | None = None,
           dry_run: bool = False, only: list[str] | None = None) -> int:
    """Run the recipe as its launch section says; returns the exit status."""
    resolved = write_resolved(recipe, out_dir)
    if node_rank is not None and not 0 <= node_rank < recipe.launch.nodes:
        raise ValueError(f"--node-rank {node_rank}: the recipe has launch.nodes = {recipe.launch.nodes}; "
                         f"use 0 … {recipe.launch.nodes - 1}")
    if recipe.world_size == 1:
        if dry_run:
            print(shlex.join([sys.executable] + worker_args(resolved, out_dir, resume, only)))
            return 0
        from .distributed import init_distributed, shutdown_distributed
        from .runner import run_recipe

        ctx = init_distributed(recipe)
        try:
            run_recipe(recipe, ctx, out_dir, resume=resume, only=only)
        finally:
            shutdown_distributed()
        return 0
    if recipe.launch.nodes > 1 and node_rank is None:
        print(f"{recipe.launch.nodes} nodes × {recipe.launch.nproc_per_node} processes: run on node K "
              f"(rendezvous at {recipe.launch.rdzv_endpoint}, which node 0 must serve):")
        for k, command in enumerate(node_commands(recipe, resolved, out_dir, resume, only)):
            print(f"  node {k}: {command}")
        print("or on each node: archopt run RECIPE --node-rank K (same --set edits); OUT must be shared storage")
        return 0
    command = torchrun_args(recipe, node_rank) + worker_args(resolved, out_dir, resume, only)
    print("launching:", shlex.join(command), flush=True)
    if dry_run:
        return 0
    return subprocess.call(command)


def slurm_script(recipe: Recipe, resolved: Path, out_dir: Path) -> str:
    """An sbatch script: one task per node, each runs torchrun with c10d rendezvous on the first node."""
    launch, slurm = recipe.launch, recipe.launch.slurm
    gpus = slurm.gpus_per_node
    if gpus is None:
        gpus = launch.nproc_per_node if recipe.backend.device in ("cuda", "auto") else 0
    port = launch.rdzv_endpoint.rsplit(":", 1)[1]
    lines = ["#!/bin/bash", f"#SBATCH --job-name={recipe.name}", f"#SBATCH --nodes={launch.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={slurm.cpus_per_task}",
             f"#SBATCH --time={slurm.time}", f"#SBATCH --output={out_dir}/slurm-%j.out"]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    if slurm.partition:
        lines.append(f"#SBATCH --partition={slurm.partition}")
    if slurm.account:
        lines.append(f"#SBATCH --account={slurm.account}")
    container = f" --container-image={shlex.quote(slurm.container_image)}" if slurm.container_image else ""
    torchrun = ['"${ARCHOPT_PYTHON:-python}"', "-m", "torch.distributed.run", '--nnodes="$SLURM_NNODES"',
                f"--nproc-per-node={launch.nproc_per_node}", "--rdzv-backend=c10d",
                f'--rdzv-endpoint="$head_node:{port}"', '--rdzv-id="$SLURM_JOB_ID"',
                f"--max-restarts={launch.max_restarts}"]
    worker = [shlex.quote(a) for a in worker_args(resolved, out_dir, resume=False)]
    lines += [
        "# generated by `archopt slurm` from the recipe; OUT must be on storage every node sees",
        "set -euo pipefail",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export OMP_NUM_THREADS={max(1, slurm.cpus_per_task // max(1, launch.nproc_per_node))}",
        f"srun{container} " + " ".join(torchrun + worker),
        "",
    ]
    return "\n".join(lines)


def write_slurm(recipe: Recipe, out_dir: Path, script: Path | None = None) -> Path:
    out_dir = out_dir.resolve()
    resolved = write_resolved(recipe, out_dir)
    script = script or out_dir / "job.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(slurm_script(recipe, resolved, out_dir))
    return script
