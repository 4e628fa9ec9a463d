"""Data preparation benchmark: tokenizing throughput and peak memory of `prepare_task` per file
size, and what a warm start (same file, cache filled) costs.

Each size gets a generated real-text file: the bundled handbook corpus (cpt/corpus/handbook, five
languages) repeated with a copy counter in front of every document, so no two documents are the
same. Every measurement runs in a fresh child process and reports that child's peak RSS
(getrusage, the figure `/usr/bin/time -v` prints as "Maximum resident set size"), so the sizes do
not share memory; `baseline` is a child that only imports cpt. Tokenizer: the bundled
cpt/corpus/handbook/tokenizer.json.

    python benchmarks/prepare.py                        # 25 and 75 MB, txt and jsonl (~2-3 min on 2 cores)
    python benchmarks/prepare.py --sizes 100,300        # the figures quoted for issue "data at scale"
    python benchmarks/prepare.py --code /tmp/old        # measure another checkout (e.g. a `git archive` of HEAD)

Cold: `source_key` + `prepare_task` into an empty cache. Warm: a new process runs `source_key`
(with the cache when the code has the fingerprint cache) + `prepare_task` + `check_token_range`
on the filled cache, which is what a second run of the same config does before training.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HANDBOOK = ROOT / "cpt" / "corpus" / "handbook"

# run in the child: `code` is put first on sys.path, so --code measures that checkout's cpt
_CHILD = r"""
import inspect, json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from cpt.data.tokenizer import load_tokenizer
from cpt.data.tokens import check_token_range, prepare_task, source_key
mode, src, cache, fmt = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
out = {}
if mode != "baseline":
    tok = load_tokenizer(sys.argv[6])
    # a checkout from before the fingerprint cache has no `cache` parameter: it re-hashes every byte
    kw = {"cache": cache} if "cache" in inspect.signature(source_key).parameters else {}
    t0 = time.perf_counter()
    key = source_key(src, fmt, "text", **kw)
    out["hash_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    task = prepare_task("bench", src, tok, cache, fmt=fmt, log=lambda m: None, key_of_source=key)
    out["prepare_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    check_token_range(task, tok.vocab_size)
    out["check_s"] = time.perf_counter() - t2
    out["total_s"] = time.perf_counter() - t0
    out["tokens"] = int(task.meta["train_tokens"] + task.meta["val_tokens"])
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def _handbook_docs() -> list[str]:
    docs = []
    for f in sorted(HANDBOOK.glob("*.txt.xz")):
        text = lzma.decompress(f.read_bytes()).decode("utf-8")
        docs += [d.strip() for d in text.split("\n\n") if d.strip()]
    return docs


def make_source(path: Path, fmt: str, size_mb: float, docs: list[str]) -> int:
    """Write about `size_mb` MB of distinct documents; returns the file's size in bytes."""
    target = int(size_mb * 1e6)
    written = 0
    copy = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            for doc in docs:
                text = f"[{copy}] {doc}"
                piece = json.dumps({"text": text}, ensure_ascii=False) + "\n" if fmt == "jsonl" else text + "\n\n"
                fh.write(piece)
                written += len(piece.encode("utf-8"))
                if written >= target:
                    break
            copy += 1
    return path.stat().st_size


def _child(code: Path, mode: str, src: Path, cache: Path, fmt: str, tokenizer: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(code), mode, str(src), str(cache), fmt, str(tokenizer)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child ({mode}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="25,75", help="file sizes in MB, comma-separated (default 25,75)")
    ap.add_argument("--formats", default="txt,jsonl", help="txt, jsonl or both (default both)")
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose cpt package is measured (default this one)")
    ap.add_argument("--tokenizer", type=Path, default=HANDBOOK / "tokenizer.json")
    ap.add_argument("--workdir", type=Path, default=None, help="where the generated files go (default a temp dir, deleted after)")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",") if s]
    formats = [f for f in args.formats.split(",") if f]

    work = Path(tempfile.mkdtemp(prefix="cpt-prepare-", dir=args.workdir))
    try:
        base = _child(args.code, "baseline", work, work, "txt", args.tokenizer)
        print(f"code: {args.code}   tokenizer: {args.tokenizer.name}   baseline (import only): {base['peak_rss_mb']:.0f} MB RSS")
        print(f"{'format':>6} {'size MB':>8} {'cold s':>7} {'MB/s':>6} {'cold RSS MB':>11} {'warm s':>7} {'warm RSS MB':>11}  warm split")
        docs = _handbook_docs()
        for fmt in formats:
            for size in sizes:
                src = work / f"src-{size:g}.{fmt}"
                nbytes = make_source(src, fmt, size, docs)
                cache = work / f"cache-{fmt}-{size:g}"
                cold = _child(args.code, "run", src, cache, fmt, args.tokenizer)
                warm = _child(args.code, "run", src, cache, fmt, args.tokenizer)
                mbs = nbytes / 1e6 / max(cold["prepare_s"], 1e-9)
                split = f"hash {warm['hash_s']:.2f}s, open {warm['prepare_s']:.2f}s, range check {warm['check_s']:.2f}s"
                print(
                    f"{fmt:>6} {nbytes / 1e6:>8.0f} {cold['total_s']:>7.1f} {mbs:>6.1f} {cold['peak_rss_mb']:>11.0f} "
                    f"{warm['total_s']:>7.2f} {warm['peak_rss_mb']:>11.0f}  {split}",
                    flush=True,
                )
                src.unlink()
                shutil.rmtree(cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
