"""Data at scale: streaming readers give exactly the documents of the whole-file readers they
replaced, and a warm start neither re-hashes a source's bytes nor scans its token files.

The reference functions below are the whole-file implementations (`_open_bytes`, `_iter_txt`,
`_iter_jsonl` as of the commit before streaming), kept verbatim as the oracle.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest

from cpt.data import readers
from cpt.data.readers import ReadStats, content_fingerprint, iter_documents, split_blocks
from cpt.data.tokenizer import TextTokenizer, load_tokenizer
from cpt.data.tokens import TaskTokens, check_token_range, prepare_task, source_key
from cpt.errors import CptError

HANDBOOK_TOKENIZER = Path(readers.__file__).resolve().parents[1] / "corpus" / "handbook" / "tokenizer.json"
_REF_BLANK_LINES = re.compile(rb"\r?\n[ \t]*\r?\n(?:[ \t]*\r?\n)*")


# ------------------------------------------------------------------ reference (whole-file) readers
def _ref_open_bytes(path: Path) -> bytes:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    return path.read_bytes()


def _ref_emit(text, stats):
    text = text.strip()
    if not text:
        stats.skipped_empty += 1
        return
    stats.documents += 1
    stats.bytes += len(text.encode("utf-8"))
    yield text


def _ref_iter_txt(path, stats):
    for block in _REF_BLANK_LINES.split(_ref_open_bytes(path)):
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_non_utf8 += 1
            continue
        yield from _ref_emit(text, stats)


def _ref_iter_jsonl(path, field, stats):
    for lineno, raw in enumerate(_ref_open_bytes(path).splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_non_utf8 += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CptError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or field not in obj:
            raise CptError(f"{path}:{lineno}: no {field!r} field (set tasks.N.text_field)")
        if not isinstance(obj[field], str):
            raise CptError(f"{path}:{lineno}: field {field!r} is not a string")
        yield from _ref_emit(obj[field], stats)


def _outcome(it):
    """(documents, stats) or the error message: what a reader gives, to compare two readers."""
    stats = ReadStats()
    try:
        docs = list(it(stats))
    except CptError as err:
        return ("error", str(err), stats)
    return (docs, stats)


TRICKY = [
    b"",
    b"\n",
    b"\n\n",
    b"\r\n\r\n",
    b"   \n\t\n",
    b"one",
    b"one\n",
    b"one\n\ntwo",
    b"one\n\ntwo\n",
    b"one\r\n\r\ntwo\r\n",
    b"one\r\n \t \r\n\t\r\n\r\ntwo\n\n\n",
    b"\n\none\n\n",
    b"  \n\nlead",
    b"one\n \n two \n\t\nthree",
    b"one\r\r\n\ntwo",
    b"one\n\r\r\ntwo",
    b"one\n \r \ntwo",
    b"one\ntwo\nthree",
    b"caf\xc3\xa9\n\nbad \xff byte\n\nok\n",
    b"\xe6\x97\xa5\xe6\x9c\xac\n\n\xe8\xaa\x9e",
    b"split \xe6\x97\n\n\xa5 mid-char",
    b"trailing blanks\n\n \t \n   ",
    b"\x0bvt\x0c\n\n\x85\n\nnbsp\xc2\xa0\n",
]


def _random_text(rng: random.Random, n: int) -> bytes:
    alphabet = [b"a", b"b", b" ", b"\t", b"\r", b"\n", b"\n", b"\n", b"\r\n", b"\xff", b"\xc3\xa9"]
    return b"".join(rng.choice(alphabet) for _ in range(n))


def _chunked(data: bytes, size: int):
    return (data[i : i + size] for i in range(0, len(data), size))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 1 << 20])
def test_split_blocks_matches_whole_file_split_at_every_chunking(size):
    rng = random.Random(size)
    inputs = TRICKY + [_random_text(rng, rng.randint(0, 300)) for _ in range(300)]
    for data in inputs:
        assert list(split_blocks(_chunked(data, size))) == _REF_BLANK_LINES.split(data), data


def test_split_blocks_blank_run_across_a_chunk_boundary():
    data = b"first\r\n \t\r\n" + b"  \n" * 5 + b"second\n\n"
    for cut in range(len(data) + 1):
        assert list(split_blocks(iter([data[:cut], data[cut:]]))) == [b"first", b"second", b""], cut


def _write(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    elif path.name.endswith(".xz"):
        path.write_bytes(lzma.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_txt_reader_matches_whole_file_reader(tmp_path, monkeypatch, suffix, chunk):
    monkeypatch.setattr(readers, "_CHUNK", chunk)
    rng = random.Random(7)
    inputs = TRICKY + [_random_text(rng, 400) for _ in range(20)]
    for i, data in enumerate(inputs):
        path = _write(tmp_path / f"t{i}.txt{suffix}", data)
        got = _outcome(lambda st, p=path: iter_documents(p, stats=st))
        want = _outcome(lambda st, p=path: _ref_iter_txt(p, st))
        assert got == want, data


JSONL_INPUTS = [
    b"",
    b'{"text": "a"}',
    b'{"text": "a"}\n{"text": "b"}\n',
    b'{"text": "a"}\r\n\r\n  \n{"text": " b "}\r\n',
    b'{"text": "a"}\r{"text": "lone CR"}\r\n{"text": ""}\n',
    b'{"text": "caf\xc3\xa9"}\n{"text": "\xff"}\n{"text": "ok"}',
    b'{"text": "a"}\n\n{"text": 3}\n',
    b'{"text": "a"}\r\r{"other": "x"}\n',
    b'{"text": "a"}\n{not json\n',
    b'\n\r\n{"text": "\\u00e9\\n\\nkeeps blank lines inside"}\n',
]


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
def test_jsonl_reader_matches_whole_file_reader(tmp_path, suffix):
    for i, data in enumerate(JSONL_INPUTS):
        path = _write(tmp_path / f"j{i}.jsonl{suffix}", data)
        got = _outcome(lambda st, p=path: iter_documents(p, stats=st))
        want = _outcome(lambda st, p=path: _ref_iter_jsonl(p, "text", st))
        assert got == want, data


def test_corrupt_compressed_file_is_a_cpt_error(tmp_path):
    good = gzip.compress(b"one\n\ntwo\n" * 1000)
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CptError, match="bad.txt.gz: cannot read"):
        list(iter_documents(bad))
    garbled = tmp_path / "garbled.txt.xz"
    garbled.write_bytes(b"\xfd7zXZ\x00" + b"\x00" * 64)
    with pytest.raises(CptError, match="garbled.txt.xz: cannot read"):
        list(iter_documents(garbled))


# ------------------------------------------------------------------ fingerprint cache
def _same_size_rewrite(path: Path, data: bytes) -> None:
    """Replace the bytes, keep size and mtime: a change the cache cannot see (the documented trade-off)."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_warm_source_key_does_not_read_the_file(tmp_path):
    cache = tmp_path / "cache"
    src = tmp_path / "task.txt"
    src.write_bytes(b"alpha\n\nbeta\n")
    cold = source_key(src, "auto", "text")
    first = source_key(src, "auto", "text", cache)
    assert first == cold  # the cache does not change the key (run.json keys from before stay valid)
    _same_size_rewrite(src, b"gamma\n\ndelta")
    assert source_key(src, "auto", "text", cache) == first  # unchanged: the bytes were not read again
    assert source_key(src, "auto", "text") != first  # (they did change)
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 1_000_000))
    touched = source_key(src, "auto", "text", cache)
    assert touched != first and touched == source_key(src, "auto", "text")


def test_fingerprint_cache_of_a_directory_is_per_file(tmp_path):
    cache = tmp_path / "cache"
    d = tmp_path / "ds"
    (d / "sub").mkdir(parents=True)
    (d / "a.arrow").write_bytes(b"1234")
    (d / "sub" / "b.json").write_bytes(b"{}")
    cold = content_fingerprint(d)
    assert content_fingerprint(d, cache) == cold
    _same_size_rewrite(d / "sub" / "b.json", b"[]")
    assert content_fingerprint(d, cache) == cold
    (d / "c.txt").write_bytes(b"new")  # a new file is a change even when no old file's stat moved
    assert content_fingerprint(d, cache) == content_fingerprint(d) != cold


def test_unreadable_fingerprint_entry_is_rehashed(tmp_path):
    cache = tmp_path / "cache"
    src = tmp_path / "task.txt"
    src.write_bytes(b"alpha\n")
    key = content_fingerprint(src, cache)
    (entry,) = (cache / "fingerprints").iterdir()
    entry.write_text("{not json")
    assert content_fingerprint(src, cache) == key
    assert json.loads(entry.read_text())["fingerprint"] == key


# ------------------------------------------------------------------ token range from meta.json
@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return load_tokenizer(HANDBOOK_TOKENIZER)


def _task_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "docs.txt", b"\n\n".join(f"Document number {i}, with some words in it.".encode() for i in range(60)))


def test_prepare_task_stores_the_max_id_of_each_split(tok, tmp_path):
    task = prepare_task("t", _task_file(tmp_path), tok, tmp_path / "cache", val_fraction=0.2, log=lambda m: None)
    assert task.meta["max_train_id"] == int(np.asarray(task.train).max())
    assert task.meta["max_val_id"] == int(np.asarray(task.val).max())
    check_token_range(task, tok.vocab_size)


def test_check_token_range_trusts_meta_and_does_not_scan(tok, tmp_path):
    task = prepare_task("t", _task_file(tmp_path), tok, tmp_path / "cache", val_fraction=0.2, log=lambda m: None)

    class NoScan:
        """A split that fails when anything reads it: a scan is the failure this test looks for."""

        def __getattr__(self, name):
            raise AssertionError(f"check_token_range read the token split ({name})")

        def __len__(self):
            raise AssertionError("check_token_range read the token split")

        def __array__(self, *args, **kwargs):
            raise AssertionError("check_token_range scanned the token split")

    unscannable = TaskTokens(task.name, NoScan(), NoScan(), task.directory, task.meta)
    check_token_range(unscannable, tok.vocab_size)
    # an out-of-range id is still caught, from the meta value, and the message names the entry and split
    meta = dict(task.meta, max_val_id=tok.vocab_size + 5)
    with pytest.raises(CptError, match=rf"token id {tok.vocab_size + 5} in .*{task.directory.name} \(val split\)"):
        check_token_range(TaskTokens(task.name, unscannable.train, unscannable.val, task.directory, meta), tok.vocab_size)


def test_check_token_range_scans_an_entry_written_before_the_max_was_stored(tok, tmp_path):
    task = prepare_task("t", _task_file(tmp_path), tok, tmp_path / "cache", val_fraction=0.2, log=lambda m: None)
    old_meta = {k: v for k, v in task.meta.items() if k not in ("max_train_id", "max_val_id")}
    check_token_range(TaskTokens(task.name, task.train, task.val, task.directory, old_meta), tok.vocab_size)
    top = int(np.asarray(task.train).max())
    with pytest.raises(CptError, match=r"\(train split\)"):
        check_token_range(TaskTokens(task.name, task.train, task.val, task.directory, old_meta), top)
