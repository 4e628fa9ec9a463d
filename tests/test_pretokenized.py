"""Pre-tokenized readers against files written by the real tools (datatrove, megatron-core, numpy).

Every format must give back exactly the ids a byte-level BPE assigns to ~50 real handbook pages,
one document per page ending in EOS, and every broken file must be a one-line CptError naming it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from cpt.data.pretokenized import (
    PARTNER_FORMATS,
    PRETOKENIZED_FORMATS,
    TokenShard,
    _eos_ends,
    ends_with_eos,
    max_token_id,
    open_shard,
    pretokenized_format,
)
from cpt.data.tokenizer import TextTokenizer, load_tokenizer, train_bpe
from cpt.errors import CptError
from tests.conftest import corpus_docs


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return [d for d in corpus_docs("en") if len(d) < 6000][:50]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(docs, vocab_size=600).save(str(path))
    return path


@pytest.fixture(scope="module")
def tok(tok_path) -> TextTokenizer:
    return load_tokenizer(tok_path)


@pytest.fixture(scope="module")
def expected(tok, docs) -> list[list[int]]:
    return [ids + [tok.eos_id] for ids in tok.encode_batch(docs)]


def assert_documents(shard: TokenShard, expected: list[list[int]]) -> None:
    assert shard.documents() == len(expected)
    assert shard.doc_ends.dtype == np.int64 and int(shard.doc_ends[-1]) == len(shard.tokens)
    assert (np.diff(shard.doc_ends) > 0).all()
    assert isinstance(shard.tokens, np.memmap) and not shard.tokens.flags.writeable
    for i, ids in enumerate(expected):
        assert shard.document(i).tolist() == ids, f"document {i}"


def assert_error(fn, file: Path, *words: str) -> str:
    with pytest.raises(CptError) as info:
        fn()
    msg = str(info.value)
    assert str(file) in msg and "\n" not in msg, msg
    for word in words:
        assert word in msg, msg
    return msg


@pytest.fixture(scope="module")
def datatrove_dir(tmp_path_factory, docs, tok_path) -> Path:
    """Run datatrove's own JsonlReader → DocumentTokenizer pipeline, offline, on the real pages."""
    pytest.importorskip("datatrove")
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    root = tmp_path_factory.mktemp("datatrove")
    (root / "in").mkdir()
    with open(root / "in" / "pages.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"text": text, "id": str(i)}) + "\n")
    writer = DocumentTokenizer(
        output_folder=str(root / "out"), tokenizer_name_or_path=str(tok_path), eos_token="<|endoftext|>", shuffle_documents=False
    )
    LocalPipelineExecutor(
        [JsonlReader(str(root / "in"), glob_pattern="*.jsonl"), writer], tasks=1, workers=1, logging_dir=str(root / "logs")
    ).run()
    return root / "out"


def test_datatrove_real_files(datatrove_dir, expected, tmp_path):
    names = sorted(p.name for p in datatrove_dir.iterdir())
    assert names == ["00000_unshuffled.ds", "00000_unshuffled.ds.index", "00000_unshuffled.ds.metadata"]
    ds = datatrove_dir / "00000_unshuffled.ds"
    assert pretokenized_format(ds) == "datatrove"
    assert pretokenized_format(datatrove_dir / "00000_unshuffled.ds.index") in PARTNER_FORMATS
    assert pretokenized_format(datatrove_dir / "00000_unshuffled.ds.metadata") in PARTNER_FORMATS
    shard = open_shard(ds)
    assert shard.fmt == "datatrove" and shard.tokens.dtype == np.uint16 and shard.path == ds
    assert_documents(shard, expected)

    bare = tmp_path / "bare.ds"
    shutil.copy(ds, bare)
    shutil.copy(datatrove_dir / "00000_unshuffled.ds.index", tmp_path / "bare.ds.index")
    assert_documents(open_shard(bare), expected)


def test_datatrove_uint32_from_metadata(tmp_path, expected):
    flat = np.concatenate([np.array(d) for d in expected])
    ds = tmp_path / "wide.ds"
    flat.astype("<u4").tofile(ds)
    np.cumsum([len(d) for d in expected]).astype("<u8").tofile(tmp_path / "wide.ds.index")
    (tmp_path / "wide.ds.metadata").write_text("my/tokenizer|4\n123\n123 T")
    shard = open_shard(ds)
    assert shard.tokens.dtype == np.uint32
    assert_documents(shard, expected)
    (tmp_path / "wide.ds.metadata").unlink()
    assert open_shard(ds).tokens.dtype == np.uint32


def test_datatrove_errors(datatrove_dir, tmp_path):
    ds, index = tmp_path / "a.ds", tmp_path / "a.ds.index"
    shutil.copy(datatrove_dir / "00000_unshuffled.ds", ds)
    shutil.copy(datatrove_dir / "00000_unshuffled.ds.metadata", tmp_path / "a.ds.metadata")
    assert_error(lambda: open_shard(ds), index, "missing")

    ends = np.fromfile(datatrove_dir / "00000_unshuffled.ds.index", dtype="<u8")
    ends[:-1].tofile(index)
    assert_error(lambda: open_shard(ds), ds, "bytes")
    swapped = ends.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    swapped.tofile(index)
    assert_error(lambda: open_shard(ds), index, "increasing")
    index.write_bytes(ends.tobytes()[:-3])
    assert_error(lambda: open_shard(ds), index, "multiple of 8")
    ends.tofile(index)
    (tmp_path / "a.ds.metadata").write_text("tok|3\n1\n1 T")
    assert_error(lambda: open_shard(ds), tmp_path / "a.ds.metadata", "token size")
    (tmp_path / "a.ds.metadata").write_text("tok|4\n1\n1 T")
    assert_error(lambda: open_shard(ds), ds, "4-byte")
    ds.write_bytes(b"")
    assert_error(lambda: open_shard(ds), ds, "empty")


def build_megatron(prefix: Path, documents: list[list[int]], dtype=np.uint16, split: bool = False) -> None:
    """Write with megatron-core's own builder; with `split`, every document is stored as two sequences."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 on torch.Tensor.__array__, inside megatron
        for ids in documents:
            cut = len(ids) // 2
            builder.add_document(torch.tensor(ids), [cut, len(ids) - cut] if split else [len(ids)])
    builder.finalize(str(prefix) + ".idx")


@pytest.fixture(scope="module")
def megatron_prefix(tmp_path_factory, expected) -> Path:
    pytest.importorskip("megatron.core")
    prefix = tmp_path_factory.mktemp("megatron") / "pages_text_document"
    build_megatron(prefix, expected)
    return prefix


def test_megatron_real_files(megatron_prefix, expected):
    idx, bin_ = Path(str(megatron_prefix) + ".idx"), Path(str(megatron_prefix) + ".bin")
    assert pretokenized_format(idx) == "megatron"
    assert pretokenized_format(bin_) == "megatron-data" and "megatron-data" in PARTNER_FORMATS
    assert pretokenized_format(megatron_prefix) == "megatron"
    for entry in (megatron_prefix, idx, bin_, str(megatron_prefix)):
        shard = open_shard(entry)
        assert shard.fmt == "megatron" and shard.path == bin_ and shard.tokens.dtype == np.uint16
        assert_documents(shard, expected)


def test_megatron_cross_check_with_indexed_dataset(tmp_path, expected):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = tmp_path / "split"
    build_megatron(prefix, expected, dtype=np.int32, split=True)
    ref = IndexedDataset(str(prefix))
    assert len(ref) == 2 * len(expected) and len(ref.document_indices) == len(expected) + 1
    shard = open_shard(prefix)
    assert shard.tokens.dtype == np.int32
    assert_documents(shard, expected)
    for d in range(shard.documents()):
        seqs = [ref[s] for s in range(ref.document_indices[d], ref.document_indices[d + 1])]
        assert np.concatenate(seqs).tolist() == shard.document(d).tolist()


def test_megatron_without_eod(tmp_path, expected, tok):
    pytest.importorskip("megatron.core")
    bare = [ids[:-1] for ids in expected]
    build_megatron(tmp_path / "noeod", bare)
    shard = open_shard(tmp_path / "noeod.idx")
    assert_documents(shard, bare)
    assert not ends_with_eos(shard, tok.eos_id)


def test_megatron_errors(megatron_prefix, tmp_path):
    src_idx, src_bin = Path(str(megatron_prefix) + ".idx"), Path(str(megatron_prefix) + ".bin")
    idx, bin_ = tmp_path / "m.idx", tmp_path / "m.bin"
    shutil.copy(src_bin, bin_)
    assert_error(lambda: open_shard(tmp_path / "m"), idx, "missing")
    assert_error(lambda: open_shard(bin_, "megatron"), idx, "missing")
    shutil.copy(src_idx, idx)
    bin_.unlink()
    assert_error(lambda: open_shard(idx), bin_, "missing")
    shutil.copy(src_bin, bin_)
    assert open_shard(idx).documents() == 50

    raw = src_idx.read_bytes()
    idx.write_bytes(raw[:-10])
    assert_error(lambda: open_shard(idx), idx, "truncated")
    idx.write_bytes(raw[:20])
    assert_error(lambda: open_shard(idx), idx, "truncated")
    idx.write_bytes(b"NOTMMIDX\x00" + raw[9:])
    assert_error(lambda: open_shard(idx), idx, "magic", "not a Megatron index")
    idx.write_bytes(raw[:9] + (2).to_bytes(8, "little") + raw[17:])
    assert_error(lambda: open_shard(idx), idx, "version 2")
    idx.write_bytes(raw[:17] + bytes([42]) + raw[18:])
    assert_error(lambda: open_shard(idx), idx, "dtype code 42")
    idx.write_bytes(raw + b"\x00" * 7)
    assert_error(lambda: open_shard(idx), idx, "corrupt")

    idx.write_bytes(raw)
    with open(bin_, "ab") as f:
        f.write(b"\x01\x02")
    assert_error(lambda: open_shard(idx), bin_, "holds")
    bin_.write_bytes(src_bin.read_bytes()[:-2])
    assert_error(lambda: open_shard(idx), bin_, "holds")


def tokens_file(tmp_path: Path, expected: list[list[int]], suffix: str, dtype: str, tail: list[int] = ()) -> Path:
    flat = np.array([t for d in expected for t in d] + list(tail), dtype=dtype)
    path = tmp_path / f"tokens_{dtype}{suffix}"
    if suffix == ".npy":
        np.save(path, flat)
    else:
        flat.tofile(path)
    return path


@pytest.mark.parametrize(
    ("suffix", "dtype"), [(".npy", "uint16"), (".npy", "uint32"), (".npy", "int32"), (".bin", "uint16"), (".bin", "uint32")]
)
def test_plain_tokens(tmp_path, expected, tok, suffix, dtype):
    path = tokens_file(tmp_path, expected, suffix, dtype)
    assert pretokenized_format(path) == "tokens"
    shard = open_shard(path, dtype=dtype if suffix == ".bin" else None, eos_id=tok.eos_id)
    assert shard.fmt == "tokens" and shard.tokens.dtype == np.dtype(dtype)
    assert_documents(shard, expected)
    assert ends_with_eos(shard, tok.eos_id)

    tail = expected[0][:5]
    path = tokens_file(tmp_path, expected, suffix, dtype, tail=tail)
    shard = open_shard(path, "tokens", dtype=dtype, eos_id=tok.eos_id)
    assert_documents(shard, expected + [tail])
    assert not ends_with_eos(shard, tok.eos_id)


def test_eos_scan_is_chunk_independent(expected, tok):
    flat = np.array([t for d in expected for t in d] + [7, 7], dtype=np.uint16)
    whole = _eos_ends(flat, tok.eos_id, chunk=len(flat) + 1)
    for chunk in (1, 2, 7, 1000, len(flat) - 1):
        assert _eos_ends(flat, tok.eos_id, chunk=chunk).tolist() == whole.tolist()
    assert whole[-1] == len(flat) and len(whole) == len(expected) + 1
    assert _eos_ends(np.array([5, 5, 5], dtype=np.uint16), 0).tolist() == [3]
    assert _eos_ends(np.array([0, 0], dtype=np.uint16), 0).tolist() == [1, 2]


def test_plain_tokens_errors(tmp_path, expected, tok):
    binary = tokens_file(tmp_path, expected, ".bin", "uint16")
    assert_error(lambda: open_shard(binary, eos_id=tok.eos_id, where="tasks.0.path"), binary, "tasks.0.dtype")
    assert_error(lambda: open_shard(binary, dtype="uint16", where="tasks.3.path"), binary, "tasks.3.eos_id")
    assert_error(lambda: open_shard(binary, dtype="float16", eos_id=tok.eos_id), binary, "unknown token dtype")
    assert_error(lambda: open_shard(binary, dtype="uint16", eos_id=70_000), binary, "EOS id 70000")
    with open(binary, "ab") as f:
        f.write(b"\x01")
    assert_error(lambda: open_shard(binary, dtype="uint16", eos_id=tok.eos_id), binary, "whole number")
    binary.write_bytes(b"")
    assert_error(lambda: open_shard(binary, dtype="uint16", eos_id=tok.eos_id), binary, "empty")

    npy = tokens_file(tmp_path, expected, ".npy", "uint32")
    assert_error(lambda: open_shard(npy, eos_id=tok.eos_id, dtype="uint16"), npy, "uint32")
    np.save(npy, np.zeros((3, 4), dtype=np.uint16))
    assert_error(lambda: open_shard(npy, eos_id=tok.eos_id), npy, "1-D")
    np.save(npy, np.zeros(4, dtype=np.float32))
    assert_error(lambda: open_shard(npy, eos_id=tok.eos_id), npy, "float32")
    np.save(npy, np.zeros(0, dtype=np.uint16))
    assert_error(lambda: open_shard(npy, eos_id=tok.eos_id), npy, "empty")
    npy.write_bytes(b"not a numpy file at all")
    assert_error(lambda: open_shard(npy, eos_id=tok.eos_id), npy, ".npy")


def test_detection_and_unknown_paths(tmp_path):
    assert set(PRETOKENIZED_FORMATS) == {"megatron", "datatrove", "tokens"}
    for name in ("a.txt", "a.jsonl", "a.parquet", "a.json.gz"):
        (tmp_path / name).write_text("x")
        assert pretokenized_format(tmp_path / name) is None
        assert_error(lambda n=name: open_shard(tmp_path / n), tmp_path / name, "not a pre-tokenized file")
    assert pretokenized_format(tmp_path / "lonely.bin") == "tokens"
    assert pretokenized_format(tmp_path / "nothing") is None
    assert_error(lambda: open_shard(tmp_path / "nothing", where="tasks.2.path"), tmp_path / "nothing", "not found", "tasks.2.path")
    assert_error(lambda: open_shard(tmp_path / "a.txt", "parquet"), tmp_path / "a.txt", "unknown pre-tokenized format")


def test_max_token_id(datatrove_dir, megatron_prefix, tmp_path, expected, tok):
    true_max = max(max(d) for d in expected)
    shards = [
        open_shard(datatrove_dir / "00000_unshuffled.ds"),
        open_shard(megatron_prefix),
        open_shard(tokens_file(tmp_path, expected, ".npy", "uint32"), eos_id=tok.eos_id),
    ]
    for shard in shards:
        assert max_token_id(shard) == true_max
        assert max_token_id(shard, chunk=999) == true_max
        assert ends_with_eos(shard, tok.eos_id) and ends_with_eos(shard, tok.eos_id, sample=1)
    empty = TokenShard(tmp_path / "x.bin", np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.int64), "tokens")
    assert max_token_id(empty) == -1 and not ends_with_eos(empty, 0)


def test_megatron_multimodal_and_empty(tmp_path, expected, tok):
    """A multimodal index carries one int8 mode per sequence after the document indices; it is ignored."""
    pytest.importorskip("megatron.core")
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "mm.bin"), dtype=np.uint16, multimodal=True)
    for ids in expected[:5]:
        builder.add_document(torch.tensor(ids).numpy(), [len(ids)], modes=[1])
    builder.finalize(str(tmp_path / "mm.idx"))
    assert_documents(open_shard(tmp_path / "mm.idx"), expected[:5])

    IndexedDatasetBuilder(str(tmp_path / "none.bin"), dtype=np.uint16).finalize(str(tmp_path / "none.idx"))
    assert_error(lambda: open_shard(tmp_path / "none"), tmp_path / "none.bin", "empty")
