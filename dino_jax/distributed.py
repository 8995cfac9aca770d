"""Start-up of JAX's multi-controller runtime (`jax.distributed.initialize`) for a run of several
processes, one per host (docs/multihost.md), and what makes a failing process stop the others.

When it starts: when asked (`--coordinator_address`/`--num_processes`/`--process_id`, or the
environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`), or when
JAX's own cluster detection finds a job of more than one process (a SLURM step of several tasks,
an Open MPI job, a multi-host Cloud TPU slice). Otherwise nothing happens: a single-process run is
exactly what it was. It must run before any other JAX call (a backend, once started, cannot join).

A process that fails publishes its error in the coordination service's key-value store and exits
at once; a thread in every other process waits on that key and exits with the message, so no
process waits in a collective for a peer that is gone. A process killed outright (SIGKILL, a lost
host) cannot publish: the others either see their next collective fail (CPU collectives: at once)
or are stopped by the coordination service when the dead process misses its heartbeats for
`heartbeat_timeout_s` (JAX then terminates them, saying another task died).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import traceback

# JAX reads JAX_COORDINATOR_ADDRESS itself; the two others are ours (JAX has no such variables).
ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# JAX's cluster environments that auto-start the runtime: its own detection, minus the opt-in ones
# (mpi4py) and Kubernetes (a single pod with a service account would query the API server).
AUTO_DETECTED_CLUSTERS = ("slurm", "ompi", "gcetpu", "gketpu")
FAILURE_KEY = "dino_jax/failure"
# How long a failing process tries to publish its error before it exits anyway (the coordination
# service may be what failed).
_PUBLISH_TIMEOUT_S = 5.0
# The watcher waits this long per call; at exit it is joined (a thread still inside the runtime's
# C++ call when the interpreter finalises aborts the process).
_WATCH_POLL_MS = 1_000

_stopping = False  # set at interpreter exit: the watcher then ignores the service going away


def define_flags() -> None:
    """The launcher's flags for the runtime (absl); `initialize_from_flags` reads them."""
    from absl import flags

    flags.DEFINE_string(
        "coordinator_address",
        None,
        f"host:port of process 0, for a run of several processes (or ${ENV_COORDINATOR_ADDRESS}). "
        "Not needed on SLURM, Open MPI or a Cloud TPU slice: JAX detects them.",
    )
    flags.DEFINE_integer("num_processes", None, f"processes in the run (or ${ENV_NUM_PROCESSES}).")
    flags.DEFINE_integer("process_id", None, f"this process, 0..num_processes-1 (or ${ENV_PROCESS_ID}).")
    flags.DEFINE_integer(
        "heartbeat_timeout_s",
        100,
        "a run of several processes: a process silent this long is declared dead and the others stop.",
    )


def initialize_from_flags() -> bool:
    from absl import flags

    f = flags.FLAGS
    return initialize(
        f.coordinator_address, f.num_processes, f.process_id, heartbeat_timeout_s=f.heartbeat_timeout_s
    )


def requested(coordinator_address=None, num_processes=None, process_id=None, environ=os.environ) -> bool:
    """Whether the flags or the environment ask for the runtime."""
    given = (coordinator_address, num_processes, process_id)
    env = (ENV_COORDINATOR_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    return any(value is not None for value in given) or any(environ.get(name) for name in env)


def detect_cluster() -> tuple[str, int] | None:
    """`(name, process count)` of the multi-process job JAX's cluster detection finds here, or None
    (no cluster, or one of a single process)."""
    try:
        from jax._src import clusters  # JAX's detection, so we start exactly where JAX would
    except ImportError:  # moved in a newer JAX: only an explicit request starts the runtime
        return None
    for cluster in clusters.ClusterEnv._cluster_types:
        if cluster.name not in AUTO_DETECTED_CLUSTERS:
            continue
        try:
            if cluster.is_env_present():
                count = int(cluster.get_process_count())
                return (cluster.name, count) if count > 1 else None
        except Exception:  # a half-set environment: not a cluster we can join
            continue
    return None


def _int_or_none(value) -> int | None:
    return None if value in (None, "") else int(value)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = 100,
    initialization_timeout_s: int = 300,
) -> bool:
    """Starts the runtime when asked or on a multi-process cluster (module docstring); returns
    whether it did. Each process then prints one line: its id, its local and the global devices."""
    asked = requested(coordinator_address, num_processes, process_id)
    cluster = None if asked else detect_cluster()
    if not asked and cluster is None:
        return False
    import jax

    if num_processes is None:
        num_processes = _int_or_none(os.environ.get(ENV_NUM_PROCESSES))
    if process_id is None:
        process_id = _int_or_none(os.environ.get(ENV_PROCESS_ID))
    # CPU processes exchange arrays through gloo (the default CPU backend has no cross-process
    # collectives); accelerators are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=initialization_timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    except (ValueError, TypeError) as error:  # JAX's messages name the missing or bad value
        raise DistributedStartError(f"cannot start the distributed runtime: {error}") from error
    print(describe(), file=sys.stderr, flush=True)
    if jax.process_count() > 1:
        _start_failure_watcher()
    return True


def is_primary() -> bool:
    """Whether this process writes the run's files (logs, reports, results, figures): process 0.
    Every process still computes what they hold, since the computations are collective."""
    import jax

    return jax.process_index() == 0


class DistributedStartError(ValueError):
    """The runtime was asked for but its settings are incomplete or wrong."""


def describe() -> str:
    """`process 1 of 2: 2 local device(s) [cpu:2 cpu:3], 4 global device(s) (cpu)`."""
    import jax

    local = " ".join(f"{d.platform}:{d.id}" for d in jax.local_devices())
    return (
        f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local "
        f"device(s) [{local}], {jax.device_count()} global device(s) ({jax.default_backend()})"
    )


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def _exit_now(code: int = 1) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not sys.exit: JAX's shutdown barrier would wait for the processes that are gone


def _start_failure_watcher() -> None:
    import jax

    me, count = jax.process_index(), jax.process_count()
    client = _client()

    def watch() -> None:
        while not _stopping:
            try:
                message = client.blocking_key_value_get(FAILURE_KEY, _WATCH_POLL_MS)
            except Exception as error:
                if _stopping:
                    return
                if "DEADLINE_EXCEEDED" in str(error) or "deadline" in str(error).lower():
                    continue
                print(
                    f"error: process {me} of {count}: lost the coordination service "
                    f"({str(error).splitlines()[0][:200]}); process 0, which hosts it, probably "
                    "failed: see its log. Stopping.",
                    file=sys.stderr,
                )
                _exit_now(1)
            if message.startswith(f"process {me} "):
                return  # our own failure: the main thread is exiting
            print(f"error: process {me} of {count} stopping because {message}", file=sys.stderr)
            _exit_now(1)

    watcher = threading.Thread(target=watch, name="dino_jax-failure-watcher", daemon=True)
    watcher.start()

    def stop_watching() -> None:
        global _stopping
        _stopping = True
        watcher.join(2 * _WATCH_POLL_MS / 1000)

    # atexit runs last-registered first: this runs before JAX's own shutdown of the client.
    atexit.register(stop_watching)


def _publish_failure(message: str) -> None:
    """Sets FAILURE_KEY (the first failure wins), giving up after _PUBLISH_TIMEOUT_S."""
    client = _client()
    if client is None:
        return

    def publish():
        with contextlib.suppress(Exception):
            client.key_value_set(FAILURE_KEY, message)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    thread.join(_PUBLISH_TIMEOUT_S)


@contextlib.contextmanager
def failure_stops_all():
    """In a run of several processes, an exception (or a non-zero `sys.exit`) inside the block is
    printed, published to the other processes, and ends this process at once with status 1; with
    one process the block behaves as if this were not there."""
    try:
        yield
    except BaseException as error:
        import jax

        if not _multi_process(jax) or (isinstance(error, SystemExit) and error.code in (None, 0)):
            raise
        me, count = jax.process_index(), jax.process_count()
        if isinstance(error, SystemExit):
            reason = str(error.code)
        else:
            traceback.print_exc()
            first_line = str(error).splitlines()[0] if str(error) else ""
            reason = f"{type(error).__name__}: {first_line[:300]}"
        print(
            f"error: process {me} of {count} failed: {reason}\n(in a run of several processes this "
            "can also be the consequence of another process failing first: see the others' logs)",
            file=sys.stderr,
        )
        _publish_failure(f"process {me} failed: {reason}")
        _exit_now(1)


def _multi_process(jax) -> bool:
    from jax._src import distributed

    return distributed.global_state.client is not None and jax.process_count() > 1
