"""The ``archopt`` command."""

from __future__ import annotations

import argparse
import sys


def _plan(args: argparse.Namespace) -> int:
    from . import available_optimizers, plan
    from .recipe.training import ModelConfig, build_llama

    model = build_llama(ModelConfig(), seed=0)
    print(plan(model, args.name).summary())
    print(f"available optimizers: {', '.join(available_optimizers())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="archopt", description="architecture-aware optimizers: plans, runs, reports")
    sub = parser.add_subparsers(dest="command", required=True)
    from .recipe.commands import add_recipe_commands  # `archopt validate|run|slurm RECIPE`

    add_recipe_commands(sub)
    p = sub.add_parser("plan", help="print the plan of a named optimizer for the quickstart model")
    p.add_argument("name", nargs="?", default="muon")
    p.set_defaults(func=_plan)
    from .integrations.hf.launcher import add_hf_run_command  # `archopt hf-run SCRIPT ARGS...`

    add_hf_run_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
