"""A run's progress read from its files (dino_jax/viz/progress.py), as the notebooks show it."""

import json

import matplotlib
import numpy as np
import pytest
from PIL import Image

from dino_jax.viz import progress

matplotlib.use("Agg")


def write_rows(workdir, rows, tail=""):
    with open(workdir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.write(tail)


def test_columns_of_a_run_still_writing(tmp_path):
    rows = [{"step": 2, "loss": 6.0, "lr": 1e-4}, {"step": 4, "loss": 5.5, "lr": 2e-4, "knn_top1": 40.0}]
    write_rows(tmp_path, rows, tail='{"step": 6, "loss": 5.')  # a line cut short
    metrics = progress.read_metrics(str(tmp_path))
    assert list(metrics) == ["step", "knn_top1", "loss", "lr"]
    np.testing.assert_array_equal(metrics["step"], [2, 4])
    np.testing.assert_array_equal(metrics["loss"], [6.0, 5.5])
    np.testing.assert_array_equal(metrics["knn_top1"], [np.nan, 40.0])  # logged from step 4 on


def test_a_run_that_logged_nothing_yet_has_no_columns(tmp_path):
    assert progress.read_metrics(str(tmp_path)) == {}
    write_rows(tmp_path, [])
    assert progress.read_metrics(str(tmp_path)) == {}


def test_one_panel_per_logged_metric_asked_for(tmp_path):
    write_rows(tmp_path, [{"step": s, "loss": 7.0 - s, "lr": 1e-3, "momentum": 0.99} for s in (1, 2, 3)])
    metrics = progress.read_metrics(str(tmp_path))
    figure = progress.plot_curves(metrics)  # MAIN_CURVES: only loss, lr and momentum are logged
    assert [axis.get_title() for axis in figure.axes if axis.axison] == ["loss", "lr", "momentum"]
    np.testing.assert_array_equal(figure.axes[0].lines[0].get_ydata(), [6.0, 5.0, 4.0])
    with pytest.raises(ValueError, match="none of the metrics asked for is logged"):
        progress.plot_curves(metrics, ["knn_top1"])


def test_attention_panels_by_step_and_a_spread_of_them(tmp_path):
    (tmp_path / "attention").mkdir()
    for step in (20, 5, 10, 15):
        Image.new("RGB", (40, 80)).save(tmp_path / "attention" / f"step_{step:07d}.png")
    panels = progress.attention_panels(str(tmp_path))
    assert [step for step, _ in panels] == [5, 10, 15, 20]
    assert progress.spread(panels, 2) == [panels[0], panels[-1]]
    assert progress.spread(panels, 3) == [panels[0], panels[2], panels[3]]
    assert progress.spread(panels, 1) == [panels[-1]] and progress.spread(panels, 9) == panels
    figure = progress.plot_panels(panels[:2], width=2.0)
    assert [axis.get_title() for axis in figure.axes] == ["step 5", "step 10"]
    np.testing.assert_allclose(figure.get_size_inches(), [4.0, 4.0])  # two 2 x 4 inch panels in a row
    assert progress.attention_panels(str(tmp_path / "nothing")) == []


def test_the_knn_monitor_rows_between_the_logged_steps_draw_whole_lines(tmp_path):
    # As a run writes them: the monitor's rows (its metrics only) between the logged steps' rows.
    rows = [{"step": 0, "monitor_teacher_knn_k20_top1": 60.0, "monitor_seconds": 1.0}]
    for step in (2, 4, 6):
        rows.append({"step": step, "loss": 7.0 - step / 2, "lr": 1e-3})
        rows.append({"step": step, "monitor_teacher_knn_k20_top1": 60.0 + step, "monitor_seconds": 1.0})
    write_rows(tmp_path, rows)
    metrics = progress.read_metrics(str(tmp_path))
    assert progress.knn_curves(metrics) == ["monitor_teacher_knn_k20_top1"]
    figure = progress.plot_curves(metrics)
    titles = [axis.get_title() for axis in figure.axes if axis.axison]
    assert titles == ["loss", "lr", "monitor_teacher_knn_k20_top1"]
    loss, knn = figure.axes[0].lines[0], figure.axes[2].lines[0]
    np.testing.assert_array_equal(loss.get_xdata(), [2, 4, 6])
    np.testing.assert_array_equal(loss.get_ydata(), [6.0, 5.0, 4.0])
    np.testing.assert_array_equal(knn.get_xdata(), [0, 2, 4, 6])
    np.testing.assert_array_equal(knn.get_ydata(), [60.0, 62.0, 64.0, 66.0])
