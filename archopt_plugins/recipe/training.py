"""A small single-process pretraining loop: model from a config, byte corpus, one optimizer.

Used by ``archopt plan`` and callers that want a quick model (recipes run through ``runner.py``).
Deterministic for a seed: the model init, the batch order and the evaluation batches depend only
on it, so two optimizers trained with the same seed see the same data in the same order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import build_optimizer
from .data import BYTE_VOCAB, ByteCorpus


@dataclass
class ModelConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = BYTE_VOCAB
    max_seq_len: int = 256
    tie_embeddings: bool = True


def build_llama(cfg: ModelConfig, seed: int) -> nn.Module:
    """A Llama-style causal LM (RMSNorm, RoPE, SwiGLU, GQA) from transformers, built from a config."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as err:  # the `hf` extra
        raise RuntimeError("the quickstart model needs transformers: pip install 'archopt-plugins[hf]'") from err
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1  # cosine decay to this fraction of the peak
    eval_every: int = 25
    eval_batches: int = 8
    seed: int = 0


@dataclass
class History:
    label: str
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    wall_seconds: list[float] = field(default_factory=list)  # at each eval step

    def first_step_reaching(self, target: float) -> int | None:
        for step, loss in zip(self.eval_steps, self.val_loss):
            if loss <= target:
                return step
        return None


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``final_lr_fraction`` (one schedule for every optimizer)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: nn.Module, corpus: ByteCorpus, cfg: TrainConfig, split: str = "val") -> float:
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)  # the same eval batches for every run
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(cfg.eval_batches):
        batch = corpus.batch(split, cfg.batch_size, cfg.seq_len, gen)
        total += float(model(input_ids=batch, labels=batch).loss)
    model.train(was_training)
    return total / cfg.eval_batches


def train(label: str, model: nn.Module, corpus: ByteCorpus, cfg: TrainConfig, optimizer_name: str,
          hparams: dict[str, Any], progress: bool = True) -> History:
    """Train ``model`` in place; returns its loss history (validation every ``eval_every`` steps)."""
    from tqdm.auto import tqdm

    optimizer = build_optimizer(model, optimizer_name, **hparams)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    hist = History(label)
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.steps), desc=label, disable=not progress, dynamic_ncols=True, leave=True)
    for step in bar:
        batch = corpus.batch("train", cfg.batch_size, cfg.seq_len, gen)
        # HF causal LMs shift labels internally: seq_len + 1 tokens give seq_len predictions.
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        hist.steps.append(step + 1)
        hist.train_loss.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            hist.eval_steps.append(step + 1)
            hist.val_loss.append(evaluate(model, corpus, cfg))
            hist.wall_seconds.append(time.perf_counter() - start)
            bar.set_postfix(train=f"{hist.train_loss[-1]:.3f}", val=f"{hist.val_loss[-1]:.3f}")
    return hist
