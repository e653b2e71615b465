"""Models a recipe names, built from transformers configs (no downloads): Llama, GPT-2, Mixtral (MoE).

``build_model(section, vocab_size, seed)`` gives the trainable model; ``build_meta_model`` the same
architecture on the meta device (no memory, milliseconds even for 1B parameters), which validation
plans the optimizer on so bad hyperparameters and unmatched overrides fail before any run starts.
Dropout is off unless the recipe asks (runs are deterministic for a seed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .schema import ModelSection


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # the `hf` extra
        raise RuntimeError("recipe models are built with transformers: pip install 'archopt-plugins[hf]'") from err
    transformers.logging.set_verbosity_error()
    return transformers


def model_config(section: ModelSection, vocab_size: int) -> Any:
    """The transformers config of ``section`` (``model.family`` picks the class)."""
    t = _transformers()
    kv_heads = section.num_kv_heads or section.num_heads
    no_special = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if section.family == "gpt2":
        return t.GPT2Config(vocab_size=vocab_size, n_embd=section.hidden_size, n_layer=section.num_layers,
                            n_head=section.num_heads, n_inner=section.intermediate_size,
                            n_positions=section.max_seq_len, resid_pdrop=section.dropout,
                            embd_pdrop=section.dropout, attn_pdrop=section.dropout,
                            tie_word_embeddings=section.tie_embeddings, use_cache=False, **no_special)
    common = dict(vocab_size=vocab_size, hidden_size=section.hidden_size, intermediate_size=section.intermediate_size,
                  num_hidden_layers=section.num_layers, num_attention_heads=section.num_heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=section.max_seq_len,
                  tie_word_embeddings=section.tie_embeddings, use_cache=False, **no_special)
    if section.family == "mixtral":
        return t.MixtralConfig(num_local_experts=section.num_experts, num_experts_per_tok=section.experts_per_token,
                               **common)
    return t.LlamaConfig(**common)


def _model_class(family: str) -> Any:
    t = _transformers()
    return {"llama": t.LlamaForCausalLM, "gpt2": t.GPT2LMHeadModel, "mixtral": t.MixtralForCausalLM}[family]


def build_model(section: ModelSection, vocab_size: int, seed: int) -> nn.Module:
    """The model, initialised deterministically from ``seed``."""
    config = model_config(section, vocab_size)
    torch.manual_seed(seed)
    model = _model_class(section.family)(config)
    model.config.use_cache = False
    return model


def build_meta_model(section: ModelSection, vocab_size: int) -> nn.Module:
    """The same architecture with meta tensors: shapes and structure only, for planning."""
    config = model_config(section, vocab_size)
    with torch.device("meta"):
        return _model_class(section.family)(config)


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters, tied ones counted once."""
    seen = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
    return sum(seen.values())
