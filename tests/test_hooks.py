"""The hooks between training steps: TensorBoard events, the JSON-lines switch, the KL the logs
derive, and the collapse warning of the kNN monitor."""

import glob
import io
import json
import math
import os
import struct

import numpy as np
import pytest
from PIL import Image

from dino_jax.hooks import guards, metrics_log, monitors
from dino_jax.hooks.base import StateResults, with_derived_metrics


def read_events(logdir):
    """`(scalars {tag: [(step, value)]}, images {tag: [(step, uint8 HxWx3)]})` of the event files in
    `logdir`, parsed from their TFRecord framing (8-byte length, 4-byte CRC, the record, 4-byte
    CRC) with tensorboardX's protobuf classes."""
    from tensorboardX.proto import event_pb2

    scalars, images = {}, {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    picture = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
                    images.setdefault(value.tag, []).append((event.step, picture))
                else:
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, images


def test_tensorboard_events_hold_the_step_metrics_the_knn_rows_and_the_attention_image(tmp_path):
    writer = metrics_log.TensorBoardLog(str(tmp_path), start_step=0)
    writer.on_metrics(2, {"loss": 6.5, "lr": 1e-4})
    writer.on_metrics(4, {"loss": 6.25, "lr": 2e-4})
    panel = np.zeros((8, 12, 3), np.uint8)
    panel[:, :6, 0] = 255
    writer.on_results(4, StateResults({"monitor_teacher_knn_k20_top1": 71.5}, {"attention/teacher": panel}))
    writer.close()
    scalars, images = read_events(str(tmp_path))
    assert scalars["train/loss"] == [(2, 6.5), (4, 6.25)]
    assert scalars["train/lr"][1] == (4, pytest.approx(2e-4))
    assert scalars["knn/teacher_knn_k20_top1"] == [(4, 71.5)]
    [(step, picture)] = images["attention/teacher"]
    assert step == 4 and picture.shape == (8, 12, 3) and np.array_equal(picture, panel)


def test_log_to_without_jsonl_writes_no_metrics_file(tmp_path):
    log = metrics_log.LogMetrics(str(tmp_path), total_steps=4, images_per_step=2, start_step=0, jsonl=False)
    log.on_metrics(2, {"loss": 1.0, "lr": 0.1})
    log.on_results(2, StateResults({"monitor_seconds": 1.0}))
    log.close()
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_results_of_a_hook_are_a_row_of_their_own_and_read_back(tmp_path):
    log = metrics_log.LogMetrics(str(tmp_path), total_steps=4, images_per_step=2, start_step=0)
    log.on_results(0, StateResults({"monitor_teacher_knn_k20_top1": 50.0}))
    log.on_metrics(2, {"loss": 1.0, "lr": 0.1})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss"')  # a run writing its next line right now
    rows = metrics_log.read_metrics(str(tmp_path))
    assert [row["step"] for row in rows] == [0, 2]
    assert rows[0] == {"step": 0, "monitor_teacher_knn_k20_top1": 50.0}
    assert metrics_log.read_metrics(str(tmp_path), up_to_step=1) == rows[:1]


def test_the_kl_is_the_loss_less_the_teacher_entropy():
    # The cross-entropy H(q, p) = H(q) + KL(q || p), averaged over the same view pairs.
    rng = np.random.default_rng(0)
    q, p = rng.dirichlet(np.ones(5), size=3), rng.dirichlet(np.ones(5), size=3)
    cross_entropy = float(np.mean(-np.sum(q * np.log(p), axis=1)))
    entropy = float(np.mean(-np.sum(q * np.log(q), axis=1)))
    kl = float(np.mean(np.sum(q * np.log(q / p), axis=1)))
    metrics = with_derived_metrics({"loss": cross_entropy, "teacher_entropy": entropy})
    assert metrics["teacher_student_kl"] == pytest.approx(kl)


def warn(values, every=10, falling_after=20, no_better_after=20, num_test=360):
    return guards.knn_collapse_warning(
        [(i * every, v) for i, v in enumerate(values)],
        num_test=num_test,
        falling_after=falling_after,
        no_better_after=no_better_after,
    )


def test_knn_warning_on_a_run_whose_features_get_worse_after_a_good_start():
    # The loss can look healthy meanwhile (docs/results.md): only the kNN shows it.
    message = warn([60.0, 70.0, 78.0, 80.0, 71.0, 70.0])
    assert message and "fell from 80.0% (step 30) to 70.0% (step 50)" in message
    assert warn([60.0, 70.0, 78.0, 80.0, 79.0, 71.0]) is None  # one low point is noise
    assert warn([60.0, 70.0, 78.0, 80.0, 78.0, 77.5]) is None  # within the margin
    # The dip below the untrained network early in training (measured on digits) is no collapse.
    assert (
        warn([62.8, 58.6, 53.1, 52.5, 60.0, 70.0, 80.0], every=22, falling_after=70, no_better_after=176)
        is None
    )


def test_knn_warning_when_training_does_not_beat_the_untrained_network():
    message = warn([13.2, 12.0, 11.5, 11.2], num_test=1500)
    assert message and "no better than the untrained network's (13.2%)" in message
    assert warn([62.8, 63.0, 70.0, 72.5]) is None
    # Too early to tell: the last two points come before `no_better_after`.
    assert warn([13.2, 12.0, 11.5, 11.2], no_better_after=100) is None


def test_the_knn_monitor_measures_teacher_and_student_and_logs_a_row(capsys):
    from dino_jax.models import dino
    from tests import train_helpers

    config = train_helpers.tiny_config()
    parts, _ = train_helpers.build(config)
    calls = []

    def knn_fn(vit_graphdef, params):
        calls.append(params)
        return {"knn_k20_top1": 40.0 + len(calls), "knn_k20_top5": 90.0}

    monitor = monitors.KnnMonitor(
        parts.graphdef,
        knn_fn,
        every_steps=5,
        k=20,
        num_train=100,
        num_test=50,
        networks=("teacher", "student"),
    )
    results = monitor.on_state(0, parts.state)
    assert results.scalars["monitor_teacher_knn_k20_top1"] == 41.0
    assert results.scalars["monitor_student_knn_k20_top1"] == 42.0
    assert results.scalars["monitor_seconds"] >= 0
    _, teacher_backbone = dino.split_backbone(parts.graphdef, parts.state.teacher)
    assert json.dumps(sorted(calls[0].keys())) == json.dumps(sorted(teacher_backbone.keys()))
    monitor.on_state(5, parts.state)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        "kNN monitor at step 5: k=20 top-1 teacher 43.00%, student 44.00% (untrained 41.00%)"
    )
    assert math.isfinite(results.scalars["monitor_seconds"])


def test_the_knn_monitor_times_itself_only_once_the_queued_steps_have_finished(monkeypatch):
    # Steps are dispatched asynchronously; a monitor call that started its clock at once would be
    # charged with the computation of every step queued since the last fetched metrics.
    from tests import train_helpers

    parts, _ = train_helpers.build(train_helpers.tiny_config())
    events = []
    monkeypatch.setattr(monitors.jax, "block_until_ready", lambda tree: events.append(("ready", len(tree))))
    clock = iter(range(100))
    monkeypatch.setattr(monitors.time, "perf_counter", lambda: events.append("clock") or float(next(clock)))

    def knn_fn(vit_graphdef, params):
        events.append("knn")
        return {"knn_k20_top1": 40.0, "knn_k20_top5": 90.0}

    monitor = monitors.KnnMonitor(
        parts.graphdef, knn_fn, every_steps=5, k=20, num_train=10, num_test=5, networks=("teacher", "student")
    )
    results = monitor.on_state(5, parts.state)
    assert events == [("ready", 2), "clock", "knn", "knn", "clock"]
    assert results.scalars["monitor_seconds"] == 1.0
