"""Process set-up for DeepSpeed on CPU in tests and benchmarks: no C++ op is ever compiled.

REFERENCES.md §1: ``DS_ACCELERATOR=cpu``, gloo, ``TORCH_COMPILE_DISABLE=1``, one
``TORCH_EXTENSIONS_DIR`` per venv. DeepSpeed 0.19's communication backend also JIT-builds a
shared-memory all-reduce op (``ShareMemCommBuilder``) at ``init_distributed`` — minutes of g++ on
a 2-core machine, and a hang while another process holds the build lock. It is only a fast path
for inference all-reduces; marking it incompatible makes DeepSpeed use plain gloo collectives.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cpu_environment() -> dict[str, str]:
    """Environment variables for a process that will import deepspeed on CPU."""
    venv = Path(sys.prefix)
    return {"DS_ACCELERATOR": "cpu", "TORCH_COMPILE_DISABLE": "1", "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": str(venv / "torch_extensions"), "TOKENIZERS_PARALLELISM": "false"}


def prepare_deepspeed() -> None:
    """Call before deepspeed.init_distributed / deepspeed.initialize in the process."""
    for key, value in cpu_environment().items():
        os.environ.setdefault(key, value)
    import deepspeed.ops as ops

    ops.__compatible_ops__ = {**ops.__compatible_ops__, "deepspeed_shm_comm": False}
