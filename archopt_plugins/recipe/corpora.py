"""Documents for a recipe: the embedded stdlib corpus, user text/JSONL files, and out-of-distribution sets.

Every source yields documents (bytes) split into train and validation by a hash, so the split is
deterministic, the same on every machine, and never puts one document in both:

- ``stdlib``: one document per standard-library ``.py`` file, split by its relative path (exactly
  the split of ``data.load_stdlib_corpus``, so a byte-level recipe sees the quickstart's corpus);
- ``text``: files (or globs) cut into ~64 KB blocks at line ends, split by each block's content, so
  even a single large file gets a held-out part;
- ``jsonl``: one document per record's ``jsonl_field``, split by its content.

Out-of-distribution sets are other kinds of text found on every machine this runs on (the Debian
image CI uses, NVIDIA's and Python's containers): ``licenses`` — the English licence texts Debian's
essential ``base-files`` package installs in /usr/share/common-licenses — and ``c_headers`` — C,
the interpreter's own ``Python.h`` headers. ``load_ood_text(name)`` is a plain function for
benchmarks that want the same sets.
"""

from __future__ import annotations

import glob
import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .data import _is_validation, stdlib_files, stdlib_root

TEXT_BLOCK_BYTES = 64 * 1024


@dataclass
class DocumentSplit:
    train: list[bytes]
    val: list[bytes]
    description: str


def _held_out(key: bytes, holdout_percent: int) -> bool:
    return zlib.crc32(key) % 100 < holdout_percent


def stdlib_documents(max_bytes: int | None, holdout_percent: int) -> DocumentSplit:
    root = stdlib_root()
    train, val, train_bytes = [], [], 0
    for path in stdlib_files(root):
        held_out = _is_validation(path.relative_to(root).as_posix(), holdout_percent)
        if not held_out and max_bytes is not None and train_bytes >= max_bytes:
            continue  # decided by the path alone: unread files cost nothing
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if held_out:
            val.append(data)
        else:
            train.append(data)
            train_bytes += len(data) + 1
    return DocumentSplit(train, val, f"Python {sysconfig.get_python_version()} standard library sources ({root})")


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files named by ``patterns`` (plain paths or globs), sorted and de-duplicated."""
    files: set[Path] = set()
    for pattern in patterns:
        hits = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
        files.update(Path(h) for h in hits if Path(h).is_file())
    return sorted(files)


def _blocks(data: bytes) -> list[bytes]:
    """Cut ``data`` into blocks of about TEXT_BLOCK_BYTES, each ending at a newline where one exists."""
    blocks, start = [], 0
    while start < len(data):
        end = min(len(data), start + TEXT_BLOCK_BYTES)
        if end < len(data):
            newline = data.rfind(b"\n", start, end)
            end = newline + 1 if newline > start else end
        blocks.append(data[start:end])
        start = end
    return blocks


def _split(docs: list[bytes], max_bytes: int | None, holdout_percent: int, description: str) -> DocumentSplit:
    train, val, train_bytes = [], [], 0
    for doc in docs:
        if _held_out(doc, holdout_percent):
            val.append(doc)
        elif max_bytes is None or train_bytes < max_bytes:
            train.append(doc)
            train_bytes += len(doc) + 1
    return DocumentSplit(train, val, description)


def text_documents(patterns: list[str], max_bytes: int | None, holdout_percent: int) -> DocumentSplit:
    files = expand_paths(patterns)
    docs = [block for path in files for block in _blocks(path.read_bytes())]
    return _split(docs, max_bytes, holdout_percent, f"{len(files)} text file(s)")


def jsonl_documents(patterns: list[str], field: str, max_bytes: int | None, holdout_percent: int) -> DocumentSplit:
    files = expand_paths(patterns)
    docs = []
    for path in files:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}); each line must be one JSON "
                                     "object") from None
                if not isinstance(record, dict) or field not in record:
                    raise ValueError(f"{path}:{lineno}: record has no field {field!r} (data.jsonl_field); "
                                     f"keys: {sorted(record) if isinstance(record, dict) else type(record).__name__}")
                text = record[field]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, expected a string")
                docs.append(text.encode("utf-8"))
    return _split(docs, max_bytes, holdout_percent, f"{len(docs)} JSONL records from {len(files)} file(s)")


# -- out-of-distribution sets --------------------------------------------------------------------------

def _license_files() -> list[Path]:
    root = Path("/usr/share/common-licenses")
    return sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []


def _c_header_files() -> list[Path]:
    include = Path(sysconfig.get_paths()["include"])
    return sorted(include.rglob("*.h")) if include.is_dir() else []


OOD_SETS: dict[str, tuple[Callable[[], list[Path]], str]] = {
    "licenses": (_license_files, "English licence texts (/usr/share/common-licenses, Debian base-files)"),
    "c_headers": (_c_header_files, "C: the interpreter's Python.h headers (sysconfig include dir)"),
}


def ood_files(name: str) -> list[Path]:
    if name not in OOD_SETS:
        raise ValueError(f"unknown out-of-distribution set {name!r}; known: {sorted(OOD_SETS)}")
    return OOD_SETS[name][0]()


def available_ood_sets() -> list[str]:
    """The OOD sets present on this machine."""
    return [name for name in OOD_SETS if ood_files(name)]


def load_ood_text(name: str, max_bytes: int | None = 2_000_000) -> bytes:
    """The OOD set ``name`` as one byte string (files in sorted order, NUL-separated)."""
    files = ood_files(name)
    if not files:
        raise FileNotFoundError(f"out-of-distribution set {name!r} ({OOD_SETS[name][1]}) is not on this machine")
    parts, total = [], 0
    for path in files:
        data = path.read_bytes()
        parts.append(data)
        total += len(data) + 1
        if max_bytes is not None and total >= max_bytes:
            break
    return b"\0".join(parts)[:max_bytes] if max_bytes is not None else b"\0".join(parts)
