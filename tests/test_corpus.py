"""The bundled handbook corpus (cpt/corpus/handbook/*.txt.xz): present, readable, in the right
language and in the document format cpt's `.txt` reader expects.

Offline and fast: reads only the committed files; `scripts/build_corpus.py` rebuilds them.
"""

from __future__ import annotations

import lzma
import re
from functools import cache
from pathlib import Path

import pytest

import cpt.corpus

HANDBOOK = Path(cpt.corpus.__file__).parent / "handbook"
LANGS = ("en", "fr", "de", "ar", "ja")

# Arabic block and its supplements / presentation forms; Japanese kana and CJK ideographs.
SCRIPTS = {
    "ar": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "ja": ((0x3005, 0x3007), (0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F)),
}
# Unambiguous English function words (none is a common French or German word).
ENGLISH_STOPWORDS = frozenset("the and of to is that for with this are be it by from which can not you your these they have has".split())
WORD = re.compile(r"[^\W\d_]+")
# What cpt's .txt reader treats as a document separator: a line that is empty or blank.
BLANK_LINE = re.compile(r"\n[ \t]*\n")


@cache
def text(lang: str) -> str:
    return lzma.decompress((HANDBOOK / f"{lang}.txt.xz").read_bytes()).decode("utf-8")


def documents(lang: str) -> list[str]:
    return text(lang).rstrip("\n").split("\n\n")


def english_rate(s: str) -> float:
    words = WORD.findall(s.lower())
    return sum(w in ENGLISH_STOPWORDS for w in words) / len(words)


def script_share(s: str, lang: str) -> float:
    letters = [ord(c) for c in s if c.isalpha()]
    inside = sum(any(lo <= c <= hi for lo, hi in SCRIPTS[lang]) for c in letters)
    return inside / len(letters)


@pytest.mark.parametrize("lang", LANGS)
def test_file_decompresses_to_enough_text(lang: str) -> None:
    path = HANDBOOK / f"{lang}.txt.xz"
    assert path.is_file(), f"{path} missing; run python scripts/build_corpus.py"
    size_mb = len(text(lang).encode("utf-8")) / 1e6
    assert 0.4 <= size_mb <= 1.5, f"{lang}: {size_mb:.2f} MB of text"


@pytest.mark.parametrize("lang", LANGS)
def test_document_format(lang: str) -> None:
    body = text(lang)
    docs = documents(lang)
    assert len(docs) >= 50, f"{lang}: only {len(docs)} documents"
    # One blank line between documents and none inside one: the reader's own separator
    # pattern must find exactly the document boundaries.
    assert len(BLANK_LINE.findall(body)) == len(docs) - 1
    assert "\n\n\n" not in body and "\r" not in body
    assert body.endswith("\n") and not body.endswith("\n\n")
    assert min(len(d) for d in docs) >= 200
    lines = body.split("\n")
    assert all(line == line.strip() for line in lines), "paragraphs are stripped"


@pytest.mark.parametrize("lang", ["ar", "ja"])
def test_non_latin_text_is_in_its_script(lang: str) -> None:
    share = script_share(text(lang), lang)
    assert share >= 0.70, f"{lang}: only {share:.0%} of letters in the target script"


@pytest.mark.parametrize("lang", ["fr", "de"])
def test_latin_translations_are_not_english(lang: str) -> None:
    rate = english_rate(text(lang))
    assert rate < 0.05, f"{lang}: English stop words are {rate:.1%} of the words"


def test_stopword_measure_detects_english() -> None:
    # Guards the check above against passing vacuously.
    assert english_rate(text("en")) > 0.20


def test_no_repeated_paragraphs() -> None:
    for lang in LANGS:
        paragraphs = [p for d in documents(lang) for p in d.split("\n")]
        assert len(paragraphs) == len(set(paragraphs)), lang


def test_readme_names_source_and_license() -> None:
    readme = (HANDBOOK / "README.md").read_text(encoding="utf-8")
    assert "debian-handbook" in readme
    assert "GPL-2.0+ or CC-BY-SA-3.0" in readme
    assert "python scripts/build_corpus.py" in readme
