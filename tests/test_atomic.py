"""cpt.atomic: files and directories are replaced whole or not at all, on real files."""

import hashlib
import json
import os
import stat

import pytest
import torch

from cpt import atomic


def _tree(directory):
    """{relative path: sha256} of every file under `directory`: byte-identical trees compare equal."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def _hidden(directory):
    """What a write left next to its target: temporaries and moved-aside directories start with a dot."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------- files
def test_write_text_bytes_and_json_replace_the_whole_file(tmp_path):
    f = tmp_path / "summary.json"
    atomic.write_json(f, {"a": [1, 2.5, None], "é": "ü"})
    assert f.read_text(encoding="utf-8") == json.dumps({"a": [1, 2.5, None], "é": "ü"}, indent=2)
    atomic.write_json(f, {"é": "ü"}, indent=None, ensure_ascii=False)
    assert f.read_text(encoding="utf-8") == '{"é": "ü"}'
    atomic.write_text(tmp_path / "r.md", "line\r\nnext\n")
    assert (tmp_path / "r.md").read_bytes() == b"line\r\nnext\n"  # written as given
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01" * 10)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01" * 10
    assert _hidden(tmp_path) == []


def test_json_that_fails_half_way_leaves_the_old_file_byte_identical(tmp_path):
    f = tmp_path / "summary.json"
    f.write_text('{"old": true}')
    before = f.read_bytes()
    # a long list first, so json.dump has streamed real bytes to the temporary before it fails
    bad = {"rows": list(range(50_000)), "oops": object()}
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic.write_json(f, bad)
    assert f.read_bytes() == before
    assert _hidden(tmp_path) == []


def test_a_failing_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    f = tmp_path / "report.html"
    f.write_bytes(b"<p>old</p>")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_text(f, "<p>new</p>" * 1000)
    monkeypatch.undo()
    assert f.read_bytes() == b"<p>old</p>"
    assert _hidden(tmp_path) == []


def test_a_failing_writer_of_written_file_leaves_the_old_file(tmp_path):
    f = tmp_path / "bpe.json"
    f.write_text("old")
    with pytest.raises(RuntimeError, match="half"):
        with atomic.written_file(f) as tmp:
            tmp.write_text("half of the new one")
            raise RuntimeError("killed half way")
    assert f.read_text() == "old" and _hidden(tmp_path) == []
    with atomic.written_file(f) as tmp:  # what torch.save / Tokenizer.save do: write to a path
        torch.save({"w": torch.ones(3)}, tmp)
    assert torch.equal(torch.load(f, weights_only=True)["w"], torch.ones(3))


def test_permissions_follow_the_umask_or_the_replaced_file(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    atomic.write_text(tmp_path / "new.txt", "x")
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o666 & ~umask  # as open() would, not mkstemp's 0600
    (tmp_path / "old.txt").write_text("x")
    os.chmod(tmp_path / "old.txt", 0o640)
    atomic.write_text(tmp_path / "old.txt", "y")
    assert stat.S_IMODE((tmp_path / "old.txt").stat().st_mode) == 0o640


# ------------------------------------------------------------------------- directories
def _filled(directory, files):
    directory.mkdir(parents=True)
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def test_written_whole_replaces_an_existing_directory_whole(tmp_path):
    out = _filled(tmp_path / "final", {"config.json": "{}", "stale.bin": "old weights", "sub/x": "1"})
    with atomic.written_whole(out) as tmp:
        assert tmp.parent == out.parent and tmp != out and tmp.name.startswith(".")
        (tmp / "config.json").write_text('{"new": 1}')
    assert _tree(out) == _tree(_filled(tmp_path / "expect", {"config.json": '{"new": 1}'}))  # no stale file survives
    assert _hidden(tmp_path) == []


def test_an_exception_inside_written_whole_leaves_the_old_directory_intact(tmp_path):
    out = _filled(tmp_path / "task-0-en", {"config.json": "{}", "model.safetensors": "weights", "sub/tok.json": "t"})
    before = _tree(out)
    with pytest.raises(KeyboardInterrupt):
        with atomic.written_whole(out) as tmp:
            (tmp / "config.json").write_text("half")
            raise KeyboardInterrupt  # a kill signal is not an Exception: it is handled all the same
    assert _tree(out) == before
    assert _hidden(tmp_path) == []
    with pytest.raises(ValueError):  # and a directory that did not exist stays absent
        with atomic.written_whole(tmp_path / "new") as tmp:
            (tmp / "a").write_text("a")
            raise ValueError
    assert not (tmp_path / "new").exists() and _hidden(tmp_path) == []


def test_a_failing_final_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    out = _filled(tmp_path / "final", {"config.json": "{}", "model.safetensors": "weights"})
    before = _tree(out)
    real = os.replace

    def fail_into_out(src, dst):
        if str(dst) == str(out) and ".tmp-" in str(src):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_into_out)
    with pytest.raises(OSError, match="Input/output"):
        with atomic.written_whole(out) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
    monkeypatch.undo()
    assert _tree(out) == before
    assert _hidden(tmp_path) == []


def test_replace_false_keeps_the_entry_another_process_finished_first(tmp_path):
    out = tmp_path / "tokens" / "abc"
    with atomic.written_whole(out, replace=False) as tmp:
        (tmp / "meta.json").write_text("ours")
        _filled(out, {"meta.json": "theirs"})  # the other process renames its entry in meanwhile
    assert (out / "meta.json").read_text() == "theirs"
    assert _hidden(out.parent) == []


def test_a_given_staging_directory_is_renamed_or_deleted(tmp_path):
    staged = _filled(tmp_path / ".staging", {"dcp/shard-0": "a"})
    with atomic.written_whole(tmp_path / "step-1", tmp=staged) as tmp:
        assert tmp == staged
        (tmp / "state.pt").write_text("s")
    assert not staged.exists()
    assert (tmp_path / "step-1" / "dcp" / "shard-0").read_text() == "a" and (tmp_path / "step-1" / "state.pt").read_text() == "s"
    staged = _filled(tmp_path / ".staging2", {"dcp/shard-0": "a"})
    with pytest.raises(RuntimeError):
        with atomic.written_whole(tmp_path / "step-2", tmp=staged):
            raise RuntimeError("disk full")
    assert not staged.exists() and not (tmp_path / "step-2").exists()


# ------------------------------------------------------------------------- HF checkpoints
@pytest.fixture(scope="module")
def tiny_model_and_tokenizer():
    from cpt.data.tokenizer import TextTokenizer, _fingerprint, train_bpe
    from cpt.model import build_model

    text = ["the cat sat on the mat", "le chat est sur le tapis", "die Katze sitzt auf der Matte"] * 50
    tok = train_bpe(text, 300, 1)
    tokenizer = TextTokenizer(tok, tok.token_to_id("<|endoftext|>"), _fingerprint(tok), "test")

    def model(seed):
        return build_model("tiny", tokenizer.vocab_size, tokenizer.eos_id, 64, seed)

    return model, tokenizer


class _TokenizerThatFails:
    def save_pretrained(self, directory):
        (directory / "tokenizer.json").write_text('{"half": ')  # what a crash mid-save leaves
        raise OSError(28, "No space left on device")


def _same_weights(directory, model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    AutoTokenizer.from_pretrained(str(directory))
    mine = model.state_dict()
    return all(torch.equal(v, mine[k]) for k, v in loaded.state_dict().items())


def test_save_hf_into_an_existing_checkpoint_replaces_it_whole(tmp_path, tiny_model_and_tokenizer):
    from cpt.model import save_hf

    make, tokenizer = tiny_model_and_tokenizer
    directory = tmp_path / "checkpoints" / "final"
    first, second = make(1), make(2)
    save_hf(first, directory, tokenizer)
    (directory / "model-00002-of-00002.safetensors").write_text("a stale shard of an older save")
    save_hf(second, directory, tokenizer)
    assert not (directory / "model-00002-of-00002.safetensors").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in directory.iterdir()}
    assert _same_weights(directory, second) and not _same_weights(directory, first)
    assert _hidden(directory.parent) == []


def test_a_crash_during_save_hf_leaves_the_previous_checkpoint_intact_and_loadable(tmp_path, tiny_model_and_tokenizer):
    from cpt.model import save_hf

    make, tokenizer = tiny_model_and_tokenizer
    directory = tmp_path / "checkpoints" / "task-0-en"
    previous = make(1)
    save_hf(previous, directory, tokenizer)
    before = _tree(directory)
    with pytest.raises(OSError, match="No space left"):
        save_hf(make(2), directory, _TokenizerThatFails())  # the weights are written, then the tokenizer fails
    assert _tree(directory) == before
    assert _same_weights(directory, previous)
    assert _hidden(directory.parent) == []
    with pytest.raises(OSError):  # a checkpoint that never existed is not created half
        save_hf(make(2), tmp_path / "checkpoints" / "final", _TokenizerThatFails())
    assert not (tmp_path / "checkpoints" / "final").exists()
