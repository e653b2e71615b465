"""One torchrun launch runs many DeepSpeed cases (``deepspeed_cases.py``); pytest reads their results.

    python -m torch.distributed.run --standalone --nproc_per_node N deepspeed_runner.py OUT CASE [CASE ...]
    deepspeed --num_nodes 1 --num_gpus N deepspeed_runner.py OUT CASE [CASE ...]     # DeepSpeed's launcher

Results (or the traceback of a case that raised) land in ``OUT/<case>.json`` (rank 0) and
``OUT/<case>.rank<r>.json`` for a rank that failed. The adapter is enabled with the one line a
training script needs; no DeepSpeed C++ op is compiled (``deepspeed_env.py``).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "distributed")]
    from deepspeed_env import prepare_deepspeed

    prepare_deepspeed()
    import datetime

    import deepspeed
    import torch
    import torch.distributed as dist

    import archopt_plugins.integrations.deepspeed as archopt_ds

    archopt_ds.enable()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    deepspeed.init_distributed("gloo", timeout=datetime.timedelta(seconds=300))
    from deepspeed_cases import CASES

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    out, names = Path(args[0]), args[1:]
    rank = dist.get_rank()
    for name in names:
        start = time.perf_counter()
        try:
            result = {"ok": True, "result": CASES[name]()}
        except Exception:  # report and go on: the test reading this case fails with the traceback
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
