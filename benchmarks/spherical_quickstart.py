"""Does the spherical rule for scale-invariant weights change steps-to-target or out-of-distribution loss?

The quickstart's setting (byte-level Python stdlib corpus, 300 steps, batch 16 × 128 bytes, warmup
+ cosine, the default plan ``"muon"`` with lr 0.02 and AdamW lr 3e-3 beside it, no weight decay)
on models of the quickstart's size (hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 384, tied
embeddings) that *have* scale-invariant weights. The quickstart's own Llama has none (pre-norm, no
QK-norm: detection finds no linear feeding a normalization directly), so the measurement uses

* ``qwen3`` — Qwen3ForCausalLM: per-head QK-norm, so q and k projections are invariant per head;
* ``olmo2`` — Olmo2ForCausalLM: QK-norm over all heads, and norms *before* the residual adds, so
  q, k, o and down projections are invariant as whole matrices.

Compared on the same initial weights and batches: the default plan, and the same plan with
``scale_invariant="spherical"`` (the flagged weights run the hyperball rule: Muon-direction steps
at a fixed norm per invariant block, no weight decay). The spherical lr is picked from a small grid
on seed 0 by final *validation* loss (in-distribution), then both run on the other seeds.

Reported: final validation loss (held-out stdlib files), steps to reach the default plan's final
validation loss (evaluated every 25 steps), and out-of-distribution loss on the recipe sets
``licenses`` (English licence texts) and ``c_headers`` (C headers): text the model never saw.

    .venv/bin/python benchmarks/spherical_quickstart.py            # ~30 min on 2 shared cores
    .venv/bin/python benchmarks/spherical_quickstart.py --quick    # smoke run, prints only
    .venv/bin/python benchmarks/spherical_quickstart.py --render-only   # section again from the saved run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import ROOT, machine_line, write_section  # noqa: E402

from archopt_plugins import plan  # noqa: E402
from archopt_plugins.recipe.corpora import available_ood_sets, load_ood_text  # noqa: E402
from archopt_plugins.recipe.data import load_stdlib_corpus  # noqa: E402
from archopt_plugins.recipe.training import History, ModelConfig, TrainConfig, train  # noqa: E402

MARK = "benchmarks/spherical_quickstart.py"
PLOT = "docs/spherical_quickstart.png"
DEFAULT = {"lr": 0.02, "adamw_lr": 3e-3, "weight_decay": 0.0}  # the quickstart's default plan


def build(family: str, cfg: ModelConfig, seed: int) -> nn.Module:
    import transformers as t

    t.logging.set_verbosity_error()
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
                  tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  use_cache=False)
    if family == "qwen3":
        config, cls = t.Qwen3Config(head_dim=cfg.hidden_size // cfg.num_heads, **common), t.Qwen3ForCausalLM
    elif family == "olmo2":
        config, cls = t.Olmo2Config(**common), t.Olmo2ForCausalLM
    else:
        raise ValueError(f"unknown model family {family!r}; use qwen3 or olmo2")
    torch.manual_seed(seed)
    return cls(config)


@torch.no_grad()
def text_loss(model: nn.Module, data: torch.Tensor, cfg: TrainConfig, batches: int = 8) -> float:
    """Mean loss on fixed random windows of ``data`` (bytes), like the validation evaluation."""
    gen = torch.Generator().manual_seed(20_000 + cfg.seed)
    model.eval()
    total = 0.0
    for _ in range(batches):
        starts = torch.randint(0, data.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = data[starts[:, None] + torch.arange(cfg.seq_len + 1)[None, :]].long()
        total += float(model(input_ids=batch, labels=batch).loss)
    model.train()
    return total / batches


@dataclass
class Result:
    family: str
    label: str
    seed: int
    spherical_lr: float | None
    history: dict
    ood: dict[str, float] = field(default_factory=dict)
    invariant: int = 0

    @property
    def final_val(self) -> float:
        return self.history["val_loss"][-1]

    def steps_to(self, target: float) -> int | None:
        return History(**self.history).first_step_reaching(target)

    def steps_to_interpolated(self, target: float) -> float | None:
        """Step at which validation loss first reaches ``target``, linear between evaluations."""
        steps, losses = self.history["eval_steps"], self.history["val_loss"]
        for i, (step, loss) in enumerate(zip(steps, losses)):
            if loss <= target:
                if i == 0:
                    return float(step)
                s0, l0 = steps[i - 1], losses[i - 1]
                return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        return None


def run_one(family: str, seed: int, spherical_lr: float | None, corpus, ood: dict[str, torch.Tensor],
            cfg: TrainConfig, mcfg: ModelConfig) -> Result:
    cfg = TrainConfig(**{**asdict(cfg), "seed": seed})
    model = build(family, mcfg, seed)
    hparams = dict(DEFAULT)
    label = "default plan (muon)"
    if spherical_lr is not None:
        hparams.update(scale_invariant="spherical", spherical_lr=spherical_lr)
        label = f"spherical on invariant weights, lr {spherical_lr:g}"
    p = plan(model, "muon", **hparams)
    invariant = sum(e.scale_invariant for e in p.entries)
    hist = train(f"{family} {label} s{seed}", model, corpus, cfg, "muon", hparams, progress=False)
    result = Result(family, label, seed, spherical_lr, asdict(hist), invariant=invariant)
    result.ood = {name: text_loss(model, data, cfg) for name, data in ood.items()}
    print(f"  {family} seed {seed} {label}: val {result.final_val:.4f}, "
          + ", ".join(f"{k} {v:.4f}" for k, v in result.ood.items())
          + f", {hist.wall_seconds[-1]:.0f} s", flush=True)
    return result


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def render(results: list[Result], best: dict[str, float], grid: list[float], cfg: TrainConfig, command: str,
           seeds: list[int], ood_names: list[str], machine: str) -> str:
    lines = [
        "## Spherical rule for scale-invariant weights on the quickstart setting "
        "(benchmarks/spherical_quickstart.py)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}",
        "",
        f"Quickstart setting: {cfg.steps} steps, batch {cfg.batch_size} × {cfg.seq_len} bytes, warmup "
        f"{cfg.warmup_steps} + cosine to {cfg.final_lr_fraction:g}×, default plan `muon` (lr 0.02, AdamW lr 3e-3, "
        "no weight decay). Models of the quickstart's size built from Qwen3 and OLMo2 configs, because the "
        "quickstart's Llama (pre-norm, no QK-norm) has no scale-invariant weight. `spherical`: the same plan with "
        f"`scale_invariant=\"spherical\"`; its lr picked from {grid} on seed {seeds[0]} by final validation loss "
        f"(so seed {seeds[0]} favours it; the other seeds do not). Seeds {seeds}. Validation every "
        f"{cfg.eval_every} steps on held-out stdlib files; OOD: {', '.join(ood_names)} (recipe OOD sets, never "
        "trained on). Steps to the default plan's final validation loss are interpolated linearly between "
        "evaluations.",
        "",
        "| model | run | invariant tensors | final val loss (per seed) | steps to default's final val (per seed) | "
        + " | ".join(f"OOD {n} (per seed)" for n in ood_names) + " |",
        "|---|---|---|---|---|" + "---|" * len(ood_names),
    ]
    notes, deltas = [], {}
    for family in dict.fromkeys(r.family for r in results):
        default = {r.seed: r for r in results if r.family == family and r.spherical_lr is None}
        chosen = {r.seed: r for r in results if r.family == family and r.spherical_lr == best.get(family)}
        for rows in (default, chosen):
            reach = []
            for seed, r in rows.items():
                step = r.steps_to_interpolated(default[seed].final_val)
                reach.append("not reached" if step is None else f"{step:.0f}")
            first = next(iter(rows.values()))
            lines.append(f"| {family} | {first.label} | {first.invariant} | "
                         + ", ".join(f"{r.final_val:.4f}" for r in rows.values()) + f" | {', '.join(reach)} | "
                         + " | ".join(", ".join(f"{r.ood[n]:.4f}" for r in rows.values()) for n in ood_names) + " |")
        for seed in chosen:
            d = deltas.setdefault(family, [])
            d.append((seed, chosen[seed].final_val - default[seed].final_val,
                      {n: chosen[seed].ood[n] - default[seed].ood[n] for n in ood_names}))
        sweep = [r for r in results if r.family == family and r.seed == seeds[0] and r.spherical_lr is not None]
        notes.append(f"{family} lr grid (seed {seeds[0]}, final val): "
                     + ", ".join(f"{r.spherical_lr:g}: {r.final_val:.4f}" for r in sweep)
                     + f" (default plan: {default[seeds[0]].final_val:.4f}).")
    lines += ["", *notes, "", "Spherical minus default, per seed (negative: spherical lower):", ""]
    for family, rows in deltas.items():
        for seed, dval, dood in rows:
            lines.append(f"- {family}, seed {seed}: val {dval:+.4f}; "
                         + ", ".join(f"OOD {n} {v:+.4f}" for n, v in dood.items()))
    dvals = [d for rows in deltas.values() for _, d, _ in rows]
    doods = [v for rows in deltas.values() for _, _, dood in rows for v in dood.values()]
    if dvals:
        lower = sum(d < 0 for d in dvals)
        lines += ["", f"Summary: spherical's final validation loss is lower in {lower} of {len(dvals)} (model, seed) pairs "
                  f"(differences {min(dvals):+.4f} to {max(dvals):+.4f}); OOD losses are lower in "
                  f"{sum(v < 0 for v in doods)} of {len(doods)} comparisons (differences {min(doods):+.4f} to "
                  f"{max(doods):+.4f}). {len(seeds)} seed(s), {cfg.steps}-step runs on a shared CPU: a small effect, not a settled one."]
    lines += ["", f"![validation loss, seed {seeds[0]}]({PLOT})"]
    return "\n".join(lines)


def plot(results: list[Result], best: dict[str, float], seed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r.family for r in results))
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families):
        for r in results:
            if r.family == family and r.seed == seed and r.spherical_lr in (None, best.get(family)):
                ax.plot(r.history["eval_steps"], r.history["val_loss"], marker="o", markersize=3, label=r.label)
        ax.set_title(f"{family}: validation loss (seed {seed})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen3,olmo2")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--grid", default="0.02,0.05,0.1", help="spherical lr values tried on the first seed")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="30 steps, one seed, one lr, qwen3; prints only")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the section and plot from runs/spherical_quickstart.json without training")
    args = parser.parse_args()
    saved = ROOT / "runs" / "spherical_quickstart.json"
    if args.render_only:
        data = json.loads(saved.read_text())
        results = [Result(**r) for r in data["results"]]
        cfg = TrainConfig(**data["train"])
        text = render(results, data["best"], data["grid"], cfg, data["command"], data["seeds"], data["ood"],
                      data["machine"])
        print(text)
        plot(results, data["best"], data["seeds"][0], ROOT / PLOT)
        write_section(MARK, text)
        return
    if args.quick:
        args.models, args.seeds, args.grid, args.steps = "qwen3", "0", "0.05", 30
    torch.set_num_threads(args.threads)
    families = args.models.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = [float(x) for x in args.grid.split(",")]
    cfg = TrainConfig(steps=args.steps, eval_every=25 if args.steps >= 50 else 10)
    mcfg = ModelConfig()
    corpus = load_stdlib_corpus()
    ood_names = available_ood_sets()
    ood = {n: torch.frombuffer(bytearray(load_ood_text(n)), dtype=torch.uint8) for n in ood_names}
    results: list[Result] = []
    best: dict[str, float] = {}
    for family in families:
        for lr in [None, *grid]:
            results.append(run_one(family, seeds[0], lr, corpus, ood, cfg, mcfg))
        sweep = [r for r in results if r.family == family and r.spherical_lr is not None]
        best[family] = min(sweep, key=lambda r: r.final_val).spherical_lr
        for seed in seeds[1:]:
            for lr in (None, best[family]):
                results.append(run_one(family, seed, lr, corpus, ood, cfg, mcfg))
    command = ".venv/bin/python benchmarks/spherical_quickstart.py" + (" --quick" if args.quick else "")
    if not args.quick and (args.models, args.seeds, args.grid, args.steps) != ("qwen3,olmo2", "0,1",
                                                                               "0.02,0.05,0.1", 300):
        command += f" --models {args.models} --seeds {args.seeds} --grid {args.grid} --steps {args.steps}"
    machine = machine_line()
    text = render(results, best, grid, cfg, command, seeds, ood_names, machine)
    print(text)
    if not args.quick:
        plot(results, best, seeds[0], ROOT / PLOT)
        write_section(MARK, text)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"results": [asdict(r) for r in results], "best": best, "grid": grid,
                                     "train": asdict(cfg), "command": command, "seeds": seeds, "ood": ood_names,
                                     "machine": machine}, indent=1))
        print(f"wrote {ROOT / 'BENCHMARKS.md'}, {ROOT / PLOT} and {saved}")


if __name__ == "__main__":
    main()
