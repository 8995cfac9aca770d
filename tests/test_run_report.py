"""The figures of a run's report (dino_jax/viz/report_figures.py), and the end-of-run report."""

import numpy as np

from dino_jax.viz import report_figures


def test_the_whole_split_knn_points_are_drawn_beside_the_monitor_curve():
    curve = report_figures.Series(
        "teacher (monitor subsets)", np.array([0.0, 22.0, 44.0]), np.array([60.0, 65, 70])
    )
    point = report_figures.Series("trained teacher, whole splits", np.array([44.0]), np.array([72.0]), "s")
    figure = report_figures.panel_figure([report_figures.Panel("kNN", [curve, point], "%")])
    line, square = figure.axes[0].lines[:2]
    assert line.get_marker() == "o" and line.get_linestyle() == "-"
    assert square.get_marker() == "s" and square.get_linestyle() == "None"  # visible: a square, no line


def test_the_end_of_run_report_maps_the_trainers_teacher_without_reading_a_checkpoint(
    tmp_path, monkeypatch, capsys
):
    # The workdir holds no checkpoint, and the loader that --mode=report reads one with fails: a
    # feature map at the step given can only come from the parameters handed over in memory.
    from dino_jax import train
    from dino_jax.interop import load
    from dino_jax.models import dino
    from tests import train_helpers as th

    def refuse(*args, **kwargs):
        raise AssertionError("the end-of-run report read a checkpoint back from disk")

    monkeypatch.setattr(load, "load_checkpoint", refuse)
    config = th.tiny_config(**{"dataset.synthetic": True, "eval.monitor_test_images": 64})
    parts, mesh = th.build(config)
    backbone = dino.split_backbone(parts.graphdef, parts.state.teacher)
    workdir = tmp_path / "run"

    train.write_run_report(config, str(workdir), backbone, 7, mesh)

    assert (workdir / "report.html").exists(), capsys.readouterr().err  # its warning says why not
    page = (workdir / "report.html").read_text()
    assert "final-norm CLS features at step 7 of 64 fixed digits test images" in page
    assert (workdir / "report" / "features_pca.png").exists()


def test_the_page_counts_the_steps_of_what_the_run_trains_on(tmp_path):
    from PIL import Image

    from configs import cifar100, tiny_imagenet
    from dino_jax.viz import report_html

    stl10 = tiny_imagenet.get_config()
    stl10.dataset.name = "stl10_unlabelled"  # 100,000 unlabelled images, not the 5,000 labelled
    assert report_html.planned_steps(stl10) == 100 * (100_000 // 256)

    for i in range(10):
        Image.new("RGB", (8 + i, 8)).save(tmp_path / f"{i}.png")
    folder = cifar100.get_config()
    folder.dataset.name, folder.dataset.train_dir = "folder", str(tmp_path)
    folder.train.batch_size, folder.train.epochs = 4, 3
    assert report_html.planned_steps(folder) == 3 * (10 // 4)  # listed, nothing decoded
    folder.dataset.train_dir = str(tmp_path / "gone")
    assert report_html.planned_steps(folder) == "?"
