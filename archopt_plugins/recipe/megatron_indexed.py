"""Megatron's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``), read and written without megatron.

The ``.bin`` file is every sequence's token ids back to back in one dtype. The ``.idx`` file, all
little-endian:

    magic b"MMIDIDX\\x00\\x00" (9 bytes) | version u64 (= 1) | dtype code u8
    | sequence count u64 | document-index count u64 (documents + 1)
    | sequence lengths int32[sequences] | sequence byte offsets int64[sequences]
    | document index int64[documents + 1]   (document d = sequences doc[d] .. doc[d+1]-1)
    [| sequence modes int8[sequences]  (multimodal datasets only; ignored here)]

dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16. Token ids
must be integers, so the float codes are refused. The reader memory-maps the ``.bin`` file and
checks every offset against its size, so a truncated or mismatched pair fails loudly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                                7: np.float32, 8: np.uint16}
_HEADER = struct.Struct("<9sQBQQ")


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that is missing, truncated or not in Megatron's format."""


def _code_of(dtype: np.dtype) -> int:
    for code, dt in DTYPE_CODES.items():
        if np.dtype(dt) == dtype:
            return code
    raise IndexedDatasetError(f"dtype {dtype} has no Megatron code; use one of "
                              f"{[np.dtype(d).name for d in DTYPE_CODES.values()]}")


@dataclass
class IndexedDataset:
    """One opened ``PREFIX.bin``/``.idx`` pair."""

    prefix: str
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32
    sequence_pointers: np.ndarray  # int64, byte offsets into .bin
    document_index: np.ndarray  # int64, length documents + 1
    tokens: np.memmap  # the whole .bin as one array of ``dtype``

    @property
    def num_documents(self) -> int:
        return len(self.document_index) - 1

    def sequence(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sequence_lengths[i])]

    def document(self, d: int) -> np.ndarray:
        """Document ``d``: its sequences concatenated."""
        first, last = int(self.document_index[d]), int(self.document_index[d + 1])
        if last == first:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        end = int(self.sequence_pointers[last - 1]) // self.dtype.itemsize + int(self.sequence_lengths[last - 1])
        return self.tokens[start:end]


def read_indexed_dataset(prefix: str | Path) -> IndexedDataset:
    prefix = str(prefix)
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise IndexedDatasetError(f"Megatron dataset {prefix!r}: {path} does not exist (give the path prefix "
                                      "without .bin/.idx)")
    raw = idx_path.read_bytes()
    if len(raw) < _HEADER.size:
        raise IndexedDatasetError(f"{idx_path}: {len(raw)} bytes is shorter than the index header")
    magic, version, code, n_seq, n_doc_index = _HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise IndexedDatasetError(f"{idx_path}: not a Megatron index (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise IndexedDatasetError(f"{idx_path}: index version {version}, only version {VERSION} is supported")
    if code not in DTYPE_CODES or DTYPE_CODES[code] in (np.float32, np.float64):
        raise IndexedDatasetError(f"{idx_path}: dtype code {code} is not an integer token dtype")
    if n_doc_index < 1:
        raise IndexedDatasetError(f"{idx_path}: the document index is empty (it holds documents + 1 entries)")
    dtype = np.dtype(DTYPE_CODES[code])
    offset = _HEADER.size
    need = offset + 4 * n_seq + 8 * n_seq + 8 * n_doc_index
    if len(raw) < need:
        raise IndexedDatasetError(f"{idx_path}: truncated ({len(raw)} bytes, the header promises {need})")
    lengths = np.frombuffer(raw, dtype="<i4", count=n_seq, offset=offset)
    offset += 4 * n_seq
    pointers = np.frombuffer(raw, dtype="<i8", count=n_seq, offset=offset)
    offset += 8 * n_seq
    doc_index = np.frombuffer(raw, dtype="<i8", count=n_doc_index, offset=offset)
    bin_size = bin_path.stat().st_size
    if n_seq and int((pointers + lengths.astype(np.int64) * dtype.itemsize).max()) > bin_size:
        raise IndexedDatasetError(f"{bin_path}: {bin_size} bytes is shorter than the index's sequences reach")
    if doc_index[0] != 0 or doc_index[-1] != n_seq or (np.diff(doc_index) < 0).any():
        raise IndexedDatasetError(f"{idx_path}: document index must rise from 0 to the sequence count {n_seq}")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if bin_size else np.zeros(0, dtype=dtype)
    return IndexedDataset(prefix, dtype, lengths, pointers, doc_index, tokens)


def write_indexed_dataset(prefix: str | Path, documents: list[np.ndarray | list[int]],
                          dtype: np.dtype | type = np.uint16) -> None:
    """Write ``documents`` (one sequence each) as ``PREFIX.bin``/``.idx`` in Megatron's format."""
    prefix = str(prefix)
    dtype = np.dtype(dtype)
    code = _code_of(dtype)
    arrays = [np.asarray(doc, dtype=dtype) for doc in documents]
    lengths = np.array([a.size for a in arrays], dtype="<i4")
    pointers = np.zeros(len(arrays), dtype="<i8")
    if len(arrays) > 1:
        pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * dtype.itemsize
    doc_index = np.arange(len(arrays) + 1, dtype="<i8")
    with open(prefix + ".bin", "wb") as f:
        for a in arrays:
            f.write(a.astype(dtype.newbyteorder("<"), copy=False).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, code, len(arrays), len(doc_index)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_index.tobytes())
