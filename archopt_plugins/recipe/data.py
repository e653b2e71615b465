"""The embedded default corpus: the Python standard library's source files of this interpreter.

Present on every machine with Python, real text (code, docstrings, comments), and large enough
(tens of MB) for CPU-scale language-model runs without downloads. Tokenized as raw bytes
(vocabulary 256), so no tokenizer has to be trained or fetched.

The split is by file and deterministic: a file belongs to validation when a CRC of its relative
path falls in the held-out bucket, so train and validation never share a file and every machine
with the same Python version gets the same split.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

BYTE_VOCAB = 256


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted ``*.py`` files of the standard library (site-packages excluded)."""
    root = root or stdlib_root()
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_validation(rel: str, holdout_percent: int) -> bool:
    return zlib.crc32(rel.encode()) % 100 < holdout_percent


@dataclass
class ByteCorpus:
    train: torch.Tensor  # uint8, all training files concatenated (separated by a NUL byte)
    val: torch.Tensor
    files_train: int
    files_val: int

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """[batch_size, seq_len + 1] int64 windows at random offsets (inputs and shifted targets)."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
        offsets = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        return data[offsets].long()


def load_stdlib_corpus(max_bytes: int | None = 16_000_000, holdout_percent: int = 5,
                       root: Path | None = None) -> ByteCorpus:
    """Read the corpus (at most ``max_bytes`` of training text, files taken in sorted order)."""
    root = root or stdlib_root()
    train_parts, val_parts = [], []
    train_bytes = 0
    counts = [0, 0]
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if _is_validation(rel, holdout_percent):
            val_parts.append(data + b"\0")
            counts[1] += 1
        elif max_bytes is None or train_bytes < max_bytes:
            train_parts.append(data + b"\0")
            train_bytes += len(data) + 1
            counts[0] += 1
    if not train_parts or not val_parts:
        raise RuntimeError(f"no Python source files found under {root}: cannot build the default corpus")

    def to_tensor(parts: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)

    return ByteCorpus(to_tensor(train_parts), to_tensor(val_parts), counts[0], counts[1])
