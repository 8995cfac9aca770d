"""dino_jax/viz/run_report.py's figures."""

import numpy as np

from dino_jax.viz import run_report


def test_the_whole_split_knn_points_are_drawn_beside_the_monitor_curve():
    curve = run_report.Series(
        "teacher (monitor subsets)", np.array([0.0, 22.0, 44.0]), np.array([60.0, 65, 70])
    )
    point = run_report.Series("trained teacher, whole splits", np.array([44.0]), np.array([72.0]), "s")
    figure = run_report.panel_figure([run_report.Panel("kNN", [curve, point], "%")])
    line, square = figure.axes[0].lines[:2]
    assert line.get_marker() == "o" and line.get_linestyle() == "-"
    assert square.get_marker() == "s" and square.get_linestyle() == "None"  # visible: a square, no line
