"""Quality check: each structured preconditioner trains the quickstart model without diverging.

The quickstart's small Llama (hidden 128, 4 layers, GQA; built from a config) on the embedded
corpus (Python standard library bytes), the quickstart's schedule (warmup + cosine), the same
initial weights and batches for every run. Runs: AdamW (``recipes/quickstart.yaml``'s tuned baseline), then
``shampoo``, ``one_sided_shampoo``, ``soap`` and ``adafactor`` with their default hyperparameters
(no tuning: this checks stability, not the best achievable loss), AdamW beside them at the
quickstart's ``adamw_lr``.

A run *diverges* if any loss is non-finite or its final validation loss is not below the first
evaluation's. Loss curves go to ``runs/preconditioner_quality/loss.png`` (and ``docs/``), raw
histories to ``histories.json``; the table to this script's section of BENCHMARKS.md.

    .venv/bin/python benchmarks/preconditioner_quality.py                      # 300 steps per run
    .venv/bin/python benchmarks/preconditioner_quality.py --steps 40 --smoke   # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from archopt_plugins.recipe.data import load_stdlib_corpus
from archopt_plugins.recipe.training import History, ModelConfig, TrainConfig, build_llama, train

ROOT = Path(__file__).resolve().parents[1]
MARK = "benchmarks/preconditioner_quality.py"
AUX = {"adamw_lr": 3e-3, "weight_decay": 0.0}
RUNS = {
    # recipes/quickstart.yaml's baseline: the best AdamW lr of 1e-3, 3e-3, 6e-3 in a 300-step probe
    "adamw": ("adamw", {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.0}),
    "shampoo": ("shampoo", dict(AUX)),
    "one_sided_shampoo": ("one_sided_shampoo", dict(AUX)),
    "soap": ("soap", dict(AUX)),
    "adafactor": ("adafactor", dict(AUX)),
}


def plot(histories: dict[str, History], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, h in histories.items():
        line, = ax.plot(h.steps, h.train_loss, alpha=0.25, linewidth=0.8)
        ax.plot(h.eval_steps, h.val_loss, marker="o", markersize=3, color=line.get_color(), label=f"{label} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title("structured preconditioners on the quickstart model (stdlib bytes)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def diverged(h: History) -> bool:
    losses = h.train_loss + h.val_loss
    return not all(math.isfinite(x) for x in losses) or h.val_loss[-1] >= h.val_loss[0]


def table(histories: dict[str, History]) -> str:
    base = histories["adamw"]
    lines = ["| run | hyperparameters | final train (last 20) | final val | steps to AdamW's final val | "
             "wall s | diverged |", "|---|---|---|---|---|---|---|"]
    for label, h in histories.items():
        name, hp = RUNS[label]
        tail = h.train_loss[-20:]
        reached = h.first_step_reaching(base.val_loss[-1])
        hp_text = ", ".join(f"{k}={v}" for k, v in hp.items())
        lines.append(f"| {label} | {hp_text} | {sum(tail) / len(tail):.4f} | {h.val_loss[-1]:.4f} | "
                     f"{'not reached' if reached is None else reached} | {h.wall_seconds[-1]:.0f} | "
                     f"{'YES' if diverged(h) else 'no'} |")
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
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="write nothing to BENCHMARKS.md or docs/")
    parser.add_argument("--only", nargs="*", help="run labels to run (adamw always runs: it is the reference)")
    args = parser.parse_args()
    smoke = args.smoke
    cfg = TrainConfig(steps=args.steps, eval_every=max(5, min(25, args.steps // 4)))
    model_cfg = ModelConfig()
    corpus = load_stdlib_corpus(max_bytes=16_000_000)
    histories = {}
    load = []  # 1-minute load averages after each run (the machine is shared)
    for label, (name, hp) in RUNS.items():
        if args.only and label != "adamw" and label not in args.only:
            continue
        model = build_llama(model_cfg, seed=cfg.seed)
        histories[label] = train(label, model, corpus, cfg, name, hp, progress=False)
        load.append(os.getloadavg()[0])
        h = histories[label]
        print(f"{label:18s} val {h.val_loss[-1]:.4f}  wall {h.wall_seconds[-1]:.0f}s  "
              f"{'DIVERGED' if diverged(h) else 'ok'}", flush=True)
    out = ROOT / "runs" / "preconditioner_quality"
    out.mkdir(parents=True, exist_ok=True)
    plot(histories, out / "loss.png")
    (out / "histories.json").write_text(json.dumps(
        {"train": asdict(cfg), "model": asdict(model_cfg), "runs": {k: asdict(h) for k, h in histories.items()}},
        indent=1))
    text = table(histories)
    print(text)
    if smoke:
        return
    shutil.copyfile(out / "loss.png", ROOT / "docs" / "preconditioner_quality.png")
    command = "python " + " ".join(["benchmarks/preconditioner_quality.py", *sys.argv[1:]])
    write_section("\n".join([
        "## Structured preconditioners: quality on the quickstart model",
        "",
        f"Command: `{command}` — {datetime.date.today().isoformat()}, {platform.machine()} with "
        f"{os.cpu_count()} cores, shared with other developers' jobs (1-minute load average "
        f"{min(load):.1f}–{max(load):.1f} after the runs; wall times grow with it); torch {torch.__version__}.",
        "",
        f"Quickstart model ({model_cfg.hidden_size} hidden, {model_cfg.num_layers} layers) on stdlib bytes, "
        f"{cfg.steps} steps of {cfg.batch_size}×{cfg.seq_len} bytes, warmup {cfg.warmup_steps} + cosine to "
        f"{cfg.final_lr_fraction}× peak, same init and batches for every run. Each rule at its default "
        "hyperparameters (untuned); embeddings, head and norms run AdamW beside it. Curves: "
        "`docs/preconditioner_quality.png` (validation markers, faint training lines).",
        "",
        text,
    ]))
    print(f"wrote the {MARK} section of BENCHMARKS.md and docs/preconditioner_quality.png")


if __name__ == "__main__":
    main()
