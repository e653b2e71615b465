"""Token streams for a recipe, and batches that depend only on (seed, step).

``build_token_data(recipe)`` reads the recipe's documents (``corpora.py``), tokenizes them
(``tokenizer.py``) into train / validation / out-of-distribution id streams. ``train_batch`` draws
the global batch of step ``s`` from a generator seeded by (seed, s) alone: the data order does not
depend on how many steps ran before in this process, so a run resumed from a checkpoint, restarted
by torchrun, or spread over another number of processes sees exactly the batches of an
uninterrupted single-process run (each rank takes its own rows of the same global batch).

``prepare_token_data`` caches the streams under the run folder: the main process builds them once
(BPE training and encoding included), the other ranks and later runs load the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .corpora import DocumentSplit, jsonl_documents, load_ood_text, stdlib_documents, text_documents
from .megatron_indexed import read_indexed_dataset
from .schema import Recipe
from .tokenizer import BPETokenizer, ByteTokenizer

@dataclass
class TokenData:
    train: torch.Tensor  # 1-D integer ids (uint8 for bytes, int32 otherwise)
    val: torch.Tensor
    ood: dict[str, torch.Tensor] = field(default_factory=dict)
    vocab_size: int = 256
    description: str = ""

    def split(self, name: str) -> torch.Tensor:
        if name == "train":
            return self.train
        if name == "val":
            return self.val
        if name.startswith("ood/") and name[4:] in self.ood:
            return self.ood[name[4:]]
        raise KeyError(f"no data split {name!r}; have train, val, {', '.join('ood/' + k for k in self.ood)}")


def _windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    offsets = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    return stream[offsets].long()


def _seed32(*parts: object) -> int:
    """A generator seed from several parts. Hashed to 32 bits: torch's CPU generator keeps only the low
    32 bits of a seed, so packing (seed << 32) + step would give every seed the same batches."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


def train_batch(data: TokenData, seed: int, step: int, global_batch: int, seq_len: int) -> torch.Tensor:
    """[global_batch, seq_len + 1] ids of optimizer step ``step`` (0-based); a function of (seed, step) only."""
    gen = torch.Generator().manual_seed(_seed32("train", seed, step))
    starts = torch.randint(0, data.train.numel() - seq_len - 1, (global_batch,), generator=gen)
    return _windows(data.train, starts, seq_len)


def eval_batches(data: TokenData, split: str, count: int, batch: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """The same ``count`` evaluation batches for every run of a seed (and every optimizer)."""
    stream = data.split(split)
    gen = torch.Generator().manual_seed(_seed32("eval", seed, split))
    high = stream.numel() - seq_len - 1
    return [_windows(stream, torch.randint(0, high, (batch,), generator=gen), seq_len) for _ in range(count)]


# -- building ------------------------------------------------------------------------------------------

def _documents(recipe: Recipe) -> DocumentSplit:
    d = recipe.data
    if d.source == "stdlib":
        return stdlib_documents(d.max_bytes, d.holdout_percent)
    if d.source == "text":
        return text_documents(d.paths, d.max_bytes, d.holdout_percent)
    if d.source == "jsonl":
        return jsonl_documents(d.paths, d.jsonl_field, d.max_bytes, d.holdout_percent)
    raise ValueError(f"data.source {d.source!r} has no document reader")


def _megatron_streams(recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Pre-tokenized documents from Megatron .bin/.idx pairs, split by each document's content hash."""
    train, val = [], []
    for prefix in recipe.data.paths:
        ds = read_indexed_dataset(prefix)
        for d in range(ds.num_documents):
            doc = np.asarray(ds.document(d), dtype=np.int64)
            (val if zlib.crc32(doc.tobytes()) % 100 < recipe.data.holdout_percent else train).append(doc)
    vocab = recipe.tokenizer.vocab_size or 0
    for name, docs in (("train", train), ("validation", val)):
        top = max((int(doc.max()) for doc in docs if doc.size), default=0)
        low = min((int(doc.min()) for doc in docs if doc.size), default=0)
        if top >= vocab or low < 0:
            raise ValueError(f"data.paths: the {name} documents hold token id {top if top >= vocab else low}, "
                             f"outside [0, tokenizer.vocab_size={vocab}); set tokenizer.vocab_size to the "
                             "vocabulary the data was tokenized with")

    def cat(docs: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(docs).astype(np.int32)) if docs else torch.zeros(0, dtype=torch.int32)

    return cat(train), cat(val), f"{len(train) + len(val)} documents from {len(recipe.data.paths)} Megatron dataset(s)"


def build_token_data(recipe: Recipe, tokenizer_path: Path | None = None) -> TokenData:
    """Read and tokenize the recipe's data (the BPE, when trained, is saved to ``tokenizer_path``)."""
    ood_docs = {name: load_ood_text(name).split(b"\0") for name in recipe.evaluation.ood}
    if recipe.data.source == "megatron":
        train, val, description = _megatron_streams(recipe)
        # Pre-tokenized data comes with its own vocabulary: OOD text has no ids in it.
        if ood_docs:
            raise ValueError("evaluation.ood: out-of-distribution text cannot be scored with pre-tokenized "
                             "Megatron data (its tokenizer is unknown here); remove evaluation.ood")
        data = TokenData(train, val, {}, recipe.vocab_size, description)
    else:
        docs = _documents(recipe)
        if recipe.tokenizer.kind == "bpe":
            tok = BPETokenizer.train(docs.train, recipe.tokenizer.vocab_size or 0, recipe.tokenizer.train_bytes)
            if tokenizer_path is not None:
                tok.save(tokenizer_path)
        else:
            tok = ByteTokenizer()
        ood = {name: tok.encode_documents(parts) for name, parts in ood_docs.items()}
        data = TokenData(tok.encode_documents(docs.train), tok.encode_documents(docs.val), ood, recipe.vocab_size,
                         f"{docs.description}, {len(docs.train)} train / {len(docs.val)} held-out documents, "
                         f"{tok.kind} tokens")
    need = recipe.batch.seq_len + 2
    for name, stream in (("train", data.train), ("val", data.val), *((f"ood/{k}", v) for k, v in data.ood.items())):
        if stream.numel() < need:
            raise ValueError(f"data: the {name} split has {stream.numel()} tokens, fewer than batch.seq_len + 2 = "
                             f"{need}; add data, raise data.holdout_percent or lower batch.seq_len")
    return data


def data_cache_key(recipe: Recipe) -> str:
    described = {"data": recipe.data.model_dump(), "tokenizer": recipe.tokenizer.model_dump(),
                 "ood": recipe.evaluation.ood, "python": sys.version.split()[0]}
    return hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def prepare_token_data(recipe: Recipe, cache_dir: Path, is_main: bool, barrier: Callable[[], None]) -> TokenData:
    """Build once on the main process, save under ``cache_dir``; every process loads the saved streams."""
    path = cache_dir / f"tokens-{data_cache_key(recipe)}.pt"
    if is_main and not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        data = build_token_data(recipe, tokenizer_path=cache_dir / f"tokenizer-{data_cache_key(recipe)}.json")
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"train": data.train, "val": data.val, "ood": data.ood, "vocab_size": data.vocab_size,
                    "description": data.description}, tmp)
        os.replace(tmp, path)
    barrier()
    saved = torch.load(path, weights_only=True)
    return TokenData(saved["train"], saved["val"], dict(saved["ood"]), int(saved["vocab_size"]), saved["description"])
