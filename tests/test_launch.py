"""End-to-end runs of launch.py, as a user types them (tiny settings)."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

from dino_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Tiny models: XLA's optimisation passes cost more compile time than they save.
FAST_COMPILE = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def launch(*args, timeout=900, env=None):
    env = {**FAST_COMPILE, **(env or {})}
    return subprocess.run(
        [sys.executable, "launch.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **env),
    )


@pytest.fixture(scope="module")
def digits_data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


# The kNN monitor every 3 of the 6 steps (89 make an epoch), of the teacher and the student.
MONITOR_FLAGS = ("--config.eval.monitor_every_epochs=0.034", "--config.eval.monitor_student=True")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, digits_data_dir):
    workdir = str(tmp_path_factory.mktemp("digits_smoke"))
    out = launch(
        "--config=configs/digits.py:smoke",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={digits_data_dir}",
        *MONITOR_FLAGS,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return workdir, out


def metric_rows(workdir):
    """(the logged steps' rows, the kNN monitor's rows) of metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss" in r], [r for r in rows if "monitor_seconds" in r]


def test_digits_smoke_run_writes_results_metrics_and_a_checkpoint(smoke_run):
    workdir, out = smoke_run
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    for key in (
        "knn_k5_top1",
        "knn_k20_top1",
        "knn_k20_top5",
        "random_init_knn_k20_top1",
        "random_init_knn_k5_top1",
    ):
        assert 0.0 <= results[key] <= 100.0, key
    assert results["knn_k20_top5"] >= results["knn_k20_top1"]
    rows, _ = metric_rows(workdir)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(
        set(r) >= {"loss", "lr", "weight_decay", "momentum", "teacher_entropy", "teacher_student_kl"}
        for r in rows
    )
    assert "step 6/6" in out.stderr and "img/s" in out.stderr and "ETA" in out.stderr
    # The devices the run used (dino_jax/accelerator.py), printed before training starts.
    devices = re.search(r"JAX backend \w+: \d+ device\(s\) \(.+\) in 1 process\(es\)", out.stderr)
    assert devices and devices.start() < out.stderr.index("training 6 steps")
    # No dtype given: model.dtype=auto resolved for the CPU (dino_jax/precision.py), said and recorded.
    assert "compute dtype: float32 (model.dtype=auto on the CPU)\n" in out.stderr
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["dtype"] == "float32"
    # The CLI's malloc settings (dino_jax/host_memory.py), where they apply.
    kept = host_memory.reason_not_to_keep_here() is None
    assert ("host memory: freed memory kept for reuse" in out.stderr) == kept
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))


def test_a_run_logs_the_knn_monitor_and_tensorboard_events_and_writes_its_report(smoke_run):
    from PIL import Image

    from tests.test_hooks import read_events

    workdir, out = smoke_run
    rows, monitor_rows = metric_rows(workdir)
    assert [r["step"] for r in monitor_rows] == [0, 3, 6]
    for row in monitor_rows:
        for network in ("teacher", "student"):
            assert (
                0 <= row[f"monitor_{network}_knn_k20_top1"] <= row[f"monitor_{network}_knn_k20_top5"] <= 100
            )
    # Step 0 is the untrained network; digits is smaller than the monitor's subsets, so it is the
    # whole-split kNN of the same network.
    with open(os.path.join(workdir, "results.json")) as f:
        untrained = json.load(f)["random_init_knn_k20_top1"]
    assert monitor_rows[0]["monitor_teacher_knn_k20_top1"] == pytest.approx(untrained)
    assert "kNN monitor at step 3: k=20 top-1 teacher" in out.stderr

    scalars, images = read_events(workdir)
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [step for step, _ in scalars["knn/student_knn_k20_top1"]] == [0, 3, 6]
    assert [step for step, _ in images["attention/teacher"]] == [0, 3, 6]

    page = pathlib.Path(workdir, "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    figures = {"loss", "schedules", "teacher", "throughput", "knn", "features_pca", "features_tsne"}
    assert {f"report/{name}.png" for name in figures} <= set(sources)
    assert {f"attention/step_{step:07d}.png" for step in (0, 3, 6)} <= set(sources)
    for source in sources:
        with Image.open(os.path.join(workdir, source)) as image:
            assert min(image.size) > 50, source
    assert "finished: 6 of 6 steps, evaluated" in page


def test_the_report_renders_in_headless_chromium_with_every_image(smoke_run, tmp_path):
    """Opens report.html in a real browser (Debian's chromium, which `bash install.sh dev`
    installs) and checks in the page that every <img> decoded."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if browser is None:
        message = "needs Chromium: `bash install.sh dev` installs Debian's chromium where apt-get may run"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    workdir, _ = smoke_run
    for folder in ("report", "attention"):
        shutil.copytree(os.path.join(workdir, folder), tmp_path / folder)
    page = pathlib.Path(workdir, "report.html").read_text()
    check = """<script>window.addEventListener("load", () => {
      const images = Array.from(document.images);
      const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.src);
      const out = document.createElement("pre");
      out.id = "image-check";
      out.textContent = JSON.stringify({count: images.length, broken: broken});
      document.body.appendChild(out);
    });</script></body>"""
    (tmp_path / "report.html").write_text(page.replace("</body>", check))
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
        + ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
        + [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom"]
        + [(tmp_path / "report.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="image-check">(.*?)</pre>', out.stdout)
    assert found, out.stderr[-2000:]
    checked = json.loads(found.group(1))
    assert checked["broken"] == [] and checked["count"] == page.count("<img ") >= 10


def test_report_mode_on_a_run_still_training(smoke_run, tmp_path):
    workdir, _ = smoke_run
    running = tmp_path / "running"
    # A run before its evaluation: no results.json yet, and a metrics line being written.
    shutil.copytree(workdir, running, ignore=shutil.ignore_patterns("report*", "results.*"))
    with open(running / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    out = launch("--mode=report", f"--workdir={running}")
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"wrote {running / 'report.html'}" in out.stderr
    page = (running / "report.html").read_text()
    assert "in progress, or stopped before its evaluation: 6 of 6 steps logged" in page
    assert "No evaluation yet" in page
    assert {"loss.png", "knn.png", "features_pca.png"} <= set(os.listdir(running / "report"))
    for source in re.findall(r'<img src="([^"]+)"', page):
        assert (running / source).is_file(), source


def test_report_mode_of_a_folder_that_is_no_run_is_a_one_line_error(tmp_path):
    from dino_jax.modes import report

    with pytest.raises(FileNotFoundError, match="config.json not found: is .* the workdir of a training run"):
        report.run(str(tmp_path))


def test_rerun_of_a_finished_workdir_resumes_instead_of_retraining(smoke_run, digits_data_dir):
    workdir, _ = smoke_run
    out = launch(
        "--config=configs/digits.py:smoke",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={digits_data_dir}",
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed from" in out.stderr and "at step 6" in out.stderr
    rows, monitor_rows = metric_rows(workdir)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert [r["step"] for r in monitor_rows] == [0, 3, 6]


def test_a_second_run_loads_its_compiled_step_from_the_compilation_cache(tmp_path, digits_data_dir):
    cache = tmp_path / "compilation_cache"
    flags = [
        "--config=configs/digits.py:smoke",
        f"--config.dataset.data_dir={digits_data_dir}",
        f"--config.train.compilation_cache_dir={cache}",
        "--config.eval.evaluators=('knn',)",
        "--config.eval.random_init_knn=False",
        "--config.eval.report=False",
    ]
    # Cache every compilation, however quick it is on this machine; report hits.
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}
    first = launch(*flags, f"--workdir={tmp_path / 'first'}", env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    assert any(name.startswith("jit_train_step") for name in os.listdir(cache))
    assert "cache hit for 'jit_train_step'" not in first.stderr
    second = launch(*flags, f"--workdir={tmp_path / 'second'}", env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "cache hit for 'jit_train_step'" in second.stderr


def test_cifar100_without_the_dataset_or_internet_stops_at_once(tmp_path):
    started = time.perf_counter()
    out = launch(
        "--config=configs/cifar100.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.dataset.data_dir={tmp_path / 'empty'}",
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert out.returncode != 0
    assert "cifar100" in out.stderr and "Traceback" not in out.stderr
    assert elapsed < 60


def test_eval_mode_evaluates_the_latest_checkpoint_of_a_workdir(smoke_run, tmp_path):
    workdir, _ = smoke_run
    out_dir = tmp_path / "eval"
    out = launch("--mode=eval", f"--checkpoint={workdir}", f"--workdir={out_dir}")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "step 6" in out.stderr
    with open(out_dir / "results.json") as f:
        results = json.load(f)
    for key in (
        "knn_k5_top1",
        "knn_k20_top1",
        "linear_train_top1",
        "linear_test_top1",
        "linear_best_test_top1",
        "linear_train_loss",
        "linear_test_loss",
        "fewshot_5shot_ncm",
        "fewshot_5shot_ncm_ci95",
    ):
        assert key in results, key
    # The training run's own evaluation of the same teacher gives the same kNN.
    with open(os.path.join(workdir, "results.json")) as f:
        trained = json.load(f)
    assert results["knn_k20_top1"] == pytest.approx(trained["knn_k20_top1"], abs=1e-6)
    markdown = (out_dir / "results.md").read_text()
    assert "Linear probe" in markdown and "Weighted kNN" in markdown and "Few-shot" in markdown
    assert "Command: `python launch.py --mode=eval" in markdown


def test_visualize_mode_writes_attention_maps_for_photo_files(smoke_run, tmp_path):
    from PIL import Image
    import numpy as np

    workdir, _ = smoke_run
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("a.jpg", (50, 40)), ("b.png", (33, 33))):
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    out_dir = tmp_path / "viz"
    out = launch(
        "--mode=visualize", f"--checkpoint={workdir}", f"--workdir={out_dir}", f"--images={','.join(paths)}"
    )
    assert out.returncode == 0, out.stderr[-4000:]
    written = sorted(os.listdir(out_dir / "attention"))
    assert {"a", "b", "attention_grid.png"} <= set(written)
    per_image = os.listdir(out_dir / "attention" / "a")
    assert any("head" in name for name in per_image) and any("mask" in name for name in per_image)
    assert any("overlay" in name for name in per_image)


@pytest.fixture(scope="module")
def reference_backbone(tmp_path_factory):
    """A backbone state dict saved by the PyTorch reference model (tests/torch_reference.py)."""
    torch = pytest.importorskip("torch")
    from tests import torch_reference

    torch.manual_seed(0)
    model = torch_reference.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=128, depth=1, num_heads=2
    ).eval()
    path = tmp_path_factory.mktemp("torch") / "backbone.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


def test_embed_and_convert_a_pytorch_checkpoint_from_the_command_line(reference_backbone, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    model, path = reference_backbone
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")

    out = launch(
        "--mode=embed", f"--checkpoint={path}", f"--images={folder}", f"--out={tmp_path / 'emb.npz'}"
    )
    assert out.returncode == 0, out.stderr[-4000:]
    embedded = np.load(tmp_path / "emb.npz")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    with torch.no_grad():
        inputs = torch.tensor(((images / 255.0 - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
        expected = model(inputs).numpy()
    assert [os.path.basename(p) for p in embedded["paths"]] == ["0.png", "1.png", "2.png"]
    np.testing.assert_allclose(embedded["features"], expected, atol=1e-4)

    converted = tmp_path / "converted"
    out = launch("--mode=convert", f"--from={path}", f"--to={converted}")
    assert out.returncode == 0, out.stderr[-4000:]
    back = tmp_path / "back.pth"
    out = launch("--mode=convert", f"--from={converted}", f"--to={back}", "--backbone_only")
    assert out.returncode == 0, out.stderr[-4000:]
    original, returned = torch.load(path, weights_only=True), torch.load(back, weights_only=True)
    assert set(original) == set(returned)
    for key in original:
        assert torch.equal(original[key], returned[key]), key


def test_eval_mode_on_a_pytorch_checkpoint(reference_backbone, tmp_path, digits_data_dir):
    _, path = reference_backbone
    out = launch(
        "--mode=eval",
        "--config=configs/digits.py:smoke",
        f"--config.dataset.data_dir={digits_data_dir}",
        f"--checkpoint={path}",
        f"--workdir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-4000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert 10.0 < results["knn_k20_top1"] <= 100.0  # random features of digits still beat chance


def test_a_pickle_that_holds_code_is_refused_and_not_run(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad.pth"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    out = launch(
        "--mode=embed",
        f"--checkpoint={bad}",
        f"--images={tmp_path / 'image.png'}",
        f"--out={tmp_path / 'x.npz'}",
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and f"error: refused to load {bad}" in out.stderr
    assert not marker.exists()


def test_convert_to_a_destination_it_cannot_write_is_a_one_line_error(
    reference_backbone, smoke_run, tmp_path
):
    _, path = reference_backbone
    workdir, _ = smoke_run
    for source, destination, expected in (
        (path, tmp_path / "backbone.pt", "cannot write a .pt file"),
        (workdir, tmp_path / "copy", "is already ours"),
    ):
        out = launch("--mode=convert", f"--from={source}", f"--to={destination}", timeout=120)
        assert out.returncode != 0
        assert "Traceback" not in out.stderr and "error: " in out.stderr and expected in out.stderr
        assert not destination.exists()


def test_embed_of_a_file_that_is_no_image_is_a_one_line_error(reference_backbone, tmp_path):
    _, path = reference_backbone
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not pixels")
    out = launch(
        "--mode=embed", f"--checkpoint={path}", f"--images={not_an_image}", f"--out={tmp_path / 'x.npz'}"
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "notes.png: not an image file" in out.stderr
