"""Recipe data: Megatron .bin/.idx reader/writer, text and JSONL documents, BPE, OOD sets, step-indexed batches."""

import json
import struct

import numpy as np
import pytest
import torch

from archopt_plugins.cli import main
from archopt_plugins.recipe.corpora import (OOD_SETS, available_ood_sets, jsonl_documents, load_ood_text,
                                            stdlib_documents, text_documents)
from archopt_plugins.recipe.data import load_stdlib_corpus
from archopt_plugins.recipe.dataset import TokenData, build_token_data, train_batch
from archopt_plugins.recipe.megatron_indexed import (MAGIC, IndexedDatasetError, read_indexed_dataset,
                                                     write_indexed_dataset)
from archopt_plugins.recipe.tokenizer import BPETokenizer, ByteTokenizer
from archopt_plugins.recipe.validate import validate_data
from recipe_fixtures import tiny, write_recipe


def _docs(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(20, 60))) for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8, np.int64])
def test_megatron_round_trip(tmp_path, dtype):
    docs = _docs(12, 200)
    write_indexed_dataset(tmp_path / "corpus", docs, dtype)
    ds = read_indexed_dataset(tmp_path / "corpus")
    assert ds.num_documents == 12 and ds.dtype == np.dtype(dtype)
    for d, doc in enumerate(docs):
        np.testing.assert_array_equal(ds.document(d), doc)


def test_megatron_index_layout_is_the_documented_one(tmp_path):
    """Byte-level check of the header and arrays (what megatron's own reader expects)."""
    write_indexed_dataset(tmp_path / "c", [[1, 2, 3], [4, 5]], np.uint16)
    raw = (tmp_path / "c.idx").read_bytes()
    assert raw[:9] == MAGIC == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, 9)
    assert (version, code, n_seq, n_doc) == (1, 8, 2, 3)
    off = 9 + 8 + 1 + 8 + 8
    assert list(np.frombuffer(raw, "<i4", 2, off)) == [3, 2]
    assert list(np.frombuffer(raw, "<i8", 2, off + 8)) == [0, 6]  # byte offsets of uint16 tokens
    assert list(np.frombuffer(raw, "<i8", 3, off + 24)) == [0, 1, 2]
    assert (tmp_path / "c.bin").read_bytes() == np.array([1, 2, 3, 4, 5], "<u2").tobytes()


def test_megatron_corrupt_files_fail_loudly(tmp_path):
    write_indexed_dataset(tmp_path / "c", _docs(3, 50), np.uint16)
    idx = (tmp_path / "c.idx").read_bytes()
    (tmp_path / "bad.idx").write_bytes(b"NOTANIDX!" + idx[9:])
    (tmp_path / "bad.bin").write_bytes((tmp_path / "c.bin").read_bytes())
    with pytest.raises(IndexedDatasetError, match="not a Megatron index"):
        read_indexed_dataset(tmp_path / "bad")
    (tmp_path / "short.idx").write_bytes(idx)
    (tmp_path / "short.bin").write_bytes((tmp_path / "c.bin").read_bytes()[:10])
    with pytest.raises(IndexedDatasetError, match="shorter than the index's sequences reach"):
        read_indexed_dataset(tmp_path / "short")
    (tmp_path / "cut.idx").write_bytes(idx[:40])
    (tmp_path / "cut.bin").write_bytes(b"")
    with pytest.raises(IndexedDatasetError, match="truncated"):
        read_indexed_dataset(tmp_path / "cut")
    with pytest.raises(IndexedDatasetError, match="does not exist"):
        read_indexed_dataset(tmp_path / "nothing")


def test_megatron_recipe_trains_on_pretokenized_ids(tmp_path):
    write_indexed_dataset(tmp_path / "corpus", _docs(200, 100, seed=3), np.uint16)
    edits = {"data.source": "megatron", "data.paths": [str(tmp_path / "corpus")], "data.holdout_percent": 10,
             "tokenizer.kind": "pretokenized", "tokenizer.vocab_size": 100, "evaluation.ood": [],
             "baseline.enabled": False, "logging.tensorboard": False, "schedule.steps": 3, "checkpoint.every_steps": 0}
    recipe = validate_data(tiny(**edits))
    data = build_token_data(recipe)
    assert data.vocab_size == 100 and int(data.train.max()) < 100 and data.val.numel() > 0
    path = write_recipe(tmp_path / "m.yaml", tiny(**edits))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    too_small = validate_data(tiny(**{**edits, "tokenizer.vocab_size": 50}))
    with pytest.raises(ValueError, match=r"token id 9\d, outside \[0, tokenizer.vocab_size=50\)"):
        build_token_data(too_small)


def test_text_files_split_into_blocks_and_hold_out_some(tmp_path):
    text = "".join(f"line {i} of a long file about optimizers\n" for i in range(40_000)).encode()
    (tmp_path / "big.txt").write_bytes(text)
    split = text_documents([str(tmp_path / "*.txt")], None, 10)
    assert split.val and split.train and b"".join(split.train + split.val).__len__() == len(text)
    assert max(len(d) for d in split.train) <= 64 * 1024 and all(d.endswith(b"\n") for d in split.train[:-1])


def test_jsonl_documents_and_their_errors(tmp_path):
    rows = [{"text": f"document {i} " * 20, "id": i} for i in range(300)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    split = jsonl_documents([str(tmp_path / "a.jsonl")], "text", None, 10)
    assert len(split.train) + len(split.val) == 300 and 10 <= len(split.val) <= 60
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:1: record has no field 'text' \(data.jsonl_field\)"):
        jsonl_documents([str(tmp_path / "b.jsonl")], "text", None, 10)
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: not valid JSON"):
        jsonl_documents([str(tmp_path / "c.jsonl")], "text", None, 10)


def test_stdlib_documents_match_the_byte_corpus():
    """A byte-level stdlib recipe sees exactly the quickstart corpus (same files, same split)."""
    split = stdlib_documents(300_000, 5)
    corpus = load_stdlib_corpus(max_bytes=300_000)
    tok = ByteTokenizer()
    assert torch.equal(tok.encode_documents(split.train), corpus.train)
    assert torch.equal(tok.encode_documents(split.val), corpus.val)


def test_bpe_trains_on_the_training_split_and_round_trips():
    split = stdlib_documents(400_000, 5)
    tok = BPETokenizer.train(split.train, vocab_size=600, train_bytes=300_000)
    assert 300 < tok.vocab_size <= 600
    ids = tok.encode_documents(split.val[:3])
    assert ids.dtype == torch.int32 and int(ids.max()) < tok.vocab_size
    first = ids[: (ids == 0).nonzero()[0, 0]].tolist()
    assert tok.decode(first) == split.val[0].decode("utf-8", errors="replace")
    assert ids.numel() < sum(len(d) for d in split.val[:3]) / 1.5  # merges compress Python source


def test_ood_sets_exist_here_and_differ_from_the_training_text():
    assert set(available_ood_sets()) == set(OOD_SETS)  # both must exist on a fresh CI machine too
    licenses, headers = load_ood_text("licenses", 100_000), load_ood_text("c_headers", 100_000)
    assert b"GNU GENERAL PUBLIC LICENSE" in licenses and b"#define" in headers
    assert len(licenses) == 100_000 and b"def " not in licenses[:20_000]


def test_batches_depend_on_seed_and_step_only():
    data = TokenData(torch.arange(10_000, dtype=torch.int32) % 251, torch.zeros(100, dtype=torch.int32))
    a = train_batch(data, seed=1, step=7, global_batch=8, seq_len=16)
    b = train_batch(data, seed=1, step=7, global_batch=8, seq_len=16)
    assert a.shape == (8, 17) and torch.equal(a, b)
    assert not torch.equal(a, train_batch(data, seed=1, step=8, global_batch=8, seq_len=16))
    assert not torch.equal(a, train_batch(data, seed=2, step=7, global_batch=8, seq_len=16))
    # windows are contiguous slices of the stream: targets are the inputs shifted by one
    assert torch.equal((a[:, 1:] - a[:, :-1]) % 251, torch.ones(8, 16, dtype=torch.long))
