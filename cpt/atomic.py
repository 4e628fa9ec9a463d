"""Atomic writes: a file or a directory is replaced whole or not at all.

Contract: a reader of `path` (another process, or this one after a crash or a kill at any point)
sees either the old content or the whole new one, never a part. A file is written to a temporary
file in the same directory (same filesystem, so the rename is atomic), flushed and fsync'ed, then
`os.replace`d onto `path`, and the directory is fsync'ed where the platform allows it, so the
rename itself survives a power loss. A directory is filled under a temporary sibling name, every
file in it fsync'ed, then renamed into place; an existing one is moved aside first and deleted
after. On any failure (an exception in the caller's code, a full disk, an object `json` cannot
serialise half way through) the temporary is removed and the old file or directory is left as it
was, byte for byte.

Temporary names start with a dot and hold the process id, so they never match the names readers
look for (`step-*`, `summary.json`, ...) and two processes never share one. A process killed
mid-write can leave such a hidden temporary behind; it is never mistaken for the real thing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp_name(path: Path, kind: str) -> Path:
    # pid + random: unique across processes and across threads of one process
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}")


def fsync_dir(directory: Path) -> None:
    """Make a rename or creation inside `directory` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def written_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` for a writer that takes a file name (`torch.save`,
    `Tokenizer.save`); when the block ends without an exception it is fsync'ed and renamed onto
    `path`. On any exception the temporary is deleted and `path` keeps its old content."""
    path = Path(path)
    tmp = _tmp_name(path, "tmp")
    try:
        yield tmp
        if path.exists():  # a replaced file keeps its permissions, as an in-place write would
            with contextlib.suppress(OSError):
                os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def _open_whole(path: Path, binary: bool, encoding: str | None):
    with written_file(path) as tmp:
        # O_EXCL: a stray file of the same name is never written through; mode 0o666 lets the umask
        # decide the permissions, like open() does (mkstemp would make every file 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with open(fd, "wb" if binary else "w", encoding=None if binary else encoding, newline=None if binary else "") as fh:
            yield fh
            fh.flush()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data`, atomically (see the module docstring)."""
    with _open_whole(Path(path), True, None) as fh:
        fh.write(data)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` with `text`, atomically; newlines are written as given (no translation)."""
    with _open_whole(Path(path), False, encoding) as fh:
        fh.write(text)


def write_json(path: str | Path, obj: Any, indent: int | None = 2, *, ensure_ascii: bool = True) -> None:
    """Replace `path` with `json.dumps(obj, indent=indent)` (no trailing newline), atomically.

    The JSON is streamed to the temporary file, so an object that fails to serialise half way
    leaves only a temporary behind, which is deleted: `path` is untouched.
    """
    with _open_whole(Path(path), False, "utf-8") as fh:
        json.dump(obj, fh, indent=indent, ensure_ascii=ensure_ascii)


def _fsync_tree(directory: Path) -> None:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                _fsync_file(p)
        fsync_dir(Path(root))


def replace_dir(tmp: Path, out: Path, replace: bool = True) -> bool:
    """Rename the filled directory `tmp` to `out`. An existing `out` is moved aside, `tmp` renamed in,
    then the old one deleted; if the rename fails the old one is put back and the error raised.

    `replace=False`: an existing non-empty `out` wins (another process finished the same entry first):
    `tmp` is deleted and False returned. True when `tmp` became `out`.
    """
    if not replace:
        try:
            os.replace(tmp, out)  # refused (ENOTEMPTY / EEXIST) when `out` already holds files
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not out.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        fsync_dir(out.parent)
        return True
    old = None
    if out.exists() or out.is_symlink():
        old = _tmp_name(out, "old")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the previous one back: `out` is as it was
        raise
    fsync_dir(out.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def written_whole(out: str | Path, *, tmp: Path | None = None, replace: bool = True, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory of `out` to fill; when the block ends without an exception
    its files are fsync'ed and it is renamed to `out` (`replace_dir`). On any exception the temporary
    is deleted and `out` is left untouched, so `out` is never half-written.

    `tmp`: a directory already being filled (by other processes: FSDP ranks' shards) to use as the
    temporary instead of a fresh one; it is deleted on failure all the same.
    `replace=False`: keep an `out` that another process completed meanwhile (see `replace_dir`).
    `fsync=False`: skip the per-file fsync (the rename stays atomic; only power-loss durability is lost).
    """
    out = Path(out)
    own = tmp is None
    if own:
        tmp = _tmp_name(out, "tmp")
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        replace_dir(tmp, out, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
