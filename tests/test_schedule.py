import pytest

from cpt.config import ScheduleConfig
from cpt.training.schedule import lr_at

LR, MIN = 1e-3, 1e-4


def values(name, total=1000, ends=(500, 1000), **kw):
    cfg = ScheduleConfig(name=name, min_lr=MIN, **kw)
    return [lr_at(s, total, list(ends), LR, cfg) for s in range(total)]


def test_cosine_warms_up_then_decays_once_to_min_lr():
    v = values("cosine", warmup=0.01)
    assert v[0] == pytest.approx(LR / 10)  # 10 warmup steps, linear, never 0
    assert v[9] == pytest.approx(LR)
    assert max(v) == pytest.approx(LR)
    assert v[505] == pytest.approx(MIN + 0.5 * (LR - MIN), rel=0.01)  # half way through the cosine
    assert v[-1] == pytest.approx(MIN, rel=1e-3)
    assert all(a >= b for a, b in zip(v[10:], v[11:]))  # monotone after warmup, across task ends


def test_rewarm_restarts_in_every_task():
    v = values("rewarm", warmup=0.02)
    assert v[9] == pytest.approx(LR)  # 10 warmup steps in a 500-step task
    assert v[499] == pytest.approx(MIN, rel=1e-2)
    assert v[500] == pytest.approx(LR / 10)  # warmup again
    assert v[509] == pytest.approx(LR)


def test_infinite_has_cooldown_constant_and_anneal():
    v = values("infinite", warmup=0.01, cooldown=0.1, anneal=0.05, constant_lr=4e-4)
    assert v[9] == pytest.approx(LR)
    assert v[110] == pytest.approx(4e-4)  # end of cooldown
    assert v[500] == pytest.approx(4e-4) and v[949] == pytest.approx(4e-4)  # constant phase
    assert v[-1] == pytest.approx(MIN, rel=1e-6)  # annealed
    assert v[975] < 4e-4 and v[975] > MIN


def test_wsd_is_stable_then_decays_linearly():
    v = values("wsd", warmup=0.01, decay=0.2)
    assert v[10] == LR and v[799] == LR
    assert v[899] == pytest.approx(LR + (MIN - LR) * 100 / 200)
    assert v[-1] == pytest.approx(MIN)


def test_constant():
    v = values("constant", warmup=0.0)
    assert set(v) == {LR}
