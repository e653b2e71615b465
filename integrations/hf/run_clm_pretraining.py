"""Causal-LM pretraining with the HF Trainer on the embedded corpus, any optimizer from ``--optim``.

Written in the style of a stock ``run_clm``-type script: three argument dataclasses parsed by
``HfArgumentParser``, a model built from a config (a small Llama: RMSNorm, RoPE, SwiGLU, GQA,
tied embeddings; no download), the data grouped into fixed-length blocks, ``Trainer.train()``,
then evaluation with perplexity. The data is this interpreter's standard library source,
byte-tokenized (``archopt_plugins.recipe.data``), so it runs offline on any machine.

The only archopt line is ``enable()`` below (a script without it runs under ``archopt hf-run``).
Compare archopt's Muon with the Trainer's AdamW on the same initial weights and batches:

    python integrations/hf/run_clm_pretraining.py --output_dir runs/hf-muon --optim archopt_muon \\
        --learning_rate 0.02 --optim_args "adamw_lr=3e-3"
    python integrations/hf/run_clm_pretraining.py --output_dir runs/hf-adamw --optim adamw_torch \\
        --learning_rate 1e-3 --adam_beta2 0.95

(both with the defaults below: 300 steps, batch 16 × 128 bytes, warmup 20, cosine decay). Add
``--optim_args "...,ns_steps=5"`` etc. for other settings; ``--geometry_every 25`` logs the
geometry diagnostics.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

from archopt_plugins.integrations.hf import enable
from archopt_plugins.recipe.data import BYTE_VOCAB, load_stdlib_corpus

enable()  # before HfArgumentParser: --optim archopt_<name> becomes a valid choice

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    hidden_size: int = field(default=128, metadata={"help": "model width"})
    num_hidden_layers: int = field(default=4)
    num_attention_heads: int = field(default=4)
    num_key_value_heads: int = field(default=2, metadata={"help": "fewer than heads: grouped-query attention"})
    intermediate_size: int = field(default=384)
    tie_word_embeddings: bool = field(default=True)


@dataclass
class DataTrainingArguments:
    block_size: int = field(default=128, metadata={"help": "tokens (bytes) per training sequence"})
    max_train_bytes: int = field(default=16_000_000, metadata={"help": "cap on the training text read"})
    max_eval_blocks: int = field(default=256, metadata={"help": "validation blocks evaluated"})
    geometry_every: int = field(default=0, metadata={"help": "log archopt geometry diagnostics every k steps (0: off)"})


class BlockDataset(torch.utils.data.Dataset):
    """Consecutive, non-overlapping ``block_size`` windows of a byte stream (as run_clm's group_texts)."""

    def __init__(self, data: torch.Tensor, block_size: int, max_blocks: int | None = None) -> None:
        n = data.numel() // block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        self.blocks = data[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i].long()
        return {"input_ids": ids, "labels": ids}  # the model shifts labels itself


def default_training_args() -> list[str]:
    """The defaults this example runs with when the command line does not set them."""
    return ["--max_steps", "300", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16",
            "--warmup_steps", "20", "--lr_scheduler_type", "cosine", "--logging_steps", "25",
            "--eval_strategy", "steps", "--eval_steps", "100", "--save_strategy", "no", "--report_to", "none",
            "--seed", "0", "--disable_tqdm", "true"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(default_training_args() + argv)

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    corpus = load_stdlib_corpus(max_bytes=data_args.max_train_bytes)
    train_dataset = BlockDataset(corpus.train, data_args.block_size)
    eval_dataset = BlockDataset(corpus.val, data_args.block_size, data_args.max_eval_blocks)
    logger.info("corpus: %d train blocks, %d eval blocks of %d bytes", len(train_dataset), len(eval_dataset),
                data_args.block_size)

    config = LlamaConfig(
        vocab_size=BYTE_VOCAB, hidden_size=model_args.hidden_size, intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_hidden_layers, num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_key_value_heads, max_position_embeddings=data_args.block_size,
        tie_word_embeddings=model_args.tie_word_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        use_cache=False,
    )
    model = LlamaForCausalLM(config)  # from the seed above: the same weights for every optimizer

    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    if data_args.geometry_every:
        from archopt_plugins.integrations.hf import GeometryCallback

        GeometryCallback.install(trainer, every=data_args.geometry_every)

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(train_result.metrics)
    metrics.update(trainer.evaluate())
    metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 50 else float("inf")
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.save_state()
    return metrics


if __name__ == "__main__":
    main()
