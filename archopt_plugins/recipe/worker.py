"""The process torchrun starts for each rank: ``python -m archopt_plugins.recipe.worker RECIPE --out DIR``.

Reads the resolved recipe ``archopt run`` wrote, joins the process group, runs every run of the
recipe (resuming when asked or when torchrun restarted this worker) and leaves the group.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .distributed import init_distributed, shutdown_distributed
from .errors import RecipeError
from .runner import run_recipe
from .validate import load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="archopt-worker", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--only", action="append", default=None)
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as err:
        print(err, file=sys.stderr)
        return 2
    ctx = init_distributed(recipe)
    try:
        run_recipe(recipe, ctx, Path(args.out), resume=args.resume, only=args.only)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
