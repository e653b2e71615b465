"""Optimizer-step time and state bytes per parameter, side by side in one run, on CPU.

The parameter set is that of a ~10M-parameter Llama-style model (built from a transformers config,
no downloads); gradients are fixed random tensors, so only ``optimizer.step()`` is timed. Compared:

* ArchOpt ``"muon"`` with ``compute_dtype="bfloat16"`` vs ``torch.optim.Muon`` (which always runs
  Newton–Schulz in bf16) on the same 2-D hidden matrices + ``torch.optim.AdamW`` (foreach) on the
  rest — the same dtype, the same split of parameters;
* ArchOpt ``"muon"`` in fp32 (``compute_dtype="float32"``, the CPU default);
* ``torch.optim.AdamW`` (foreach) on everything, and ArchOpt's other names for reference.

Configurations are interleaved step by step, in a rotating order (the machine may be shared). Each reported time is the median over repeats of the mean step time in that repeat, as
wall-clock time and as this process's CPU time; on a shared machine the CPU time is the steadier
of the two (waiting for a core is not counted), so the ratios are given on both. torch runs one
thread by default here (``--threads``) for the same reason. The section between the
``<!-- benchmarks/step_overhead.py -->`` markers of BENCHMARKS.md is rewritten with the results.

    .venv/bin/python benchmarks/step_overhead.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/step_overhead.py --quick    # smoke run, does not write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import archopt_plugins as ao

ROOT = Path(__file__).resolve().parents[1]
MARK = "benchmarks/step_overhead.py"


def llama_10m() -> torch.nn.Module:
    """hidden 256, 8 layers, 8 heads / 4 KV heads, MLP 688, vocab 8192, untied: 10.5M parameters."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                   tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


class TorchMuonPlusAdamW:
    """torch.optim.Muon on the matrices ArchOpt's plan gives Muon, torch.optim.AdamW on the rest."""

    def __init__(self, model: torch.nn.Module, lr: float, adamw_lr: float) -> None:
        plan = ao.plan(model, "muon")
        params = dict(model.named_parameters())
        muon = [params[e.fqn] for e in plan.entries if e.rule == "muon"]
        rest = [params[e.fqn] for e in plan.entries if e.rule != "muon"]
        self.muon = torch.optim.Muon(muon, lr=lr, weight_decay=0.0, adjust_lr_fn="original")
        self.adamw = torch.optim.AdamW(rest, lr=adamw_lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
        self.muon_numel = sum(p.numel() for p in muon)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}


def state_bytes(state: dict, params: list[torch.Tensor] | None = None) -> int:
    """Bytes of every tensor in the optimizer state (of ``params`` only, when given)."""
    keep = None if params is None else {id(p) for p in params}
    total = 0
    for p, s in state.items():
        if keep is not None and id(p) not in keep:
            continue
        total += sum(t.numel() * t.element_size() for t in s.values() if isinstance(t, torch.Tensor))
    return total


def configurations(model: torch.nn.Module) -> dict[str, Callable[[], object]]:
    muon_kw = dict(lr=0.02, adamw_lr=3e-4)
    return {
        "torch.optim.Muon (bf16) + AdamW": lambda: TorchMuonPlusAdamW(model, 0.02, 3e-4),
        "ArchOpt muon, bf16": lambda: ao.build_optimizer(model, "muon", compute_dtype="bfloat16", **muon_kw),
        "ArchOpt muon, fp32": lambda: ao.build_optimizer(model, "muon", compute_dtype="float32", **muon_kw),
        "torch.optim.AdamW (foreach)": lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True),
        "ArchOpt adamw": lambda: ao.build_optimizer(model, "adamw", lr=1e-3),
        "ArchOpt lion": lambda: ao.build_optimizer(model, "lion", lr=1e-4),
        "ArchOpt scion, fp32": lambda: ao.build_optimizer(model, "scion", compute_dtype="float32"),
        "ArchOpt blockwise_adam": lambda: ao.build_optimizer(model, "blockwise_adam"),
    }


def run(repeats: int, steps: int, warmup: int, model_fn: Callable[[], torch.nn.Module] = llama_10m,
        ) -> tuple[list[dict], dict]:
    model = model_fn()
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
    originals = [p.detach().clone() for p in params]

    def reset() -> None:
        with torch.no_grad():
            for p, w, g in zip(params, originals, grads):
                p.copy_(w)
                p.grad = g.clone()

    builders = configurations(model)
    optimizers, rows = {}, []
    times = {name: [] for name in builders}
    cpu_times = {name: [] for name in builders}
    for name, build in builders.items():
        reset()
        optimizers[name] = build()
        for _ in range(warmup):  # creates the lazy state and warms the allocator
            optimizers[name].step()
    names = list(optimizers)
    reset()
    for r in range(repeats):
        wall = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        for s in range(steps):
            # interleaved step by step, in a rotating order: a shared machine's drift hits every
            # configuration alike. (All step the same parameters with the same fixed gradients.)
            shift = (r * steps + s) % len(names)
            for name in names[shift:] + names[:shift]:
                start, cpu_start = time.perf_counter(), time.process_time()
                optimizers[name].step()
                wall[name] += time.perf_counter() - start
                cpu[name] += time.process_time() - cpu_start
        for name in names:
            times[name].append(wall[name] / steps)
            cpu_times[name].append(cpu[name] / steps)
    by_name = dict(model.named_parameters())
    muon_params = [by_name[e.fqn] for e in ao.plan(model, "muon").entries if e.rule == "muon"]
    for name, opt in optimizers.items():
        row = {"name": name, "median_ms": 1e3 * statistics.median(times[name]),
               "cpu_ms": 1e3 * statistics.median(cpu_times[name]),
               "spread_ms": 1e3 * (max(times[name]) - min(times[name])),
               "bytes_per_param": state_bytes(opt.state) / numel}
        if "muon" in name.lower():
            matrices = muon_params
            row["matrix_bytes_per_param"] = state_bytes(opt.state, matrices) / sum(p.numel() for p in matrices)
        rows.append(row)
    info = {"numel": numel, "muon_numel": sum(p.numel() for p in muon_params), "repeats": repeats,
            "steps": steps, "threads": torch.get_num_threads()}
    return rows, info


def render(rows: list[dict], info: dict, command: str) -> str:
    by = {r["name"]: r for r in rows}
    ref_muon = by["torch.optim.Muon (bf16) + AdamW"]
    ref_adamw = by["torch.optim.AdamW (foreach)"]
    lines = [
        "## Optimizer step overhead (CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, torch threads: {info['threads']}, "
        f"torch {torch.__version__}, Python {platform.python_version()}; "
        f"shared with other developers' jobs (1-minute load average {os.getloadavg()[0]:.1f} at the end of "
        f"the run), so absolute times can be noisy; the ratios come from the same run with the configurations "
        f"interleaved.  ",
        f"Date: {datetime.date.today().isoformat()}.  ",
        f"Parameters: Llama-style, hidden 256, 8 layers, 8 heads / 4 KV heads, MLP 688, vocab 8192, untied: "
        f"{info['numel'] / 1e6:.2f}M ({info['muon_numel'] / 1e6:.2f}M in the 56 hidden matrices Muon runs on). "
        f"Step time: median over {info['repeats']} repeats of the mean of {info['steps']} steps.",
        "",
        "| optimizer | wall ms | wall spread ms | CPU ms | vs torch Muon+AdamW (wall / CPU) "
        "| vs torch AdamW (wall / CPU) | state B/param (all) | state B/param (Muon matrices) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratio(r: dict, ref: dict) -> str:
        return f"{r['median_ms'] / ref['median_ms']:.2f}x / {r['cpu_ms'] / ref['cpu_ms']:.2f}x"

    for r in rows:
        matrix = f"{r['matrix_bytes_per_param']:.2f}" if "matrix_bytes_per_param" in r else "-"
        lines.append(f"| {r['name']} | {r['median_ms']:.1f} | {r['spread_ms']:.1f} | {r['cpu_ms']:.1f} "
                     f"| {ratio(r, ref_muon)} | {ratio(r, ref_adamw)} | {r['bytes_per_param']:.2f} | {matrix} |")
    bf16 = by["ArchOpt muon, bf16"]
    met = bf16["median_ms"] <= ref_muon["median_ms"] and bf16["cpu_ms"] <= ref_muon["cpu_ms"]
    lines += [
        "",
        f"Targets: ArchOpt muon at torch's dtype (bf16) ≤ 1.0x torch.optim.Muon+AdamW: "
        f"**{ratio(bf16, ref_muon)}** (wall / CPU; {'met' if met else 'not met'}); "
        f"Muon state ≤ 4 B/param in fp32: **{by['ArchOpt muon, fp32']['matrix_bytes_per_param']:.2f} B/param** on "
        f"the Muon matrices (the whole model's figure includes AdamW's 8 B/param on embeddings, head and norms).",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n\nEach script rewrites only its own section.\n"
    block = f"<!-- {MARK} -->\n{text}\n<!-- /{MARK} -->"
    pattern = re.compile(rf"<!-- {re.escape(MARK)} -->.*?<!-- /{re.escape(MARK)} -->", re.S)
    new = pattern.sub(lambda _: block, current) if pattern.search(current) else current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="2 repeats of 1 step; prints only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 1, 1
    rows, info = run(args.repeats, args.steps, args.warmup)
    command = ".venv/bin/python benchmarks/step_overhead.py" + (" --quick" if args.quick else "")
    if (args.repeats, args.steps, args.warmup, args.threads) != (7, 3, 1, 1) and not args.quick:
        command += f" --repeats {args.repeats} --steps {args.steps} --warmup {args.warmup} --threads {args.threads}"
    text = render(rows, info, command)
    print(text)
    if not args.quick:
        write_section(text)


if __name__ == "__main__":
    main()
