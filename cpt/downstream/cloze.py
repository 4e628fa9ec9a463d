"""`cpt_cloze_<lang>`: a next-word multiple-choice task per language, over held-out handbook text.

Each example is a passage of a held-out document of the bundled corpus (`cpt/corpus/handbook/`)
cut just before a word, and four candidate continuations: the word that really follows and three
distractors of similar length drawn from the same language's held-out vocabulary (same
capitalisation). A model that knows the language ranks the true word first; chance is 25%. For
Japanese, written without spaces, the unit is the next three characters instead of a word.

The documents are the validation split that training uses (`cpt.data.tokens.split_documents` with
the default `val_fraction`), so a run on the bundled corpus with `val_fraction >= 0.05` has never
trained on them. The examples are a pure function of the corpus file, the language and the
settings below (seeded), written once as JSON lines with an lm-eval task YAML next to them that
includes `cloze.yaml` (the shared definition in this package); lm-eval reads them offline with
its `json` dataset builder.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from cpt import atomic
from cpt.data.readers import content_fingerprint, iter_documents
from cpt.data.tokens import split_documents
from cpt.errors import CptError

HANDBOOK = Path(__file__).resolve().parents[1] / "corpus" / "handbook"
TEMPLATE = Path(__file__).resolve().parent / "cloze.yaml"
LANGS = ("en", "fr", "de", "ar", "ja")
PREFIX = "cpt_cloze_"
BUILDER_VERSION = "1"
VAL_FRACTION = 0.05  # the default tasks.N.val_fraction: the documents a default run never trains on
MAX_EXAMPLES = 400
CHOICES = 4
# scripts written without spaces between words: the unit is a few characters
CHAR_UNITS = {"ja": 3}
CONTEXT_WORDS, WORD_STRIDE, MIN_WORD = 48, 24, 4
CONTEXT_CHARS, CHAR_STRIDE = 120, 40


def task_names() -> list[str]:
    return [PREFIX + lang for lang in LANGS]


def _word_ok(word: str) -> bool:
    return len(word) >= MIN_WORD and word.isalpha()


def _chunk_ok(chunk: str) -> bool:
    return all(c.isalpha() and not c.isascii() for c in chunk)


def _word_examples(docs: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(context, word) candidates and the pool of distractor words, for space-separated languages."""
    candidates, pool = [], set()
    for doc in docs:
        words = [(m.start(), m.group()) for m in re.finditer(r"\S+", doc)]
        pool.update(w for _, w in words if _word_ok(w))
        last = -WORD_STRIDE
        for i in range(CONTEXT_WORDS // 2, len(words)):
            start, word = words[i]
            # the word must follow a plain space, so context + " " + word is the real text
            if i - last < WORD_STRIDE or not _word_ok(word) or doc[start - 1] != " ":
                continue
            context = doc[words[max(0, i - CONTEXT_WORDS)][0] : start - 1]
            candidates.append((context, word))
            last = i
    return candidates, sorted(pool)


def _char_examples(docs: list[str], unit: int) -> tuple[list[tuple[str, str]], list[str]]:
    candidates, pool = [], set()
    for doc in docs:
        pool.update(doc[i : i + unit] for i in range(len(doc) - unit + 1) if _chunk_ok(doc[i : i + unit]))
        last = -CHAR_STRIDE
        for i in range(CONTEXT_CHARS // 2, len(doc) - unit + 1):
            if i - last < CHAR_STRIDE or not _chunk_ok(doc[i : i + unit]):
                continue
            candidates.append((doc[max(0, i - CONTEXT_CHARS) : i], doc[i : i + unit]))
            last = i
    return candidates, sorted(pool)


def build_examples(lang: str, source: Path | None = None, max_examples: int = MAX_EXAMPLES, seed: int = 0) -> list[dict]:
    """The task's examples: {context, choices, label} with `choices[label]` the true continuation."""
    source = source or HANDBOOK / f"{lang}.txt.xz"
    if not source.is_file():
        raise CptError(f"{source}: bundled corpus file missing (needed by {PREFIX}{lang})")
    docs = list(split_documents(iter_documents(source), VAL_FRACTION, "val"))
    unit = CHAR_UNITS.get(lang)
    candidates, pool = _char_examples(docs, unit) if unit else _word_examples(docs)
    rng = random.Random(f"{PREFIX}{lang}:{seed}")
    if len(candidates) > max_examples:
        keep = sorted(rng.sample(range(len(candidates)), max_examples))
        candidates = [candidates[i] for i in keep]
    by_length: dict[int, list[str]] = {}
    for w in pool:
        by_length.setdefault(len(w), []).append(w)
    examples = []
    for context, answer in candidates:
        near = [
            w
            for n in range(len(answer) - 2, len(answer) + 3)
            for w in by_length.get(n, [])
            if w.lower() != answer.lower() and w[:1].isupper() == answer[:1].isupper()
        ]
        if len(near) < CHOICES - 1:
            continue
        choices = [answer, *rng.sample(near, CHOICES - 1)]
        rng.shuffle(choices)
        examples.append({"context": context, "choices": choices, "label": choices.index(answer)})
    if not examples:
        raise CptError(f"{source}: no cloze examples could be built for {PREFIX}{lang}")
    return examples


def write_task(lang: str, cache: Path, max_examples: int = MAX_EXAMPLES) -> Path:
    """Write (once) the examples and the lm-eval YAML of `cpt_cloze_<lang>`; returns the YAML's directory."""
    if lang not in LANGS:
        raise CptError(f"{PREFIX}{lang}: no such task; cpt's tasks are {', '.join(task_names())}")
    source = HANDBOOK / f"{lang}.txt.xz"
    settings = f"{BUILDER_VERSION}|{lang}|{content_fingerprint(source)}|{VAL_FRACTION}|{max_examples}|{TEMPLATE.read_text()}"
    key = hashlib.sha256(settings.encode()).hexdigest()[:16]
    directory = cache / "downstream" / f"{PREFIX}{lang}-{key}"
    yaml_file = directory / f"{PREFIX}{lang}.yaml"
    if yaml_file.is_file():
        return directory
    examples = build_examples(lang, source, max_examples)
    data = directory / "test.jsonl"
    # written whole; replace=False: another process that wrote the same entry first wins (same content)
    with atomic.written_whole(directory, replace=False) as tmp:
        (tmp / "test.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
        # the final paths are written into the YAML: lm-eval reads them after the rename
        task = {
            "include": str(TEMPLATE),
            "task": f"{PREFIX}{lang}",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(directory / "hf-datasets")},
            "target_delimiter": "" if lang in CHAR_UNITS else " ",
        }
        (tmp / yaml_file.name).write_text(json.dumps(task, indent=1, ensure_ascii=False), encoding="utf-8")  # JSON is YAML
    return directory
