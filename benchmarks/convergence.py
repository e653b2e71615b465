"""Convergence on the CPU validation recipe: archopt's default plan against AdamW tuned over an LR grid.

For every seed it runs ``recipes/validation_cpu.yaml`` through ``archopt run`` (the default plan
and each AdamW learning rate, same initial weights, same batches, same steps), the runs spread over
``--processes`` parallel processes (``archopt run --only``). Then:

- AdamW's best LR is the one with the lowest final validation loss averaged over seeds; the
  grid must bracket it (the best is not at an edge), and the script says so either way;
- per seed, the target is that AdamW run's final validation loss; the table gives the steps and
  training seconds archopt needed to reach it, against what AdamW needed to reach its own final
  value (evaluation every ``evaluation.every_steps`` steps, so the step ratio has that resolution);
- wall-clock two ways: the training seconds each run measured (on a shared machine, runs at
  different moments see different load), and the step ratio times the per-step time ratio measured
  by interleaving archopt and AdamW steps in one process (both see the same load);
- the out-of-distribution losses (``evaluation.ood``) of archopt and the tuned AdamW.

Targets from the issue: ≤ 0.5× the steps and ≤ 0.55× the wall-clock of tuned AdamW.

    .venv/bin/python benchmarks/convergence.py                      # full: 2 seeds × (1 + 4) runs × 300 steps
    .venv/bin/python benchmarks/convergence.py --steps 60 --no-write  # a short check of the pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from archopt_plugins.recipe.history import RunHistory, RunSpec  # noqa: E402
from archopt_plugins.recipe.validate import load_recipe  # noqa: E402

MARK = "benchmarks/convergence.py"
RECIPE = ROOT / "recipes" / "validation_cpu.yaml"
PLOT = "docs/convergence.png"


def launch(seed: int, labels: list[str], sets: list[str], out: Path, tag: str) -> subprocess.Popen:
    """One ``archopt run`` process doing ``labels`` of the recipe for ``seed``."""
    command = [sys.executable, "-m", "archopt_plugins.cli", "run", str(RECIPE), "--out", str(out),
               "--set", f"seed={seed}", "--set", "logging.progress=false"]
    for item in sets:
        command += ["--set", item]
    for label in labels:
        command += ["--only", label]
    log = open(out.parent / f"{out.name}-{tag}.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))


def split_runs(labels: list[str], parts: int) -> list[list[str]]:
    """Runs into ``parts`` processes, longest first onto the least loaded (Muon steps cost ~1.2 AdamW's)."""
    cost = {label: 1.2 if label.startswith("archopt") else 1.0 for label in labels}
    bins: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(parts)]
    for label in sorted(labels, key=lambda x: -cost[x]):
        load, members = min(bins, key=lambda b: b[0])
        bins.remove((load, members))
        bins.append((load + cost[label], members + [label]))
    return [members for _, members in bins if members]


def load_runs(out: Path) -> dict[str, RunHistory]:
    return {h.label: h for h in (RunHistory.load(p) for p in sorted(out.glob("*/result.json")))}


def interleaved_step_times(recipe, adamw_lr: float, steps: int = 30) -> dict[str, float]:
    """Median seconds per training step of archopt and AdamW, their steps alternating in one process."""
    import torch

    from archopt_plugins import build_optimizer
    from archopt_plugins.recipe.dataset import build_token_data, train_batch
    from archopt_plugins.recipe.models import build_model

    torch.set_num_threads(max(1, recipe.backend.threads))
    data = build_token_data(recipe.model_copy(update={"evaluation": recipe.evaluation.model_copy(
        update={"ood": []})}))
    runs = {"archopt": (recipe.optimizer.name, dict(recipe.optimizer.hparams)),
            "adamw": (recipe.baseline.name, {**recipe.baseline.hparams, "lr": adamw_lr})}
    models = {k: build_model(recipe.model, recipe.vocab_size, recipe.seed) for k in runs}
    opts = {k: build_optimizer(models[k], name, **hp) for k, (name, hp) in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for step in range(steps + 5):
        batch = train_batch(data, recipe.seed, step, recipe.batch.global_batch_size, recipe.batch.seq_len)
        for k in runs:
            began = time.perf_counter()
            loss = models[k](input_ids=batch, labels=batch).loss
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if step >= 5:  # the first steps build state and warm caches
                times[k].append(time.perf_counter() - began)
    return {k: statistics.median(v) for k, v in times.items()}


def analyse(by_seed: dict[int, dict[str, RunHistory]], grid: list[float], main_label: str) -> dict:
    labels = [RunSpec(f"adamw lr={lr:g}", "adamw", {}, {}, "baseline").label for lr in grid]
    mean_final = {label: statistics.mean(runs[label].final_val for runs in by_seed.values()) for label in labels}
    best = min(mean_final, key=mean_final.get)
    best_index = labels.index(best)
    rows = []
    for seed, runs in sorted(by_seed.items()):
        adamw, ours = runs[best], runs[main_label]
        target = adamw.final_val
        ref_step = adamw.first_step_reaching(target)
        step = ours.first_step_reaching(target)
        rows.append({
            "seed": seed, "target": target, "adamw_steps": ref_step, "archopt_steps": step,
            "step_ratio": None if step is None else step / ref_step,
            "adamw_seconds": adamw.seconds_at(ref_step),
            "archopt_seconds": None if step is None else ours.seconds_at(step),
            "archopt_final": ours.final_val,
            "ood": {name: (ours.ood_loss[name][-1], adamw.ood_loss[name][-1]) for name in ours.ood_loss},
            "s_per_step": (ours.train_seconds[-1] / ours.eval_steps[-1], adamw.train_seconds[-1] / adamw.eval_steps[-1]),
        })
        r = rows[-1]
        r["seconds_ratio"] = None if step is None else r["archopt_seconds"] / r["adamw_seconds"]
    return {"best": best, "best_lr": grid[best_index], "bracketed": 0 < best_index < len(grid) - 1,
            "mean_final": mean_final, "rows": rows}


def plot(by_seed: dict[int, dict[str, RunHistory]], result: dict, main_label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = [main_label] + list(result["mean_final"])
    for i, label in enumerate(labels):
        for j, (seed, runs) in enumerate(sorted(by_seed.items())):
            h = runs[label]
            style = dict(color=colors[i % len(colors)], alpha=1.0 if j == 0 else 0.45,
                         linewidth=2.2 if label in (main_label, result["best"]) else 1.0,
                         label=label if j == 0 else None)
            axes[0].plot(h.eval_steps, h.val_loss, **style)
            axes[1].plot(h.train_seconds, h.val_loss, **style)
    for ax, xlabel in zip(axes, ["step", "training seconds (shared machine)"]):
        for row in result["rows"]:
            ax.axhline(row["target"], color="gray", linestyle=":", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(top=min(3.5, axes[0].get_ylim()[1]))
    axes[1].set_ylim(axes[0].get_ylim())
    axes[0].legend(fontsize=8)
    fig.suptitle("validation_cpu: default plan vs AdamW LR grid (dotted: tuned AdamW's final loss per seed; "
                 "faint: other seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x, spec: str) -> str:
    return "not reached" if x is None else format(x, spec)


def markdown(result: dict, recipe, grid: list[float], seeds: list[int], command: str, machine: str,
             step_times: dict[str, float], elapsed: float, processes: int) -> str:
    rows = result["rows"]
    ood_names = list(rows[0]["ood"])
    lines = [
        "## Convergence: default plan vs tuned AdamW on the CPU validation recipe (benchmarks/convergence.py)", "",
        f"Command: `{command}`  ", f"Machine: {machine}; {elapsed / 60:.0f} min for the whole benchmark", "",
        f"Recipe `recipes/validation_cpu.yaml`: {recipe.model.family} {recipe.model.num_layers}×"
        f"{recipe.model.hidden_size} on this interpreter's stdlib bytes, {recipe.schedule.steps} steps × "
        f"{recipe.tokens_per_step} tokens, warmup {recipe.schedule.warmup_steps} + cosine; evaluation every "
        f"{recipe.evaluation.every_steps} steps. archopt: `muon` with {dict(recipe.optimizer.hparams)}. "
        f"AdamW {dict(recipe.baseline.hparams)} over lr ∈ {grid}, seeds {seeds}, same data and steps.", "",
        "AdamW final validation loss by LR (mean over seeds): " + ", ".join(
            f"{label.split('=')[1]}: {v:.4f}" for label, v in result["mean_final"].items())
        + f". Best: **{result['best_lr']:g}** "
        + ("(inside the grid: bracketed)." if result["bracketed"] else "(**at the edge of the grid: not bracketed**)."),
        "",
        "| seed | target (tuned AdamW final val) | AdamW steps | archopt steps | × steps | AdamW train s | archopt train s "
        "| × wall (measured) | archopt final val | " + " | ".join(f"OOD {n}: archopt / AdamW" for n in ood_names) + " |",
        "|" + "---|" * (9 + len(ood_names)),
    ]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['target']:.4f} | {r['adamw_steps']} | {_f(r['archopt_steps'], 'd')} | "
                     f"{_f(r['step_ratio'], '.2f')} | {r['adamw_seconds']:.0f} | {_f(r['archopt_seconds'], '.0f')} | "
                     f"{_f(r['seconds_ratio'], '.2f')} | {r['archopt_final']:.4f} | "
                     + " | ".join(f"{a:.4f} / {b:.4f}" for a, b in r["ood"].values()) + " |")
    step_ratios = [r["step_ratio"] for r in rows if r["step_ratio"] is not None]
    wall = [r["seconds_ratio"] for r in rows if r["seconds_ratio"] is not None]
    per_step = step_times["archopt"] / step_times["adamw"]
    mean_steps = statistics.mean(step_ratios) if len(step_ratios) == len(rows) else None
    lines += [
        "",
        f"Mean over seeds: **{_f(mean_steps, '.2f')}× the steps** (target ≤ 0.5) and "
        f"**{_f(statistics.mean(wall) if len(wall) == len(rows) else None, '.2f')}× the measured training "
        "seconds** (target ≤ 0.55) of tuned AdamW to reach its final validation loss.",
        f"Per-step time measured interleaved in one process (30 steps each, median): archopt "
        f"{step_times['archopt'] * 1e3:.0f} ms, AdamW {step_times['adamw'] * 1e3:.0f} ms ({per_step:.2f}×), so the "
        f"load-independent wall-clock ratio is {_f(None if mean_steps is None else mean_steps * per_step, '.2f')}×.",
        f"Training seconds exclude evaluation; the runs ran as {processes} parallel single-thread processes on a "
        "machine shared with other developers' test runs, so measured seconds are noisy; the interleaved ratio is "
        "the steadier figure.",
        "", f"![validation loss against steps and training seconds]({PLOT})",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="override schedule.steps (a short check)")
    parser.add_argument("--grid", type=float, nargs="+", default=None, help="override the AdamW LR grid")
    parser.add_argument("--out", default="runs/convergence")
    parser.add_argument("--processes", type=int, default=10,
                        help="parallel `archopt run` processes (each seed's runs are split between its share)")
    parser.add_argument("--reuse", action="store_true", help="analyse finished runs under --out without running")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md and the plot")
    args = parser.parse_args()
    sets = [f"schedule.steps={args.steps}"] if args.steps else []
    if args.grid:
        sets.append("baseline.lr_grid=[" + ",".join(repr(x) for x in args.grid) + "]")
    recipe = load_recipe(RECIPE, sets)
    grid = list(recipe.baseline.lr_grid)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    if not args.reuse:
        from archopt_plugins.recipe.runner import run_specs

        labels = [spec.label for spec in run_specs(recipe)]
        per_seed = max(1, args.processes // len(args.seeds))
        procs = {(seed, i): launch(seed, part, sets, out / f"seed{seed}", f"p{i}")
                 for seed in args.seeds for i, part in enumerate(split_runs(labels, per_seed))}
        for (seed, i), proc in procs.items():
            if proc.wait() != 0:
                print(f"seed {seed} process {i} failed; see {out / f'seed{seed}-p{i}.log'}", file=sys.stderr)
                return 1
    by_seed = {seed: load_runs(out / f"seed{seed}") for seed in args.seeds}
    main_label = f"archopt {recipe.optimizer.name}"
    result = analyse(by_seed, grid, main_label)
    step_times = interleaved_step_times(recipe, result["best_lr"])
    elapsed = time.perf_counter() - began
    from sections import machine_line, write_section

    command = "python benchmarks/convergence.py " + " ".join(sys.argv[1:])
    text = markdown(result, recipe, grid, args.seeds, command.strip(), machine_line(), step_times, elapsed,
                    args.processes)
    print(text)
    (out / "convergence.json").write_text(json.dumps({**result, "step_times": step_times}, indent=1, default=str))
    if not args.no_write:
        plot(by_seed, result, main_label, ROOT / PLOT)
        write_section(MARK, text)
        print(f"wrote the {MARK} section of BENCHMARKS.md and {PLOT}")
    else:
        plot(by_seed, result, main_label, out / "convergence.png")
        print(f"plot: {out / 'convergence.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
