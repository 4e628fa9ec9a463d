"""Pre-tokenized token files, read in place: memory-mapped, never copied, never loaded whole.

Users who already tokenized their data bring one of three layouts. Each is opened as a
`TokenShard`: a read-only memmap over all of a file's tokens in their stored dtype, plus the
int64 end offset of every document (the index arrays are small, so they are loaded).

Megatron / GPT-NeoX indexed dataset (`PREFIX.bin` + `PREFIX.idx`, written by
`megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder` or `tools/preprocess_data.py`).
`.bin` holds the tokens of every sequence back to back. `.idx` is little-endian:

    magic        9 bytes  b"MMIDIDX\\x00\\x00"
    version      u64      1
    dtype code   u8       1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    n_seq        u64      number of sequences
    n_doc_idx    u64      length of document_indices (documents + 1)
    sizes        int32[n_seq]      tokens per sequence
    pointers     int64[n_seq]      byte offset of each sequence in .bin
    doc_indices  int64[n_doc_idx]  sequence index where each document starts; first 0, last n_seq
    modes        int8[n_seq]       only in multimodal datasets, ignored here

A document may span several sequences: document j is sequences doc_indices[j] .. doc_indices[j+1].
Token offsets are pointer / itemsize. The sequences must tile `.bin` exactly (first pointer 0,
each one starting where the previous ended), which is what every Megatron writer produces.
Megatron adds an EOS after each document only with `--append-eod`; `ends_with_eos` detects data
written without it.

datatrove tokenized file (`NAME.ds` + `NAME.ds.index` + optional `NAME.ds.metadata`, written by
`datatrove.pipeline.tokens.DocumentTokenizer` as `00000_unshuffled.ds`, `00000_doc_shuffled.ds`, ...,
or by `DocumentTokenizerMerger`). `.ds` is little-endian uint16 tokens (uint32 when the vocabulary
exceeds 65536), documents back to back, each ending in EOS when the tokenizer step was given
`eos_token`. `.ds.index` is uint64 end offset (in tokens) of every document. `.ds.metadata` is text:
`tokenizer_name|token_size_in_bytes`, the token count, and a human-readable count. Without
metadata (or with an older one lacking `|size`) the token size is inferred from the index.

Plain token file (`.npy` holding a 1-D integer array, or a raw `.bin` whose dtype the caller names,
as nanoGPT / OLMo write them): documents separated by EOS. A document ends after every EOS; trailing
tokens with no final EOS are one more document. The ends are found by a chunked vectorised scan,
holding one chunk and the list of ends, never the whole file as int64.

Empty documents (possible in Megatron and datatrove indexes) hold no tokens and are dropped, so
`doc_ends` is strictly increasing in every format.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpt.errors import CptError

PRETOKENIZED_FORMATS = ("megatron", "datatrove", "tokens")
PARTNER_FORMATS = ("megatron-data", "datatrove-index")
"""What `pretokenized_format` returns for a file that belongs to a dataset entered elsewhere (a
Megatron `.bin` beside its `.idx`, a datatrove `.ds.index` / `.ds.metadata` / `.ds.loss`): a
directory walker skips these so it sees each dataset exactly once."""

_MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
_MEGATRON_HEADER = struct.Struct("<9sQBQQ")
_MEGATRON_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_DATATROVE_PARTNERS = (".ds.index", ".ds.metadata", ".ds.loss")
_BIN_DTYPES = ("uint16", "uint32")
_NPY_DTYPES = (np.uint16, np.uint32, np.int32, np.int64)
_NPY_NAMES = tuple(np.dtype(t).name for t in _NPY_DTYPES)
_SCAN_CHUNK = 1 << 24


@dataclass
class TokenShard:
    """One pre-tokenized file: all its tokens (read-only memmap, stored dtype) and its document ends.

    Document i is `tokens[doc_ends[i - 1] : doc_ends[i]]` (from 0 for i = 0); `doc_ends` is int64,
    strictly increasing, and its last value is `len(tokens)`.
    """

    path: Path
    tokens: np.ndarray
    doc_ends: np.ndarray
    fmt: str

    def documents(self) -> int:
        return len(self.doc_ends)

    def document(self, i: int) -> np.ndarray:
        """The tokens of document i, a view into the memmap."""
        start = int(self.doc_ends[i - 1]) if i > 0 else 0
        return self.tokens[start : int(self.doc_ends[i])]


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _strip(path: Path, suffix: str) -> Path:
    return path.with_name(path.name[: -len(suffix)])


def pretokenized_format(path: Path) -> str | None:
    """Which pre-tokenized layout `path` is, from its name and its siblings (the file is not read).

    "megatron" for `PREFIX.idx` (or a bare `PREFIX` whose `.idx` / `.bin` exists), "datatrove" for
    `NAME.ds`, "tokens" for `.npy` or a `.bin` with no sibling `.idx`, one of `PARTNER_FORMATS` for a
    file that belongs to a dataset entered through another file, None for anything else (text formats).
    A `.ds` without its `.ds.index` or an `.idx` without its `.bin` is still recognised, so that
    `open_shard` can say which partner is missing.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".idx"):
        return "megatron"
    if name.endswith(".bin"):
        return "megatron-data" if _sibling(_strip(path, ".bin"), ".idx").exists() else "tokens"
    if name.endswith(".ds"):
        return "datatrove"
    if any(name.endswith(s) for s in _DATATROVE_PARTNERS):
        return "datatrove-index"
    if name.endswith(".npy"):
        return "tokens"
    if not path.exists() and (_sibling(path, ".idx").exists() or _sibling(path, ".bin").exists()):
        return "megatron"
    return None


def _field(where: str, name: str) -> str:
    """The config field next to `where` ("tasks.0.path" -> "tasks.0.dtype")."""
    return f"{where.rsplit('.', 1)[0]}.{name}" if "." in where else name


def open_shard(
    path: Path | str,
    fmt: str | None = None,
    *,
    dtype: str | None = None,
    eos_id: int | None = None,
    where: str = "tasks.N.path",
) -> TokenShard:
    """Open a pre-tokenized file in place. `fmt` None detects it with `pretokenized_format`.

    A Megatron dataset may be named by `PREFIX`, `PREFIX.bin` or `PREFIX.idx`. "tokens" needs
    `eos_id` (documents are EOS-separated) and, for a raw `.bin`, `dtype` ("uint16" / "uint32");
    `where` is the config field that named the file, used in error messages. Any problem with the
    files (missing partner, corrupt or truncated index, sizes that disagree) is a one-line CptError
    naming the file.
    """
    path = Path(path)
    detected = pretokenized_format(path)
    fmt = fmt or detected
    if fmt == "megatron-data":
        fmt = "megatron"
    if fmt not in PRETOKENIZED_FORMATS:
        if fmt is None:
            if not path.exists():
                raise CptError(f"{path}: not found ({where})")
            raise CptError(f"{path}: not a pre-tokenized file (expected .idx/.bin, .ds or .npy) ({where})")
        raise CptError(f"{path}: unknown pre-tokenized format {fmt!r}, expected one of {', '.join(PRETOKENIZED_FORMATS)} ({where})")
    if fmt == "megatron":
        name = path.name.lower()
        prefix = _strip(path, ".idx") if name.endswith(".idx") else _strip(path, ".bin") if name.endswith(".bin") else path
        return _open_megatron(prefix)
    if not path.exists():
        raise CptError(f"{path}: not found ({where})")
    if fmt == "datatrove":
        return _open_datatrove(path)
    return _open_tokens(path, dtype, eos_id, where)


def _require_pair(data: Path, index: Path, what: str) -> None:
    for file, partner in ((data, index), (index, data)):
        if not file.is_file():
            if partner.is_file():
                raise CptError(f"{file}: missing; {partner} needs it ({what})")
            raise CptError(f"{file}: not found ({what})")


def _open_megatron(prefix: Path) -> TokenShard:
    idx, bin_ = _sibling(prefix, ".idx"), _sibling(prefix, ".bin")
    _require_pair(bin_, idx, "a Megatron dataset is PREFIX.bin + PREFIX.idx")
    idx_size = idx.stat().st_size
    if idx_size < _MEGATRON_HEADER.size:
        raise CptError(f"{idx}: truncated Megatron index ({idx_size} bytes, the header alone is {_MEGATRON_HEADER.size})")
    with open(idx, "rb") as f:
        magic, version, code, n_seq, n_doc_idx = _MEGATRON_HEADER.unpack(f.read(_MEGATRON_HEADER.size))
    if magic != _MEGATRON_MAGIC:
        raise CptError(f"{idx}: not a Megatron index (bad magic bytes {magic!r}, expected {_MEGATRON_MAGIC!r})")
    if version != 1:
        raise CptError(f"{idx}: Megatron index version {version}, only version 1 is supported")
    if code not in _MEGATRON_DTYPES:
        raise CptError(f"{idx}: unknown Megatron dtype code {code} (known: {sorted(_MEGATRON_DTYPES)})")
    dtype = np.dtype(_MEGATRON_DTYPES[code])
    if dtype.kind not in "iu":
        raise CptError(f"{idx}: Megatron dtype {dtype.name} does not hold token ids")
    need = _MEGATRON_HEADER.size + 12 * n_seq + 8 * n_doc_idx
    if idx_size < need:
        raise CptError(
            f"{idx}: truncated Megatron index ({idx_size} bytes; {n_seq} sequences and {n_doc_idx} document indices need {need})"
        )
    if idx_size not in (need, need + n_seq):
        raise CptError(f"{idx}: corrupt Megatron index ({idx_size} bytes; {n_seq} sequences and {n_doc_idx} document indices need {need})")
    bin_size = bin_.stat().st_size
    if n_seq == 0 or bin_size == 0:
        raise CptError(f"{bin_}: empty Megatron dataset (no tokens)")
    off = _MEGATRON_HEADER.size
    sizes = np.fromfile(idx, dtype="<i4", count=n_seq, offset=off).astype(np.int64)
    pointers = np.fromfile(idx, dtype="<i8", count=n_seq, offset=off + 4 * n_seq)
    doc_idx = np.fromfile(idx, dtype="<i8", count=n_doc_idx, offset=off + 12 * n_seq)
    item = dtype.itemsize
    expected = int(pointers[-1]) + int(sizes[-1]) * item
    if expected != bin_size:
        raise CptError(f"{bin_}: holds {bin_size} bytes but {idx} describes {expected} (last pointer + size × {item})")
    if (sizes < 0).any() or pointers[0] != 0 or (pointers[1:] != pointers[:-1] + sizes[:-1] * item).any():
        raise CptError(f"{idx}: corrupt Megatron index (sequence pointers do not tile {bin_.name} back to back)")
    if n_doc_idx < 2 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or (np.diff(doc_idx) < 0).any():
        raise CptError(f"{idx}: corrupt Megatron index (document indices must rise from 0 to {n_seq} sequences)")
    seq_ends = pointers // item + sizes
    starts = doc_idx[1:]
    ends = np.where(starts > 0, seq_ends[np.maximum(starts - 1, 0)], 0)
    tokens = np.memmap(bin_, dtype=dtype.newbyteorder("<"), mode="r", shape=(bin_size // item,))
    return TokenShard(bin_, tokens, _drop_empty(ends), "megatron")


def _drop_empty(ends: np.ndarray) -> np.ndarray:
    ends = np.asarray(ends, dtype=np.int64)
    keep = np.diff(ends, prepend=0) > 0
    return ends if keep.all() else ends[keep]


def _datatrove_token_size(ds: Path) -> int | None:
    meta = _sibling(ds, ".metadata")
    if not meta.is_file():
        return None
    lines = meta.read_text(encoding="utf-8", errors="replace").splitlines()
    first = lines[0] if lines else ""
    if "|" not in first:
        return None
    size = first.rsplit("|", 1)[1].strip()
    if size not in ("2", "4"):
        raise CptError(f"{meta}: token size {size!r} after '|' on the first line, expected 2 (uint16) or 4 (uint32)")
    return int(size)


def _open_datatrove(ds: Path) -> TokenShard:
    index = _sibling(ds, ".index")
    _require_pair(ds, index, "a datatrove tokenized file is NAME.ds + NAME.ds.index")
    ds_size, index_size = ds.stat().st_size, index.stat().st_size
    if ds_size == 0:
        raise CptError(f"{ds}: empty datatrove file (no tokens)")
    if index_size == 0 or index_size % 8:
        raise CptError(f"{index}: corrupt datatrove index ({index_size} bytes, expected a non-empty multiple of 8)")
    ends = np.fromfile(index, dtype="<u8")
    if (np.diff(ends.astype(np.int64), prepend=0) < 0).any() or ends[-1] > np.iinfo(np.int64).max:
        raise CptError(f"{index}: corrupt datatrove index (document ends are not increasing)")
    ends = ends.astype(np.int64)
    last = int(ends[-1])
    size = _datatrove_token_size(ds)
    if size is None:
        size = next((s for s in (2, 4) if last * s == ds_size), None)
        if size is None:
            raise CptError(f"{ds}: holds {ds_size} bytes but {index.name} ends at token {last} (neither uint16 nor uint32 fits)")
    elif last * size != ds_size:
        raise CptError(f"{ds}: holds {ds_size} bytes but {index.name} ends at token {last} ({last * size} bytes of {size}-byte tokens)")
    tokens = np.memmap(ds, dtype="<u2" if size == 2 else "<u4", mode="r", shape=(last,))
    return TokenShard(ds, tokens, _drop_empty(ends), "datatrove")


def _open_tokens(path: Path, dtype: str | None, eos_id: int | None, where: str) -> TokenShard:
    if eos_id is None:
        raise CptError(f"{path}: a plain token file needs the EOS id to find its documents ({_field(where, 'eos_id')})")
    if path.name.lower().endswith(".npy"):
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise CptError(f"{path}: not a readable .npy file: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        if tokens.ndim != 1:
            raise CptError(f"{path}: a token .npy must be 1-D, this one has shape {tokens.shape}")
        if tokens.dtype.type not in _NPY_DTYPES:
            raise CptError(f"{path}: unsupported token dtype {tokens.dtype.name} (expected {', '.join(_NPY_NAMES)})")
        if dtype is not None and (str(dtype) not in _NPY_NAMES or np.dtype(dtype) != tokens.dtype.newbyteorder("=")):
            raise CptError(f"{path}: holds {tokens.dtype.name} tokens but {_field(where, 'dtype')} says {dtype}")
        if tokens.size == 0:
            raise CptError(f"{path}: empty token file")
    else:
        if dtype is None:
            raise CptError(f"{path}: a raw .bin token file needs its dtype, uint16 or uint32 ({_field(where, 'dtype')})")
        if str(dtype) not in _BIN_DTYPES:
            raise CptError(f"{path}: unknown token dtype {dtype!r} ({_field(where, 'dtype')}), expected uint16 or uint32")
        item = np.dtype(dtype).itemsize
        size = path.stat().st_size
        if size == 0:
            raise CptError(f"{path}: empty token file")
        if size % item:
            raise CptError(f"{path}: {size} bytes is not a whole number of {dtype} tokens ({item} bytes each)")
        tokens = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", shape=(size // item,))
    info = np.iinfo(tokens.dtype)
    if not info.min <= eos_id <= info.max or eos_id < 0:
        raise CptError(f"{path}: EOS id {eos_id} cannot occur in {tokens.dtype.name} tokens ({_field(where, 'eos_id')})")
    return TokenShard(path, tokens, _eos_ends(tokens, eos_id), "tokens")


def _eos_ends(tokens: np.ndarray, eos_id: int, chunk: int = _SCAN_CHUNK) -> np.ndarray:
    """Position after every EOS, plus len(tokens) when the last document has no final EOS."""
    parts = []
    for start in range(0, len(tokens), chunk):
        hits = np.flatnonzero(tokens[start : start + chunk] == eos_id)
        if hits.size:
            parts.append(hits.astype(np.int64) + (start + 1))
    ends = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if not ends.size or ends[-1] != len(tokens):
        ends = np.append(ends, np.int64(len(tokens)))
    return ends


def max_token_id(shard: TokenShard, chunk: int = 1 << 24) -> int:
    """The largest token id in the shard, scanned `chunk` tokens at a time; -1 when it holds none."""
    best = -1
    for start in range(0, len(shard.tokens), chunk):
        best = max(best, int(shard.tokens[start : start + chunk].max()))
    return best


def ends_with_eos(shard: TokenShard, eos_id: int, sample: int = 64) -> bool:
    """Whether the first and last `sample` documents all end in `eos_id`.

    Megatron data tokenized without `--append-eod` has no separator between documents, so
    sequence packing would run documents together; a sample is enough to tell.
    """
    n = shard.documents()
    if n == 0:
        return False
    picks = np.unique(np.concatenate([np.arange(min(sample, n)), np.arange(max(0, n - sample), n)]))
    last_tokens = shard.tokens[shard.doc_ends[picks] - 1]
    return bool(np.all(last_tokens == eos_id))
