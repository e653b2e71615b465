"""GPU check of the Megatron adapter: real megatron-core steps with archopt on one CUDA GPU, no shim.

    python tests/gpu/megatron_gpu_check.py            # one process; exits non-zero on any failure
    bash tests/gpu/run_megatron_gpu_check.sh          # the same in a fresh GPU environment (installs the
                                                      # carried megatron-core wheel and this package first)

What it checks, on a tiny bf16 GPTModel (Float16Module, fp32 main parameters in Megatron's
distributed optimizer, NCCL, Megatron's CUDA RNG tracker and buffers — the code paths the CPU smoke
tests shim):

1. ``get_megatron_optimizer(OptimizerConfig(optimizer="archopt_muon", bf16=True))`` builds archopt's
   optimizer and 3 training steps run: finite losses, every fp32 main parameter moved;
2. the archopt step equals a plain ``ArchOpt`` step on the same fp32 main parameters and gradients
   (one GPU, fp32 matrix math): relative difference <= 1e-5;
3. a ``dist_checkpointing`` save and load into a fresh model and optimizer restores the fp32 main
   parameters and the optimizer state exactly.

Prints one JSON line with the measurements. Written for megatron-core 0.19.x; runs under any torch
and Python that megatron-core 0.19 supports (e.g. Python 3.12 with the GPU machine's torch).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/ (megatron_models: the tiny GPTModel of the CPU smoke tests)


# --cpu-smoke: the same script on CPU/gloo under the test-only shim, to check the script itself where
# there is no GPU (tests/gpu/test_megatron_gpu.py); it proves nothing about CUDA.
CPU_SMOKE = "--cpu-smoke" in sys.argv
DEVICE = torch.device("cpu") if CPU_SMOKE else torch.device("cuda", 0)


def _init() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if CPU_SMOKE:
        dist.init_process_group("gloo")
        return
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")


def _build(config):
    """Tiny bf16 GPTModel on the GPU, Megatron DDP (distributed optimizer), archopt through get_megatron_optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    import megatron_models as mm
    from archopt_plugins.integrations import megatron as archopt_megatron

    mm.setup_parallel(1)
    model = mm.build_gpt("llama").to(DEVICE)
    chunk = model
    if config.bf16:  # Megatron's mixed precision: bf16 weights and activations, fp32 main parameters
        model.config.bf16 = True
        chunk = Float16Module(model.config, model)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True), chunk)
    archopt_megatron.enable()
    return model, ddp, get_megatron_optimizer(config, [ddp])


def _states_by_name(inner) -> dict:
    groups = inner.archopt.param_groups
    return {n: inner.archopt.state[p] for g in groups for n, p in zip(g["param_names"], g["params"])}


def _snapshot(inner) -> dict:
    """Main parameters, gradients and optimizer state of every parameter before a step."""
    keys = {n: p for g in inner.archopt.param_groups for n, p in zip(g["param_names"], g["params"])}
    return {name: (shard.detach().clone(), shard.grad.detach().clone(),
                   {k: v.clone() for k, v in inner.archopt.state[keys[name]].items()})
            for _, name, shard in inner.bound}


def _replay_difference(inner, snapshot: dict) -> float:
    """Largest relative difference between the adapter's step and a plain ArchOpt replaying it."""
    from archopt_plugins.optim.archopt import ArchOpt
    from archopt_plugins.optim.executor import LocalExecutor
    from archopt_plugins.planner import get_rule

    plan = inner.archopt.plan
    params = {e.fqn: torch.nn.Parameter(snapshot[e.fqn][0].view(e.shape).clone()) for e in plan.entries}
    reference = ArchOpt.from_plan(plan, params)
    reference.executor = LocalExecutor()
    for e in plan.entries:
        _, grad, state = snapshot[e.fqn]
        params[e.fqn].grad = grad.view(e.shape)
        local = set(get_rule(e.rule).kernel.local_state_keys)  # the adapter keeps these shaped like its flat piece
        reference.state[params[e.fqn]] = {k: v.view(e.shape) if k in local else v for k, v in state.items()}
    reference.step()
    worst = 0.0
    for _, name, shard in inner.bound:
        ref = params[name].detach().reshape(-1)
        worst = max(worst, float((shard.detach() - ref).norm() / ref.norm().clamp_min(1e-30)))
    return worst


def main() -> int:
    import megatron_models as mm
    from megatron.core import dist_checkpointing, parallel_state

    _init()
    results: dict[str, object] = {"torch": torch.__version__, "python": sys.version.split()[0],
                                  "device": "cpu (smoke, shimmed)" if CPU_SMOKE else torch.cuda.get_device_name(0)}
    import megatron.core

    results["megatron_core"] = getattr(megatron.core, "__version__", "?")
    failures = []

    config = mm.optimizer_config("muon")
    config.bf16 = True
    model, ddp, opt = _build(config)
    distopt = opt.chained_optimizers[0]
    inner = distopt.optimizer
    # fp32 main parameters: a bf16 weight near 1 (a norm gain) does not show a 3e-4 AdamW step
    before = {name: shard.detach().clone() for _, name, shard in inner.bound}
    losses, snapshot = [], None
    for i, (tokens, labels) in enumerate(mm.batches()[:3]):
        tokens, labels = tokens.to(DEVICE), labels.to(DEVICE)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = mm.loss_of(ddp, tokens, labels)
        loss.backward()
        ddp.finish_grad_sync()
        if i == 2:  # the inputs of step 3, to replay it with a plain ArchOpt
            distopt.prepare_grads()  # Megatron's own copy of the gradient buffer into the fp32 main grads
            snapshot = _snapshot(inner)
        ok, _, _ = opt.step()
        losses.append(float(loss.detach()))
        if not ok:
            failures.append(f"step {i} was not applied")
    results["losses"] = losses
    if not all(torch.isfinite(torch.tensor(losses))):
        failures.append(f"non-finite loss {losses}")
    unmoved = [name for _, name, shard in inner.bound if torch.equal(shard.detach(), before[name])]
    if unmoved:
        failures.append(f"parameters not updated: {unmoved[:3]}")

    # 2. step 3 replayed by a plain ArchOpt (one process's executor) from the same inputs
    worst = _replay_difference(inner, snapshot)
    results["plain_archopt_relative_difference"] = worst
    if not worst <= 1e-5:
        failures.append(f"adapter step differs from a plain ArchOpt step by {worst:.2e}")

    # 3. dist_checkpointing round trip
    with tempfile.TemporaryDirectory() as folder:
        dist_checkpointing.save({"model": model.sharded_state_dict(),
                                 "optimizer": opt.sharded_state_dict(model.sharded_state_dict())}, folder)
        model2, _, opt2 = _build(config)
        state = dist_checkpointing.load({"model": model2.sharded_state_dict(),
                                         "optimizer": opt2.sharded_state_dict(model2.sharded_state_dict(),
                                                                              is_loading=True)}, folder)
        model2.load_state_dict(state["model"])
        opt2.load_state_dict(state["optimizer"])
        a, b = distopt.optimizer, opt2.chained_optimizers[0].optimizer
        same = all(torch.equal(s1, s2) for (_, _, s1), (_, _, s2) in zip(a.bound, b.bound))
        sa, sb = _states_by_name(a), _states_by_name(b)
        state_same = sa.keys() == sb.keys() and all(
            torch.equal(v, sb[n][k]) for n, s in sa.items() for k, v in s.items())
        results["checkpoint_round_trip"] = bool(same and state_same)
        if not (same and state_same):
            failures.append("dist_checkpointing round trip changed the main parameters or the optimizer state")

    results["failures"] = failures
    print(json.dumps(results))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    if CPU_SMOKE:
        from megatron_cpu_shim import cpu_shim

        with cpu_shim():
            sys.exit(main())
    if not torch.cuda.is_available():
        print("megatron_gpu_check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
