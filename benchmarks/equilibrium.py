"""Does the measured angular update of scale-invariant weights reach the theory's equilibrium?

A small normalized network (an MLP whose hidden linears feed LayerNorms directly, so detection
flags them scale-invariant) learns a noisy random-teacher classification task. For SGD with
momentum and for AdamW, ``GeometryMonitor`` measures each step's angle of the flagged weights and
reports the prediction beside it (REFERENCES.md §3):

* SGD, momentum μ:  √(2ηλ/(1+μ));
* AdamW, β₁:        √(2ηλ·(1−β₁)/(1+β₁)).

The flagged weights start 3× larger than their initialisation (the function is unchanged: they are
scale-invariant), so the angle starts ~9× below equilibrium and has to converge to it. Claim checked:
after ~3/(ηλ) steps the measured angle (mean over the flagged weights, averaged over the window
[3, 4]/(ηλ), then over seeds) is within 10% of the prediction. Also reported: per seed, the first
time (in units of 1/(ηλ)) from which the 200-step running mean stays within 10%. The plot shows
measured against predicted over time (first seed).

    .venv/bin/python benchmarks/equilibrium.py            # ~3-10 minutes on 2 shared cores; writes its section
    .venv/bin/python benchmarks/equilibrium.py --quick    # smoke run, prints only
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import ROOT, machine_line, write_section  # noqa: E402

import archopt_plugins as ao  # noqa: E402
from archopt_plugins.monitor import GeometryMonitor  # noqa: E402
from archopt_plugins.roles.scale_invariance import detect_scale_invariance  # noqa: E402

MARK = "benchmarks/equilibrium.py"
PLOT = "docs/equilibrium.png"
KEY = "geometry/scale_invariant/"


class NormMLP(nn.Module):
    """Linear (no bias) → LayerNorm → GELU blocks: every hidden linear is scale-invariant."""

    def __init__(self, d_in: int = 32, width: int = 128, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width, bias=False), nn.LayerNorm(width), nn.GELU()]
            d = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class Task:
    teacher: nn.Module
    noise: float = 0.3  # label noise keeps the gradient noisy, the regime the theory assumes

    def batch(self, gen: torch.Generator, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, 32, generator=gen)
        with torch.no_grad():
            y = self.teacher(x).argmax(dim=1)
        flip = torch.rand(size, generator=gen) < self.noise
        y = torch.where(flip, torch.randint(0, 10, (size,), generator=gen), y)
        return x, y


def make_task(seed: int) -> Task:
    torch.manual_seed(seed + 100)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    return Task(teacher)


@dataclass
class Run:
    label: str
    lr: float
    weight_decay: float
    predicted: float
    steps: list[int]
    measured: list[float]
    seconds: float

    @property
    def eta_lambda(self) -> float:
        return self.lr * self.weight_decay

    def window_mean(self, lo: float, hi: float) -> float:
        vals = [m for s, m in zip(self.steps, self.measured) if lo <= s * self.eta_lambda <= hi]
        return sum(vals) / len(vals)

    def settle_time(self, within: float = 0.1, smooth: int = 200) -> float | None:
        """Earliest ηλ·t from which the running mean stays within ``within`` of the prediction."""
        running, last_bad = [], -1
        for i in range(len(self.measured)):
            window = self.measured[max(0, i - smooth + 1):i + 1]
            running.append(sum(window) / len(window))
            if abs(running[-1] / self.predicted - 1) > within:
                last_bad = i
        if last_bad + 1 >= len(self.steps):
            return None
        return self.steps[last_bad + 1] * self.eta_lambda


def scale_up_(model: nn.Module, names: set[str], factor: float) -> None:
    """Multiply the scale-invariant weights by ``factor``: same function, ``factor``² smaller effective lr."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.mul_(factor)


def train(label: str, model: NormMLP, optimizer: torch.optim.Optimizer, lr: float, wd: float, steps: int,
          seed: int) -> Run:
    task = make_task(seed)
    gen = torch.Generator().manual_seed(seed)
    monitor = GeometryMonitor(optimizer, spectral=False)
    loss_fn = nn.CrossEntropyLoss()
    xs, ys, predicted = [], [], float("nan")
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = task.batch(gen)
        loss_fn(model(x), y).backward()
        monitor.before_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        m = monitor.after_step()
        xs.append(step)
        ys.append(m[KEY + "angular_update"])
        predicted = m[KEY + "equilibrium_angular_update"]
    return Run(label, lr, wd, predicted, xs, ys, time.perf_counter() - start)


def invariant_names(model: nn.Module) -> set[str]:
    report = detect_scale_invariance(model, torch.randn(16, 32))
    names = set(report.invariant)
    if len(names) != 3:
        raise RuntimeError(f"expected the 3 hidden linears to be flagged scale-invariant, got {sorted(names)}: "
                           f"{report.note}; rejected: {report.rejected}")
    return names


def sgd_run(steps_per_unit: int, units: float, seed: int, init_scale: float) -> Run:
    lr, wd, momentum = 0.1, 1.0 / steps_per_unit / 0.1, 0.9
    torch.manual_seed(seed)
    model = NormMLP()
    flagged = invariant_names(model)
    scale_up_(model, flagged, init_scale)
    named = dict(model.named_parameters())
    # role "scale_invariant" names the group in the monitor's metrics (a plain torch optimizer has no plan)
    groups = [{"params": [named[n] for n in sorted(flagged)], "weight_decay": wd, "role": "scale_invariant"},
              {"params": [p for n, p in named.items() if n not in flagged], "weight_decay": 0.0, "lr": 0.01,
               "role": "rest"}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return train(f"SGD, momentum {momentum}, lr {lr}, weight decay {wd:g}", model, opt, lr, wd,
                 int(units * steps_per_unit), seed)


def adamw_run(steps_per_unit: int, units: float, seed: int, init_scale: float) -> Run:
    lr = 2e-3
    wd = 1.0 / steps_per_unit / lr
    torch.manual_seed(seed)
    model = NormMLP()
    # ArchOpt's "adamw": the plan flags the three hidden linears (the probe needs a batch: a plain MLP
    # has no HF dummy_inputs), and the monitor aggregates them under geometry/scale_invariant/...
    opt = ao.build_optimizer(model, "adamw", lr=lr, weight_decay=wd, betas=(0.9, 0.999),
                             probe_inputs=torch.randn(16, 32), overrides={"output": {"weight_decay": 0.0}})
    flagged = {e.fqn for e in opt.plan.entries if e.scale_invariant}
    if len(flagged) != 3:
        raise RuntimeError(f"expected 3 scale-invariant weights in the plan, got {sorted(flagged)}")
    scale_up_(model, flagged, init_scale)
    return train(f"AdamW (ArchOpt), betas (0.9, 0.999), lr {lr:g}, weight decay {wd:g}", model, opt, lr, wd,
                 int(units * steps_per_unit), seed)


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        t = [s * run.eta_lambda for s in run.steps]
        smooth = [sum(run.measured[max(0, i - 49):i + 1]) / len(run.measured[max(0, i - 49):i + 1])
                  for i in range(len(run.measured))]
        ax.plot(t, run.measured, alpha=0.25, linewidth=0.6, label="measured (per step)")
        ax.plot(t, smooth, linewidth=1.5, label="measured (50-step mean)")
        ax.set_yscale("log")
        ax.axhline(run.predicted, color="k", linestyle="--", label="predicted equilibrium")
        ax.axhspan(0.9 * run.predicted, 1.1 * run.predicted, color="k", alpha=0.08, label="±10%")
        ax.axvline(3.0, color="gray", linestyle=":")
        ax.set_xlabel("ηλ · step")
        ax.set_ylabel("angular update per step (rad)")
        ax.set_title(run.label, fontsize=9)
        ax.set_ylim(0.05 * run.predicted, 3 * run.predicted)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(runs: list[Run], command: str, steps_per_unit: int, seeds: list[int], init_scale: float) -> str:
    lines = [
        "## Rotational equilibrium of scale-invariant weights (benchmarks/equilibrium.py)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line()}",
        "",
        "A normalized MLP (3 × [Linear without bias → LayerNorm → GELU], width 128, then a linear head) on a "
        "random-teacher 10-class task with 30% label noise, batch 64. Scale-invariance detection flags the three "
        "hidden linears; `GeometryMonitor` measures their angle per step (mean over the three) and predicts the "
        f"equilibrium. ηλ = {1 / steps_per_unit:g} for both optimizers, so 1/(ηλ) = {steps_per_unit} steps. The "
        f"flagged weights start {init_scale:g}× their initialisation (same function), so the angle starts far below "
        f"equilibrium. Seeds {seeds}.",
        "",
        "| optimizer | predicted angle | measured, ηλ·t ∈ [3, 4] (mean over seeds) | error (per seed) | "
        "measured, ηλ·t ∈ [1, 2] | 200-step mean stays within 10% from ηλ·t = (per seed) | wall s (total) |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for label in dict.fromkeys(r.label for r in runs):
        group = [r for r in runs if r.label == label]
        predicted = group[0].predicted
        late = [r.window_mean(3.0, 4.0) for r in group]
        early = [r.window_mean(1.0, 2.0) for r in group]
        mean_late = sum(late) / len(late)
        errors = ", ".join(f"{100 * (x / predicted - 1):+.1f}%" for x in late)
        settle = ", ".join("never" if (t := r.settle_time()) is None else f"{t:.2f}" for r in group)
        lines.append(f"| {label} | {predicted:.4g} | {mean_late:.4g} ({100 * (mean_late / predicted - 1):+.1f}%) | "
                     f"{errors} | {sum(early) / len(early):.4g} | {settle} | {sum(r.seconds for r in group):.0f} |")
        verdicts.append((label.split(",")[0], abs(mean_late / predicted - 1) <= 0.1))
    lines += ["", f"![measured against predicted angular update]({PLOT})", ""]
    lines.append("Within 10% after 3/(ηλ) steps (mean over seeds): "
                 + ", ".join(f"{name}: **{'yes' if ok else 'no'}**" for name, ok in verdicts) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps-per-unit", type=int, default=1000, help="1/(ηλ) in steps")
    parser.add_argument("--units", type=float, default=4.0, help="run length in units of 1/(ηλ)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--init-scale", type=float, default=3.0, help="start the invariant weights this much larger")
    parser.add_argument("--quick", action="store_true", help="short run (1/(ηλ) = 100 steps); prints only")
    args = parser.parse_args()
    if args.quick:
        args.steps_per_unit, args.seeds = 100, "0"
    torch.set_num_threads(1)  # tiny model: one thread is as fast, and the machine is shared
    seeds = [int(x) for x in args.seeds.split(",")]
    runs = []
    for make in (sgd_run, adamw_run):
        for seed in seeds:
            runs.append(make(args.steps_per_unit, args.units, seed, args.init_scale))
            print(f"  {runs[-1].label} seed {seed}: {runs[-1].window_mean(3.0, 4.0):.4g} vs {runs[-1].predicted:.4g}",
                  flush=True)
    command = ".venv/bin/python benchmarks/equilibrium.py" + (" --quick" if args.quick else "")
    if not args.quick and (args.steps_per_unit, args.units, args.seeds, args.init_scale) != (1000, 4.0, "0,1,2", 3.0):
        command += (f" --steps-per-unit {args.steps_per_unit} --units {args.units} --seeds {args.seeds} "
                    f"--init-scale {args.init_scale}")
    text = render(runs, command, args.steps_per_unit, seeds, args.init_scale)
    print(text)
    if not args.quick:
        first = {}
        for r in runs:
            first.setdefault(r.label, r)
        plot(list(first.values()), ROOT / PLOT)
        write_section(MARK, text)
        print(f"wrote {ROOT / 'BENCHMARKS.md'} and {ROOT / PLOT}")


if __name__ == "__main__":
    main()
