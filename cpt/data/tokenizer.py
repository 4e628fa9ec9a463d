"""Tokenizers: load a `tokenizer.json` / HF tokenizer directory, or train a byte-level BPE.

Everything downstream needs three things from a tokenizer: fast batched encoding (HF `tokenizers`,
which encodes a batch in parallel threads), the id of the end-of-document token, and a fingerprint
that keys the token cache. A trained BPE is cached by the content hash of the text it was trained
on, so every run over the same tasks shares one tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cpt import atomic
from cpt.errors import CptError

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")
BOS_TOKEN = "<|begin_of_text|>"


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    eos_id: int
    fingerprint: str
    source: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save_pretrained(self, directory: Path) -> None:
        """Write HF tokenizer files so `AutoTokenizer.from_pretrained(directory)` works."""
        eos = self.tokenizer.id_to_token(self.eos_id)
        fast = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer, eos_token=eos, pad_token=eos)
        fast.save_pretrained(str(directory))


def _fingerprint(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]


def _find_eos(tok: Tokenizer, hint: str | None, source: str) -> int:
    for name in ([hint] if hint else []) + list(EOS_CANDIDATES):
        tid = tok.token_to_id(name) if name else None
        if tid is not None:
            return tid
    raise CptError(f"{source}: the tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a tokenizer.json file or an HF tokenizer directory (tokenizer.json inside, or any AutoTokenizer)."""
    path = Path(path)
    if not path.exists():
        raise CptError(f"{path}: tokenizer not found (tokenizer.path)")
    eos_hint = None
    if path.is_dir():
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                eos = json.loads(cfg_file.read_text(encoding="utf-8")).get("eos_token")
                eos_hint = eos.get("content") if isinstance(eos, dict) else eos
            except json.JSONDecodeError:
                raise CptError(f"{cfg_file}: not valid JSON") from None
        if (path / "tokenizer.json").is_file():
            file = path / "tokenizer.json"
        else:
            try:
                hf = AutoTokenizer.from_pretrained(str(path))
            except Exception as err:
                raise CptError(f"{path}: not a loadable HF tokenizer directory: {err}") from None
            if not getattr(hf, "is_fast", False):
                raise CptError(f"{path}: only fast (tokenizer.json-backed) tokenizers are supported")
            tok = hf.backend_tokenizer
            return TextTokenizer(tok, _find_eos(tok, hf.eos_token, str(path)), _fingerprint(tok), str(path))
    else:
        file = path
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:
        raise CptError(f"{file}: not a valid tokenizer.json: {err}") from None
    return TextTokenizer(tok, _find_eos(tok, eos_hint, str(file)), _fingerprint(tok), str(file))


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE (GPT-2 / Llama-3 style) with `<|endoftext|>` as the document separator."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=["<|endoftext|>", BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def cache_root(configured: str | None) -> Path:
    if configured:
        return Path(configured)
    return Path(os.environ.get("CPT_CACHE") or Path.home() / ".cache" / "cpt")


def train_or_load_bpe(key: str, texts: Iterator[str], vocab_size: int, min_frequency: int, cache: Path) -> TextTokenizer:
    """Train a BPE on `texts` once; `key` (a hash of the texts and settings) finds it next time."""
    file = cache / "tokenizers" / f"bpe-{key}.json"
    if not file.is_file():
        tok = train_bpe(texts, vocab_size, min_frequency)
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic.written_file(file) as tmp:  # a concurrent run reads the old file or the whole new one
            tok.save(str(tmp))
    return load_tokenizer(file)
