"""Writing one benchmark script's section of BENCHMARKS.md (between its own markers), and run metadata.

Each script owns the text between ``<!-- benchmarks/NAME.py -->`` and ``<!-- /benchmarks/NAME.py -->``;
everything else in the file is left as it is (other scripts write their sections concurrently).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def write_section(mark: str, text: str, path: Path | None = None) -> None:
    """Replace (or append) the section between the markers of ``mark`` (e.g. ``benchmarks/equilibrium.py``)."""
    path = path or ROOT / "BENCHMARKS.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n\nEach script rewrites only its own section.\n"
    block = f"<!-- {mark} -->\n{text.rstrip()}\n<!-- /{mark} -->"
    pattern = re.compile(rf"<!-- {re.escape(mark)} -->.*?<!-- /{re.escape(mark)} -->", re.S)
    if pattern.search(current):
        new = pattern.sub(lambda _: block, current)
    else:
        new = current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def machine_line() -> str:
    """Where and when: date, CPU, cores, torch version, threads (the machine may be shared)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{date}; {cpu}, {os.cpu_count()} cores (shared with other developers' jobs), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")
