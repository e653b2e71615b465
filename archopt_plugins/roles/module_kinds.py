"""Recognising module kinds: which modules are linear maps, norms, embeddings, convs, experts.

Kinds are decided by class (torch's own modules, and the few foreign classes whose storage differs:
GPT-2's ``Conv1D``, Megatron's parallel linears) and, for classes we have never seen, by the
parameters they hold: a leaf module with only a 1-D ``weight`` (and a 1-D ``bias``) of one size is
a normalization gain. Names are not consulted here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .types import ParamStructure


@dataclass(frozen=True)
class LinearInfo:
    """A module applying ``y = x·Wᵀ (+ b)``: its weight, fan-in / fan-out, and stored orientation."""

    module: nn.Module
    weight: torch.Tensor
    fan_in: int
    fan_out: int
    transposed: bool


_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase,
                                 nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)

_CONV_TYPES = (nn.modules.conv._ConvNd,)
_EMBED_TYPES = (nn.Embedding, nn.EmbeddingBag)


def _class_names(module: nn.Module) -> list[str]:
    return [c.__name__ for c in type(module).__mro__]


def linear_info(module: nn.Module) -> LinearInfo | None:
    """LinearInfo when ``module`` is a linear map with a 2-D weight, else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    if isinstance(module, nn.Linear):
        return LinearInfo(module, weight, module.in_features, module.out_features, False)
    names = _class_names(module)
    if "Conv1D" in names and hasattr(module, "nf"):
        # transformers.pytorch_utils.Conv1D (GPT-2): y = x @ W + b with W stored [in, out].
        return LinearInfo(module, weight, weight.shape[0], weight.shape[1], True)
    if any(n in ("ColumnParallelLinear", "RowParallelLinear", "TELinear", "TEColumnParallelLinear",
                 "TERowParallelLinear", "TELayerNormColumnParallelLinear") for n in names):
        # Megatron stores [out, in] like nn.Linear (per TP rank: a slice along partition_dim).
        return LinearInfo(module, weight, weight.shape[1], weight.shape[0], False)
    return None


def is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORM_TYPES):
        return True
    if any(n.endswith(("RMSNorm", "LayerNorm", "GroupNorm", "BatchNorm")) for n in _class_names(module)[:1]):
        return True
    # Unknown leaf holding one 1-D gain (and maybe a matching 1-D bias) and nothing else.
    if next(module.children(), None) is not None:
        return False
    own = dict(module.named_parameters(recurse=False))
    weight = own.get("weight")
    if weight is None or weight.ndim != 1 or set(own) - {"weight", "bias"}:
        return False
    bias = own.get("bias")
    return bias is None or bias.shape == weight.shape


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, _CONV_TYPES)


def conv_structure(module: nn.Module) -> ParamStructure:
    """Conv kernels are [out, in/groups, k...]; transposed convs store [in, out/groups, k...]."""
    transposed = bool(getattr(module, "transposed", False))
    return ParamStructure(flatten_kernel=True, transposed=transposed)


def is_embedding(module: nn.Module) -> bool:
    # Megatron's VocabParallelEmbedding stores [vocab, width] (per TP rank: a block of vocabulary rows).
    return isinstance(module, _EMBED_TYPES) or "VocabParallelEmbedding" in _class_names(module)


def is_attention(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    cls = type(module).__name__
    return "Attention" in cls and not cls.endswith(("Output", "Norm"))


def linear_children(module: nn.Module) -> list[tuple[str, LinearInfo]]:
    """Direct children that are linear maps, in registration order (the order forward uses them)."""
    found = []
    for name, child in module.named_children():
        info = linear_info(child)
        if info is not None:
            found.append((name, info))
    return found
