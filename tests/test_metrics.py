import math

import pytest

from cpt import evaluate

L3 = [
    [2.0, 5.0, 6.0],
    [2.5, 2.2, 5.5],
    [3.0, 2.6, 2.1],
]


def test_definitions_on_a_hand_made_matrix():
    s = evaluate.summarize(L3)
    assert s["learned_loss"] == pytest.approx((2.0 + 2.2 + 2.1) / 3)
    assert s["retained_loss"] == pytest.approx((3.0 + 2.6) / 2)
    assert s["avg_final_loss"] == pytest.approx((3.0 + 2.6 + 2.1) / 3)
    # forgetting_j = L[T][j] - min over rows j..T-1 of column j
    assert s["forgetting"] == pytest.approx([3.0 - 2.0, 2.6 - 2.2])
    assert s["forgetting_score"] == pytest.approx(0.7)
    assert s["bwt"] == pytest.approx(((3.0 - 2.0) + (2.6 - 2.2)) / 2)


def test_forgetting_uses_the_best_row_not_the_diagonal():
    # task 0 kept improving after it was learned (row 1), then was forgotten
    L = [[3.0, 9.0, 9.0], [2.0, 3.0, 9.0], [2.8, 3.1, 3.0]]
    assert evaluate.forgetting(L) == pytest.approx([0.8, 0.1])
    assert evaluate.bwt(L) == pytest.approx((-0.2 + 0.1) / 2)


def test_joint_run_has_one_row_and_no_forgetting():
    s = evaluate.summarize([[2.0, 3.0, 4.0]])
    assert s["forgetting"] == [] and s["forgetting_score"] is None and s["bwt"] is None
    assert s["avg_final_loss"] == pytest.approx(3.0)
    assert s["learned_loss"] == pytest.approx(3.0)


def test_eval_windows_are_fixed_and_non_overlapping():
    import numpy as np

    tokens = np.arange(1000, dtype=np.uint16)
    w = evaluate.eval_windows(tokens, seq_len=10, max_tokens=100)
    assert w.shape == (10, 11)
    assert w[1, 0] == 100 and w[0, -1] == 10 and w[-1, -1] == 990  # spread over the split, not its first windows
    assert not math.isnan(float(w.sum()))
