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
    python benchmarks/prepare.py --sizes 1000,5000 --formats jsonl --workers 1,2 --encode   # the scale check
    python benchmarks/prepare.py --code /tmp/old        # measure another checkout (e.g. a `git archive` of HEAD)

Cold: `source_key` + `prepare_task` into an empty cache. Warm: a new process runs `source_key`
(with the cache when the code has the fingerprint cache) + `prepare_task` + `check_token_range`
on the filled cache, then cuts the first training batch (8 rows of 2049 tokens): what a second run of
the same config does before training. `worker RSS` is the largest worker process (`--workers` > 1).
`vs raw`: the cold prepare's MB/s over raw `encode_batch` on documents already in memory (`--encode`).
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
mode, src, cache, fmt, workers = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5], int(sys.argv[7])
out = {}
if mode == "encode":  # the per-core limit: raw `tokenizers` over documents already in memory (nothing read, nothing written)
    from cpt.data.readers import iter_documents
    tok = load_tokenizer(sys.argv[6]).tokenizer
    docs, nbytes = [], 0
    for doc in iter_documents(src, fmt):  # the first `workers` MB of documents (the caller's --encode-mb)
        docs.append(doc)
        nbytes += len(doc.encode())
        if nbytes >= workers * 1e6:
            break
    for name in ("encode_batch", "encode_batch_fast"):
        fn = getattr(tok, name, None)
        if fn is None:
            continue
        t0 = time.perf_counter()
        for i in range(0, len(docs), 512):
            fn(docs[i : i + 512], add_special_tokens=False)
        out[name + "_mbs"] = nbytes / 1e6 / (time.perf_counter() - t0)
elif mode != "baseline":
    tok = load_tokenizer(sys.argv[6])
    # a checkout from before the fingerprint cache has no `cache` parameter: it re-hashes every byte
    kw = {"cache": cache} if "cache" in inspect.signature(source_key).parameters else {}
    t0 = time.perf_counter()
    key = source_key(src, fmt, "text", **kw)
    out["hash_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    extra = {}
    if "settings" in inspect.signature(prepare_task).parameters:
        from cpt.data.prepare import Settings
        extra["settings"] = Settings(workers=workers, progress=False)
    task = prepare_task("bench", src, tok, cache, fmt=fmt, log=lambda m: None, key_of_source=key, **extra)
    out["prepare_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    check_token_range(task, tok.vocab_size)
    out["check_s"] = time.perf_counter() - t2
    from cpt.data.streams import TaskStream
    TaskStream(task.train, 2048, 0, 0).next_rows(8)  # the first training batch: 8 rows of 2048 + 1 tokens
    out["total_s"] = time.perf_counter() - t0
    out["tokens"] = int(task.meta["train_tokens"] + task.meta["val_tokens"])
    out["shards"] = len(task.meta.get("shards", [1]))
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["children_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
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


def _child(code: Path, mode: str, src: Path, cache: Path, fmt: str, tokenizer: Path, workers: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(code), mode, str(src), str(cache), fmt, str(tokenizer), str(workers)],
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
    ap.add_argument("--workers", default="1", help="worker processes for the cold prepare, comma-separated (e.g. 1,2)")
    ap.add_argument("--encode", action="store_true", help="also time raw tokenizers encode_batch on each file (the per-core limit)")
    ap.add_argument("--encode-mb", type=int, default=200, help="MB of documents the raw encode_batch figure is taken on (default 200)")
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose cpt package is measured (default this one)")
    ap.add_argument("--tokenizer", type=Path, default=HANDBOOK / "tokenizer.json")
    ap.add_argument("--workdir", type=Path, default=None, help="where the generated files go (default a temp dir, deleted after)")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",") if s]
    formats = [f for f in args.formats.split(",") if f]
    workers = [int(w) for w in args.workers.split(",") if w]

    work = Path(tempfile.mkdtemp(prefix="cpt-prepare-", dir=args.workdir))
    try:
        base = _child(args.code, "baseline", work, work, "txt", args.tokenizer)
        print(f"code: {args.code}   tokenizer: {args.tokenizer.name}   baseline (import only): {base['peak_rss_mb']:.0f} MB RSS")
        print(
            f"{'format':>6} {'size MB':>8} {'workers':>7} {'shards':>6} {'cold s':>7} {'MB/s':>6} {'vs raw':>6} {'cold RSS MB':>11} "
            f"{'worker RSS':>10} {'warm s':>7} {'warm RSS MB':>11}  warm split"
        )
        docs = _handbook_docs()
        for fmt in formats:
            for size in sizes:
                src = work / f"src-{size:g}.{fmt}"
                nbytes = make_source(src, fmt, size, docs)
                raw = _child(args.code, "encode", src, work, fmt, args.tokenizer, args.encode_mb) if args.encode else None
                for w in workers:
                    cache = work / f"cache-{fmt}-{size:g}-{w}"
                    cold = _child(args.code, "run", src, cache, fmt, args.tokenizer, w)
                    warm = _child(args.code, "run", src, cache, fmt, args.tokenizer, w)
                    mbs = nbytes / 1e6 / max(cold["prepare_s"], 1e-9)
                    vs = f"{mbs / raw['encode_batch_mbs']:.0%}" if raw else "-"
                    split = f"hash {warm['hash_s']:.2f}s, open {warm['prepare_s']:.2f}s, range check {warm['check_s']:.2f}s, first batch"
                    print(
                        f"{fmt:>6} {nbytes / 1e6:>8.0f} {w:>7} {cold.get('shards', 1):>6} {cold['total_s']:>7.1f} {mbs:>6.1f} {vs:>6} "
                        f"{cold['peak_rss_mb']:>11.0f} {cold['children_rss_mb']:>10.0f} {warm['total_s']:>7.2f} {warm['peak_rss_mb']:>11.0f}  {split}",
                        flush=True,
                    )
                    shutil.rmtree(cache)
                if raw:
                    rates = ", ".join(f"{k[:-4]} {v:.1f} MB/s" for k, v in raw.items() if k.endswith("_mbs"))
                    print(f"{'':>6} raw tokenizers on the first {args.encode_mb} MB of documents, in memory: {rates}", flush=True)
                src.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
