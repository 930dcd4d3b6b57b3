"""Learning-rate schedules: pure functions of the step (cxr.engine.schedules)."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.engine.schedules import constant_then_linear, linear_decay_lr, warmup_constant_lr, warmup_cosine_lr


def test_linear_decay_constant_then_linear():
    f = [constant_then_linear(s, 10, 4) for s in range(10)]
    assert f == pytest.approx([1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25])
    half = [constant_then_linear(s, 8) for s in range(8)]
    assert half == pytest.approx([1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25])
    assert constant_then_linear(12, 10, 4) == 0.0
    assert constant_then_linear(5, 10, 0) == 1.0
    assert linear_decay_lr(2e-4, 9, 10, 4) == pytest.approx(5e-5)
    assert [linear_decay_lr(2e-4, s, 10, 4) for s in range(10)] == [2e-4 * m for m in f]
    with pytest.raises(ValueError):
        constant_then_linear(0, 10, 11)
    with pytest.raises(ValueError):
        constant_then_linear(-1, 10)


def test_warmup_cosine():
    assert warmup_cosine_lr(1.0, 0, 100) == 1.0 and np.isclose(warmup_cosine_lr(1.0, 50, 100), 0.5)
    assert warmup_cosine_lr(1.0, 100, 100) == 0.0 and warmup_cosine_lr(1.0, 4, 100, warmup=10) == 0.5
    warm = [warmup_cosine_lr(2.0, s, 20, warmup=4) for s in range(4)]
    assert warm == pytest.approx([0.5, 1.0, 1.5, 2.0])  # linear ramp reaching the base rate
    assert warmup_cosine_lr(2.0, 4, 20, warmup=4) == 2.0  # the cosine starts at the base rate
    assert warmup_cosine_lr(2.0, 12, 20, warmup=4) == pytest.approx(1.0)  # half way: half the rate
    assert warmup_cosine_lr(2.0, 25, 20, warmup=4) == 0.0  # past the end: stays at zero
    rates = [warmup_cosine_lr(1.0, s, 50, warmup=5) for s in range(5, 51)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # never rises after the warmup
    assert warmup_cosine_lr(1.0, 7, 7, warmup=7) == 1.0  # nothing left after the warmup: no division by zero



def test_warmup_constant():
    warm = [warmup_constant_lr(2.0, s, warmup=4) for s in range(4)]
    assert warm == [warmup_cosine_lr(2.0, s, 20, warmup=4) for s in range(4)]  # the cosine's warmup
    assert [warmup_constant_lr(2.0, s, warmup=4) for s in (4, 19, 1000)] == [2.0, 2.0, 2.0]
    assert warmup_constant_lr(2e-3, 0) == 2e-3

def test_schedules_are_pure():
    assert linear_decay_lr(1e-3, 7, 10) == linear_decay_lr(1e-3, 7, 10)
    assert warmup_cosine_lr(1e-3, 7, 10, 2) == warmup_cosine_lr(1e-3, 7, 10, 2)
