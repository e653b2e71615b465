"""The end-of-run report: a markdown table and PNG plots comparing the optimizer with its baseline.

The target is the best baseline run's final validation loss (the best learning rate of the grid).
For every run the report gives the first evaluation step at which it reached that target, the
tokens and training seconds (evaluation and checkpoint time excluded) that took, and their ratios
to what the best baseline needed to reach its own final value; final validation and
out-of-distribution losses; and the plots: validation loss against steps, tokens and training
seconds, and each out-of-distribution loss against steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .history import RunHistory
from .schema import Recipe


@dataclass
class Reach:
    label: str
    steps: int | None
    tokens: int | None
    seconds: float | None
    step_ratio: float | None
    seconds_ratio: float | None


def reach_table(histories: dict[str, RunHistory]) -> tuple[float | None, str | None, list[Reach]]:
    """(target loss, best baseline label, per-run reach); no target without a finished baseline."""
    baselines = [h for h in histories.values() if h.kind == "baseline" and h.val_loss]
    if not baselines:
        return None, None, []
    best = min(baselines, key=lambda h: h.final_val)
    target = best.final_val
    ref_steps = best.first_step_reaching(target)
    ref_seconds = best.seconds_at(ref_steps) if ref_steps else None
    rows = []
    for h in histories.values():
        step = h.first_step_reaching(target)
        seconds = h.seconds_at(step) if step is not None else None
        rows.append(Reach(h.label, step, None if step is None else step * h.tokens_per_step, seconds,
                          None if step is None or not ref_steps else step / ref_steps,
                          None if seconds is None or not ref_seconds else seconds / ref_seconds))
    return target, best.label, rows


def _fmt(x: float | None, spec: str) -> str:
    return "not reached" if x is None else format(x, spec)


def markdown_report(recipe: Recipe, histories: dict[str, RunHistory], plot_name: str = "curves.png") -> str:
    target, best, reach = reach_table(histories)
    ood_names = list(recipe.evaluation.ood)
    reach_head = ["steps to target", "× steps", "tokens to target", "train s to target", "× wall"]
    head = ["run", "final train", "final val", *[f"OOD {n}" for n in ood_names],
            *(reach_head if target is not None else []), "train s total"]
    lines = [f"# archopt report: {recipe.name}", "",
             f"{recipe.model.family} model, {recipe.schedule.steps} steps × {recipe.tokens_per_step} tokens, "
             f"{recipe.world_size} process(es) ({recipe.backend.kind}), seed {recipe.seed}.", ""]
    if target is not None:
        lines += [f"Target: the best baseline's final validation loss, **{target:.4f}** ({best}). "
                  "Ratios are to the steps / training seconds that run needed to reach it.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_label = {r.label: r for r in reach}
    for h in histories.values():
        tail = h.train_loss[-max(1, len(h.train_loss) // 10):]
        r = by_label.get(h.label)
        cells = [h.label, _fmt(sum(tail) / len(tail) if tail else None, ".4f"), _fmt(h.final_val, ".4f"),
                 *[_fmt(h.ood_loss[n][-1] if h.ood_loss.get(n) else None, ".4f") for n in ood_names]]
        if target is not None:
            cells += [_fmt(r.steps if r else None, "d"), _fmt(r.step_ratio if r else None, ".2f"),
                      _fmt(r.tokens if r else None, ",d"), _fmt(r.seconds if r else None, ".1f"),
                      _fmt(r.seconds_ratio if r else None, ".2f")]
        cells.append(_fmt(h.train_seconds[-1] if h.train_seconds else None, ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "final train: mean of the last 10% of steps; losses in nats per token; training seconds exclude "
              f"evaluation and checkpoints; evaluation every {recipe.evaluation.every_steps} steps on "
              f"{recipe.evaluation.batches} held-out batches.", "", f"![loss curves]({plot_name})", ""]
    lines += geometry_table(histories)
    skipped = {h.label: h.skipped_steps for h in histories.values() if h.skipped_steps}
    if skipped:
        lines += [f"Steps skipped for non-finite gradients: {skipped}", ""]
    return "\n".join(lines)


GEOMETRY_COLUMNS = ("update_rms", "relative_update", "angular_update", "effective_lr", "weight_norm")


def geometry_table(histories: dict[str, RunHistory]) -> list[str]:
    """Per run and role, the last GeometryMonitor measurement (logging.geometry_every > 0)."""
    lines = []
    for h in histories.values():
        roles: dict[str, dict[str, float]] = {}
        for key, value in h.geometry.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "geometry" and parts[2] in GEOMETRY_COLUMNS:
                roles.setdefault(parts[1], {})[parts[2]] = value
        if not roles:
            continue
        lines += [f"Geometry of {h.label} at its last measurement (`geometry/<role>/<metric>` in metrics.jsonl):",
                  "", "| role | " + " | ".join(GEOMETRY_COLUMNS) + " |", "|" + "---|" * (len(GEOMETRY_COLUMNS) + 1)]
        for role, values in sorted(roles.items()):
            lines.append(f"| {role} | " + " | ".join(_fmt(values.get(c), ".3g") if c in values else "-"
                                                   for c in GEOMETRY_COLUMNS) + " |")
        lines.append("")
    return lines


def plot_curves(recipe: Recipe, histories: dict[str, RunHistory], path: Path, target: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ood_names = list(recipe.evaluation.ood)
    panels = 3 + (1 if ood_names else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.0), squeeze=False)
    axes = axes[0]
    for h in histories.values():
        style = dict(linewidth=2.0 if h.kind == "main" else 1.2, linestyle="-" if h.kind == "main" else "--")
        line, = axes[0].plot(h.eval_steps, h.val_loss, label=h.label, **style)
        axes[0].plot(h.steps, h.train_loss, alpha=0.15, linewidth=0.7, color=line.get_color())
        axes[1].plot([s * h.tokens_per_step for s in h.eval_steps], h.val_loss, color=line.get_color(), **style)
        axes[2].plot(h.train_seconds, h.val_loss, color=line.get_color(), **style)
        for i, name in enumerate(ood_names):
            axes[3].plot(h.eval_steps, h.ood_loss.get(name, []), color=line.get_color(),
                         marker="os^v"[i % 4], markersize=3, **style)
    for ax, xlabel in zip(axes, ["step", "tokens", "training seconds", "step"]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss" if xlabel != "step" or ax is axes[0] else "OOD loss")
        ax.grid(alpha=0.3)
        if target is not None and ax is not axes[-1] or (target is not None and not ood_names):
            ax.axhline(target, color="gray", linewidth=0.8, linestyle=":")
    if ood_names:
        axes[3].set_title(f"out-of-distribution ({', '.join(ood_names)}: o s ^ v)", fontsize=9)
    axes[0].set_title("validation (faint: train)", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{recipe.name}: {recipe.model.family}, {recipe.schedule.steps} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(recipe: Recipe, histories: dict[str, RunHistory], out_dir: Path) -> str:
    """Write report.md and curves.png under ``out_dir``; print and return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target, _, _ = reach_table(histories)
    plot_curves(recipe, histories, out_dir / "curves.png", target)
    text = markdown_report(recipe, histories)
    (out_dir / "report.md").write_text(text)
    print(text)
    print(f"saved {out_dir / 'report.md'} and {out_dir / 'curves.png'}", flush=True)
    return text
