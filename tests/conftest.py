"""Shared fixtures: an isolated token cache and small real-text task files from the bundled corpus."""

from __future__ import annotations

import lzma
import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "cpt" / "corpus" / "handbook"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Never touch the user's ~/.cache/cpt; share one cache across the session (tokenize once)."""
    cache = tmp_path_factory.mktemp("cpt-cache")
    old = os.environ.get("CPT_CACHE")
    os.environ["CPT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("CPT_CACHE", None)
    else:
        os.environ["CPT_CACHE"] = old


def corpus_docs(lang: str) -> list[str]:
    text = lzma.decompress((CORPUS / f"{lang}.txt.xz").read_bytes()).decode("utf-8")
    return [d for d in text.split("\n\n") if d.strip()]


@pytest.fixture(scope="session")
def small_texts(tmp_path_factory) -> dict[str, Path]:
    """~60 KB of real handbook text per language, as .txt files (documents = handbook pages)."""
    out = tmp_path_factory.mktemp("texts")
    paths = {}
    for lang in ("en", "fr", "de"):
        docs, size = [], 0
        for d in corpus_docs(lang):
            if len(d) > 6000:  # many short pages make a better split than two long ones
                continue
            docs.append(d)
            size += len(d.encode())
            if size > 60_000:
                break
        p = out / f"{lang}.txt"
        p.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        paths[lang] = p
    return paths


def tiny_config(texts: dict[str, Path], **sections) -> dict:
    """A 2-task config of the tiny preset that trains in seconds."""
    cfg = {
        "tasks": [
            {"name": "en", "path": str(texts["en"]), "tokens": 12_000},
            {"name": "fr", "path": str(texts["fr"]), "tokens": 12_000},
        ],
        "tokenizer": {"vocab_size": 512},
        "model": {"preset": "tiny"},
        "training": {"seq_len": 64, "batch_size": 4, "lr": 3e-3, "eval_tokens": 2048},
        "logging": {"progress": False, "log_every": 5},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    return cfg


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's own gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
