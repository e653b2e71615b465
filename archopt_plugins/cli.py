"""The ``archopt`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _quickstart(args: argparse.Namespace) -> int:
    import torch

    from .recipe.quickstart import run_quickstart
    from .recipe.training import TrainConfig

    torch.set_num_threads(args.threads) if args.threads else None
    cfg = TrainConfig(steps=args.steps, seed=args.seed)
    run_quickstart(Path(args.out), cfg)
    return 0


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
    q = sub.add_parser("quickstart", help="train a small Llama on the stdlib corpus with the default plan and AdamW")
    q.add_argument("--steps", type=int, default=300)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default="runs/quickstart", help="folder for loss.png, summary.txt, histories.json")
    q.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    q.set_defaults(func=_quickstart)
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
