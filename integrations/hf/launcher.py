"""``archopt hf-run SCRIPT ARGS…``: run a stock Trainer script, unchanged, with ``--optim archopt_*``.

The script runs in this process as ``__main__`` (as ``python SCRIPT ARGS…`` would run it: its
folder first on ``sys.path``, ``sys.argv`` = [SCRIPT, ARGS…]) after ``enable()``, so its
``HfArgumentParser`` already knows the archopt names. It composes with launchers:

    archopt hf-run train.py --optim archopt_muon --learning_rate 0.02 ...
    accelerate launch --multi_gpu --num_processes 2 -m archopt_plugins.cli hf-run train.py ...
    torchrun --nproc_per_node 2 -m archopt_plugins.cli hf-run train.py ...

``-m MODULE`` runs a module instead of a file (``archopt hf-run -m my_pkg.train ...``).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any


def run_script(script: str, script_args: list[str], module: bool = False) -> int:
    """Enable archopt's Trainer names, then run ``script`` (a path, or a module name) as ``__main__``."""
    from .enable import disable, enable, is_enabled

    was_enabled = is_enabled()
    enable()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    group_before = _process_group_initialized()
    try:
        if module:
            sys.argv = [script, *script_args]
            runpy.run_module(script, run_name="__main__", alter_sys=True)
        else:
            path = Path(script)
            if not path.is_file():
                raise FileNotFoundError(f"archopt hf-run: no script at {script!r}")
            sys.argv = [str(path), *script_args]
            sys.path.insert(0, str(path.resolve().parent))
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:  # the script's own exit code
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        if not was_enabled:
            disable()  # leave the process as found (matters when called in-process, e.g. from tests)
        if not group_before and _process_group_initialized():
            # The Trainer (accelerate) started a process group and never closes it; left to the
            # interpreter's exit, gloo's threads can be torn down mid-flight ("terminate called
            # without an active exception", SIGABRT) and a finished run exits non-zero.
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _process_group_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _command(args: argparse.Namespace) -> int:
    return run_script(args.script, list(args.script_args), module=args.module)


def add_hf_run_command(subparsers: Any) -> None:
    """Register ``hf-run`` on the ``archopt`` command's subparsers."""
    p = subparsers.add_parser(
        "hf-run", help="run an HF Trainer script unchanged, with --optim archopt_<name> available",
        description="Runs SCRIPT with ARGS after archopt_plugins.integrations.hf.enable(): a script that uses "
                    "HfArgumentParser(TrainingArguments) and Trainer accepts --optim archopt_<name> and "
                    "--optim_args \"k=v,...\" without edits.")
    p.add_argument("-m", dest="module", action="store_true", help="SCRIPT is a module name, run like python -m")
    p.add_argument("script", help="the training script (or module with -m)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    p.set_defaults(func=_command)
