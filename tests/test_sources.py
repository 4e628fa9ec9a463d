"""A task's sources: a file, a directory of shards, a glob or a list read as one stream of documents;
`.zst` inputs; `documents: lines` for one-paragraph-per-line text; and the errors that say what to fix."""

import hashlib
import json

import pytest
import yaml
import zstandard

import cpt
from cpt.cli import main
from cpt.config import load_config, validate
from cpt.data.readers import content_fingerprint, expand_sources, iter_documents
from cpt.data.tokens import source_key
from cpt.errors import CptError
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory, small_texts):
    """The en text as three .txt shards in a directory, and the same documents as one file."""
    root = tmp_path_factory.mktemp("shards")
    docs = list(iter_documents(small_texts["en"]))
    third = len(docs) // 3
    parts = [docs[:third], docs[third : 2 * third], docs[2 * third :]]
    folder = root / "en"
    folder.mkdir()
    for i, part in enumerate(parts):
        (folder / f"shard-{i:02d}.txt").write_text("\n\n".join(part) + "\n")
    (folder / ".hidden.txt").write_text("never read\n")
    (folder / "README").write_text("not a recognised format, skipped\n")
    whole = root / "en-all.txt"
    whole.write_text("\n\n".join(docs) + "\n")
    return {"docs": docs, "dir": folder, "whole": whole, "files": sorted(folder.glob("shard-*.txt"))}


def test_directory_glob_and_list_give_the_documents_of_one_file(shards):
    forms = {
        "dir": str(shards["dir"]),
        "glob": str(shards["dir"] / "*.txt"),
        "recursive glob": str(shards["dir"].parent / "**" / "shard-*.txt"),
        "list": [str(f) for f in shards["files"]],
        "list of globs": [str(shards["dir"] / "shard-00.txt"), str(shards["dir"] / "shard-0[12].txt")],
    }
    assert list(iter_documents(shards["whole"])) == shards["docs"]
    for what, path in forms.items():
        assert expand_sources(path) == shards["files"], what
        assert list(iter_documents(path)) == shards["docs"], what
    # one key for every way of naming the same shards, another for the concatenated file
    keys = {source_key(path, "auto", "text") for path in forms.values()}
    assert len(keys) == 1 and source_key(shards["whole"], "auto", "text") not in keys


def test_sharded_task_trains_the_same_loss_matrix(shards, small_texts, tmp_path):
    def run(path, name):
        cfg = tiny_config(small_texts)
        cfg["tasks"][0]["path"] = path
        for t in cfg["tasks"]:
            t["tokens"] = 3000
        return cpt.train(validate(cfg), tmp_path / name)["loss_matrix"]

    ref = run(str(shards["whole"]), "whole")
    assert run(str(shards["dir"]), "dir") == ref
    assert run(str(shards["dir"] / "*.txt"), "glob") == ref
    assert run([str(f) for f in shards["files"]], "list") == ref


def test_relative_globs_resolve_against_the_config_file(shards, tmp_path):
    cfg = tmp_path / "run.yaml"
    rel_glob = str(shards["dir"].relative_to(shards["dir"].anchor))  # a path from / written relative to tmp_path below
    up = "../" * len(tmp_path.relative_to(tmp_path.anchor).parts)
    cfg.write_text(yaml.safe_dump({"tasks": [{"name": "en", "path": [up + rel_glob + "/shard-0*.txt"], "tokens": 1000}]}))
    path = load_config(cfg).tasks[0].path
    assert isinstance(path, list) and path[0].endswith("shard-0*.txt") and path[0].startswith("/")
    assert expand_sources(path) == shards["files"]


def test_a_datasets_directory_stays_one_source(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "hf"))
    assert expand_sources(tmp_path / "hf") == [tmp_path / "hf"]
    assert list(iter_documents(tmp_path / "hf")) == ["one", "two"]


def test_missing_sources_name_the_field(tmp_path):
    with pytest.raises(CptError, match=r"^tasks\.1\.path: no files match .*/nothing/\*\.jsonl$"):
        source_key(str(tmp_path / "nothing" / "*.jsonl"), "auto", "text", where="tasks.1.path")
    with pytest.raises(CptError, match=r"tasks\.N\.path: .*absent\.txt: data file or directory not found"):
        list(iter_documents([str(tmp_path / "absent.txt")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CptError, match=r"tasks\.N\.path: .*empty: directory holds no"):
        expand_sources(tmp_path / "empty")


def test_cli_names_the_task_field_of_an_empty_glob(tmp_path, small_texts, capsys):
    cfg = tiny_config(small_texts)
    cfg["tasks"][1]["path"] = "fr/*.jsonl"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert f"tasks.1.path: no files match {tmp_path}/fr/*.jsonl" in capsys.readouterr().err


def test_zst_gives_the_documents_of_the_plain_file(tmp_path, small_texts):
    for lang in ("en", "de"):
        raw = small_texts[lang].read_bytes()
        packed = tmp_path / f"{lang}.txt.zst"
        packed.write_bytes(zstandard.ZstdCompressor().compress(raw))
        assert list(iter_documents(packed)) == list(iter_documents(small_texts[lang]))
    docs = list(iter_documents(small_texts["fr"]))
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    (tmp_path / "fr.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode()))
    assert list(iter_documents(tmp_path / "fr.jsonl.zst")) == docs
    (tmp_path / "bad.txt.zst").write_bytes(b"not zstd at all")
    with pytest.raises(CptError, match="bad.txt.zst: cannot read"):
        list(iter_documents(tmp_path / "bad.txt.zst"))


def _per_line_file(tmp_path, small_texts):
    paragraphs = [" ".join(d.split()) for d in iter_documents(small_texts["fr"])]
    path = tmp_path / "fr.txt"
    path.write_text("\n".join(paragraphs) + "\n")
    return path, paragraphs


def test_documents_lines_reads_one_document_per_line(tmp_path, small_texts):
    path, paragraphs = _per_line_file(tmp_path, small_texts)
    assert list(iter_documents(path)) == ["\n".join(paragraphs)]  # auto: no blank line, so one document
    assert list(iter_documents(path, documents="lines")) == paragraphs
    assert source_key(path, "auto", "text", documents="lines") != source_key(path, "auto", "text")
    assert source_key(path, "auto", "text", documents="blank-lines") == source_key(path, "auto", "text")


def test_one_document_per_line_without_the_setting_says_what_to_set(tmp_path, small_texts, capsys):
    path, paragraphs = _per_line_file(tmp_path, small_texts)
    cfg = tiny_config(small_texts)
    cfg["tasks"][1]["path"] = str(path)
    for t in cfg["tasks"]:
        t["tokens"] = 3000
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{path} holds 1 document(s)" in err
    assert "in a .txt file a document is a block separated by a blank line" in err
    assert "cpt: error: tasks.1 (fr): " in err and "set tasks.1.documents: lines" in err
    # with the setting the same file trains (and a cached blank-lines entry is not reused)
    assert main(["train", str(tmp_path / "c.yaml"), "tasks.1.documents=lines", "--out", str(tmp_path / "r2")]) == 0


def test_a_single_file_keeps_its_source_key(tmp_path, small_texts):
    cache = tmp_path / "cache"
    for path, fmt, field in ((small_texts["en"], "auto", "text"), (small_texts["de"], "txt", "body")):
        before = hashlib.sha256((content_fingerprint(path) + f"|txt|{field}").encode()).hexdigest()[:24]
        assert source_key(path, fmt, field) == before == source_key(str(path), fmt, field, cache) == source_key([str(path)], fmt, field)
