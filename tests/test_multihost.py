"""Runs of several real processes on this CPU machine (JAX's distributed runtime over localhost, gloo
CPU collectives), against one process with the same total devices: the same losses, parameters,
checkpoint and kNN. Also 8 simulated devices against 1, and a killed process stopping the other.

Every run is a tiny digits model trained for a few steps through launch.py, as a user starts it;
all of them start at once (the cores share the compilations) and every wait is bounded.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dino_jax import checkpointing, distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# A tiny model, every step logged, a checkpoint mid-run, kNN only.
TINY = [
    "--config=configs/digits.py:smoke",
    "--config.model.depth=1",
    "--config.augment.num_local_crops=0",
    "--config.head.out_dim=64",
    f"--config.train.max_steps={STEPS}",
    "--config.train.log_every_steps=1",
    "--config.train.checkpoint_every_steps=2",
    "--config.train.compilation_cache_dir=",
    "--config.eval.evaluators=knn",
    "--config.eval.random_init_knn=False",
]
RUN_TIMEOUT_S = 900  # all runs together: bounds a hang (about 2 min on an idle 2-core box)
# Agreement required between layouts of the same global batch. Measured (docs/multihost.md): the
# losses agree to ~1e-6, the parameters to ~1e-3 at most: Adam divides by the root of tiny second
# moments in the first steps, so a last-bit difference in a reduction order can move a weight by
# up to ~2 * lr (1.25e-4 here) per step.
LOSS_TOL = 1e-4
PARAM_TOL = 5e-3
# Percent: at most three of the 360 test images voted differently (features that differ by ~1e-4
# can reorder two near-equal neighbours; 2x2 against 1x4 has flipped one or two). A misaligned
# gather of rows and labels costs tens of points.
KNN_TOL = 3 * 100 / 360 + 1e-6

# Layouts, each `processes x devices per process`. A run of several processes gets the two cores
# to itself (more at once only makes its processes wait for each other in every collective); the
# single-process runs share them. "2x1 resumed 1x2": the 2x1 run's step-2 checkpoint, continued by
# one process of two devices; "1x2 evaluated 2x1": --mode=eval of the 1x2 run by two processes.
WAVES = [
    {"2x1": (2, 1)},
    {"2x2": (2, 2)},
    {"1x2": (1, 2), "1x4": (1, 4), "1x8": (1, 8), "1x1": (1, 1), "2x1 resumed 1x2": (1, 2)},
    {"1x2 evaluated 2x1": (2, 1)},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(workdir, data_dir, *, processes, devices, log_prefix, extra=()):
    """Starts `processes` launch.py processes of `devices` CPU devices each; -> [(Popen, log path)]."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    )
    args = [
        sys.executable,
        "launch.py",
        *TINY,
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
    ]
    if processes > 1:
        args += [f"--coordinator_address=localhost:{free_port()}", f"--num_processes={processes}"]
    started = []
    for process_id in range(processes):
        log_path = f"{log_prefix}.p{process_id}.log"
        with open(log_path, "w") as log:
            ids = [f"--process_id={process_id}"] if processes > 1 else []
            proc = subprocess.Popen(
                [*args, *ids, *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        started.append((proc, log_path))
    return started


def wait_all(started, timeout_s):
    deadline = time.monotonic() + timeout_s
    try:
        for proc, _ in started:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def read(path) -> str:
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """The digits TFDS dataset, prepared once before the processes that share it start."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    code = f"from dino_jax.data import sources; sources.open_split('digits', 'train', data_dir={data_dir!r})"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return data_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_dir):
    """Every layout trained; -> {layout: (workdir, [log text of each process])}."""
    base = tmp_path_factory.mktemp("multihost")
    started = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for wave in WAVES:
        for name, (processes, devices) in wave.items():
            workdir = str(base / name.replace(" ", "_"))
            extra = []
            if name == "2x1 resumed 1x2":
                shutil.copytree(started["2x1"][0], workdir)
                shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
                os.remove(os.path.join(workdir, "results.json"))
            if name == "1x2 evaluated 2x1":
                shutil.copytree(started["1x2"][0], workdir)
                os.remove(os.path.join(workdir, "results.json"))
                extra = ["--mode=eval"]
            started[name] = (
                workdir,
                start(
                    workdir, digits_dir, processes=processes, devices=devices, log_prefix=workdir, extra=extra
                ),
            )
        wait_all([p for name in wave for p in started[name][1]], deadline - time.monotonic())
    out = {}
    for name, (workdir, procs) in started.items():
        logs = [read(path) for _, path in procs]
        for (proc, _), log in zip(procs, logs):
            assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{log[-4000:]}"
        out[name] = (workdir, logs)
    return out


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # one writer, no duplicates
    return np.array([row["loss"] for row in rows])


def final_params(workdir):
    """The last checkpoint's student, teacher and center, restored in this single process."""
    state, step = checkpointing.restore_item(os.path.join(workdir, "checkpoints"), "state")
    assert step == STEPS
    return {key: jax.tree.leaves(state[key]) for key in ("student", "teacher", "center")}


def max_param_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for key in a
        for x, y in zip(a[key], b[key], strict=True)
    )


def knn(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    return {key: value for key, value in results.items() if key.startswith("knn_")}


def agreement(runs, one, other):
    """(max |loss diff|, max |param diff|, max |kNN diff|) between two layouts' runs."""
    a, b = runs[one][0], runs[other][0]
    knn_a, knn_b = knn(a), knn(b)
    assert knn_a.keys() == knn_b.keys() and knn_a
    return (
        float(np.max(np.abs(losses(a) - losses(b)))),
        max_param_diff(final_params(a), final_params(b)),
        max(abs(knn_a[key] - knn_b[key]) for key in knn_a),
    )


def test_every_process_prints_its_id_and_devices_and_one_process_is_unchanged(runs):
    _, logs = runs["2x2"]
    for process_id, log in enumerate(logs):
        assert (
            f"process {process_id} of 2: 2 local device(s) [cpu:" in log and "4 global device(s) (cpu)" in log
        ), log[-3000:]
    assert "step 4/4" in logs[0] and "step 4/4" not in logs[1]  # process 0 alone logs progress
    # The report's feature map needs every process (it hung when process 0 computed it alone).
    workdir, _ = runs["2x2"]
    assert os.path.exists(os.path.join(workdir, "report.html")) and "wrote " in logs[0]
    _, (single,) = runs["1x2"]
    assert "process 0 of" not in single and "2 device(s) (2 x cpu) in 1 process(es)" in single


@pytest.mark.parametrize("devices_per_process", [1, 2])
def test_two_processes_match_one_process_with_the_same_devices(runs, devices_per_process):
    loss_diff, param_diff, knn_diff = agreement(
        runs, f"2x{devices_per_process}", f"1x{2 * devices_per_process}"
    )
    print(
        f"2x{devices_per_process} vs 1x{2 * devices_per_process}: {loss_diff=:.3g} {param_diff=:.3g} {knn_diff=}"
    )
    assert loss_diff <= LOSS_TOL and param_diff <= PARAM_TOL and knn_diff <= KNN_TOL


def test_a_two_process_checkpoint_resumes_in_one_process_as_if_never_stopped(runs):
    """Steps 3-4 by one process from the two processes' step-2 checkpoint (state and iterator
    position) are the uninterrupted one-process run's."""
    _, (log,) = runs["2x1 resumed 1x2"]
    assert "resumed from" in log and "at step 2" in log
    loss_diff, param_diff, knn_diff = agreement(runs, "2x1 resumed 1x2", "1x2")
    print(f"2x1 resumed by 1x2 vs 1x2: {loss_diff=:.3g} {param_diff=:.3g} {knn_diff=}")
    assert loss_diff <= LOSS_TOL and param_diff <= PARAM_TOL and knn_diff <= KNN_TOL


def test_two_processes_evaluate_a_one_process_checkpoint_alike(runs):
    """--mode=eval in two processes: parameters restored in each process become global arrays, the
    features are gathered once, and process 0 alone writes the same kNN the run wrote."""
    workdir, logs = runs["1x2 evaluated 2x1"]
    assert "wrote " in logs[0] and "wrote " not in logs[1]
    assert knn(workdir) == knn(runs["1x2"][0])


def test_eight_devices_match_one_device_for_the_same_global_batch(runs):
    loss_diff, param_diff, knn_diff = agreement(runs, "1x8", "1x1")
    print(f"1x8 vs 1x1: {loss_diff=:.3g} {param_diff=:.3g} {knn_diff=}")
    assert loss_diff <= LOSS_TOL and param_diff <= PARAM_TOL and knn_diff <= KNN_TOL


def test_iterator_position_of_two_processes_resumes_in_one(runs, digits_dir):
    """The data item of the two-process checkpoint, restored by this single process, continues
    the stream where the one-process run would: the same next global batch."""
    import orbax.checkpoint as ocp

    from dino_jax.data import pipeline, sources

    workdir, _ = runs["2x1"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "2", "data"))) == [
        "commit_success.txt",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    source = sources.open_split("digits", "train", data_dir=digits_dir)

    def stream():
        return iter(
            pipeline.train_dataset(
                source, None, global_batch_size=16, seed=0, augment_on="device", shard_index=0, shard_count=1
            )
        )

    restored = stream()
    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_handlers={"data": checkpointing.DataIteratorHandler()}
    )
    manager.restore(2, args=ocp.args.Composite(data=checkpointing.DataRestore(restored)))
    manager.close()
    uninterrupted = stream()
    for _ in range(2):
        next(uninterrupted)
    np.testing.assert_array_equal(next(restored)["image"], next(uninterrupted)["image"])


def test_a_layout_dependent_iterator_position_is_refused_by_name(tmp_path):
    (tmp_path / "process_0-of-2.json").write_text(json.dumps({"workers_state": {"0": 1}, "next": 0}))
    (tmp_path / "process_1-of-2.json").write_text(json.dumps({"workers_state": {"0": 2}, "next": 0}))
    from etils import epath

    with pytest.raises(checkpointing.CheckpointError, match="saved by 2 process.*cannot be restored by 1"):
        checkpointing.DataIteratorHandler().restore(epath.Path(tmp_path), item=object())


def test_single_process_does_not_start_the_runtime(monkeypatch):
    for name in (
        distributed.ENV_COORDINATOR_ADDRESS,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
    ):
        monkeypatch.delenv(name, raising=False)
    # A SLURM step of one task is not a run of several processes.
    slurm = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    for key, value in {**slurm, "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    assert not distributed.requested() and distributed.detect_cluster() is None
    assert distributed.initialize() is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.detect_cluster() == ("slurm", 4)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    assert distributed.requested()


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_process_stops_the_other_with_a_message(tmp_path, digits_dir, killed):
    """SIGKILL one process mid-training: the other exits, non-zero, saying why, within a bound."""
    workdir = str(tmp_path / "run")
    procs = start(
        workdir,
        digits_dir,
        processes=2,
        devices=1,
        log_prefix=workdir,
        extra=["--config.train.max_steps=100000", "--config.train.epochs=2000", "--heartbeat_timeout_s=10"],
    )
    survivor, survivor_log = procs[1 - killed]
    try:
        deadline = time.monotonic() + 240
        while "step 2/" not in read(procs[0][1]):  # both processes are in the training loop
            assert time.monotonic() < deadline and procs[0][0].poll() is None, read(procs[0][1])[-3000:]
            time.sleep(0.5)
        os.kill(procs[killed][0].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        survivor.wait(timeout=90)  # heartbeat timeout (10 s) plus slack; TimeoutExpired fails
        print(
            f"process {1 - killed} exited {time.monotonic() - killed_at:.1f} s after process {killed} was killed"
        )
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = read(survivor_log)
    print("\n".join(line for line in log.splitlines() if line.startswith("error:")))
    assert survivor.returncode != 0
    # Either our message (the collective failed, or the coordinator is gone) or JAX's own (the
    # coordination service saw the heartbeats stop).
    assert f"error: process {1 - killed} of 2" in log or "another task died" in log, log[-3000:]
