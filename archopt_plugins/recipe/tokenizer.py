"""Tokenizers a recipe can name: raw bytes (the default) or a byte-level BPE trained locally.

Both turn a list of documents into one 1-D id stream with a separator id between documents (the
NUL byte for ``byte``; ``<|endoftext|>``, id 0, for ``bpe``), which is what the step-indexed batch
sampler cuts windows from. The BPE is trained with the ``tokenizers`` library on at most
``train_bytes`` of the recipe's own training split (never the held-out part), so nothing is
downloaded and the same recipe trains the same merges everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SEPARATOR_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256
    separator_id = 0

    def encode_documents(self, docs: list[bytes]) -> torch.Tensor:
        joined = b"\0".join(docs) + b"\0"
        return torch.frombuffer(bytearray(joined), dtype=torch.uint8)


class BPETokenizer:
    kind = "bpe"
    separator_id = 0

    def __init__(self, tokenizer: object) -> None:
        self._tok = tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    @classmethod
    def train(cls, docs: list[bytes], vocab_size: int, train_bytes: int) -> "BPETokenizer":
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError as err:  # pinned in requirements/dev.txt; the `recipes` extra
            raise RuntimeError("tokenizer.kind 'bpe' needs the tokenizers library: "
                               "pip install 'archopt-plugins[recipes]'") from err
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SEPARATOR_TOKEN], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        sample, total = [], 0
        for doc in docs:
            if total >= train_bytes:
                break
            sample.append(doc[: train_bytes - total].decode("utf-8", errors="replace"))
            total += len(sample[-1])
        tok.train_from_iterator(sample, trainer)
        if tok.token_to_id(SEPARATOR_TOKEN) != cls.separator_id:
            raise RuntimeError(f"BPE training put {SEPARATOR_TOKEN!r} at id {tok.token_to_id(SEPARATOR_TOKEN)}, "
                               f"expected {cls.separator_id}")
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        self._tok.save(str(path))

    def encode_documents(self, docs: list[bytes]) -> torch.Tensor:
        encoded = self._tok.encode_batch([d.decode("utf-8", errors="replace") for d in docs])
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encoded]
        sep = np.array([self.separator_id], dtype=np.int32)
        parts = [piece for doc in ids for piece in (doc, sep)]
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)
