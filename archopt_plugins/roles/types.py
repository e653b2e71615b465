"""What role detection produces: a role and a structure for every trainable parameter.

A *role* says what a parameter is in the architecture (the thing the plan routes on). A
*structure* says how to see the stored tensor as a batch of matrices [B, fan_out, fan_in], which
matrix rules need and which the stored layout hides: GPT-2's ``Conv1D`` stores [in, out], a conv
kernel is [out, in, k...], MoE experts are stacked in a leading dimension, and a fused QKV
projection concatenates query, key and value heads along its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

ROLES: tuple[str, ...] = (
    "embedding",  # token / position embedding tables (a tied output head keeps this role)
    "output",  # the LM head / classifier producing logits (untied)
    "norm",  # gains (and their biases) of LayerNorm / RMSNorm / GroupNorm / BatchNorm
    "bias",  # additive biases of linear and conv layers
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_qkv",  # fused q/k/v projection; its head split is in ParamStructure.qkv
    "attn_out",
    "mlp_in",  # up / gate projections (and fused gate_up)
    "mlp_out",  # down projection
    "expert",  # MoE expert weights (3-D stacked, or per-expert Linear)
    "router",  # MoE gate producing expert logits
    "conv",  # conv kernels (matrix rules see them flattened to [out, in·k...])
    "hidden",  # any other matrix
    "vector",  # a 0-D/1-D tensor whose purpose could not be told (roles from shapes only)
)

MATRIX_ROLES = frozenset(
    {"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_in", "mlp_out", "expert", "conv", "hidden",
     "router", "embedding", "output"}
)

Source = Literal["module", "names", "shapes"]

SOURCE_NOTE: dict[str, str] = {
    "module": "roles from module structure",
    "names": "roles from parameter names and shapes only (pass the nn.Module for structural detection)",
    "shapes": "roles from shapes only: embeddings and output heads cannot be told from hidden matrices "
    "(pass the nn.Module, or name them in param groups with a 'role' key)",
}


@dataclass(frozen=True)
class QKVSplit:
    """How a fused QKV weight's rows divide into heads.

    ``layout="concat"``: rows are [all q heads | all k heads | all v heads] (GPT-2, Phi-3, Falcon-new).
    ``layout="grouped"``: rows are per query group [q heads of the group | k | v] (Megatron, GPT-NeoX
    with one head per group).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    layout: Literal["concat", "grouped"] = "concat"

    @property
    def rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


@dataclass(frozen=True)
class ParamStructure:
    """How the stored tensor maps to a batch of matrices [B, fan_out, fan_in].

    ``batch_dims`` leading dimensions index independent matrices (MoE experts); ``transposed``
    means the stored matrix is [fan_in, fan_out] (GPT-2 ``Conv1D``, Mixtral's stacked experts);
    ``flatten_kernel`` folds a conv kernel's trailing dimensions into fan_in.
    ``head_dim`` says the rows come in attention heads of that many rows (separate q/k/v
    projections; a fused QKV says it in ``qkv``). ``per_head`` is not detected but set by the plan
    when a rule's hyperparameters ask for it (``update.matrix_view.view_structure``): the matrix
    view then has one matrix per head.
    """

    batch_dims: int = 0
    transposed: bool = False
    flatten_kernel: bool = False
    qkv: QKVSplit | None = None
    head_dim: int | None = None
    per_head: bool = False

    def describe(self) -> str:
        parts = []
        if self.batch_dims:
            parts.append(f"batched x{self.batch_dims}d")
        if self.transposed:
            parts.append("stored [in,out]")
        if self.flatten_kernel:
            parts.append("kernel flattened")
        if self.qkv is not None:
            q = self.qkv
            parts.append(f"q{q.num_heads}/kv{q.num_kv_heads}x{q.head_dim} {q.layout}")
        if self.per_head:
            parts.append("per head")
        return ", ".join(parts)


@dataclass
class ParamRole:
    """One trainable parameter with its detected role (mutable while detection runs)."""

    fqn: str
    param: torch.Tensor
    role: str
    structure: ParamStructure = field(default_factory=ParamStructure)
    aliases: tuple[str, ...] = ()  # other FQNs of the same tensor (tied weights)
    group_options: dict = field(default_factory=dict)  # hparams a user's param group carried


@dataclass
class RoleMap:
    """Detection result: parameters in model order, and how the roles were found."""

    params: list[ParamRole]
    source: Source

    def by_fqn(self) -> dict[str, ParamRole]:
        return {p.fqn: p for p in self.params}
