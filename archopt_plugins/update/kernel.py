"""The interface between a rule's math and whatever executes it (one process, or the sharding engine).

A rule declares what its update needs from the parameter's pieces (DESIGN.md, "What a rule needs
from the shards"):

* ``elementwise`` — runs on any shard as it is (AdamW, Lion, momentum);
* ``whole_matrix`` — needs each complete matrix (Newton–Schulz, Shampoo factors).

A whole-matrix rule is written as three phases so the executor can move data between them:
``prepare`` runs on the local piece (momentum), ``transform`` runs on complete matrices batched by
shape (wherever they are gathered), ``apply`` runs on the local piece again (weight decay and the
scaled update). Elementwise rules have a single ``step`` over lists of tensors.

Kernels hold no state of their own: per-parameter state lives in the optimizer's ``state`` dict and
is passed in. Hyperparameters arrive already validated (``planner.rules``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch

Needs = Literal["elementwise", "reductions", "whole_matrix"]
HParams = dict[str, Any]

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}


def resolve_dtype(value: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is bfloat16 on CUDA (tensor cores) and float32 elsewhere (CPU bf16 matmul is slow)."""
    if value == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPE_NAMES[value]


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """Optimizer state is float32 for low-precision parameters (bf16 moments drift), else the param's dtype."""
    return param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32


def zeros_state(param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format)


class Kernel(ABC):
    needs: Needs
    # State keys created by ``init_state``: tensors shaped like the parameter (or its local piece).
    local_state_keys: tuple[str, ...] = ()

    @abstractmethod
    def init_state(self, param: torch.Tensor, hp: HParams) -> dict[str, torch.Tensor]:
        """Fresh per-parameter state (created lazily at the parameter's first step)."""

    def state_bytes(self, shape: tuple[int, ...], matrix_shape: tuple[int, int, int] | None, hp: HParams) -> int:
        """fp32 bytes of optimizer state for a parameter of ``shape`` (for plans and benchmarks).

        ``matrix_shape`` is (B, fan_out, fan_in) when the parameter has a matrix view. Kernels with
        state that is not parameter-shaped (factors, factored moments) override this.
        """
        numel = 1
        for d in shape:
            numel *= d
        return 4 * numel * len(self.local_state_keys)

    # True when ``state_shapes`` lists every key the kernel keeps, so a checkpoint key it does not
    # list (e.g. factors saved with another block_size) is refused when the checkpoint loads.
    state_shapes_complete: bool = False
    # State keys an earlier version of the rule kept with another meaning (key → what changed), so
    # that loading such a checkpoint is refused saying why (optim.archopt.refuse_retired_state).
    retired_state_keys: Mapping[str, str] = MappingProxyType({})

    def state_shapes(self, shape: tuple[int, ...], matrix_shape: tuple[int, int, int] | None,
                     hp: HParams) -> dict[str, tuple[int, ...]]:
        """Shape of every state tensor (but ``step``) a parameter keeps; checked when a checkpoint loads.

        Kernels with owner state (factors, factored moments) override this with those shapes too.
        """
        return {key: tuple(shape) for key in self.local_state_keys}

    def describe(self, matrix_shape: tuple[int, int, int] | None, hp: HParams) -> str:
        """How the rule sees the parameter, for ``Plan.summary()`` (e.g. its preconditioner blocks)."""
        return ""


class ElementwiseKernel(Kernel):
    needs: Needs = "elementwise"

    @abstractmethod
    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor],
             states: list[dict[str, torch.Tensor]], hp: HParams) -> None:
        """Update ``params`` in place from ``grads``; all share the hyperparameters ``hp``."""


@dataclass
class Segment:
    """One parameter's share of a :class:`MatrixBatch`."""

    fqn: str
    count: int  # consecutive matrices of the batch that belong to this parameter
    owner_state: dict[str, torch.Tensor]  # state kept with the whole matrix (e.g. Shampoo factors)
    step: int  # the parameter's step count, 1 at its first step


@dataclass
class MatrixBatch:
    """Complete matrices of one shape [N, fan_out, fan_in] from one or more parameters, in segment order."""

    data: torch.Tensor
    segments: list[Segment]
    # The parameters' own complete matrices, aligned with ``data``; only for kernels that set
    # ``transform_needs_param`` (e.g. a spherical update needs ‖W‖ and W itself on the owner).
    params: torch.Tensor | None = None

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` (leading dim N) cut into one piece per segment."""
        return list(torch.split(t, [s.count for s in self.segments], dim=0))


class MatrixKernel(Kernel):
    """A rule whose update needs complete matrices; ``reductions`` rules use it too (exact, gathered).

    One that declares ``needs = "elementwise"`` promises a ``transform`` that maps each element alone
    (any batch shape) and keeps no owner state: apply still gets the matrix's fan_out/fan_in, and
    sharded executors run it on the local piece without gathering (Scion's sign LMO).

    ``owner_state`` holds whatever lives with the complete matrix ([count, ...]-shaped tensors the
    kernel creates lazily in ``transform``); the executor keeps it wherever ``transform`` runs —
    in the parameter's state in one process, on the owner rank when sharded.
    """

    needs: Needs = "whole_matrix"
    transform_keys: tuple[str, ...] = ()  # hyperparameters ``transform`` reads (batches must agree on them)
    # When True the executor also brings each parameter's complete value to ``transform``
    # (``MatrixBatch.params``); costs one more gather in sharded runs.
    transform_needs_param: bool = False
    # True when ``transform`` treats every matrix of the batch alone and keeps no owner state, so a
    # sharded executor may give each expert of a MoE weight its own owner (shard/experts.py).
    splits_by_matrix: bool = False

    def cost(self, count: int, fan_out: int, fan_in: int) -> float:
        """Relative compute of ``transform`` on ``count`` matrices (owner load balancing).

        Default: Newton–Schulz's matmuls, ~ count·m·n·min(m, n). Eigendecomposition-based rules
        override with ~ count·(m³ + n³).
        """
        return float(count) * fan_out * fan_in * min(fan_out, fan_in)

    def batches_bitwise(self, fan_out: int, fan_in: int, hp: HParams) -> bool:
        """Whether a matrix of this shape gets bitwise the same ``transform`` result batched with others.

        BLAS/LAPACK batched calls (gemm, eigh, QR) are only independent of a matrix's company when
        every matrix of the batch starts on a 64-byte boundary, as a lone, freshly allocated one does;
        a 9×9 float32 matrix (324 bytes) in second place differs from a lone call in the last bits,
        and a rank-deficient Shampoo/SOAP statistic turns that into an O(1) change of its null-space
        eigenbasis. With both sides multiples of 16 every matrix, Gram matrix and product of the
        transform has that alignment; other shapes are transformed one parameter at a time
        (``batching.transform_complete``), so the single-process and sharded steps agree bitwise.
        """
        return fan_out % 16 == 0 and fan_in % 16 == 0

    @abstractmethod
    def prepare(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                hp: HParams) -> torch.Tensor:
        """Elementwise work on the local piece; returns the tensor whose matrices ``transform`` needs."""

    @abstractmethod
    def transform(self, batch: MatrixBatch, hp: HParams) -> torch.Tensor:
        """Whole-matrix work on complete matrices of one shape; returns [N, fan_out, fan_in]."""

    @abstractmethod
    def apply(self, param: torch.Tensor, update: torch.Tensor, state: dict[str, torch.Tensor],
              hp: HParams, fan_out: int, fan_in: int) -> None:
        """Elementwise: write the transformed update into the local piece of ``param``."""


def add_scaled_(param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """param ← (1 − lr·wd)·param − lr·scale·update, in float32 when the parameter is low precision.

    Decoupled weight decay uses the unscaled ``lr`` (as torch.optim.Muon and AdamW do). At lr = 0
    this leaves the parameter bit-identical, which torch.distributed.checkpoint relies on when it
    initialises optimizer state by a zero-lr step.
    """
    if param.dtype in (torch.float32, torch.float64):
        if weight_decay != 0.0:
            param.mul_(1.0 - lr * weight_decay)
        param.add_(update.to(param.dtype), alpha=-lr * scale)
        return
    work = param.float()
    if weight_decay != 0.0:
        work.mul_(1.0 - lr * weight_decay)
    work.add_(update.float(), alpha=-lr * scale)
    param.copy_(work)
