"""Newton–Schulz throughput on a CUDA GPU against the GPU's measured bf16 matmul rate.

Times ``archopt_plugins/update/newton_schulz.py::newton_schulz`` (the fast path ArchOpt runs, bf16,
5 quintic steps) on one 4096×4096 matrix and on a batch of 1024×4096 matrices, and a plain bf16
matmul in the same run. Reports milliseconds, achieved TFLOP/s, and the fraction of the measured
matmul rate Newton–Schulz reaches (its FLOPs: per step on a wide m×n input, XXᵀ 2m²n, A² 2m³,
B·X 2m²n).

Self-contained: needs only torch ≥ 2.4 with CUDA and this source tree (the Newton–Schulz module is
loaded from its file, so nothing else of the package, and no install, is needed):

    python benchmarks/gpu/newton_schulz_throughput.py --out ns.md        # on the GPU machine
    python benchmarks/gpu/newton_schulz_throughput.py --record ns.md     # anywhere: into BENCHMARKS.md
    python benchmarks/gpu/newton_schulz_throughput.py --write            # both at once, in a checkout

``--record`` copies a result file into this script's section of BENCHMARKS.md, for when the GPU
machine is not the checkout that keeps the file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import re
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MARK = "benchmarks/gpu/newton_schulz_throughput.py"


def load_newton_schulz():
    path = ROOT / "archopt_plugins" / "update" / "newton_schulz.py"
    spec = importlib.util.spec_from_file_location("archopt_newton_schulz", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.newton_schulz


def ns_flops(batch: int, m: int, n: int, steps: int) -> float:
    small, large = min(m, n), max(m, n)  # the implementation iterates on the wide orientation
    return float(batch) * steps * (4.0 * small * small * large + 2.0 * small**3)


def time_cuda(fn, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def measure(batch: int, steps: int, repeats: int, warmup: int) -> tuple[list[dict], float]:
    newton_schulz = load_newton_schulz()
    gen = torch.Generator(device="cuda").manual_seed(0)
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=gen)
    mm_ms = statistics.median(time_cuda(lambda: torch.mm(a, b), repeats, warmup))
    mm_tflops = 2.0 * size**3 / (mm_ms * 1e-3) / 1e12
    rows = []
    for label, shape in (("4096x4096", (1, 4096, 4096)), (f"{batch} x 1024x4096", (batch, 1024, 4096))):
        G = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        times = time_cuda(lambda: newton_schulz(G, steps, "quintic", torch.bfloat16), repeats, warmup)
        ms = statistics.median(times)
        tflops = ns_flops(*shape, steps) / (ms * 1e-3) / 1e12
        rows.append({"label": label, "ms": ms, "spread": max(times) - min(times), "tflops": tflops,
                     "fraction": tflops / mm_tflops})
    return rows, mm_tflops


def render(rows: list[dict], mm_tflops: float, steps: int, repeats: int) -> str:
    device = torch.cuda.get_device_name()
    lines = [
        "## Newton–Schulz throughput (GPU)",
        "",
        "Command: `python benchmarks/gpu/newton_schulz_throughput.py --write`  ",
        f"Machine: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}, Python "
        f"{platform.python_version()}. Date: {datetime.date.today().isoformat()}.  ",
        f"bf16, {steps} quintic steps; medians of {repeats} timed calls (CUDA events). Measured bf16 matmul "
        f"rate (8192³ `torch.mm`): **{mm_tflops:.0f} TFLOP/s**.",
        "",
        "| input | Newton–Schulz (ms) | spread (ms) | achieved TFLOP/s | fraction of matmul rate |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ms']:.3f} | {r['spread']:.3f} | {r['tflops']:.0f} | {r['fraction']:.2f} |")
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n\nEach script rewrites only its own section.\n"
    block = f"<!-- {MARK} -->\n{text.rstrip()}\n<!-- /{MARK} -->"
    pattern = re.compile(rf"<!-- {re.escape(MARK)} -->.*?<!-- /{re.escape(MARK)} -->", re.S)
    new = pattern.sub(lambda _: block, current) if pattern.search(current) else current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="matrices in the 1024x4096 batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the section text to this file")
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    parser.add_argument("--record", type=Path, help="copy a result file (from --out) into BENCHMARKS.md; no GPU")
    args = parser.parse_args()
    if args.record is not None:
        write_section(args.record.read_text())
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (see --record to file a result made elsewhere)")
    rows, mm_tflops = measure(args.batch, args.steps, args.repeats, args.warmup)
    text = render(rows, mm_tflops, args.steps, args.repeats)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
