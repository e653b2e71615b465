"""A stock HF Trainer script that knows nothing of archopt (tests run it through ``archopt hf-run``).

HfArgumentParser((ScriptArguments, TrainingArguments)), a tiny Llama from a config, a fixed
synthetic token dataset, Trainer.train(), then the usual save_model / save_state. The tests pass
``--optim archopt_*`` on its command line; nothing here imports archopt_plugins.
"""

from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


@dataclass
class ScriptArguments:
    hidden_size: int = field(default=32)
    num_layers: int = field(default=2)
    vocab_size: int = field(default=64)
    seq_len: int = field(default=16)
    num_samples: int = field(default=64)
    tie_word_embeddings: bool = field(default=True)
    sequential_sampler: bool = field(default=False, metadata={"help": "iterate the data in order (parity tests)"})


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=gen)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class InOrderTrainer(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=script_args.vocab_size, hidden_size=script_args.hidden_size,
                         intermediate_size=2 * script_args.hidden_size, num_hidden_layers=script_args.num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=script_args.tie_word_embeddings, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    model = LlamaForCausalLM(config)
    dataset = TokenDataset(script_args.num_samples, script_args.seq_len, script_args.vocab_size)
    trainer_cls = InOrderTrainer if script_args.sequential_sampler else Trainer
    trainer = trainer_cls(model=model, args=training_args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()


if __name__ == "__main__":
    main()
