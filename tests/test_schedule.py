import math

import pytest

from cpt.config import ScheduleConfig
from cpt.training.schedule import lr_at

LR, MIN = 1e-3, 1e-4
NAMES = ("cosine", "rewarm", "infinite", "wsd", "constant")


def exact(x):
    return pytest.approx(x, rel=1e-12, abs=0)


def values(name, total=1000, ends=(500, 1000), **kw):
    kw.setdefault("min_lr", MIN)
    cfg = ScheduleConfig(name=name, **kw)
    return [lr_at(s, total, list(ends), LR, cfg) for s in range(total)]


def non_increasing(v):
    return all(a >= b for a, b in zip(v, v[1:]))


def increasing(v):
    return all(a < b for a, b in zip(v, v[1:]))


# ------------------------------------------------------------------ the three defects


def test_cosine_does_not_repeat_the_peak():
    """Defect 1: the warmup's last step and the cosine's first step were both exactly lr."""
    for total, warmup in [(1000, 0.01), (100, 0.1), (7, 0.3), (3, 0.0)]:
        v = values("cosine", total, ends=(total,), warmup=warmup)
        w = max(math.ceil(warmup * total), 1)
        assert v[w - 1] == LR and v[w] < LR
        assert v.count(LR) == 1
    v = values("rewarm", warmup=0.02)  # the same inside every task
    assert v[9] == LR and v[10] < LR and v[509] == LR and v[510] < LR
    assert v.count(LR) == 2


def test_cosine_ends_exactly_at_min_lr():
    """Defect 2: the last step was one cosine step short of min_lr."""
    for total in (2, 3, 10, 999, 1000):
        for warmup in (0.0, 0.01, 0.5, 0.99):
            assert values("cosine", total, ends=(total,), warmup=warmup)[-1] == MIN
    v = values("rewarm", 1000, ends=(300, 1000), warmup=0.05)
    assert v[299] == MIN and v[999] == MIN


def test_wsd_decay_overlapping_warmup_does_not_jump():
    """Defect 3: ceil(warmup·T) + ceil(decay·T) > T started the decay inside the warmup, so the first step after
    the warmup fell by several decay increments at once; warmup + decay > 1 was accepted."""
    # 0.3 + 0.7 ≤ 1 but ceil(1.5) + ceil(3.5) = 6 > 5 steps: the decay gets the 3 steps after the warmup's 2
    v = values("wsd", 5, ends=(5,), warmup=0.3, decay=0.7)
    assert v == [exact(LR / 2), LR, exact(LR + (MIN - LR) / 3), exact(LR + (MIN - LR) * 2 / 3), MIN]
    steps = [a - b for a, b in zip(v[1:], v[2:])]
    assert steps == [exact((LR - MIN) / 3)] * 3  # every decay step drops by the same amount: no jump
    assert increasing(v[:2]) and non_increasing(v[1:])
    for total in range(2, 40):  # warmup + decay = 1 at every rounding
        v = values("wsd", total, ends=(total,), warmup=0.35, decay=0.65)
        w = max(math.ceil(0.35 * total), 1)
        assert v[w - 1] == LR and v[-1] == MIN and non_increasing(v[w - 1 :])
        drops = [a - b for a, b in zip(v[w - 1 :], v[w:])]
        assert drops == [exact(drops[0])] * len(drops)
    with pytest.raises(ValueError, match=r"schedule\.warmup \+ schedule\.decay must be <= 1"):
        ScheduleConfig(name="wsd", warmup=0.3, decay=0.8)
    ScheduleConfig(name="wsd", warmup=0.3, decay=0.7)  # = 1 is fine
    ScheduleConfig(name="cosine", warmup=0.3, decay=0.8)  # decay is wsd's only


def test_wsd_validation_reads_as_one_line_in_the_config_error(tmp_path):
    import yaml

    from cpt.config import load_config
    from cpt.errors import CptError

    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"tasks": [{"name": "en", "path": "en.txt", "tokens": 1000}], "schedule": {"name": "wsd", "decay": 1.0}}))
    with pytest.raises(CptError, match=r"schedule: schedule\.warmup \+ schedule\.decay must be <= 1$"):
        load_config(p)


# ------------------------------------------------------------------ key points of every schedule


@pytest.mark.parametrize("name", NAMES)
def test_warmup_is_linear_from_lr_over_w_to_exactly_lr(name):
    kw = {"decay": 0.2} if name == "wsd" else {}
    v = values(name, warmup=0.02, ends=(1000,), **kw)  # W = 20 (rewarm: one task of 1000 steps)
    assert v[0] == exact(LR / 20)
    assert v[:20] == [exact(LR * (s + 1) / 20) for s in range(20)]
    assert v[19] == LR and max(v) == LR


@pytest.mark.parametrize("name", NAMES)
def test_no_warmup_starts_at_the_peak(name):
    v = values(name, warmup=0.0)
    assert v[0] == LR
    if name in ("cosine", "rewarm", "infinite"):
        assert v[1] < LR  # moves away at once (wsd / constant: a stable phase at lr)


def test_cosine_warms_up_then_decays_once_to_min_lr():
    v = values("cosine", warmup=0.01)
    assert v[0] == exact(LR / 10)  # 10 warmup steps, linear, never 0
    assert v[9] == LR
    assert max(v) == LR
    assert v[505] == pytest.approx(MIN + 0.5 * (LR - MIN), rel=0.01)  # half way through the cosine
    assert v[-1] == MIN  # was approx(rel=1e-3): the old schedule stopped one step short of min_lr
    assert non_increasing(v[9:])  # monotone after warmup, across task ends
    # every step of the cosine: D = 990 steps, step s at (s - 9) / 990 of the way
    assert v[10:] == [exact(MIN + 0.5 * (LR - MIN) * (1 + math.cos(math.pi * (s - 9) / 990))) for s in range(10, 1000)]
    assert v[9 + 495] == exact(MIN + 0.5 * (LR - MIN))  # exactly half way


def test_rewarm_restarts_in_every_task():
    v = values("rewarm", warmup=0.02)
    assert v[0] == exact(LR / 10)
    assert v[9] == LR  # 10 warmup steps in a 500-step task
    assert v[499] == MIN  # was approx(rel=1e-2): the last step is min_lr exactly
    assert v[500] == exact(LR / 10)  # warmup again
    assert v[509] == LR
    assert v[999] == MIN
    for task in (v[:500], v[500:]):
        assert increasing(task[:10]) and non_increasing(task[9:])
        assert task[10:] == [exact(MIN + 0.5 * (LR - MIN) * (1 + math.cos(math.pi * (s - 9) / 490))) for s in range(10, 500)]


def test_rewarm_tasks_of_different_lengths_each_get_their_own_warmup_and_end():
    ends = (300, 303, 304, 1000)  # 300, 3, 1 and 696 steps
    v = values("rewarm", ends=ends, warmup=0.5)
    assert v[0] == exact(LR / 150) and v[149] == LR and v[150] < LR and v[299] == MIN
    assert v[300:303] == [exact(LR / 2), LR, MIN]  # 3 steps: W = ceil(1.5) = 2
    assert v[303] == LR  # a one-step task: its only step is the peak
    assert v[304] == exact(LR / 348) and v[304 + 347] == LR and v[999] == MIN


def test_rewarm_task_shorter_than_its_warmup():
    # warmup 0.99 of a 2-step task rounds up to 2 steps = the whole task: capped at 1 so it still ends at min_lr
    v = values("rewarm", 12, ends=(2, 12), warmup=0.99)
    assert v[:2] == [LR, MIN]
    assert v[2:] == [exact(LR * (s + 1) / 9) for s in range(9)] + [MIN]  # ceil(9.9) = 10 capped at 9
    # past the last end (and ends past the total): one more task up to the total
    assert values("rewarm", 10, ends=(4,), warmup=0.0)[4:] == values("rewarm", 6, ends=(), warmup=0.0)
    assert values("rewarm", 10, ends=(4, 50), warmup=0.0)[4:] == values("rewarm", 6, ends=(), warmup=0.0)


def test_infinite_has_cooldown_constant_and_anneal():
    const = 4e-4
    v = values("infinite", warmup=0.01, cooldown=0.1, anneal=0.05, constant_lr=const)
    # W = 10, C = 100 (steps 10..109), constant 110..949, A = 50 (steps 950..999)
    assert v[0] == exact(LR / 10) and v[9] == LR
    assert v[10] < LR
    assert v[10:110] == [exact(const + 0.5 * (LR - const) * (1 + math.cos(math.pi * (s - 9) / 100))) for s in range(10, 110)]
    assert v[109] == const  # the cooldown's last step
    assert v[110] == const  # (the old test's "end of cooldown" was the constant phase's first step)
    assert set(v[109:950]) == {const}  # constant phase, exactly
    assert v[950:] == [exact(const * (MIN / const) ** ((s - 949) / 50)) for s in range(950, 1000)]
    assert v[-1] == MIN  # annealed, exactly
    assert v[975] < const and v[975] > MIN
    assert non_increasing(v[9:])


def test_infinite_defaults_and_zero_phases():
    v = values("infinite", warmup=0.0, cooldown=0.1, anneal=0.05)
    assert v[0] == LR and v[100] == LR / 2 and v[949] == LR / 2 and v[-1] == MIN  # constant_lr defaults to lr/2
    v = values("infinite", warmup=0.01, cooldown=0.0, anneal=0.0, constant_lr=4e-4)
    assert v[9] == LR and set(v[10:]) == {4e-4}  # no cooldown: c0 from step W; no anneal: ends on c0
    v = values("infinite", warmup=0.01, anneal=0.05, min_lr=0.0, constant_lr=4e-4)
    assert v[-1] == 0.0 and all(x > 0 for x in v[:-1])  # min_lr = 0: the anneal still ends there exactly


def test_wsd_is_stable_then_decays_linearly():
    v = values("wsd", warmup=0.01, decay=0.2)
    assert v[0] == exact(LR / 10) and v[9] == LR
    assert v[10] == LR and v[799] == LR
    assert set(v[9:800]) == {LR}  # stable, exactly
    assert v[800:] == [exact(LR + (MIN - LR) * (s - 799) / 200) for s in range(800, 1000)]
    assert v[899] == exact(LR + (MIN - LR) * 100 / 200)
    assert v[-1] == MIN
    assert non_increasing(v[9:])
    assert set(values("wsd", warmup=0.01, decay=0.0)[9:]) == {LR}
    v = values("wsd", warmup=0.0, decay=1.0)  # decay over everything: still starts at the peak
    assert v[0] == LR and v[1] == exact(LR + (MIN - LR) / 999) and v[-1] == MIN


def test_constant():
    v = values("constant", warmup=0.0)
    assert set(v) == {LR}
    v = values("constant", warmup=0.05)
    assert v[0] == exact(LR / 50) and v[49] == LR and set(v[49:]) == {LR}


# ------------------------------------------------------------------ short runs and odd inputs


def bounds_ok(v, w):
    """Warmup in (0, lr]; afterwards within [min(lr, min_lr), lr]."""
    lo, hi = min(LR, MIN), LR
    return all(0 < x <= hi for x in v[:w]) and all(lo <= x <= hi for x in v[w:])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("total", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("warmup", [0.0, 0.01, 0.34, 0.5, 0.99])
def test_very_short_runs(name, total, warmup):
    kw = {"cooldown": 0.004, "anneal": 0.004} if name == "infinite" else {}
    if name == "wsd":
        kw["decay"] = min(0.5, 1 - warmup)
    v = values(name, total, ends=(total,), warmup=warmup, **kw)
    w = min(max(math.ceil(warmup * total), 1), max(total - 1, 1))
    assert v[w - 1] == LR  # the peak, exactly
    assert bounds_ok(v, w)
    if total == 1:
        assert v == [LR]  # the only step is the peak
    elif name != "constant":
        assert v[-1] == MIN


def test_short_runs_exact_values():
    assert values("cosine", 1, ends=(1,), warmup=0.01) == [LR]
    assert values("cosine", 2, ends=(2,), warmup=0.01) == [LR, MIN]
    assert values("cosine", 3, ends=(3,), warmup=0.0) == [LR, exact(MIN + 0.5 * (LR - MIN)), MIN]
    assert values("cosine", 3, ends=(3,), warmup=0.99) == [exact(LR / 2), LR, MIN]  # warmup capped at T-1 = 2 steps
    assert values("wsd", 3, ends=(3,), warmup=0.5, decay=0.5) == [exact(LR / 2), LR, MIN]
    assert values("infinite", 2, ends=(2,), warmup=0.01, cooldown=0.1, anneal=0.05) == [LR, MIN]
    assert values("infinite", 3, ends=(3,), warmup=0.01, cooldown=0.1, anneal=0.05, constant_lr=4e-4) == [LR, 4e-4, MIN]


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_steps_and_totals_do_not_fail(name):
    cfg = ScheduleConfig(name=name, min_lr=MIN)
    assert lr_at(0, 0, [], LR, cfg) == LR  # total 0 counts as 1 step
    assert lr_at(-3, 10, [10], LR, cfg) == lr_at(0, 10, [10], LR, cfg)  # steps are clamped into the run
    assert lr_at(10, 10, [10], LR, cfg) == lr_at(9, 10, [10], LR, cfg)
    assert lr_at(10**6, 10, [10], LR, cfg) == lr_at(9, 10, [10], LR, cfg)


def test_min_lr_above_lr_stays_between_them():
    v = values("cosine", 50, ends=(50,), warmup=0.1, min_lr=2 * LR)
    assert v[4] == LR and v[-1] == 2 * LR and all(LR <= x <= 2 * LR for x in v[4:])
