"""FSDP2 through transformers' own sharded loading (``from_pretrained(distributed_config=...)``, which
applies ``fully_shard``), then the stock Trainer with ``--optim archopt_*``. Run by torchrun from
tests/integrations/test_hf_fsdp2.py; writes the full weights (gathered) from rank 0.

Args: MODEL_DIR OUT_FILE then TrainingArguments flags.
"""

import sys

import torch
from transformers import HfArgumentParser, LlamaForCausalLM, TrainingArguments
from transformers.distributed import DistributedConfig

from archopt_plugins.integrations.hf import enable
from hf_stock_train import InOrderTrainer, TokenDataset  # noqa: E402 (the script beside this file)


def main() -> None:
    model_dir, out_file, *rest = sys.argv[1:]
    enable()
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(rest)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else None
    model = LlamaForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(fsdp_size=world or 2))
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
    trainer = InOrderTrainer(model=model, args=args, train_dataset=TokenDataset(64, 16, 64))
    trainer.train()
    executor = trainer.optimizer.optimizer.executor
    full = {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters()}
    if torch.distributed.get_rank() == 0:
        print(f"executor {type(executor).__name__} mode {getattr(executor, 'mode', None)}")
        torch.save(full, out_file)
    # Leave together: a rank that exits while its peer still talks to it aborts in gloo's teardown.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
