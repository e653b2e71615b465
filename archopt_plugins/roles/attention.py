"""Roles inside an attention module: q, k, v, o projections or a fused QKV with its head split.

An attention module is recognised by its kind (``module_kinds.is_attention``). Its linear children
are then told apart by the attribute the module's forward uses for them (``q_proj``, ``c_attn``,
``query_key_value`` …: the module kind's interface) and, for attributes we do not know, by shape
and order against the head configuration: a fused QKV has (heads + 2·kv_heads)·head_dim rows, the
output projection is the last map back to the model width, q/k/v come in registration order.
"""

from __future__ import annotations

from torch import nn

from .dims import AttentionDims, attention_dims
from .module_kinds import LinearInfo, linear_children
from .types import ParamStructure, QKVSplit

_ATTRIBUTE_ROLES: dict[str, str] = {}
for _role, _names in {
    "attn_q": ("q_proj", "query", "q", "wq", "q_lin", "to_q"),
    "attn_k": ("k_proj", "key", "k", "wk", "k_lin", "to_k"),
    "attn_v": ("v_proj", "value", "v", "wv", "v_lin", "to_v"),
    "attn_qkv": ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv", "linear_qkv", "W_pack", "to_qkv"),
    "attn_out": ("o_proj", "out_proj", "c_proj", "dense", "wo", "o", "out_lin", "proj", "linear_proj", "Wo",
                 "to_out"),
}.items():
    for _name in _names:
        _ATTRIBUTE_ROLES[_name] = _role

# Families whose fused QKV interleaves heads per query group instead of concatenating q | k | v.
_GROUPED_QKV_CLASSES = ("GPTNeoX", "SelfAttention", "Falcon", "Bloom")


def _qkv_layout(attn: nn.Module) -> str:
    cls = type(attn).__name__
    return "grouped" if cls.startswith(_GROUPED_QKV_CLASSES) else "concat"


def _qkv_split(attn: nn.Module, dims: AttentionDims, rows: int) -> QKVSplit | None:
    if not dims.complete:
        return None
    split = QKVSplit(dims.num_heads, dims.num_kv_heads, dims.head_dim, _qkv_layout(attn))
    if split.rows == rows:
        return split
    # Megatron shards heads across TP ranks: the local rows are a whole number of query groups.
    groups = rows // ((dims.num_heads // dims.num_kv_heads + 2) * dims.head_dim) if dims.num_kv_heads else 0
    if groups and dims.num_kv_heads % groups == 0:
        per_group = dims.num_heads // dims.num_kv_heads
        local = QKVSplit(groups * per_group, groups, dims.head_dim, split.layout)
        if local.rows == rows:
            return local
    return None


def _role_by_shape(info: LinearInfo, dims: AttentionDims, is_last: bool, pending: list[str]) -> str | None:
    """Role of a child whose attribute we do not know; ``pending`` holds q, k, v not yet seen."""
    if not dims.complete:
        return None
    q_rows = dims.num_heads * dims.head_dim
    kv_rows = dims.num_kv_heads * dims.head_dim
    if info.fan_out == q_rows + 2 * kv_rows:
        return "attn_qkv"
    if is_last and info.fan_in == q_rows and (dims.hidden is None or info.fan_out == dims.hidden):
        return "attn_out"
    # q, k, v come in that order; q has heads·head_dim rows, k and v kv_heads·head_dim.
    for role in list(pending):
        if info.fan_out == (q_rows if role == "attn_q" else kv_rows):
            pending.remove(role)
            return role
    return None


def attention_roles(attn: nn.Module, model: nn.Module) -> list[tuple[LinearInfo, str, ParamStructure]]:
    """(linear, role, structure) for each linear child of an attention module."""
    dims = attention_dims(attn, model)
    children = linear_children(attn)
    named = {_ATTRIBUTE_ROLES[name] for name, _ in children if name in _ATTRIBUTE_ROLES}
    pending = [r for r in ("attn_q", "attn_k", "attn_v") if r not in named]
    result: list[tuple[LinearInfo, str, ParamStructure]] = []
    for index, (name, info) in enumerate(children):
        role = _ATTRIBUTE_ROLES.get(name) or _role_by_shape(info, dims, index == len(children) - 1, pending)
        structure = ParamStructure(transposed=info.transposed)
        if role == "attn_qkv":
            structure = ParamStructure(transposed=info.transposed, qkv=_qkv_split(attn, dims, info.fan_out))
        elif role in ("attn_q", "attn_k", "attn_v") and dims.head_dim and info.fan_out % dims.head_dim == 0:
            # Recorded so per-head rules (per-head orthogonalization, blockwise Adam per head)
            # see separate projections exactly as they see the same heads inside a fused QKV.
            structure = ParamStructure(transposed=info.transposed, head_dim=dims.head_dim)
        result.append((info, role or "hidden", structure))
    return result


def multihead_attention_roles(attn: nn.MultiheadAttention) -> dict[str, tuple[str, ParamStructure]]:
    """Own parameters of torch's nn.MultiheadAttention (its out_proj is an ordinary Linear child)."""
    head_dim = attn.embed_dim // attn.num_heads
    fused = ParamStructure(qkv=QKVSplit(attn.num_heads, attn.num_heads, head_dim, "concat"))
    return {
        "in_proj_weight": ("attn_qkv", fused),
        "q_proj_weight": ("attn_q", ParamStructure()),
        "k_proj_weight": ("attn_k", ParamStructure()),
        "v_proj_weight": ("attn_v", ParamStructure()),
        "in_proj_bias": ("bias", ParamStructure()),
        "bias_k": ("bias", ParamStructure()),
        "bias_v": ("bias", ParamStructure()),
    }
