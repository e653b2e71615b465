"""Shampoo and SOAP step time and state bytes per parameter against PyPI peers, side by side, on CPU.

Peers (pinned in requirements/bench.txt; install with
``.venv/bin/python -m pip install -r requirements/bench.txt``):

* pytorch-optimizer ``Shampoo`` (two-sided, no grafting, momentum) and ``SOAP``;
* heavyball ``SOAP``, eager (torch.compile disabled) and as shipped (torch.compile; compile time is
  kept out of the timing by the warm-up cycle).

Every optimizer gets the same parameters (the matrices of one width-256 transformer block: q, k,
v, o 256×256, gate/up 768×256, down 256×768), the same fixed gradients and the same
preconditioning frequency (10). A *cycle* is 10 steps, so each contains exactly one root /
eigenbasis recomputation for every optimizer; the reported time is the median over repeats of a
cycle's mean step time, optimizers interleaved within each repeat (the machine may be shared).
State bytes are every state tensor an optimizer holds (ndim ≥ 1) divided by the parameter count.

ArchOpt runs with ``block_size`` 1024 (no blocking at these sizes, like the peers). Besides its
default Shampoo (Adam grafting keeps one extra m·n moment) it runs ``graft="none"``, which keeps the
same state as pytorch-optimizer's Shampoo.

    .venv/bin/python benchmarks/preconditioners.py            # full run; rewrites its BENCHMARKS.md section
    .venv/bin/python benchmarks/preconditioners.py --quick    # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import archopt_plugins as ao

ROOT = Path(__file__).resolve().parents[1]
MARK = "benchmarks/preconditioners.py"
FREQ = 10
SHAPES = [(256, 256)] * 4 + [(768, 256)] * 2 + [(256, 768)]


def make_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(0.02 * torch.randn(*s, generator=gen)) for s in SHAPES]


def make_grads(scale: float = 1.0, count: int = 3) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[scale * torch.randn(*s, generator=gen) for s in SHAPES] for _ in range(count)]


def probe_small_gradients(factory: Callable, scale: float = 1e-3) -> str:
    """Two cycles on gradients of LLM-like scale: 'ok', or the error a peer raises."""
    try:
        runner = Runner(factory, make_grads(scale))
        runner.cycle()
        runner.cycle()
    except Exception as err:
        return f"fails: {type(err).__name__}: {str(err).splitlines()[0][:70]}"
    finite = all(torch.isfinite(p).all() for p in runner.params)
    return "ok" if finite else "non-finite parameters"


def heavyball_soap(params, compiled: bool):
    import heavyball
    import heavyball.utils as hu

    # heavyball reads these module globals each call; eager means every fused function runs plainly.
    hu.compile_mode = "max-autotune-no-cudagraphs" if compiled else None
    hu.compile_mode_recommended_to_none = "max-autotune-no-cudagraphs" if compiled else None
    return heavyball.SOAP(params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01,
                          precondition_frequency=FREQ, use_precond_schedule=False, max_precond_dim=4096)


def contenders() -> dict[str, dict[str, Callable]]:
    import pytorch_optimizer as po

    return {
        "Shampoo": {
            "archopt shampoo (Adam graft, default)": lambda ps: ao.build_optimizer(
                ps, "shampoo", lr=1e-3, betas=(0.9, 0.999), precondition_frequency=FREQ, block_size=1024),
            "archopt shampoo (graft none)": lambda ps: ao.build_optimizer(
                ps, "shampoo", lr=1e-3, betas=(0.9, 0.999), precondition_frequency=FREQ, block_size=1024,
                graft="none"),
            "archopt one_sided_shampoo": lambda ps: ao.build_optimizer(
                ps, "one_sided_shampoo", lr=1e-3, betas=(0.9, 0.999), precondition_frequency=FREQ, block_size=1024),
            "pytorch-optimizer Shampoo": lambda ps: po.Shampoo(ps, lr=1e-3, momentum=0.9,
                                                               preconditioning_compute_steps=FREQ),
        },
        "SOAP": {
            "archopt soap": lambda ps: ao.build_optimizer(ps, "soap", precondition_frequency=FREQ, block_size=1024),
            "pytorch-optimizer SOAP": lambda ps: po.SOAP(ps, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01,
                                                         precondition_frequency=FREQ, max_precondition_dim=4096),
            "heavyball SOAP (eager)": lambda ps: heavyball_soap(ps, compiled=False),
            "heavyball SOAP (torch.compile)": lambda ps: heavyball_soap(ps, compiled=True),
        },
    }


def state_bytes(state) -> int:
    """Bytes of every tensor with ndim >= 1 in an optimizer's state (nested dicts/lists walked)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() if state.ndim >= 1 else 0
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


class Runner:
    """One optimizer on its own copy of the parameters, stepping through the shared gradients."""

    def __init__(self, factory: Callable, grads: list[list[torch.Tensor]]) -> None:
        self.params = make_params()
        self.opt = factory(self.params)
        self.grads, self.steps = grads, 0

    def cycle(self) -> float:
        """FREQ steps; returns their mean step time (only ``step()`` is timed)."""
        total = 0.0
        for _ in range(FREQ):
            # Fresh copies: pytorch-optimizer's Shampoo modifies p.grad in place.
            for p, g in zip(self.params, self.grads[self.steps % len(self.grads)]):
                p.grad = g.clone()
            start = time.perf_counter()
            self.opt.step()
            total += time.perf_counter() - start
            self.steps += 1
        return total / FREQ

    def bytes_per_param(self) -> float:
        return state_bytes(dict(self.opt.state)) / sum(p.numel() for p in self.params)


LOAD: list[float] = []  # 1-minute load averages seen during the run (the machine is shared)


def run(repeats: int, only: set[str] | None) -> list[dict]:
    grads = make_grads()
    rows = []
    for algo, group in contenders().items():
        runners, failed = {}, {}
        for label, factory in group.items():
            if only and not any(o in label for o in only):
                continue
            try:
                runners[label] = Runner(factory, grads)
                runners[label].cycle()  # warm-up: first roots/bases, torch.compile, allocator
            except Exception as err:  # a peer that fails is reported as failing, not dropped silently
                failed[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
                runners.pop(label, None)
            print(f"  warmed up {label}", file=sys.stderr)
        times: dict[str, list[float]] = {label: [] for label in runners}
        for _ in range(repeats):
            LOAD.append(os.getloadavg()[0])
            for label, runner in list(runners.items()):
                try:
                    times[label].append(runner.cycle())
                except Exception as err:
                    failed[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
                    runners.pop(label)
        rows += [{"algo": algo, "label": label, "error": error} for label, error in failed.items()]
        for label, runner in runners.items():
            assert all(torch.isfinite(p).all() for p in runner.params), label
            rows.append({"algo": algo, "label": label, "ms": 1e3 * statistics.median(times[label]),
                         "spread": 1e3 * (max(times[label]) - min(times[label])),
                         "bytes": runner.bytes_per_param(), "small": probe_small_gradients(group[label])})
    for algo in {r["algo"] for r in rows}:
        peers = [r for r in rows if r["algo"] == algo and not r["label"].startswith("archopt") and "error" not in r]
        if not peers:
            continue
        fastest = min(peers, key=lambda r: r["ms"])
        smallest = min(r["bytes"] for r in peers)
        for r in rows:
            if r["algo"] == algo and "error" not in r:
                r["time_ratio"], r["fastest_peer"] = r["ms"] / fastest["ms"], fastest["label"]
                r["bytes_ratio"] = r["bytes"] / smallest
    return rows


def render(rows: list[dict], command: str, repeats: int) -> str:
    from importlib.metadata import version

    versions = (f"torch {torch.__version__}, pytorch-optimizer {version('pytorch-optimizer')}, "
                f"heavyball {version('heavyball')}")
    lines = [
        "## Structured preconditioners: step time and state (CPU)",
        "",
        f"Command: `{command}` — {datetime.date.today().isoformat()}, {platform.machine()} "
        f"{platform.processor() or ''} with {os.cpu_count()} cores, shared with other developers' jobs "
        f"while it ran (1-minute load average {min(LOAD, default=0):.0f}–{max(LOAD, default=0):.0f} during the "
        f"timed repeats); {torch.get_num_threads()} torch threads; {versions}.",
        "",
        f"Parameters: one width-256 transformer block's matrices ({', '.join('x'.join(map(str, s)) for s in SHAPES)}; "
        f"{sum(a * b for a, b in SHAPES) / 1e6:.2f}M numbers), fixed gradients, preconditioning every {FREQ} "
        f"steps for everyone. Time: median over {repeats} interleaved repeats of a {FREQ}-step cycle's mean "
        "step time (each cycle holds one root/eigenbasis recomputation); spread = max − min over repeats. "
        "Ratios are against the fastest (smallest) peer of the same algorithm.",
        "",
        "Timing gradients are N(0, 1); the last column reruns two cycles with 1e-3·N(0, 1) gradients (the scale of "
        "an LLM's), where an absolute epsilon meets eigenvalues ~1e-6·n.",
        "",
        "| algorithm | optimizer | ms / step | spread | × fastest peer | state bytes / param | × smallest peer "
        "| 1e-3-scale gradients |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['algo']} | {r['label']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['algo']} | {r['label']} | {r['ms']:.1f} | {r['spread']:.1f} | "
                     f"{r.get('time_ratio', float('nan')):.2f} | {r['bytes']:.2f} | "
                     f"{r.get('bytes_ratio', float('nan')):.2f} | {r['small']} |")
    return "\n".join(lines)


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"<!-- {MARK} -->\n{text}\n<!-- /{MARK} -->"
    pattern = re.compile(rf"<!-- {re.escape(MARK)} -->.*?<!-- /{re.escape(MARK)} -->", re.S)
    updated = (pattern.sub(lambda _: block, current) if pattern.search(current)
               else current.rstrip() + "\n\n" + block + "\n")
    path.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, eager peers only, write nothing")
    parser.add_argument("--only", nargs="*", help="substrings of optimizer labels to run")
    args = parser.parse_args()
    only = set(args.only) if args.only else None
    if args.quick:
        only = only or {"archopt", "pytorch-optimizer", "eager"}
    rows = run(1 if args.quick else args.repeats, only)
    if args.quick:
        print(json.dumps(rows, indent=1))
    command = "python " + " ".join(["benchmarks/preconditioners.py", *sys.argv[1:]])
    text = render(rows, command, 1 if args.quick else args.repeats)
    print(text)
    if not args.quick:
        write_section(text)
        print(f"wrote the {MARK} section of {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
