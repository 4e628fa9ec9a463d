"""Train the committed tokenizer of the bundled corpus: an 8k byte-level BPE on the training
splits (never the held-out documents) of all five languages.

    python scripts/train_corpus_tokenizer.py [--vocab-size 8192]

Writes cpt/corpus/handbook/tokenizer.json. Runs offline in ~10 s on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cpt.data.readers import iter_documents
from cpt.data.tokenizer import train_bpe
from cpt.data.tokens import split_documents

HANDBOOK = Path(__file__).resolve().parents[1] / "cpt" / "corpus" / "handbook"
LANGS = ("en", "fr", "de", "ar", "ja")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--val-fraction", type=float, default=0.05, help="must match tasks.N.val_fraction of the runs using it")
    ap.add_argument("--out", type=Path, default=HANDBOOK / "tokenizer.json")
    args = ap.parse_args()

    def texts():
        for lang in LANGS:
            yield from split_documents(iter_documents(HANDBOOK / f"{lang}.txt.xz"), args.val_fraction, "train")

    t0 = time.perf_counter()
    tok = train_bpe(texts(), args.vocab_size)
    tok.save(str(args.out))
    print(f"wrote {args.out} (vocab {tok.get_vocab_size()}, {time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
