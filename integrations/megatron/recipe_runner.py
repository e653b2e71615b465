"""The Megatron recipe backend: each run of a recipe as a megatron-core pretraining run.

``backend.kind: megatron`` makes ``archopt run`` train a megatron-core ``GPTModel`` (the recipe's
``model`` section: ``llama`` = RMSNorm, SwiGLU, rotary, grouped-query attention; ``gpt2`` =
LayerNorm, GELU, learned positions, biases) with tensor parallelism ``backend.tensor_parallel``
and data parallelism over the remaining processes, through Megatron's own pieces:
``initialize_model_parallel``, ``DistributedDataParallel`` with the distributed optimizer,
``get_megatron_optimizer(OptimizerConfig(optimizer="archopt_<name>"))``, ``OptimizerParamScheduler``
(the recipe's warmup and decay), micro-batches accumulated under ``no_sync``, and checkpoints with
``dist_checkpointing`` (``torch_dist``) — so a run resumes exactly, also at another data-parallel size.

The recipe's runner (``archopt_plugins.recipe.runner``) calls :func:`megatron_train_run` for every
run (the recipe's optimizer and each baseline learning rate) with the same data and report as the
other backends. On CUDA the model trains in bf16 with fp32 main parameters (Megatron's standard);
on CPU megatron-core needs a shim for its hard CUDA calls, which only the test suite has.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from archopt_plugins.recipe.errors import Issue
from archopt_plugins.recipe.history import RunHistory, RunSpec
from archopt_plugins.recipe.schema import Recipe

CPU_SHIM_ENV = "ARCHOPT_MEGATRON_CPU_SHIM"  # set by tests/megatron_cpu_shim.py while it is active


def recipe_issues(r: Recipe) -> list[Issue]:
    """What only the Megatron backend requires (on top of the TP rules in ``recipe.backends``)."""
    issues = []
    if r.model.family not in ("llama", "gpt2"):
        issues.append(Issue("model.family", f"the megatron backend builds a megatron-core GPTModel for llama or "
                            f"gpt2; {r.model.family!r} (MoE) is not covered", "use model.family: llama or gpt2",
                            r.model.family))
    tp = r.backend.tensor_parallel
    if r.vocab_size % tp:
        issues.append(Issue("backend.tensor_parallel", f"does not divide the vocabulary size {r.vocab_size}: "
                            "Megatron splits embedding rows evenly over the TP ranks",
                            "use a vocabulary size divisible by the tensor-parallel size", tp))
    device = r.backend.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get(CPU_SHIM_ENV) != "1":
        issues.append(Issue("backend.device", "megatron-core needs CUDA (its RNG tracker, buffers and optimizer "
                            "wrappers call torch.cuda); CPU runs exist only in archopt's test suite, under a "
                            "test-only shim", "run on a CUDA machine (backend.device: cuda), or use backend.kind: "
                            "ddp on CPU", r.backend.device))
    if r.logging.geometry_every:
        issues.append(Issue("logging.geometry_every", "geometry diagnostics are not wired to the megatron backend",
                            "set logging.geometry_every: 0", r.logging.geometry_every))
    roles = {"embedding", "output", "norm", "bias", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_in",
             "mlp_out", "expert", "router", "conv", "hidden", "vector"}
    for key in r.optimizer.overrides:
        if key not in roles:
            issues.append(Issue(f"optimizer.overrides.{key}", "the megatron backend takes overrides keyed by role: "
                                "validation plans the recipe on the transformers model, whose parameter names "
                                "differ from megatron-core's", f"key the override by a role ({sorted(roles)})", key))
    return issues


def build_gpt_model(recipe: Recipe, bf16: bool) -> torch.nn.Module:
    """The recipe's model as a megatron-core GPTModel at the current tensor-parallel size.

    Weights are initialized on the CPU from the recipe's seed (Megatron builds each full master weight
    and slices it), so a run starts from the same weights at any tensor-parallel size.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = recipe.model
    llama = m.family == "llama"
    norm = "RMSNorm" if llama else "LayerNorm"
    dropout = 0.0 if llama else m.dropout
    config = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_heads,
        num_query_groups=(m.num_kv_heads or m.num_heads) if llama else m.num_heads, ffn_hidden_size=m.intermediate_size,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(), normalization=norm,
        gated_linear_unit=llama, activation_func=torch.nn.functional.silu if llama else torch.nn.functional.gelu,
        add_bias_linear=not llama, hidden_dropout=dropout, attention_dropout=dropout, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        use_cpu_initialization=True, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    torch.manual_seed(recipe.seed)
    return GPTModel(config, get_gpt_layer_local_spec(normalization=norm), vocab_size=recipe.vocab_size,
                    max_sequence_length=m.max_seq_len, position_embedding_type="rope" if llama else "learned_absolute",
                    share_embeddings_and_output_weights=m.tie_embeddings)


def _matched_fields(name: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """OptimizerConfig fields equal to what archopt would use, so the config's mapping changes nothing.

    The recipe's hyperparameters are archopt keywords (as for every backend); they also go in
    ``archopt_hparams``. Megatron's ``lr`` must be set (the scheduler's peak) and its Adam fields are
    mapped onto archopt's AdamW, so they take archopt's values here.
    """
    from archopt_plugins.planner import get_name, get_rule

    opt = get_name(name)
    main = {**get_rule(opt.main_rule).defaults(), **opt.rule_defaults(opt.main_rule)}
    adamw = {**get_rule("adamw").defaults(), **opt.rule_defaults("adamw")}
    lr = float(hparams.get("lr", main.get("lr", 1e-3)))
    betas = hparams.get("adamw_betas" if name != "adamw" else "betas", adamw["betas"])
    eps = hparams.get("adamw_eps" if name != "adamw" else "eps", adamw["eps"])
    return {"lr": lr, "weight_decay": float(hparams.get("weight_decay", main.get("weight_decay", 0.0))),
            "adam_beta1": float(betas[0]), "adam_beta2": float(betas[1]), "adam_eps": float(eps)}


def build_megatron_run(recipe: Recipe, spec: RunSpec, device: torch.device) -> tuple[Any, Any, Any, Any]:
    """(model, DDP model, optimizer, scheduler) of one run; Megatron's model-parallel state is set up here."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from .enable import enable

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=recipe.backend.tensor_parallel)
    model_parallel_cuda_manual_seed(recipe.seed)
    bf16 = device.type == "cuda"
    model = build_gpt_model(recipe, bf16)
    if device.type == "cuda":
        model = model.cuda(device)
    chunk = model
    if bf16:
        from megatron.core.transformer.module import Float16Module

        chunk = Float16Module(model.config, model)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True), chunk)
    hparams = {**spec.hparams, **({"overrides": spec.overrides} if spec.overrides else {})}
    fields = _matched_fields(spec.optimizer, spec.hparams)
    s = recipe.schedule
    config = OptimizerConfig(optimizer=f"archopt_{spec.optimizer}", bf16=bf16, use_distributed_optimizer=True,
                             clip_grad=0.0, min_lr=fields["lr"] * s.final_lr_fraction, **fields)
    config.archopt_hparams = hparams
    enable()
    optimizer = get_megatron_optimizer(config, [ddp])
    decay = {"cosine": "cosine", "linear": "linear", "constant": "constant"}[s.decay]
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=fields["lr"], min_lr=config.min_lr, lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=s.steps, lr_decay_style=decay, start_wd=fields["weight_decay"], end_wd=fields["weight_decay"],
        wd_incr_steps=s.steps, wd_incr_style="constant")
    return model, ddp, optimizer, scheduler


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    tokens, labels = batch[:, :-1], batch[:, 1:]
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None, labels=labels).float().mean()


def _dp_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over the data-parallel ranks (TP ranks hold the same losses)."""
    from megatron.core import parallel_state

    t = torch.tensor(values, dtype=torch.float64, device=device)
    group = parallel_state.get_data_parallel_group()
    torch.distributed.all_reduce(t, group=group)
    return (t / torch.distributed.get_world_size(group)).tolist()


@torch.no_grad()
def _evaluate(ddp: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    from megatron.core import parallel_state

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    ddp.eval()
    total = sum(float(_loss(ddp, batches[i].to(device))) for i in range(dp_rank, len(batches), dp_size))
    ddp.train()
    t = torch.tensor([total], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return float(t.item()) / len(batches)


def _checkpoint_state(model: Any, optimizer: Any, scheduler: Any, step: int, seconds: float,
                      history: RunHistory, loading: bool) -> dict[str, Any]:
    model_state = model.sharded_state_dict()
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model.sharded_state_dict(),
                                                                             is_loading=loading),
            "scheduler": scheduler.state_dict(), "step": step, "train_seconds": seconds,
            "history": history.to_dict()}


def _latest(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob("step_*") if (p / ".complete").exists()) if folder.is_dir() else []
    return found[-1] if found else None


def megatron_train_run(recipe: Recipe, spec: RunSpec, data: Any, ctx: Any, out_dir: Path, resume: bool,
                       progress: bool = True) -> RunHistory:
    """One run of the recipe on megatron-core (same signature and record as ``runner.train_run``)."""
    from megatron.core import dist_checkpointing, parallel_state
    from tqdm.auto import tqdm

    from archopt_plugins.recipe.dataset import eval_batches, train_batch
    from archopt_plugins.recipe.runner import _Metrics, open_run_dir

    run_dir, finished = open_run_dir(out_dir, spec, ctx, resume)
    if finished is not None:
        return finished
    ckpt_dir, result_path = run_dir / "checkpoints", run_dir / "result.json"

    model, ddp, optimizer, scheduler = build_megatron_run(recipe, spec, ctx.device)
    history = RunHistory(spec.label, spec.optimizer, spec.kind, recipe.tokens_per_step, dict(spec.hparams))
    start, seconds = 0, 0.0
    latest = _latest(ckpt_dir) if resume else None
    if latest is not None:
        state = dist_checkpointing.load(_checkpoint_state(model, optimizer, scheduler, 0, 0.0, history, True),
                                        str(latest))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = RunHistory.from_dict(state["history"])
        start, seconds = int(state["step"]), float(state["train_seconds"])
        history.truncate(start)
        if ctx.is_main:
            print(f"{spec.label}: resumed from {latest} at step {start}")
    plan = optimizer.chained_optimizers[0].optimizer.archopt.plan
    if ctx.is_main and spec.kind == "main" and start == 0:
        print(plan.summary())
    metrics = _Metrics(recipe, run_dir, out_dir / "tensorboard" / spec.folder, start, ctx.is_main)

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batch = recipe.batch
    accum, micro = recipe.grad_accum, batch.micro_batch_size
    sets = ["val"] + [f"ood/{name}" for name in recipe.evaluation.ood]
    evals = {s: eval_batches(data, s, recipe.evaluation.batches, micro, batch.seq_len, recipe.seed) for s in sets}
    rows = slice(dp_rank * accum * micro, (dp_rank + 1) * accum * micro)  # TP ranks of a DP rank: the same rows
    bar = tqdm(range(start, recipe.schedule.steps), desc=spec.label, disable=not (progress and ctx.is_main),
               dynamic_ncols=True, initial=start, total=recipe.schedule.steps)
    ddp.train()
    for step in bar:
        began = time.perf_counter()
        local = train_batch(data, recipe.seed, step, batch.global_batch_size, batch.seq_len)[rows]
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss_sum = 0.0
        for m in range(accum):
            mb = local[m * micro:(m + 1) * micro].to(ctx.device)
            with ddp.no_sync() if m < accum - 1 else contextlib.nullcontext():
                loss = _loss(ddp, mb)
                (loss / accum).backward()
            loss_sum += float(loss.detach())
        ddp.finish_grad_sync()
        updated, _, _ = optimizer.step()
        scheduler.step(1)
        seconds += time.perf_counter() - began
        done = step + 1
        train_loss = _dp_mean([loss_sum / accum], ctx.device)[0]
        history.steps.append(done)
        history.train_loss.append(train_loss)
        history.skipped_steps += 0 if updated else 1
        row: dict[str, Any] = {"step": done, "tokens": done * recipe.tokens_per_step, "train_loss": train_loss,
                               "lr": optimizer.param_groups[0]["lr"]}
        if done % recipe.evaluation.every_steps == 0 or done == recipe.schedule.steps:
            losses = {s: _evaluate(ddp, evals[s], ctx.device) for s in sets}
            history.eval_steps.append(done)
            history.val_loss.append(losses["val"])
            history.train_seconds.append(seconds)
            for s in sets[1:]:
                history.ood_loss.setdefault(s[4:], []).append(losses[s])
            row.update({"val_loss": losses["val"], "train_seconds": seconds,
                        **{f"ood_loss/{s[4:]}": losses[s] for s in sets[1:]}})
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{losses['val']:.3f}")
        if done % recipe.logging.log_every == 0 or "val_loss" in row:
            metrics.log(row)
        every = recipe.checkpoint.every_steps
        if (every and done % every == 0) or done == recipe.schedule.steps:
            history.finished = done == recipe.schedule.steps
            _save(ckpt_dir, done, _checkpoint_state(model, optimizer, scheduler, done, seconds, history, False),
                  recipe.checkpoint.keep_last, ctx)
    bar.close()
    metrics.close()
    history.finished = True
    if ctx.is_main:
        history.save(result_path)
    ctx.barrier()
    parallel_state.destroy_model_parallel()
    return history


def _save(ckpt_dir: Path, step: int, state: dict[str, Any], keep: int, ctx: Any) -> None:
    """dist_checkpointing save into step_XXXXXXXX; marked complete only when every rank has written."""
    from megatron.core import dist_checkpointing

    folder = ckpt_dir / f"step_{step:08d}"
    if ctx.is_main:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    ctx.barrier()
    dist_checkpointing.save(state, str(folder))
    ctx.barrier()
    if ctx.is_main:
        (folder / ".complete").write_text(str(step))  # a save killed midway is never resumed from
        complete = sorted(p for p in ckpt_dir.glob("step_*") if (p / ".complete").exists())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
