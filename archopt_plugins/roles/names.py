"""Roles from a parameter's name and shape alone: for ``(name, param)`` input, and for the few
parameters of a module tree that no module kind explains (a bare ``nn.Parameter`` holding position
embeddings, a learnable scale). Weaker than structure, and the plan says so.
"""

from __future__ import annotations

import re

import torch

from .types import ParamStructure

# Matched against dot-separated name components, most specific first.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (role, re.compile(pattern))
    for role, pattern in (
        ("embedding", r"(^|\.)(embed\w*|wte|wpe|tok_embeddings|word_embeddings|position_embeddings|"
                      r"token_type_embeddings|pos_emb\w*|tok_emb\w*|shared)(\.|$)"),
        ("output", r"(^|\.)(lm_head|output_layer|output|classifier|head)(\.weight)?$"),
        ("router", r"(^|\.)(router|gate)(\.weight)?$"),
        ("expert", r"(^|\.)experts(\.|$)"),
        ("attn_qkv", r"(^|\.)(c_attn|qkv_proj|query_key_value|Wqkv|qkv|linear_qkv|W_pack|in_proj_weight)(\.|$)"),
        ("attn_q", r"(^|\.)(q_proj|query|wq|q_lin)(\.|$)"),
        ("attn_k", r"(^|\.)(k_proj|key|wk|k_lin)(\.|$)"),
        ("attn_v", r"(^|\.)(v_proj|value|wv|v_lin)(\.|$)"),
        ("attn_out", r"(^|\.)(o_proj|out_proj|wo|out_lin|linear_proj)(\.|$)|attn\w*\.(c_proj|dense|proj)(\.|$)"),
        ("mlp_in", r"(^|\.)(gate_proj|up_proj|gate_up_proj|fc1|c_fc|w1|w3|wi|wi_0|wi_1|linear_fc1|dense_h_to_4h)(\.|$)"),
        ("mlp_out", r"(^|\.)(down_proj|fc2|w2|wo|linear_fc2|dense_4h_to_h)(\.|$)|mlp\.c_proj(\.|$)"),
    )
)
_NORM = re.compile(r"(^|\.)(\w*norm\w*|ln_?\w*|layernorm\w*|bn\d*)(\.|$)", re.IGNORECASE)


def role_from_name(name: str, tensor: torch.Tensor) -> tuple[str, ParamStructure]:
    """Best guess of (role, structure) from a dotted name and a shape."""
    ndim = tensor.ndim
    if ndim <= 1:
        if _NORM.search(name):
            return "norm", ParamStructure()
        if name.endswith("bias") or name.split(".")[-1].startswith("bias"):
            return "bias", ParamStructure()
        return "vector", ParamStructure()
    for role, pattern in _RULES:
        if pattern.search(name):
            if role == "expert" and ndim == 3:
                return role, ParamStructure(batch_dims=1)
            if role == "expert" and ndim > 3:
                break
            return role, ParamStructure()
    if ndim >= 3:
        # A kernel-like tensor: fold trailing dims into fan_in, as for convolutions.
        return ("conv" if ndim >= 4 else "hidden"), ParamStructure(flatten_kernel=True)
    return "hidden", ParamStructure()
