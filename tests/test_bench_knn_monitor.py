"""bench/knn_monitor.py: the kNN monitor's share of a run, from the run's own files."""

import json

import pytest

from bench import knn_monitor
from dino_jax import config as config_lib
from dino_jax.configs import digits


def test_the_share_and_its_projections_from_a_run_logged_every_epoch(tmp_path):
    config = digits.get_config(None)  # batch 64, 22 steps an epoch, the monitor on 1437 + 360 images
    config_lib.save_run_config(config, str(tmp_path))
    # Monitor calls of 5 s at steps 0, 22 and 44; steps of 2 s; the first interval also compiles (10 s).
    intervals_s = {22: 5 + 10 + 22 * 2 + 5, 44: 22 * 2 + 5}
    rows = [{"step": 0, "monitor_teacher_knn_k20_top1": 60.0, "monitor_seconds": 5.0}]
    for step, interval_s in intervals_s.items():  # a step's call is written before the step's row
        rows.append({"step": step, "monitor_teacher_knn_k20_top1": 60.0, "monitor_seconds": 5.0})
        rows.append({"step": step, "loss": 7.0, "images_per_s": 22 * 64 / interval_s})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    figures = knn_monitor.monitor_cost(str(tmp_path), [1, 4], recipe="cifar100")
    assert figures["monitor_calls"] == 3 and figures["monitor_s"] == 15.0
    assert figures["loop_s"] == pytest.approx(sum(intervals_s.values()))
    assert figures["measured_share"] == pytest.approx(15 / sum(intervals_s.values()), abs=1e-4)
    assert figures["median_call_s"] == 5.0 and figures["median_step_s"] == pytest.approx(2.0)
    assert figures["projected_share_every_1_epochs"] == pytest.approx(5 / (5 + 22 * 2), abs=1e-4)
    assert figures["projected_share_every_4_epochs"] == pytest.approx(5 / (5 + 88 * 2), abs=1e-4)
    # CIFAR-100's recipe: batch 256 (steps 4x as long), 195 steps an epoch, 10,000 + 2,000 images.
    call_s = 5 * 12000 / 1797
    assert figures["recipe_call_s"] == pytest.approx(call_s, abs=0.05)
    assert figures["recipe_projected_share_every_1_epochs"] == pytest.approx(
        call_s / (call_s + 195 * 8), abs=1e-4
    )
