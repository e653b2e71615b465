"""The recipe subcommands of ``archopt``: ``validate``, ``run`` and ``slurm``.

``add_recipe_commands(subparsers)`` adds them to the ``archopt`` parser (``cli.py``), the same way
each integration adds its own subcommand. Exit status: 0 done, 2 the recipe is invalid (every
problem printed with its key path, value and fix), otherwise the launched run's status.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import Issue, RecipeError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a YAML recipe (see recipes/)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="edit the recipe before validation (repeatable), e.g. --set schedule.steps=100")


def _load(args: argparse.Namespace) -> Any:
    from .validate import load_recipe

    return load_recipe(args.recipe, args.sets)


def _out_dir(args: argparse.Namespace, recipe: Any) -> Path:
    return Path(args.out or recipe.logging.out_dir)


def describe(recipe: Any) -> str:
    """What a recipe needs and will do, in a few lines (``archopt validate`` prints it)."""
    from .backends import BACKENDS
    from .models import build_meta_model, parameter_count
    from .runner import run_specs

    params = parameter_count(build_meta_model(recipe.model, recipe.vocab_size))
    device = recipe.backend.device
    lines = [
        f"model: {recipe.model.family}, {params / 1e6:.2f}M parameters, vocabulary {recipe.vocab_size} "
        f"({recipe.tokenizer.kind} tokens), data: {recipe.data.source}",
        f"needs: {recipe.launch.nodes} node(s) × {recipe.launch.nproc_per_node} process(es) = {recipe.world_size}, "
        f"device {device}{' (one GPU per process)' if device == 'cuda' else ''}; backend {recipe.backend.kind} "
        f"({BACKENDS[recipe.backend.kind].summary})",
        f"schedule: {recipe.schedule.steps} steps × {recipe.tokens_per_step} tokens "
        f"(global batch {recipe.batch.global_batch_size} = micro {recipe.batch.micro_batch_size} × "
        f"{recipe.data_parallel_size} processes × accumulation {recipe.grad_accum})",
        "runs: " + ", ".join(spec.label for spec in run_specs(recipe)),
    ]
    return "\n".join(lines)


def _validate(args: argparse.Namespace) -> int:
    recipe = _load(args)
    print(f"{args.recipe}: valid")
    print(describe(recipe))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .launch import launch
    from .runner import select_runs

    recipe = _load(args)
    try:
        select_runs(recipe, args.only)
    except ValueError as err:
        raise RecipeError([Issue("--only", str(err), "name runs as validate lists them after 'runs:'")]) from None
    return launch(recipe, _out_dir(args, recipe), resume=args.resume, node_rank=args.node_rank,
                  dry_run=args.dry_run, only=args.only)


def _slurm(args: argparse.Namespace) -> int:
    from .launch import write_slurm

    recipe = _load(args)
    script = write_slurm(recipe, _out_dir(args, recipe), Path(args.output) if args.output else None)
    print(f"wrote {script}; submit it with: sbatch {script}")
    return 0


def _guarded(func: Any) -> Any:
    """Turn a RecipeError into its printed issues and exit status 2 (no traceback for user errors)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except RecipeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run


def add_recipe_commands(sub: Any) -> None:
    v = sub.add_parser("validate", help="check a recipe (every field and cross-field rule) without running it")
    _add_common(v)
    v.set_defaults(func=_guarded(_validate))

    r = sub.add_parser("run", help="run a recipe: one process, torchrun, or one node of a multi-node launch")
    _add_common(r)
    r.add_argument("--out", default=None, help="output folder (default: the recipe's logging.out_dir)")
    r.add_argument("--resume", action="store_true", help="skip finished runs, continue others from checkpoints")
    r.add_argument("--node-rank", type=int, default=None,
                   help="multi-node recipes: launch node K here (without it the per-node commands are printed)")
    r.add_argument("--dry-run", action="store_true", help="print the launch command instead of running it")
    r.add_argument("--only", action="append", default=None, metavar="RUN",
                   help="run only this run of the recipe (repeatable), e.g. --only 'adamw lr=0.001'")
    r.set_defaults(func=_guarded(_run))

    s = sub.add_parser("slurm", help="write an sbatch script that launches the recipe on its nodes")
    _add_common(s)
    s.add_argument("--out", default=None, help="output folder of the job (default: logging.out_dir)")
    s.add_argument("-o", "--output", default=None, help="script path (default: OUT/job.sbatch)")
    s.set_defaults(func=_guarded(_slurm))
