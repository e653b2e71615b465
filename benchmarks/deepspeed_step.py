"""archopt's ``ArchOptMuon`` against DeepSpeed's built-in ``"type": "Muon"`` under ZeRO-1/2/3, side by side.

One torchrun launch (world 2, CPU, gloo, ``DS_ACCELERATOR=cpu``) trains the same Llama-style model
on the same byte-level text (the standard library's source, ``archopt_plugins.recipe.data``) with
each contender at the same hyperparameters — Muon lr 0.02, momentum 0.95 (Nesterov), 5 Newton–Schulz
steps in fp32 (DeepSpeed's own choice on CPU), update scale √max(1, m/n), no weight decay; the
auxiliary Adam on embeddings/norms at lr 3e-4, betas (0.9, 0.95), eps 1e-8 — and records per step:

* ``engine.step()`` time (median after warm-up; the optimizer step with ZeRO's own communication)
  and the whole iteration (forward + backward + step);
* bytes moved per rank per step: DeepSpeed's collectives as its comms logger records them (payload
  bytes of each op as DeepSpeed logs it) plus, for archopt, the sharding engine's all-to-alls
  (``optimizer.comm_stats``: bytes sent);
* the training loss averaged over the last 5 of N steps.

DeepSpeed's Muon runs ZeRO-3 with ``"reduce_scatter": false`` (it requires it); both contenders run
with DeepSpeed's default ``gradient_clipping`` switched off.

    .venv/bin/python benchmarks/deepspeed_step.py            # writes its section of BENCHMARKS.md
    .venv/bin/python benchmarks/deepspeed_step.py --quick    # smaller, fewer steps, no file written
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
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "tests" / "integrations")]

MODEL = dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688, vocab=256, seq=128, micro_batch=4,
             steps=40)
QUICK = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, seq=32, micro_batch=2, steps=8)
WARMUP = 3
CONTENDERS = ("deepspeed_muon", "archopt_muon")


def build_model(cfg: dict):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=cfg["seq"], tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    return transformers.LlamaForCausalLM(config)


def ds_config(contender: str, stage: int, cfg: dict) -> dict:
    if contender == "deepspeed_muon":
        optimizer = {"type": "Muon", "params": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.0, "adam_lr": 3e-4,
                                                "betas": [0.9, 0.95], "eps": 1e-8, "torch_adam": True}}
    else:
        optimizer = {"type": "ArchOptMuon", "params": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.0,
                                                       "ns_steps": 5, "lr_scaling": "shape", "compute_dtype": "float32",
                                                       "adamw_lr": 3e-4, "adamw_betas": "0.9,0.95",
                                                       "adamw_eps": 1e-8}}
    zero = {"stage": stage}
    if contender == "deepspeed_muon" and stage == 3:
        zero["reduce_scatter"] = False  # DeepSpeed's ZeRO-3 Muon refuses reduce_scatter
    return {"train_micro_batch_size_per_gpu": cfg["micro_batch"], "gradient_accumulation_steps": 1,
            "optimizer": optimizer, "zero_optimization": zero, "gradient_clipping": 0.0, "steps_per_print": 10**9,
            "comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}


def batches(cfg: dict, world: int, rank: int):
    """The same token windows for every contender: rank r takes its slice of each global batch."""
    import torch

    from archopt_plugins.recipe.data import load_stdlib_corpus

    corpus = load_stdlib_corpus(max_bytes=2_000_000).train
    gen = torch.Generator().manual_seed(0)
    out = []
    per = cfg["micro_batch"]
    for _ in range(cfg["steps"]):
        starts = torch.randint(0, corpus.numel() - cfg["seq"] - 1, (per * world,), generator=gen)
        rows = torch.stack([corpus[s:s + cfg["seq"]].long() for s in starts.tolist()])
        out.append(rows[rank * per:(rank + 1) * per])
    return out


def _logged_bytes(comms) -> int:
    return sum(int(size) * record[0] for op in comms.comms_dict.values() for size, record in op.items())


def worker(out: str, cfg: dict) -> None:
    from deepspeed_env import prepare_deepspeed

    prepare_deepspeed()
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.comm import comm as ds_comm

    import archopt_plugins.integrations.deepspeed as archopt_ds

    archopt_ds.enable()
    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    data = batches(cfg, world, rank)
    results = {}
    logger = ds_comm.comms_logger
    for stage in (1, 2, 3):
        # Both contenders live side by side and take turns step by step (the order alternating), so the
        # load of a shared machine falls on both alike.
        engines = {}
        for contender in CONTENDERS:
            model = build_model(cfg)
            engines[contender], *_ = deepspeed.initialize(model=model, config=ds_config(contender, stage, cfg),
                                                          model_parameters=model.parameters())
        record = {c: {"step": [], "iter": [], "loss": [], "bytes": []} for c in CONTENDERS}
        for i, ids in enumerate(data):
            for contender in (CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]):
                engine, rec = engines[contender], record[contender]
                logger.comms_dict.clear()
                dist.barrier()
                start = time.perf_counter()
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                mid = time.perf_counter()
                engine.step()
                dist.barrier()
                end = time.perf_counter()
                rec["loss"].append(float(loss))
                if i >= WARMUP:
                    rec["step"].append(end - mid)
                    rec["iter"].append(end - start)
                    rec["bytes"].append(_logged_bytes(logger))
        for contender, engine in engines.items():
            rec = record[contender]
            stats = getattr(engine.basic_optimizer, "comm_stats", None)
            results[f"{stage}/{contender}"] = {
                "step_s": statistics.median(rec["step"]), "iter_s": statistics.median(rec["iter"]),
                "deepspeed_bytes": statistics.median(rec["bytes"]),
                "engine_bytes": stats[1].bytes_sent / len(data) if stats else 0.0,
                "final_loss": sum(rec["loss"][-5:]) / 5, "first_loss": rec["loss"][0],
                "optimizer": type(engine.basic_optimizer).__name__}
        del engines
    results["params"] = sum(p.numel() for p in build_model(cfg).parameters())
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def launch(cfg: dict) -> list[dict]:
    from deepspeed_env import cpu_environment

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", str(out), "--config", json.dumps(cfg)]
        proc = subprocess.run(cmd, env={**os.environ, **cpu_environment()}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
        return json.loads(out.read_text())


def report(per_rank: list[dict], cfg: dict, command: str) -> str:
    from sections import machine_line

    lines = [
        "## archopt Muon vs DeepSpeed's Muon under ZeRO-1/2/3 (`benchmarks/deepspeed_step.py`)", "",
        f"Command: `{command}`. Machine: {machine_line()}. DeepSpeed 0.19.8 on CPU (`DS_ACCELERATOR=cpu`, gloo), "
        f"world size 2, one thread per rank. Model: Llama-style {cfg} ({per_rank[0]['params'] / 1e6:.2f}M "
        "parameters, untied head), fp32, byte-level text from the standard library's source. Same hyperparameters "
        "for both (see the script's docstring). Times: median over steps after "
        f"{WARMUP} warm-up steps, max over ranks; the two contenders take turns step by step (alternating which "
        "goes first). Bytes: per rank per step, max over ranks.", "",
        "| ZeRO | contender | `engine.step()` (s) | vs DeepSpeed Muon | iteration: fwd+bwd+step (s) | vs DeepSpeed "
        "Muon | DeepSpeed collectives (MB) | archopt engine all-to-all (MB) | total vs DeepSpeed Muon | loss, mean of "
        "last 5 steps (first step) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in (1, 2, 3):
        base = max(r[f"{stage}/deepspeed_muon"]["step_s"] for r in per_rank)
        base_iter = max(r[f"{stage}/deepspeed_muon"]["iter_s"] for r in per_rank)
        base_mb = max(r[f"{stage}/deepspeed_muon"]["deepspeed_bytes"] + r[f"{stage}/deepspeed_muon"]["engine_bytes"]
                      for r in per_rank) / 1e6
        for contender in CONTENDERS:
            key = f"{stage}/{contender}"
            step = max(r[key]["step_s"] for r in per_rank)
            iteration = max(r[key]["iter_s"] for r in per_rank)
            ds_mb = max(r[key]["deepspeed_bytes"] for r in per_rank) / 1e6
            engine_mb = max(r[key]["engine_bytes"] for r in per_rank) / 1e6
            total_mb = max(r[key]["deepspeed_bytes"] + r[key]["engine_bytes"] for r in per_rank) / 1e6
            r0 = per_rank[0][key]
            label = "DeepSpeed `\"type\": \"Muon\"`" if contender == "deepspeed_muon" else "archopt `ArchOptMuon`"
            lines.append(f"| {stage} | {label} | {step:.3f} | {step / base:.2f}x | {iteration:.3f} | "
                         f"{iteration / base_iter:.2f}x | {ds_mb:.2f} | {engine_mb:.2f} | {total_mb / base_mb:.2f}x | "
                         f"{r0['final_loss']:.5f} ({r0['first_loss']:.5f}) |")
    lines += ["", "Targets (issue 8): step time ≤ 1.0x DeepSpeed's Muon at ZeRO-1/2 and ≤ 0.6x at ZeRO-3, "
              "same or lower loss. Read the iteration column for step time at ZeRO-1/2: there DeepSpeed's Muon runs "
              "its momentum and Newton–Schulz (its cheaper \"gram\" variant) while it reduces gradients inside "
              "`backward()`, so its `engine.step()` holds only the aux Adam and the all-gather, while archopt's "
              "holds the whole Muon update (quintic Newton–Schulz, each matrix on one owner). At ZeRO-3 DeepSpeed's "
              "Muon all-gathers every Muon gradient in `step()`. DeepSpeed's collective bytes are the payloads its comms logger records; the "
              "archopt engine's all-to-alls (gather to owners, return) go through torch.distributed directly and "
              "are counted separately. The 2-core machine is shared, so absolute times vary between runs; the "
              "ratios are measured side by side in one launch."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--config")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.config))
        return
    cfg = QUICK if args.quick else MODEL
    per_rank = launch(cfg)
    command = "python benchmarks/deepspeed_step.py" + (" --quick" if args.quick else "")
    text = report(per_rank, cfg, command)
    print(text)
    if not args.quick:
        from sections import write_section

        write_section("benchmarks/deepspeed_step.py", text)


if __name__ == "__main__":
    main()
