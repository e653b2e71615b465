"""One torchrun launch runs many distributed cases (each launch costs 7-10 s on a 2-core machine).

    python -m torch.distributed.run --standalone --nproc_per_node N harness.py OUT_DIR CASE [CASE ...]

A case is a function registered with :func:`case` in one of the ``cases_*`` modules; it runs on
every rank and returns a JSON-able dict (rank 0's is kept). Results — or the traceback of a case
that raised — land in ``OUT_DIR/<case>.json``; pytest tests read them (see ``launcher.py``).
Cases that hand files to a later launch (checkpoints saved at one world size, loaded at another)
use :func:`shared_dir`, the folder ``ARCHOPT_SHARED_DIR`` names (the same for every launch).
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

CASES: dict[str, Callable[[], dict]] = {}


def case(fn: Callable[[], dict]) -> Callable[[], dict]:
    CASES[fn.__name__] = fn
    return fn


def shared_dir() -> Path:
    return Path(os.environ["ARCHOPT_SHARED_DIR"])


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out, names = Path(sys.argv[1]), sys.argv[2:]
    for module in sorted(p.stem for p in here.glob("cases_*.py")):
        importlib.import_module(module)
    # Case modules register into the importable module "harness", not into this __main__.
    registry = importlib.import_module("harness").CASES
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))
    rank = dist.get_rank()
    for name in names:
        start = time.perf_counter()
        try:
            result = {"ok": True, "result": registry[name]()}
        except Exception:  # report and go on: the test that reads this case fails with the traceback
            result = {"ok": False, "error": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - start, 2)
        if rank == 0:
            print(f"case {name}: {result['seconds']} s", flush=True)
        if rank == 0 or not result["ok"]:
            suffix = "" if rank == 0 else f".rank{rank}"
            (out / f"{name}{suffix}.json").write_text(json.dumps(result, indent=1))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
