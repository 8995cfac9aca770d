"""Runs that are interrupted and restarted, through launch.py as a user meets them: killed
(SIGKILL) mid-step and mid-checkpoint-write, stopped by SIGTERM/SIGINT, restarted on a damaged
latest checkpoint or on another model's workdir; and a full disk while a checkpoint is written.

Every run is digits:smoke for 12 steps (a checkpoint every 4, a metrics row every step), sharing
one compilation cache, so only the first run compiles.
"""

import asyncio
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest

from configs import digits
from dino_jax import checkpointing, sharding, training_parts

pytestmark = pytest.mark.usefixtures("fast_compilation")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 4
# Tiny models: XLA's optimisation passes cost more compile time than they save; cache every
# compilation, however quick, for the runs after the first.
ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    """The command line of every run here, less --workdir."""
    root = tmp_path_factory.mktemp("resume")
    return [
        "--config=configs/digits.py:smoke",
        f"--config.dataset.data_dir={root / 'tfds'}",
        f"--config.train.compilation_cache_dir={root / 'compilation_cache'}",
        f"--config.train.max_steps={STEPS}",
        f"--config.train.checkpoint_every_steps={EVERY}",
        "--config.train.log_every_steps=1",
        "--config.eval.evaluators=('knn',)",
        "--config.eval.random_init_knn=False",
        "--config.eval.report=False",  # tests/test_launch.py tests it
    ]


def command(*args) -> list[str]:
    return [sys.executable, *args]


def run(args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **ENV)
    )


def launch(flags, workdir, *extra):
    return run(["launch.py", *flags, f"--workdir={workdir}", *extra])


def launch_with_signal(name, point, flags, workdir):
    """launch.py that sends itself SIG`name` at `point` (tests/launch_with_signal.py)."""
    return run(["-m", "tests.launch_with_signal", name, point, *flags, f"--workdir={workdir}"])


@pytest.fixture(scope="module")
def uninterrupted(flags, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    out = launch(flags, workdir)
    assert out.returncode == 0, out.stderr[-4000:]
    assert set(os.listdir(workdir / "checkpoints")) == {str(STEPS - EVERY), str(STEPS)}
    return workdir


def stored(workdir, step):
    """Every leaf of checkpoint `step`'s train state, as stored, and its data-iterator position."""
    state, _ = checkpointing.restore_item(os.path.join(workdir, "checkpoints"), "state", step)
    leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        leaves[jax.tree_util.keystr(path)] = np.asarray(leaf)
    with open(os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")) as f:
        return leaves, json.load(f)


def assert_same_final_state(workdir, expected_workdir):
    leaves, data = stored(workdir, STEPS)
    expected_leaves, expected_data = stored(expected_workdir, STEPS)
    assert leaves.keys() == expected_leaves.keys() and len(leaves) > 100
    different = [
        name
        for name, leaf in leaves.items()
        if leaf.dtype != expected_leaves[name].dtype or not np.array_equal(leaf, expected_leaves[name])
    ]
    assert not different, f"{len(different)} leaves differ, e.g. {different[:3]}"
    assert data == expected_data  # the data order: the iterator stands at the same place


def metric_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        del row["images_per_s"]  # a timing, the one thing allowed to differ
    return rows


def test_a_run_killed_mid_step_and_mid_checkpoint_write_ends_bitwise_equal_to_an_uninterrupted_one(
    flags, uninterrupted, tmp_path
):
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    # Killed while step 6 runs, with checkpoint 4 written.
    out = launch_with_signal("KILL", "row:5", flags, workdir)
    assert out.returncode == -signal.SIGKILL, out.stderr[-4000:]
    assert os.listdir(checkpoints) == ["4"]

    # Restarted, then killed while checkpoint 8 is being written.
    out = launch_with_signal("KILL", "write:8", flags, workdir)
    assert out.returncode == -signal.SIGKILL, out.stderr[-4000:]
    assert "at step 4" in out.stderr
    assert set(os.listdir(checkpoints)) == {"4", "8.orbax-checkpoint-tmp"}

    out = launch(flags, workdir)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"removed {checkpoints / '8.orbax-checkpoint-tmp'}: a checkpoint the previous run" in out.stderr
    assert f"resumed from {checkpoints} at step 4" in out.stderr
    assert "Traceback" not in out.stderr
    assert set(os.listdir(checkpoints)) == {"8", "12"}  # the unfinished write is gone
    assert_same_final_state(workdir, uninterrupted)
    # One row per step, the resumed run's where the killed runs had written some already.
    assert metric_rows(workdir) == metric_rows(uninterrupted)


def watch_then_signal(process, workdir, step, signum, timeout_s=300):
    """Sends `signum` to `process` once metrics.jsonl has the row of `step` (the loop runs)."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        if os.path.exists(path) and any(json.loads(line)["step"] >= step for line in open(path)):
            process.send_signal(signum)
            break
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=timeout_s)
    return process.returncode, stderr


def test_sigterm_and_sigint_stop_after_the_step_in_flight_with_a_checkpoint_and_exit_0(flags, tmp_path):
    workdir = tmp_path / "run"
    # The whole epoch (89 steps): the signal comes long before the end, whenever the machine is.
    args = ["launch.py", *flags, f"--workdir={workdir}", "--config.train.max_steps=0"]

    def start(args):
        # `python ARGS` with SIGINT at its default, as in a terminal, even where this test runs in
        # a background job, which ignores it (and exec keeps an ignored signal ignored).
        default_sigint = (
            "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
        )
        return subprocess.Popen(
            command("-c", default_sigint, *args),
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, **ENV),
        )

    returncode, stderr = watch_then_signal(start(args), workdir, 2, signal.SIGTERM)
    assert returncode == 0, stderr[-4000:]
    line = next(line for line in stderr.splitlines() if line.startswith("SIGTERM received"))
    stopped = int(line.split("stopped after step ")[1].split("/")[0])
    assert stopped >= 3 and f"checkpoint written to {workdir / 'checkpoints' / str(stopped)}." in line
    assert str(stopped) in os.listdir(workdir / "checkpoints")
    assert not (workdir / "results.md").exists()  # no evaluation of a half-trained network
    rerun = stderr.splitlines()[stderr.splitlines().index(line) + 1].strip()
    assert rerun == "python " + shlex.join(args)

    # The printed command continues the run; Ctrl-C (SIGINT) stops it the same way.
    returncode, stderr = watch_then_signal(start(shlex.split(rerun)[1:]), workdir, stopped + 2, signal.SIGINT)
    assert returncode == 0, stderr[-4000:]
    assert f"at step {stopped}" in stderr and "SIGINT received: stopped after step " in stderr
    assert max(int(name) for name in os.listdir(workdir / "checkpoints")) >= stopped + 3
    assert [row["step"] for row in metric_rows(workdir)] == list(range(1, len(metric_rows(workdir)) + 1))


def test_a_truncated_latest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(
    flags, uninterrupted, tmp_path
):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    latest = workdir / "checkpoints" / str(STEPS)
    truncated = [path for path in (latest / "state").rglob("*") if path.is_file() and path.parent.name == "d"]
    assert truncated
    for path in truncated:
        os.truncate(path, path.stat().st_size // 2)

    out = launch(flags, workdir)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"checkpoint {latest} is damaged (truncated or corrupted" in out.stderr
    assert f"moved it to {latest}.damaged and restored step {STEPS - EVERY} instead" in out.stderr
    assert f"at step {STEPS - EVERY}" in out.stderr and "Traceback" not in out.stderr
    assert_same_final_state(workdir, uninterrupted)  # steps 9-12 trained again, to the same bits


def test_orphan_orbax_read_errors_logged_by_asyncio_are_dropped_and_others_kept(tmp_path):
    """The truncated-checkpoint run above passes or fails on timing: how many of orbax's parallel
    reads fail after the first decides how many "Task/Future exception was never retrieved"
    tracebacks asyncio logs. This pins the filter on records made as asyncio makes them: errors
    raised in orbax, or tensorstore's (which name their spec) wherever raised, go; others stay."""
    checkpointing._quiet_closed_event_loop_noise()

    def error_raised_in(path, text="OUT_OF_RANGE"):
        namespace = {}
        exec(compile(f"def read():\n    raise ValueError({text!r})\n", str(path), "exec"), namespace)
        try:
            namespace["read"]()
        except ValueError as error:
            return error

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    loop = asyncio.new_event_loop()
    kept = error_raised_in(tmp_path / "elsewhere.py")
    try:
        for message, error in (
            ("Task exception was never retrieved", error_raised_in(tmp_path / "orbax" / "serialization.py")),
            (
                "Task exception was never retrieved",
                error_raised_in(tmp_path / "tasks.py", "bad [tensorstore_spec='{}']"),
            ),
            ("Future exception was never retrieved", ValueError("OUT_OF_RANGE [tensorstore_spec='{}']")),
            ("Task exception was never retrieved", kept),
        ):
            loop.default_exception_handler({"message": message, "exception": error})
    finally:
        loop.close()
        logger.removeHandler(handler)
    assert [record.exc_info[1] for record in seen] == [kept]


def test_a_workdir_of_another_model_size_is_refused_naming_the_parameters_that_differ(
    flags, uninterrupted, tmp_path
):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    out = launch(flags, workdir, "--config.model.embed_dim=48")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith(
        f"error: checkpoint {workdir / 'checkpoints' / str(STEPS)} was written for another"
    )
    assert "student.backbone.cls_token (1, 1, 32) -> (1, 1, 48)" in message
    assert "student.backbone.pos_embed (1, 65, 32) -> (1, 65, 48)" in message
    # The workdir still describes the run it holds.
    with open(workdir / "config.json") as f:
        assert json.load(f)["model"]["embed_dim"] == 32


# In-process: the checkpointer alone, on a real train state.


@pytest.fixture(scope="module")
def state():
    config = digits.get_config("smoke")
    config.model.dtype = "float32"  # build_training takes a resolved dtype, not "auto"
    return training_parts.build_training(config, 1437, sharding.make_mesh()).state


def test_garbled_bytes_in_the_latest_checkpoint_fall_back_and_none_readable_is_an_error(
    uninterrupted, state, tmp_path
):
    directory = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted / "checkpoints", directory)
    for path in (directory / str(STEPS) / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            with open(path, "r+b") as f:
                f.seek(path.stat().st_size // 2)
                f.write(b"\xff" * 64)
    logged = []
    restored = checkpointing.Checkpointer(str(directory)).restore(
        checkpointing.abstract_like(state), log=logged.append
    )
    assert int(restored.step) == STEPS - EVERY
    assert len(logged) == 1 and f"{directory / str(STEPS)} is damaged" in logged[0]

    with open(directory / str(STEPS - EVERY) / "state" / "_METADATA", "w") as f:
        f.write("{")
    with pytest.raises(
        checkpointing.CheckpointError, match=f"no checkpoint in {directory} can be read: step"
    ):
        checkpointing.Checkpointer(str(directory)).restore(checkpointing.abstract_like(state))
    assert (directory / str(STEPS - EVERY)).is_dir()  # nothing is moved when nothing reads


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        # What tensorstore, which writes the arrays, raised on a full tmpfs.
        ValueError(
            'RESOURCE_EXHAUSTED: Error writing "teacher.backbone.patch_embed.bias.value/0" in OCDBT '
            "database: Failed to write 28765 bytes to file 15: No space left on device [os_error_code='28']"
        ),
    ],
    ids=["OSError", "tensorstore"],
)
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(
    state, tmp_path, monkeypatch, error
):
    directory = tmp_path / "checkpoints"
    checkpointer = checkpointing.Checkpointer(str(directory), save_every_steps=EVERY)
    checkpointer.save(EVERY, state, force=True)
    checkpointer.wait()

    def disk_full(self, *args, **kwargs):
        raise error

    # The `data` item is written after the arrays of `state` have started: a write failing midway.
    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", disk_full)
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    with pytest.raises(checkpointing.CheckpointError) as raised:
        checkpointer.save(2 * EVERY, state, iterator, force=True)
        checkpointer.wait()
    assert str(raised.value) == (
        f"the disk is full: checkpoint step {2 * EVERY} could not be written to {directory}; the "
        f"checkpoint of step {EVERY} is intact (steps kept: {EVERY}); rerun the same command to continue "
        f"from step {EVERY} once there is space"
    )
    assert os.listdir(directory) == [str(EVERY)]  # the unfinished step's files are gone
    restored = checkpointing.Checkpointer(str(directory)).restore(checkpointing.abstract_like(state))
    assert int(restored.step) == int(state.step)
    np.testing.assert_array_equal(restored.center, state.center)
