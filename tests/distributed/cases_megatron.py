"""Megatron CPU smoke-test cases: a real megatron-core GPTModel on gloo under the test-only CUDA shim.

Each case runs inside ``megatron_cpu_shim.cpu_shim()`` (restored afterwards) and tears Megatron's
model-parallel state down again, so the other cases of the same launch are unaffected. megatron-core
is imported inside the cases only: importing it costs seconds per rank.

* ``megatron_tp2`` (world 2: TP 2 × DP 1) and ``megatron_tp2_dp2`` (world 4: TP 2 × DP 2): for Muon
  and SOAP, end-to-end parity with the single-process run from the same initial weights, and
  parity with the reference's gradients injected into Megatron's gradient buffers (the engine's
  own contribution: bitwise-identical parameters expected on the GELU model, whose TP shards are
  blocks of the unsharded weights);
* checkpoints through ``dist_checkpointing`` (torch_dist): world 2 saves at step 5 and resumes to
  step 10 (equal to the uninterrupted run); world 4 loads that checkpoint at DP 2 and finishes the
  run (parity with the reference).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.distributed as dist

from harness import case, shared_dir

NAMES = ("muon", "soap")
RESUME_AT = 5


@contextlib.contextmanager
def _megatron():
    from megatron_cpu_shim import cpu_shim

    with cpu_shim():
        try:
            yield
        finally:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()


def _dp() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def _train(kind: str, config: Any, steps: range, inject: list[dict[str, torch.Tensor]] | None = None,
           load_from: str | None = None, save_to: str | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """A TP-2 Megatron run (DP = world / 2) over ``steps`` of the shared batches; returns the full parameters."""
    import megatron_models as mm
    from megatron.core import dist_checkpointing, parallel_state

    mm.setup_parallel(2)
    model = mm.build_gpt(kind)
    ddp = mm.wrap_ddp(model)
    opt = mm.megatron_optimizer(ddp, config)
    if load_from is not None:
        state = dist_checkpointing.load({"model": model.sharded_state_dict(),
                                         "optimizer": opt.sharded_state_dict(model.sharded_state_dict(),
                                                                             is_loading=True)}, load_from)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    dp_rank, dp_size = _dp()
    tp_rank, tp = parallel_state.get_tensor_model_parallel_rank(), 2
    data = mm.batches()
    for step in steps:
        tokens, labels = data[step]
        per = tokens.shape[0] // dp_size
        rows = slice(dp_rank * per, (dp_rank + 1) * per)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        if inject is None:
            mm.loss_of(ddp, tokens[rows], labels[rows]).backward()
            ddp.finish_grad_sync()
        else:  # the reference's gradient of this step, sliced as Megatron slices the weights
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.main_grad.copy_(mm.tp_slice(inject[step][name], param, tp_rank, tp))
        opt.step()
        if save_to is not None and step + 1 == RESUME_AT:
            dist_checkpointing.save({"model": model.sharded_state_dict(),
                                     "optimizer": opt.sharded_state_dict(model.sharded_state_dict())}, save_to)
    return mm.full_params(model), opt


def _piece_kinds(opt: Any) -> list[str]:
    """Kinds of the non-empty pieces the engine assembled (Block, FlatRange, BlockRange)."""
    layouts = opt.chained_optimizers[0].optimizer.archopt.executor.layouts
    return sorted({type(piece).__name__ for layout in layouts.values() for piece, _ in layout.holders()})


def _per_name(fn: Callable[[str], dict]) -> dict:
    from parity_util import guarded

    return {name: guarded(lambda: fn(name)) for name in NAMES}


def _parity_and_injected(kind_for_injection: str = "gpt") -> dict:
    import megatron_models as mm

    def one(name: str) -> dict:
        config = mm.optimizer_config(name)
        _, _, ref = mm.reference("llama", name, config)
        got, opt = _train("llama", config, range(mm.STEPS))
        worst, where = mm.parity(ref, got)
        _, grads, ref_gpt = mm.reference(kind_for_injection, name, config)
        injected, injected_opt = _train(kind_for_injection, config, range(mm.STEPS), inject=grads)
        worst_inj, where_inj = mm.parity(ref_gpt, injected)
        stats = opt.chained_optimizers[0].optimizer.archopt.comm_stats
        return {"parity": worst, "worst": where, "injected_parity": worst_inj, "injected_worst": where_inj,
                "bytes_received": stats[1].bytes_received if stats else 0,
                "piece_kinds": _piece_kinds(opt), "injected_piece_kinds": _piece_kinds(injected_opt)}

    with _megatron():
        return _per_name(one)


@case
def megatron_tp2():
    """World 2 (TP 2): parity, injected gradients, and save at step 5 / resume to step 10."""
    import megatron_models as mm

    results = _parity_and_injected()

    def resume(name: str) -> dict:
        config = mm.optimizer_config(name)
        folder = shared_dir() / f"megatron_ckpt_{name}"
        if dist.get_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        straight, _ = _train("llama", config, range(mm.STEPS), save_to=str(folder))
        resumed, _ = _train("llama", config, range(RESUME_AT, mm.STEPS), load_from=str(folder))
        worst, where = mm.parity(straight, resumed)
        return {"resume_difference": worst, "worst": where}

    with _megatron():
        resumed = _per_name(resume)
    return {"parity": results, "resume": resumed}


@case
def megatron_tp2_dp2():
    """World 4 (TP 2 × DP 2): parity, injected gradients, and the world-2 checkpoint loaded at DP 2."""
    import megatron_models as mm

    results = _parity_and_injected()

    def reload(name: str) -> dict:
        config = mm.optimizer_config(name)
        _, _, ref = mm.reference("llama", name, config)
        got, _ = _train("llama", config, range(RESUME_AT, mm.STEPS),
                        load_from=str(shared_dir() / f"megatron_ckpt_{name}"))
        worst, where = mm.parity(ref, got)
        return {"parity": worst, "worst": where}

    with _megatron():
        reloaded = _per_name(reload)
    return {"parity": results, "reload_dp2": reloaded}


RECIPE = "recipes/gpu/megatron_llama_tp2_8gpu.yaml"
# The shipped GPU recipe shrunk to a CPU smoke test: TP 2 × DP 2 on 4 gloo processes, micro-batches
# accumulated (2 × 2 per DP rank), 6 steps with dist checkpoints every 3.
CPU_EDITS = {
    "model": {"family": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 64, "max_seq_len": 32, "tie_embeddings": True},
    "data": {"source": "stdlib", "max_bytes": 300000, "holdout_percent": 5},
    "tokenizer": {"kind": "byte"},
    "optimizer": {"name": "muon", "hparams": {"lr": 0.02, "adamw_lr": 3.0e-3, "compute_dtype": "float32"}},
    "schedule": {"steps": 6, "warmup_steps": 2, "decay": "cosine", "final_lr_fraction": 0.1},
    "batch": {"micro_batch_size": 2, "global_batch_size": 8, "seq_len": 16},
    "backend": {"kind": "megatron", "device": "cpu", "dist_backend": "gloo", "tensor_parallel": 2},
    "launch": {"nproc_per_node": 4, "nodes": 1},
    "checkpoint": {"every_steps": 3, "keep_last": 2},
    "logging": {"out_dir": "unused", "tensorboard": False, "progress": False},
    "evaluation": {"every_steps": 3, "batches": 2, "ood": []},
    "baseline": {"enabled": True, "name": "adamw", "hparams": {"betas": [0.9, 0.95]}, "lr_grid": [1.0e-3]},
}


@case
def megatron_recipe():
    """The Megatron recipe end to end (CPU smoke test): both runs, the report, then an exact resume."""
    import shutil
    from pathlib import Path

    import yaml

    from archopt_plugins.recipe.distributed import DistContext
    from archopt_plugins.recipe.runner import run_recipe
    from archopt_plugins.recipe.validate import validate_data

    root = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((root / RECIPE).read_text())
    data.update(CPU_EDITS)
    out = shared_dir() / "megatron_recipe"
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), dist.get_rank(), torch.device("cpu"), 0)
    with _megatron():
        recipe = validate_data(data, RECIPE)
        first = run_recipe(recipe, ctx, out, progress=False)
        main = first["archopt muon"]
        run_dir = out / "archopt_muon"
        checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        # resume: forget the finished record and the last checkpoint, continue from step 3
        if ctx.is_main:
            (run_dir / "result.json").unlink()
            shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
        ctx.barrier()
        second = run_recipe(recipe, ctx, out, resume=True, progress=False, only=["archopt muon"])
        resumed = second["archopt muon"]
    report = (out / "report.md").read_text() if (out / "report.md").exists() else ""
    # the record up to step 3 comes from the checkpoint: its clock reading there is the first run's
    return {"train_seconds": main.train_seconds, "resumed_train_seconds": resumed.train_seconds,
            "train_loss": main.train_loss, "val_loss": main.val_loss, "resumed_train_loss": resumed.train_loss,
            "resumed_val_loss": resumed.val_loss, "checkpoints": checkpoints, "runs": sorted(first),
            "baseline_val": first["adamw lr=0.001"].val_loss, "report_mentions_runs": "archopt muon" in report,
            "metrics_lines": len((run_dir / "metrics.jsonl").read_text().splitlines())}
