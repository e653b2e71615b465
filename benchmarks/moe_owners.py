"""One owner per expert vs one per MoE tensor: archopt's Muon on an FSDP2 Mixtral, world 4 (CPU, gloo).

FSDP2 ``Shard(0)`` of a [E, ...] expert weight already puts whole experts on ranks. With one owner
per tensor the engine gathers every expert of a tensor to one rank and sends the updates back; with
one owner per expert (``shard/experts.py``) each expert is orthogonalized where it lives. The same
model, gradients and steps run both ways (the per-tensor way by switching the split off); per rank:
median step time, Newton–Schulz time of the slowest rank, bytes received by the busiest rank.

    .venv/bin/python benchmarks/moe_owners.py            # writes its section of BENCHMARKS.md
    .venv/bin/python benchmarks/moe_owners.py --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

CONFIG = dict(vocab=256, hidden=256, intermediate=512, layers=2, experts=8, steps=6, world=4)


def _model(mesh, cfg: dict):
    import torch
    import transformers
    from torch.distributed.fsdp import fully_shard

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=cfg["experts"], num_experts_per_tok=2, max_position_embeddings=64,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.MixtralForCausalLM(config)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def worker(out: str, cfg: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from archopt_plugins import build_optimizer
    from archopt_plugins.shard.executor import ShardedExecutor

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    split = ShardedExecutor._splittable
    ids = torch.randint(0, cfg["vocab"], (4, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for label in ("one owner per tensor", "one owner per expert"):
        ShardedExecutor._splittable = split if label.endswith("expert") else (lambda self, info, matrices: False)
        model = _model(mesh, cfg)
        opt = build_optimizer(model, "muon", compute_dtype="float32")
        times, ns = [], []
        for step in range(cfg["steps"]):
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            dist.barrier()
            if step:  # the first step discovers layouts and owners
                times.append(time.perf_counter() - start)
                ns.append(opt.executor.last_transform_seconds)
        stats = torch.tensor([statistics.median(ns), float(opt.comm_stats[0].bytes_received)], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        results[label] = {"step_s": statistics.median(times), "ns_max_s": float(stats[0]),
                          "bytes_max": float(stats[1]), "split": sorted(opt.executor.splits)}
    ShardedExecutor._splittable = split
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def report(results: dict, cfg: dict) -> str:
    from sections import machine_line

    base = results["one owner per tensor"]
    lines = ["## One owner per expert on an FSDP2 MoE (`benchmarks/moe_owners.py`)", "",
             f"Command: `python benchmarks/moe_owners.py`. Machine: {machine_line()}. Model: Mixtral-style "
             f"{cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['experts']} experts of MLP width "
             f"{cfg['intermediate']}, FSDP2 `Shard(0)` over {cfg['world']} gloo ranks (2 experts per rank), "
             f"archopt `muon` in fp32, {cfg['steps'] - 1} timed steps; 4 ranks share the machine's cores.", "",
             "| owners | step (s, median) | vs per tensor | Newton–Schulz, slowest rank (s) | bytes received, "
             "busiest rank | vs per tensor |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f}x | {r['ns_max_s']:.3f} | "
                     f"{r['bytes_max'] / 1e6:.2f} MB | {r['bytes_max'] / base['bytes_max']:.2f}x |")
    lines += ["", f"Split per expert: {', '.join(results['one owner per expert']['split'])}. The bytes left are "
              "the attention matrices' (one owner per tensor as before)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, CONFIG)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={CONFIG['world']}",
               __file__, "--worker", str(out)]
        proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(proc.stderr[-4000:])
        if proc.returncode != 0:  # results complete; a rank died in gloo's teardown after writing them
            print(f"note: the launch exited with {proc.returncode} after the results were written", file=sys.stderr)
        results = json.loads(out.read_text())
    text = report(results, CONFIG)
    print(text)
    if not args.no_write:
        from sections import write_section

        write_section("benchmarks/moe_owners.py", text)


if __name__ == "__main__":
    main()
