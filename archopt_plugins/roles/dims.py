"""Model dimensions that structural detection needs: width, heads, KV heads, head size, experts.

Read from the module itself first (attention modules know their own heads), then from an HF-style
``config`` on the module or the model, under the several spellings families use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

_HIDDEN = ("hidden_size", "n_embd", "d_model", "embed_dim", "dim", "hidden_dim")
_HEADS = ("num_attention_heads", "num_heads", "n_head", "n_heads", "num_attention_heads_per_partition")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "num_query_groups", "multi_query_group_num")
_HEAD_DIM = ("head_dim", "kv_channels", "hidden_size_per_attention_head", "attention_head_size")
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _first_int(sources: list[Any], keys: tuple[str, ...]) -> int | None:
    for src in sources:
        if src is None:
            continue
        for key in keys:
            value = getattr(src, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _config_of(obj: Any) -> Any:
    config = getattr(obj, "config", None)
    # Some families nest the text model's config (multimodal wrappers).
    text = getattr(config, "text_config", None) if config is not None else None
    return text if text is not None and getattr(text, "hidden_size", None) else config


@dataclass(frozen=True)
class AttentionDims:
    hidden: int | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None

    @property
    def complete(self) -> bool:
        return None not in (self.num_heads, self.num_kv_heads, self.head_dim)


def model_hidden_size(model: nn.Module) -> int | None:
    return _first_int([_config_of(model), model], _HIDDEN)


def model_num_experts(model: nn.Module) -> int | None:
    return _first_int([_config_of(model)], _EXPERTS)


def attention_dims(attn: nn.Module, model: nn.Module) -> AttentionDims:
    sources = [attn, _config_of(attn), _config_of(model)]
    hidden = _first_int(sources, _HIDDEN)
    heads = _first_int(sources, _HEADS)
    kv = _first_int(sources, _KV_HEADS) or heads
    head_dim = _first_int(sources, _HEAD_DIM)
    if head_dim is None and hidden and heads and hidden % heads == 0:
        head_dim = hidden // heads
    return AttentionDims(hidden, heads, kv, head_dim)
