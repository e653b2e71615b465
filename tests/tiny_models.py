"""Small models built from configs (no downloads) shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def tiny_llama(tied: bool = True, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
               vocab: int = 64, seed: int = 0) -> nn.Module:
    t = _quiet_transformers()
    torch.manual_seed(seed)
    cfg = t.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=None,
                        eos_token_id=None, pad_token_id=None)
    return t.LlamaForCausalLM(cfg)


def tiny_gpt2(layers: int = 2, hidden: int = 32, heads: int = 4, vocab: int = 64, seed: int = 0) -> nn.Module:
    t = _quiet_transformers()
    torch.manual_seed(seed)
    cfg = t.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                       bos_token_id=None, eos_token_id=None)
    return t.GPT2LMHeadModel(cfg)


def tiny_mixtral(layers: int = 1, hidden: int = 32, experts: int = 4, vocab: int = 64, seed: int = 0) -> nn.Module:
    t = _quiet_transformers()
    torch.manual_seed(seed)
    cfg = t.MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                          num_experts_per_tok=2, max_position_embeddings=64, bos_token_id=None,
                          eos_token_id=None, pad_token_id=None)
    return t.MixtralForCausalLM(cfg)


def _qk_norm_lm(cls_name: str, config_name: str, seed: int, **extra) -> nn.Module:
    t = _quiet_transformers()
    torch.manual_seed(seed)
    cfg = getattr(t, config_name)(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  bos_token_id=None, eos_token_id=None, pad_token_id=None, **extra)
    return getattr(t, cls_name)(cfg)


def tiny_qwen3(seed: int = 0) -> nn.Module:
    """Qwen3: per-head QK-norm (q and k projections are scale-invariant per 8-row head)."""
    return _qk_norm_lm("Qwen3ForCausalLM", "Qwen3Config", seed, head_dim=8)


def tiny_olmo2(seed: int = 0) -> nn.Module:
    """OLMo2: QK-norm over all heads, and norms before the residual adds (q, k, o, down invariant)."""
    return _qk_norm_lm("Olmo2ForCausalLM", "Olmo2Config", seed)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


def causal_lm_loss(model: nn.Module, vocab: int = 64, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return model(input_ids=ids, labels=ids).loss
