"""Backends: how a recipe's model and optimizer are placed on the processes, as a registry.

Each entry of ``BACKENDS`` says what the backend needs (importable modules = its extra, its own
cross-field rules) and how to build an ``Engine`` — the object the training loop drives:
``forward`` → ``backward`` (``accumulate()`` around all but the last micro-batch) → ``step`` →
``state_dict``/``load_state_dict`` for checkpoints — or, for a stack that owns its whole loop
(megatron: its model, parallel state, scheduler and checkpoints), a ``train_run`` with the
signature of ``runner.train_run``. ``single``, ``ddp`` and ``megatron`` (CUDA) run in this version.

The other sharded backends are described (so recipes can name them and validation checks their
sizes) but have neither yet; validation rejects them with a message naming ``backend.kind``. The
issue that brings one registers it, replacing the placeholder entry::

    from archopt_plugins.recipe.backends import Backend, register_backend
    register_backend(Backend("fsdp2", "...", make_engine=make_fsdp2_engine, modules=("torch",)))

where ``make_engine(model, optimizer_name, hparams, recipe, ctx) -> Engine``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .distributed import DistContext
from .errors import Issue
from .schema import Recipe


class Engine:
    """A model and its optimizer on this process: the single-process implementation."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
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


class DDPEngine(Engine):
    """torch DDP: gradients are averaged over ranks before the (replicated) optimizer step.

    The optimizer is built on the unwrapped model so its plan sees clean FQNs; every rank then
    holds whole parameters and computes the same update (LocalExecutor).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> None:
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model, optimizer)
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
    return Engine(model, _build_optimizer(model, name, hparams))


def _ddp_engine(model: nn.Module, name: str, hparams: dict[str, Any], recipe: Recipe, ctx: DistContext) -> Engine:
    optimizer = _build_optimizer(model, name, hparams)
    return DDPEngine(model, optimizer, ctx) if ctx.distributed else Engine(model, optimizer)


# -- cross-field rules of each backend ------------------------------------------------------------------

def _check_single(r: Recipe) -> list[Issue]:
    if r.world_size != 1:
        return [Issue("backend.kind", f"'single' runs one process but launch asks for {r.world_size} "
                      f"(nproc_per_node {r.launch.nproc_per_node} × nodes {r.launch.nodes})",
                      "use backend.kind: ddp, or set launch.nproc_per_node and launch.nodes to 1", "single")]
    return []


def _check_deepspeed(r: Recipe) -> list[Issue]:
    if r.backend.zero_stage is None:
        return [Issue("backend.zero_stage", "deepspeed needs a ZeRO stage", "set backend.zero_stage to 0, 1, 2 or 3")]
    return []


def _check_hsdp(r: Recipe) -> list[Issue]:
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
    Backend("fsdp2", "FSDP2 fully_shard with archopt's exact sharded matrix updates",
            unavailable="it arrives with the sharding engine (archopt_plugins/shard)", owns_keys=()),
    Backend("hsdp", "FSDP2 sharded within groups of backend.shard_degree, replicated across them",
            unavailable="it arrives with the sharding engine (archopt_plugins/shard)", check=_check_hsdp,
            owns_keys=("shard_degree",)),
    Backend("deepspeed", "DeepSpeed ZeRO stage backend.zero_stage with ArchOpt as the client optimizer",
            unavailable="it arrives with the DeepSpeed adapter (integrations/deepspeed)", modules=("deepspeed",),
            extra="deepspeed", check=_check_deepspeed, owns_keys=("zero_stage",)),
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
