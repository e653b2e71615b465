"""Backends: how a recipe's model and optimizer are placed on the processes, as a registry.

Each entry of ``BACKENDS`` says what the backend needs (importable modules = its extra, its own
cross-field rules) and how to build an ``Engine`` — the object the training loop drives:
``forward`` → ``backward`` (``accumulate()`` around all but the last micro-batch) → ``step``, and
checkpoints through ``latest_checkpoint``/``save_checkpoint``/``load_checkpoint`` (collective: every
rank calls them, each engine writes its own format) — or, for a stack that owns its whole loop
(megatron: its model, parallel state, scheduler and checkpoints), a ``train_run`` with the
signature of ``runner.train_run``.

| kind | engine | checkpoints |
|---|---|---|
| ``single`` | the model and optimizer as built | ``step_*.pt`` (torch.save, main rank) |
| ``ddp`` | torch DDP, replicated optimizer | ``step_*.pt`` (torch.save, main rank) |
| ``fsdp2`` | ``fully_shard`` per decoder block + root, 1-D mesh | ``step_*/`` DCP folders |
| ``hsdp`` | the same on a (replicate, shard) mesh, shards of ``shard_degree`` | ``step_*/`` DCP folders |
| ``deepspeed`` | DeepSpeed ZeRO ``zero_stage``, an ``ArchOpt<Name>`` ds_config entry | DeepSpeed's, per rank |
| ``megatron`` | the Megatron adapter's own loop (CUDA) | Megatron's own |

The fsdp2, hsdp and deepspeed engines live in ``sharded_engines.py`` (imported when used).

A new backend registers itself (or replaces an entry)::

    from archopt_plugins.recipe.backends import Backend, register_backend
    register_backend(Backend("mine", "...", make_engine=make_my_engine, modules=("torch",)))

where ``make_engine(model, optimizer_name, hparams, recipe, ctx) -> Engine``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .distributed import DistContext
from .errors import Issue
from .schema import Recipe


class Engine:
    """A model and its optimizer on this process: the single-process implementation."""

    # True where every rank's forward takes part in collectives (FSDP2 all-gathers, ZeRO-3 gathers):
    # evaluation must then run the same number of forwards on every rank or the ranks deadlock.
    collective_forward = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext | None = None) -> None:
        self.ctx = ctx or DistContext()  # rank and barrier for checkpoints (one process by default)
        self.module = model  # the unwrapped model: evaluation, checkpoints, final parameters
        self.model = model  # what forward runs through (a wrapper in distributed engines)
        self.optimizer = optimizer

    def forward_loss(self, batch: torch.Tensor) -> torch.Tensor:
        # HF causal LMs shift labels internally: seq_len + 1 tokens give seq_len predictions.
        return self.model(input_ids=batch, labels=batch).loss

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Around micro-batches whose gradients only accumulate (DDP skips its all-reduce there)."""
        yield

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Loss of one evaluation batch (under no_grad, the model in eval mode)."""
        return self.module(input_ids=batch, labels=batch).loss

    # -- checkpoints: collective, every rank calls them ------------------------------------------------
    # This implementation: ``folder/step_XXXXXXXX.pt`` holding the whole state (replicated
    # engines: every rank has it all), written atomically by the main rank, the last ``keep`` kept.
    def latest_checkpoint(self, folder: Path) -> Path | None:
        found = sorted(folder.glob("step_*.pt")) if folder.is_dir() else []
        return found[-1] if found else None

    def save_checkpoint(self, folder: Path, step: int, extra: dict[str, Any], keep: int) -> None:
        """Save model + optimizer with ``extra`` (the runner's step, timers and record) as step ``step``."""
        if not self.ctx.is_main:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step:08d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({**extra, "engine": self.state_dict()}, tmp)
        os.replace(tmp, path)  # a kill mid-save never leaves a half-written checkpoint behind
        for old in sorted(folder.glob("step_*.pt"))[:-keep]:
            old.unlink()

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Load the checkpoint ``latest_checkpoint`` returned; gives back the ``extra`` it was saved with."""
        device = next(self.module.parameters()).device
        state = torch.load(path, map_location=device, weights_only=True)
        self.load_state_dict(state.pop("engine"))
        return state


class DDPEngine(Engine):
    """torch DDP: gradients are averaged over ranks before the (replicated) optimizer step.

    The optimizer is built on the unwrapped model so its plan sees clean FQNs; every rank then
    holds whole parameters and computes the same update (LocalExecutor).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> None:
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model, optimizer, ctx)
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=ids)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        with self.model.no_sync():
            yield


def _build_optimizer(model: nn.Module, name: str, hparams: dict[str, Any]) -> torch.optim.Optimizer:
    from .. import build_optimizer

    return build_optimizer(model, name, **hparams)


def _single_engine(model: nn.Module, name: str, hparams: dict[str, Any], recipe: Recipe, ctx: DistContext) -> Engine:
    return Engine(model, _build_optimizer(model, name, hparams), ctx)


def _ddp_engine(model: nn.Module, name: str, hparams: dict[str, Any], recipe: Recipe, ctx: DistContext) -> Engine:
    optimizer = _build_optimizer(model, name, hparams)
    return DDPEngine(model, optimizer, ctx) if ctx.distributed else Engine(model, optimizer, ctx)


def _fsdp2_engine(model: nn.Module, name: str, hparams: dict[str, Any], recipe: Recipe, ctx: DistContext) -> Engine:
    from .sharded_engines import make_fsdp2_engine  # FSDP2 / DCP imports only when used

    return make_fsdp2_engine(model, name, hparams, recipe, ctx)


def _deepspeed_engine(model: nn.Module, name: str, hparams: dict[str, Any], recipe: Recipe,
                      ctx: DistContext) -> Engine:
    from .sharded_engines import make_deepspeed_engine  # imports deepspeed

    return make_deepspeed_engine(model, name, hparams, recipe, ctx)


# -- cross-field rules of each backend ------------------------------------------------------------------

def _check_single(r: Recipe) -> list[Issue]:
    if r.world_size != 1:
        return [Issue("backend.kind", f"'single' runs one process but launch asks for {r.world_size} "
                      f"(nproc_per_node {r.launch.nproc_per_node} × nodes {r.launch.nodes})",
                      "use backend.kind: ddp, or set launch.nproc_per_node and launch.nodes to 1", "single")]
    return []


def _check_sharded(r: Recipe) -> list[Issue]:
    # The runner joins a process group only with more than one process, and these engines shard
    # (or, for ZeRO-0, reduce) over one; a single process is the `single` backend's job.
    if r.world_size < 2:
        return [Issue("backend.kind", f"{r.backend.kind!r} shards over processes but launch asks for 1 "
                      f"(nproc_per_node {r.launch.nproc_per_node} × nodes {r.launch.nodes})",
                      "set launch.nproc_per_node to 2 or more, or use backend.kind: single", r.backend.kind)]
    return []


def _check_deepspeed(r: Recipe) -> list[Issue]:
    issues = _check_sharded(r)
    if r.backend.zero_stage is None:
        issues.append(Issue("backend.zero_stage", "deepspeed needs a ZeRO stage",
                            "set backend.zero_stage to 0, 1, 2 or 3"))
    if r.logging.geometry_every:
        # The monitor reads whole parameters off the optimizer; under ZeRO it holds flat partitions.
        issues.append(Issue("logging.geometry_every", "the geometry monitor does not run under deepspeed "
                            "(ZeRO hands the optimizer flat partitions, not whole parameters)",
                            "set logging.geometry_every: 0, or use backend.kind: fsdp2 / ddp",
                            r.logging.geometry_every))
    return issues


def _check_hsdp(r: Recipe) -> list[Issue]:
    issues = _check_sharded(r)
    if issues:
        return issues
    shard = r.backend.shard_degree
    if shard is None:
        return [Issue("backend.shard_degree", "hsdp needs the size of its sharding groups",
                      f"set backend.shard_degree to a divisor of the world size {r.world_size}")]
    if r.world_size % shard:
        return [Issue("backend.shard_degree", f"does not divide the world size {r.world_size}",
                      f"use a divisor of {r.world_size} (e.g. launch.nproc_per_node = {r.launch.nproc_per_node})",
                      shard)]
    return []


def _check_megatron(r: Recipe) -> list[Issue]:
    tp, issues = r.backend.tensor_parallel, []
    if r.world_size % tp:
        issues.append(Issue("backend.tensor_parallel", f"does not divide the world size {r.world_size}",
                            "use a tensor-parallel size that divides launch.nproc_per_node × launch.nodes", tp))
    kv = r.model.num_kv_heads or r.model.num_heads
    for key, heads in (("model.num_heads", r.model.num_heads), ("model.num_kv_heads", kv)):
        if heads % tp:
            issues.append(Issue("backend.tensor_parallel", f"does not divide {key} = {heads}: tensor parallelism "
                                "splits attention heads evenly over ranks",
                                f"use a tensor-parallel size that divides {heads}", tp))
    if r.model.intermediate_size % tp:
        issues.append(Issue("backend.tensor_parallel", f"does not divide model.intermediate_size = "
                            f"{r.model.intermediate_size}", "use a divisor of the MLP width", tp))
    return issues


def _check_megatron_recipe(r: Recipe) -> list[Issue]:
    issues = _check_megatron(r)
    if module_available("megatron.core"):  # the adapter's own rules (model family, device, overrides)
        from ..integrations.megatron.recipe_runner import recipe_issues

        issues += recipe_issues(r)
    return issues


def _megatron_train_run(*args: Any, **kwargs: Any) -> Any:
    from ..integrations.megatron.recipe_runner import megatron_train_run  # imports megatron-core when run

    return megatron_train_run(*args, **kwargs)


@dataclass(frozen=True)
class Backend:
    kind: str
    summary: str
    make_engine: Callable[..., Engine] | None = None  # None: described, not available in this version
    unavailable: str = ""  # why not, and what brings it
    modules: tuple[str, ...] = ()  # importable modules the backend needs
    extra: str | None = None  # the pip extra that installs them
    check: Callable[[Recipe], list[Issue]] | None = None
    owns_keys: tuple[str, ...] = field(default=())  # backend.* keys only this backend may set
    # A backend that trains each run itself instead of driving an Engine (megatron: its own model,
    # parallel state, scheduler and checkpoints); same signature as runner.train_run.
    train_run: Callable[..., Any] | None = None


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add or replace a backend (the sharded-backend issues replace their placeholder entries)."""
    BACKENDS[backend.kind] = backend


for _b in (
    Backend("single", "one process", _single_engine, check=_check_single),
    Backend("ddp", "torch DistributedDataParallel (replicated optimizer), gloo on CPU / NCCL on CUDA", _ddp_engine),
    Backend("fsdp2", "FSDP2 fully_shard with archopt's exact sharded matrix updates", _fsdp2_engine,
            check=_check_sharded),
    Backend("hsdp", "FSDP2 sharded within groups of backend.shard_degree, replicated across them", _fsdp2_engine,
            check=_check_hsdp, owns_keys=("shard_degree",)),
    Backend("deepspeed", "DeepSpeed ZeRO stage backend.zero_stage with an ArchOpt<Name> ds_config optimizer",
            _deepspeed_engine, modules=("deepspeed",), extra="deepspeed", check=_check_deepspeed,
            owns_keys=("zero_stage",)),
    Backend("megatron", "Megatron-core tensor parallel (backend.tensor_parallel) × data parallel",
            modules=("megatron.core",), extra="megatron", check=_check_megatron_recipe,
            owns_keys=("tensor_parallel",), train_run=_megatron_train_run),
):
    register_backend(_b)

# Defaults of the backend-specific keys: a value other than these on another backend is a mistake.
_OWNED_DEFAULTS = {"zero_stage": None, "tensor_parallel": 1, "shard_degree": None}


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def backend_issues(recipe: Recipe) -> list[Issue]:
    """Every problem with running ``recipe``'s backend here (availability first, then its rules)."""
    kind = recipe.backend.kind
    backend = BACKENDS.get(kind)
    if backend is None:
        return [Issue("backend.kind", "unknown backend", f"use one of {sorted(BACKENDS)}", kind)]
    issues = []
    if backend.make_engine is None and backend.train_run is None:
        runnable = sorted(k for k, b in BACKENDS.items() if b.make_engine is not None or b.train_run is not None)
        issues.append(Issue("backend.kind", f"backend {kind!r} is not available in this version of archopt-plugins "
                            f"({backend.unavailable})", f"use one of the available backends {runnable}", kind))
    else:
        missing = [m for m in backend.modules if not module_available(m)]
        if missing:
            issues.append(Issue("backend.kind", f"backend {kind!r} needs {missing}, which is not installed",
                                f"pip install 'archopt-plugins[{backend.extra}]'", kind))
    for key, default in _OWNED_DEFAULTS.items():
        value = getattr(recipe.backend, key)
        if value != default and key not in backend.owns_keys:
            owner = next(k for k, b in BACKENDS.items() if key in b.owns_keys)
            issues.append(Issue(f"backend.{key}", f"only applies to backend.kind {owner!r}, not {kind!r}",
                                f"remove backend.{key} or set backend.kind: {owner}", value))
    if recipe.backend.device == "cpu" and recipe.backend.dist_backend == "nccl":
        issues.append(Issue("backend.dist_backend", "NCCL needs CUDA devices but backend.device is 'cpu'",
                            "use dist_backend: gloo (or auto)", "nccl"))
    if backend.check is not None:
        issues.extend(backend.check(recipe))
    return issues


def make_engine(model: nn.Module, optimizer_name: str, hparams: dict[str, Any], recipe: Recipe,
                ctx: DistContext) -> Engine:
    backend = BACKENDS[recipe.backend.kind]
    if backend.make_engine is None:  # validation refuses this first; kept for direct API callers
        raise ValueError(f"backend.kind {recipe.backend.kind!r} is not available in this version ({backend.unavailable})")
    return backend.make_engine(model, optimizer_name, hparams, recipe, ctx)
