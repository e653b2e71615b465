"""Engine cases beyond the stacks: flat fragments and TP blocks from hints, the blockwise gap, bad input."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from archopt_plugins import build_optimizer
from archopt_plugins.shard.layout import Block, FlatRange
from harness import case
from parity_util import batches, full_params, guarded, hparams, names, parity, reference, train
from tiny_models import tiny_llama


def _llama():
    return tiny_llama(tied=True, layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, seed=0)


def _zero_like_ranges(opt, fractions: list[float]) -> dict[str, tuple[int, int]]:
    """ZeRO-style: each param group's params flattened into one buffer, cut at uneven rank boundaries.

    Returns this rank's flat range of every parameter it touches (cuts fall mid-row; a rank whose
    fraction is 0 holds nothing).
    """
    rank = dist.get_rank()
    mine = {}
    for group in opt.param_groups:
        sizes = [p.numel() for p in group["params"]]
        total = sum(sizes)
        bounds = [round(sum(fractions[:r]) * total) for r in range(len(fractions) + 1)]
        lo, hi = bounds[rank], bounds[rank + 1]
        offset = 0
        for name, size in zip(group["param_names"], sizes):
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                mine[name] = (a - offset, b - offset)
            offset += size
    return mine


def _fragment_run(name: str, hp: dict, fractions: list[float]) -> dict:
    model = _llama()
    opt = build_optimizer(model, name, **hp)
    ranges = _zero_like_ranges(opt, fractions)
    params = {n: p for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}
    # Every parameter gets a hint on every rank: an empty range where this rank holds nothing.
    opt.register_layout_hints({n: FlatRange(*ranges.get(n, (0, 0))) for n in params})
    empty = torch.empty(0)
    for ids in batches():
        loss = model(input_ids=ids, labels=ids).loss  # every rank: the whole batch, the same gradients
        loss.backward()
        pieces = {}
        for n, p in params.items():
            if n in ranges:
                a, b = ranges[n]
                pieces[n] = (p.detach().view(-1)[a:b], p.grad.view(-1)[a:b])
            else:
                pieces[n] = (empty, empty)
        opt.step_pieces(pieces)
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the stack's all-gather: every element comes from the rank that updated it
            for n, p in params.items():
                mask = torch.zeros(p.numel())
                if n in ranges:
                    mask[ranges[n][0]:ranges[n][1]] = 1
                full = p.detach().view(-1) * mask
                dist.all_reduce(full)
                p.view(-1).copy_(full)
    return full_params(model), opt


@case
def flat_fragments():
    """Uneven ZeRO-like partitions: cuts mid-row, several params per buffer, one empty rank."""
    world = dist.get_world_size()
    fractions = [0.4, 0.35, 0.25] + [0.0] * (world - 3)
    results = {}
    for name in names():
        def one():
            hp = hparams(name)
            ref = reference(_llama, name, hp) if dist.get_rank() == 0 else None
            got, _ = _fragment_run(name, hp, fractions)
            if ref is not None:
                worst, where = parity(ref, got)
                return {"parity": worst, "worst": where}

        results[name] = guarded(one)
    return results


@case
def tp_blocks_from_hints():
    """Megatron-style tensor parallelism given as hints: column blocks of every matrix, DP replicas."""
    world = dist.get_world_size()
    rank = dist.get_rank()
    tp = 2
    tp_index = rank % tp
    results = {}
    for name in ("muon",):
        hp = hparams(name)
        ref = reference(_llama, name, hp) if rank == 0 else None
        model = _llama()
        opt = build_optimizer(model, name, **hp)
        params = {n: p for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}
        hints, views = {}, {}
        for n, p in params.items():
            if p.ndim == 2 and p.shape[1] % tp == 0:
                width = p.shape[1] // tp
                hints[n] = Block((0, tp_index * width), (p.shape[0], width))
                views[n] = (slice(None), slice(tp_index * width, (tp_index + 1) * width))
        opt.register_layout_hints(hints)
        for ids in batches():
            model(input_ids=ids, labels=ids).loss.backward()
            pieces = {}
            for n, p in params.items():
                if n in views:
                    pieces[n] = (p.detach()[views[n]], p.grad[views[n]])
                else:
                    pieces[n] = (p.detach(), p.grad)
            # non-contiguous column views: the engine writes through them in place
            opt.step_pieces(pieces)
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for n, p in params.items():
                    if n in views:
                        mask = torch.zeros_like(p)
                        mask[views[n]] = 1
                        full = p * mask
                        dist.all_reduce(full)
                        p.copy_(full / (world // tp))
        got = full_params(model)
        if ref is not None:
            worst, where = parity(ref, got)
            results[name] = {"parity": worst, "worst": where}
    return results


@case
def blockwise_gap():
    """How far orthogonalizing each FSDP2 row block alone lands from the exact Muon update."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    for mode in ("exact", "blockwise"):
        model = _llama()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = build_optimizer(model, "muon", compute_dtype="float32", sharding=mode, adamw_lr=0.0)
        ids = batches()[0]
        per = ids.shape[0] // dist.get_world_size()
        part = ids[dist.get_rank() * per:(dist.get_rank() + 1) * per]
        model(input_ids=part, labels=part).loss.backward()
        opt.step()
        after = full_params(model)
        out[mode] = {n: after[n] - before[n] for n in after}
    errors = {}
    for n, exact in out["exact"].items():
        if exact.ndim == 2 and exact.norm() > 0:
            errors[n] = float((out["blockwise"][n] - exact).norm() / exact.norm())
    return {"relative_update_error": errors, "max": max(errors.values()), "min": min(errors.values())}


@case
def bad_inputs():
    """A flat 1-D tensor where a matrix was planned (no fragment map) and an unknown layout raise."""
    messages = {}
    model = _llama()
    opt = build_optimizer(model, "muon")
    q = "model.layers.0.self_attn.q_proj.weight"
    group = next(g for g in opt.param_groups if q in g["param_names"])
    i = group["param_names"].index(q)
    flat = torch.nn.Parameter(group["params"][i].detach().reshape(-1)[: group["params"][i].numel() // 2].clone())
    flat.grad = torch.ones_like(flat)
    group["params"][i] = flat
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = flat.detach().clone()
    try:
        opt.step()
    except ValueError as err:
        messages["flat"] = str(err)
    messages["flat_unchanged"] = bool(torch.equal(before, flat.detach()))

    model = _llama()
    opt = build_optimizer(model, "muon")
    group = next(g for g in opt.param_groups if q in g["param_names"])
    i = group["param_names"].index(q)
    group["params"][i] = torch.nn.Parameter(torch.zeros(3, 5))
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    try:
        opt.step()
    except ValueError as err:
        messages["shape"] = str(err)
    return messages


def _injected_run(name: str, hp: dict, wrap, data_slice, build=None) -> dict:
    """Sharded optimizer fed bitwise the reference's gradients (sliced to each rank's piece).

    The single-process reference runs in lockstep on every rank; its gradients are copied into the
    sharded parameters' local gradients, so the optimizer inputs are identical and only the engine
    can make a difference.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from archopt_plugins.optim.executor import LocalExecutor

    build = build or _llama
    ref_model, model = build(), wrap(build())
    ref_opt = build_optimizer(ref_model, name, **hp)
    ref_opt.executor = LocalExecutor()
    opt = build_optimizer(model, name, **hp)
    ref_params = dict(ref_model.named_parameters())
    for ids in batches():
        ref_model(input_ids=ids, labels=ids).loss.backward()
        for n, p in model.named_parameters():
            g = ref_params[n].grad
            if isinstance(p, DTensor):
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                block = g[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
                p.grad = DTensor.from_local(block.clone(), p.device_mesh, p.placements, run_check=False,
                                            shape=p.shape, stride=p.stride())
            else:
                p.grad = g.clone()
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
    got = full_params(model)
    return parity({n: p.detach() for n, p in ref_model.named_parameters()}, got)


@case
def injected_fsdp_tp():
    """Bitwise-identical gradients into FSDP2 x TP (2x2) and HSDP (2x2): every rule, parity ~ 0."""
    from cases_parity import _fsdp, tp_wrap

    mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("dp", "tp"))
    hsdp = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard"))
    results = {}
    for name in names():
        def one():
            a = _injected_run(name, hparams(name), tp_wrap(mesh), None)
            b = _injected_run(name, hparams(name), _fsdp(hsdp), None)
            return {"parity": max(a[0], b[0]), "worst": a[1] if a[0] >= b[0] else b[1]}

        results[name] = guarded(one)
    return results


@case
def nonfinite_one_rank():
    """A NaN in one rank's gradient shard skips the step on every rank; the next clean step runs."""
    from cases_parity import _fsdp

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _fsdp(mesh)(_llama())
    opt = build_optimizer(model, "muon")
    ids = batches()[0]

    def backward(poison: bool) -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if poison and dist.get_rank() == 1:  # only rank 1's local piece of one matrix
            grad = dict(model.named_parameters())["model.layers.1.mlp.up_proj.weight"].grad
            grad.to_local().view(-1)[3] = float("nan")

    before = full_params(model)
    backward(poison=True)
    opt.step()
    after_poison = full_params(model)
    unchanged = all(torch.equal(before[n], after_poison[n]) for n in before)
    backward(poison=False)
    opt.step()
    moved = any(not torch.equal(after_poison[n], p) for n, p in full_params(model).items())
    skipped = torch.tensor([float(opt.skipped_steps)])
    dist.all_reduce(skipped, op=dist.ReduceOp.MIN)
    return {"unchanged_after_nan": unchanged, "moved_after_clean": moved, "skipped_min": float(skipped)}


@case
def scion_sign_on_pieces():
    """Scion's sign LMO (output head) runs on each rank's piece: no owner, no bytes moved, still exact.

    The same FSDP2 model steps twice: with the head on scion_sign, and with the head frozen out of
    the optimizer; the gathered bytes must be equal (the head adds none). Parity with one process
    is checked by the scion rows of the parity cases.
    """
    from cases_parity import _fsdp

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    received = {}
    for label in ("with_head", "without_head"):
        model = _fsdp(mesh)(tiny_llama(tied=False, layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, seed=0))
        params = [(n, p) for n, p in model.named_parameters() if label == "with_head" or n != "lm_head.weight"]
        opt = build_optimizer(params, "scion")
        if label == "with_head":
            rule = opt.plan.entry("lm_head.weight").rule
        ids = batches()[0]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        received[label] = opt.comm_stats[0].bytes_received
        owners = opt.executor.owners
    return {"head_rule": rule, "bytes_with_head": received["with_head"],
            "bytes_without_head": received["without_head"], "head_has_owner": "lm_head.weight" in owners}


@case
def moe_expert_owners():
    """FSDP2 over 4 ranks of a 4-expert MoE: each expert is its own unit, owned by the rank holding it
    (nothing moves for the experts), and with identical gradients the result is bitwise the
    single-process one."""
    from cases_parity import _fsdp

    from tiny_models import tiny_mixtral

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def moe():
        return tiny_mixtral(layers=1, experts=dist.get_world_size(), seed=0)

    model = _fsdp(mesh)(moe())
    opt = build_optimizer(model, "muon", **hparams("muon"))
    ids = batches()[0]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    ex = opt.executor
    experts = {fqn: [ex.owners[part.fqn] for part in parts] for fqn, parts in ex.splits.items()}
    parity_muon = _injected_run("muon", hparams("muon"), _fsdp(mesh), None, build=moe)
    parity_scion = _injected_run("scion", hparams("scion"), _fsdp(mesh), None, build=moe)
    return {"expert_owners": experts, "parity_muon": parity_muon[0], "parity_scion": parity_scion[0]}
