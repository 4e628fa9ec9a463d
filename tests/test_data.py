import json

import numpy as np
import pytest

from cpt.data.readers import iter_documents
from cpt.data.tokenizer import TextTokenizer, load_tokenizer, train_bpe
from cpt.data.tokens import is_validation, prepare_task, source_key
from cpt.errors import CptError
from tests.conftest import corpus_docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    texts = corpus_docs("en")[:80] + corpus_docs("ja")[:40] + corpus_docs("ar")[:40]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(texts, vocab_size=1024).save(str(path))
    return load_tokenizer(path)


def test_bpe_round_trips_every_script(tok):
    for lang in ("en", "fr", "de", "ar", "ja"):
        doc = corpus_docs(lang)[3][:2000]
        ids = tok.encode_batch([doc])[0]
        assert tok.decode(ids) == doc
        assert max(ids) < tok.vocab_size


def test_token_file_has_eos_after_every_document_and_uint16(tok, tmp_path, small_texts):
    task = prepare_task("en", small_texts["en"], tok, tmp_path, val_fraction=0.1, log=lambda m: None)
    assert task.train.dtype == np.uint16
    n_docs = len(list(iter_documents(small_texts["en"])))
    n_val = sum(is_validation(i, 0.1) for i in range(n_docs))
    assert int((np.asarray(task.train) == tok.eos_id).sum()) == n_docs - n_val
    assert int((np.asarray(task.val) == tok.eos_id).sum()) == n_val >= 1
    assert task.train[-1] == tok.eos_id


def test_cache_hit_does_not_retokenize(tok, tmp_path, small_texts):
    logs = []
    a = prepare_task("en", small_texts["en"], tok, tmp_path, log=logs.append)
    b = prepare_task("en", small_texts["en"], tok, tmp_path, log=logs.append)
    assert len(logs) == 1 and "MB/s" in logs[0]  # tokenized once, throughput printed
    assert a.directory == b.directory and np.array_equal(a.train, b.train)
    # a changed file gets a new entry
    changed = tmp_path / "changed.txt"
    changed.write_text(small_texts["en"].read_text() + "\n\nOne more document.\n")
    c = prepare_task("en", changed, tok, tmp_path, log=logs.append)
    assert c.directory != a.directory and len(logs) == 2


def test_validation_split_is_disjoint_and_fixed(tok, tmp_path, small_texts):
    docs = list(iter_documents(small_texts["fr"]))
    val = [d for i, d in enumerate(docs) if is_validation(i, 0.2)]
    train = [d for i, d in enumerate(docs) if not is_validation(i, 0.2)]
    assert val and train and not set(val) & set(train)
    assert 0.1 < len(val) / len(docs) < 0.3
    task = prepare_task("fr", small_texts["fr"], tok, tmp_path, val_fraction=0.2, log=lambda m: None)
    expect = sum(len(ids) + 1 for ids in tok.encode_batch(val))
    assert len(task.val) == expect


def test_jsonl_parquet_and_datasets_give_the_same_tokens(tok, tmp_path, small_texts):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = list(iter_documents(small_texts["de"]))
    (tmp_path / "de.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"content": docs}), tmp_path / "de.parquet")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "de_hf"))
    quiet = dict(log=lambda m: None)
    ref = prepare_task("de", small_texts["de"], tok, tmp_path / "c1", **quiet)
    for path, field in ((tmp_path / "de.jsonl", "text"), (tmp_path / "de.parquet", "content"), (tmp_path / "de_hf", "text")):
        got = prepare_task("de", path, tok, tmp_path / "c2", text_field=field, **quiet)
        assert np.array_equal(got.train, ref.train) and np.array_equal(got.val, ref.val), path


def test_bad_sources_name_the_file(tok, tmp_path):
    quiet = dict(log=lambda m: None)
    with pytest.raises(CptError, match="missing.txt: data file .* not found"):
        prepare_task("x", tmp_path / "missing.txt", tok, tmp_path, **quiet)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CptError, match="empty.txt: no documents"):
        prepare_task("x", empty, tok, tmp_path, **quiet)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(CptError, match=r"bad.jsonl:2: no 'text' field"):
        prepare_task("x", bad, tok, tmp_path, **quiet)
    # the error names the field of the task (or replay source) whose file it is, not a placeholder
    with pytest.raises(CptError, match=r"bad.jsonl:2: no 'text' field \(set tasks.1.text_field\)$"):
        prepare_task("x", bad, tok, tmp_path, where="tasks.1 (x)", **quiet)
    with pytest.raises(CptError, match=r"bad.jsonl:2: no 'text' field \(set replay.sources.0.text_field\)$"):
        list(iter_documents(bad, where="replay.sources.0.path"))
    odd = tmp_path / "web.foo"  # an unknown format is found when the source's content key is made, before any reading
    odd.write_text("text\n")
    with pytest.raises(CptError, match=r"web.foo: unknown data format.*replay.sources.0.format"):
        source_key(odd, "auto", "text", where="replay.sources.0.path")


def test_non_utf8_documents_are_skipped_and_counted(tok, tmp_path, small_texts):
    raw = small_texts["en"].read_bytes() + b"\n\nbroken \xff\xfe bytes here\n\nA last good document.\n"
    p = tmp_path / "mixed.txt"
    p.write_bytes(raw)
    task = prepare_task("en", p, tok, tmp_path, log=lambda m: None)
    assert task.meta["skipped_non_utf8"] == 1
