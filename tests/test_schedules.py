import numpy as np
import pytest

from dino_jax import schedules


def test_lr_worked_example_from_the_reference():
    # CIFAR-100: 50,000 images, batch 256 -> 195 iterations an epoch, 100 epochs, 10 of warm-up.
    lr = schedules.cosine_schedule(5e-4, 1e-6, epochs=100, steps_per_epoch=195, warmup_epochs=10)
    assert len(lr) == 19500
    assert lr[0] == 0.0
    # linspace includes both ends, so the peak appears at the last warm-up step and the first cosine step.
    assert lr[1949] == pytest.approx(5e-4, rel=1e-12)
    assert lr[1950] == pytest.approx(5e-4, rel=1e-12)
    assert lr[-1] == pytest.approx(1.000004e-6, rel=1e-6)
    assert lr[-1] > 1e-6
    assert np.all(np.diff(lr[1950:]) <= 0)


def test_weight_decay_and_momentum_midpoints():
    wd = schedules.cosine_schedule(0.04, 0.4, epochs=100, steps_per_epoch=195)
    momentum = schedules.cosine_schedule(0.996, 1.0, epochs=100, steps_per_epoch=195)
    assert wd[0] == pytest.approx(0.04) and momentum[0] == pytest.approx(0.996)
    assert wd[len(wd) // 2] == pytest.approx(0.22, abs=1e-9)
    assert momentum[len(momentum) // 2] == pytest.approx(0.998, abs=1e-12)


def test_teacher_temperature_warmup_reaches_the_final_value_at_its_last_epoch():
    temps = schedules.teacher_temperature_schedule(0.04, 0.07, warmup_epochs=30, epochs=100)
    assert len(temps) == 100
    assert temps[0] == pytest.approx(0.04)
    assert temps[29] == pytest.approx(0.07)
    assert np.all(temps[29:] == pytest.approx(0.07))
    assert temps[1] == pytest.approx(0.04 + 0.03 / 29)


def test_lookup_clamps_past_the_end():
    table = np.array([1.0, 2.0, 3.0])
    assert float(schedules.lookup(table, 1)) == 2.0
    assert float(schedules.lookup(table, 10)) == 3.0


def test_bad_lengths_are_rejected():
    with pytest.raises(ValueError, match="warm-up of 5 epochs is longer"):
        schedules.cosine_schedule(1.0, 0.0, epochs=2, steps_per_epoch=3, warmup_epochs=5)
