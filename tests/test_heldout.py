"""The held-out set: windows spread over the whole validation split, and what they cover."""

import numpy as np
import pytest

from cpt import evaluate

EOS = 0


def _split(doc_lengths, kinds=None, seed=0, dtype=np.uint16):
    """A validation split of EOS-terminated documents; `kinds[i]` picks document i's token ids."""
    rng = np.random.default_rng(seed)
    kinds = kinds or ["a"] * len(doc_lengths)
    parts = []
    for n, kind in zip(doc_lengths, kinds):
        lo, hi = (1, 100) if kind == "a" else (100, 200)
        parts.append(np.append(rng.integers(lo, hi, n - 1), EOS))
    return np.concatenate(parts).astype(dtype)


def _all_windows(tokens, seq_len):
    m = (len(tokens) - 1) // seq_len
    return np.stack([np.asarray(tokens[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64) for i in range(m)])


def _reference_touched(tokens, starts, length):
    """Distinct documents of the target positions, the slow way."""
    is_eos = np.asarray(tokens) == EOS
    doc = np.concatenate([[0], np.cumsum(is_eos)[:-1]])  # EOSes strictly before each position
    targets = (np.asarray(starts)[:, None] + np.arange(1, length + 1)[None, :]).reshape(-1)
    return len(set(doc[targets].tolist()))


def test_ordered_corpus_is_evaluated_in_both_halves():
    """First half of the split is one kind of document, second half another: both must be evaluated."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 60, 200).tolist()
    tokens = _split(lengths, ["a"] * 100 + ["b"] * 100)
    w = evaluate.eval_windows(tokens, seq_len=16, max_tokens=160)
    assert w.shape == (10, 17) and w.dtype == np.int64
    targets = w[:, 1:]
    kind_b = (targets >= 100).sum() / (targets != EOS).sum()
    assert (targets[targets != EOS] < 100).any() and (targets >= 100).any()
    assert 0.3 < kind_b < 0.7  # roughly the share of each half, not all of one
    cov = evaluate.heldout_coverage(tokens, 16, 160, EOS)
    assert cov["span_end"] > 0.95 and cov["span_start"] == 0.0


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_windows_are_fixed_and_all_windows_when_the_budget_covers_the_split(tmp_path, dtype):
    tokens = _split(np.random.default_rng(2).integers(5, 40, 300).tolist(), dtype=dtype)
    path = tmp_path / "val.bin"
    tokens.tofile(path)
    mm = np.memmap(path, dtype=dtype, mode="r")
    a = evaluate.eval_windows(mm, 32, 1000)
    b = evaluate.eval_windows(mm, 32, 1000)
    assert np.array_equal(a, b) and np.array_equal(a, evaluate.eval_windows(tokens, 32, 1000))
    assert a.dtype == np.int64 and a.shape == (1000 // 32, 33)
    full = _all_windows(tokens, 32)
    for budget in (len(full) * 32, len(tokens), 10 * len(tokens)):
        assert np.array_equal(evaluate.eval_windows(mm, 32, budget), full)


@pytest.mark.parametrize(
    "n_tokens,seq_len,max_tokens",
    [(1000, 10, 100), (1000, 10, 1), (1000, 10, 10_000), (1001, 10, 990), (1000, 10, 980), (33, 32, 64), (50, 32, 64), (7919, 64, 4096)],
)
def test_windows_do_not_overlap_and_lie_inside_the_split(n_tokens, seq_len, max_tokens):
    tokens = np.arange(n_tokens, dtype=np.uint32)  # each token is its own position
    w = evaluate.eval_windows(tokens, seq_len, max_tokens)
    m = (n_tokens - 1) // seq_len
    n = min(m, max(1, max_tokens // seq_len))
    assert w.shape == (n, seq_len + 1) and w.dtype == np.int64
    starts = w[:, 0]
    assert np.array_equal(w, starts[:, None] + np.arange(seq_len + 1)[None, :])  # contiguous slices of the split
    assert np.array_equal(starts, evaluate.eval_window_starts(n_tokens, seq_len, max_tokens))
    assert starts[0] == 0 and (starts % seq_len == 0).all()  # on the grid of all non-overlapping windows
    assert (np.diff(starts) >= seq_len).all()  # targets [s+1, s+seq_len] never overlap
    assert w.max() <= n_tokens - 1
    if n > 1:
        assert starts[-1] == (m - 1) * seq_len  # the last available window: the spread reaches the end
        gaps = np.diff(starts) // seq_len
        assert gaps.max() - gaps.min() <= 1  # evenly spaced


def test_short_split_gets_one_shorter_window():
    tokens = np.arange(20, dtype=np.uint16)
    w = evaluate.eval_windows(tokens, 32, 64)
    assert w.shape == (1, 20) and w.dtype == np.int64 and np.array_equal(w[0], np.arange(20))
    cov = evaluate.heldout_coverage(tokens, 32, 64, eos_id=19)
    assert cov["windows"] == 1 and cov["eval_tokens"] == 19 and cov["documents"] == 1 and cov["documents_touched"] == 1
    assert (cov["span_first"], cov["span_last"], cov["span_start"], cov["span_end"]) == (0, 19, 0.0, 1.0)


def test_coverage_on_a_hand_made_split():
    # documents of 3, 5, 2, 6, 4, 5 tokens (EOS included): EOS at 2, 7, 9, 15, 19, 24; 25 tokens
    tokens = _split([3, 5, 2, 6, 4, 5])
    assert np.flatnonzero(tokens == EOS).tolist() == [2, 7, 9, 15, 19, 24]
    # seq_len 4: 6 windows available; 12 tokens → 3 windows at indices 0, 2, 5 → starts 0, 8, 20
    assert evaluate.eval_window_starts(25, 4, 12).tolist() == [0, 8, 20]
    # targets 1-4 (docs 0, 1), 9-12 (docs 2, 3), 21-24 (doc 5): 5 documents touched
    cov = evaluate.heldout_coverage(tokens, 4, 12, EOS)
    assert cov == {
        "documents": 6,
        "tokens": 25,
        "windows": 3,
        "windows_available": 6,
        "eval_tokens": 12,
        "token_fraction": 12 / 25,
        "documents_touched": 5,
        "document_fraction": 5 / 6,
        "span_first": 0,
        "span_last": 24,
        "span_start": 0.0,
        "span_end": 1.0,
    }
    # every window: docs (0,1) (1,2) (2,3) (3,4) (4,5) (5) → all 6, shared boundary documents counted once
    full = evaluate.heldout_coverage(tokens, 4, 10_000, EOS)
    assert (full["windows"], full["eval_tokens"], full["documents_touched"]) == (6, 24, 6)
    # one window: targets 1-4 → docs 0 and 1; it ends at position 4 of 25
    one = evaluate.heldout_coverage(tokens, 4, 1, EOS)
    assert (one["windows"], one["documents_touched"], one["span_last"], one["span_end"]) == (1, 2, 4, 5 / 25)
    # the scan in chunks gives the same numbers at any chunk size
    for chunk in (1, 2, 3, 7):
        assert evaluate.heldout_coverage(tokens, 4, 12, EOS, chunk=chunk) == cov


def test_coverage_of_one_long_document_and_an_unterminated_tail():
    tokens = np.concatenate([_split([2, 200]), np.array([5, 6, 7], dtype=np.uint16)])  # a tail without EOS
    cov = evaluate.heldout_coverage(tokens, 8, 40, EOS)  # 5 windows, all inside document 1 but the first
    assert cov["documents"] == 3 and cov["tokens"] == 205
    assert cov["documents_touched"] == 2  # targets 1-8 → docs 0, 1; then only doc 1


@pytest.mark.parametrize("seed", range(5))
def test_documents_touched_matches_a_brute_force_count(seed):
    rng = np.random.default_rng(seed)
    tokens = _split(rng.integers(1, 30, 120).tolist(), seed=seed)
    seq_len = int(rng.integers(2, 20))
    max_tokens = int(rng.integers(1, len(tokens)))
    cov = evaluate.heldout_coverage(tokens, seq_len, max_tokens, EOS, chunk=int(rng.integers(1, 500)))
    starts = evaluate.eval_window_starts(len(tokens), seq_len, max_tokens)
    assert cov["documents_touched"] == _reference_touched(tokens, starts, seq_len)
    assert cov["documents"] == int((tokens == EOS).sum())
    assert cov["eval_tokens"] == len(starts) * seq_len


def test_describe_coverage_is_one_line():
    cov = evaluate.heldout_coverage(_split([3, 5, 2, 6, 4, 5]), 4, 12, EOS)
    line = evaluate.describe_coverage(cov)
    assert "\n" not in line and "3/6 windows" in line and "5/6 documents" in line
