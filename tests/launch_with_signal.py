"""`python -m tests.launch_with_signal SIGNAL POINT FLAGS...` runs `python launch.py FLAGS...` in
this process and sends it SIGNAL (KILL, TERM or INT) at POINT, so a test interrupts a real run at a
known place instead of racing it with a timer:

- `row:N`: right after the row of step N is written to metrics.jsonl, once no checkpoint is being
  written. With a row every step, that is after step N+1 was dispatched: the signal lands
  mid-step, between checkpoints.
- `write:N`: while checkpoint step N is being written. Orbax writes a step into
  `N.orbax-checkpoint-tmp`, its items one by one (the arrays of `state` in the background), and
  renames it to `N` only at the end; the signal is sent when the grain handler starts writing the
  `data` item (its public `save`), so the step's files are on disk in part and nothing is
  committed. A kill at any other moment of the write leaves the same kind of unfinished directory.
"""

import os
import runpy
import signal
import sys
import time

import grain

from dino_jax.hooks import metrics_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def send(signum: int) -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signum)


def wait_for_checkpoint_writes(directory: str, timeout_s: float = 120.0) -> None:
    """Until no step in `directory` is being written: a checkpoint is written in the background
    while the next steps run, so without this, `row:N` could land during a write."""
    deadline = time.monotonic() + timeout_s
    while any(".orbax-checkpoint-tmp" in name for name in os.listdir(directory)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"a checkpoint in {directory} is still being written after {timeout_s} s")
        time.sleep(0.01)


def signal_after_row(step: int, signum: int) -> None:
    write = metrics_log.MetricsWriter.write

    def write_then_signal(self, row_step, metrics):
        write(self, row_step, metrics)
        if row_step == step:
            wait_for_checkpoint_writes(os.path.join(os.path.dirname(self.path), "checkpoints"))
            send(signum)

    metrics_log.MetricsWriter.write = write_then_signal


def signal_during_write(step: int, signum: int) -> None:
    save = grain.checkpoint.CheckpointHandler.save

    def signal_then_save(self, directory, *args, **kwargs):
        if os.path.basename(os.path.dirname(str(directory))).split(".")[0] == str(step):
            send(signum)
        return save(self, directory, *args, **kwargs)

    grain.checkpoint.CheckpointHandler.save = signal_then_save


def main(argv: list[str]) -> None:
    name, point, flags = argv[0], argv[1], argv[2:]
    kind, step = point.split(":")
    signum = getattr(signal, f"SIG{name}")
    {"row": signal_after_row, "write": signal_during_write}[kind](int(step), signum)
    sys.argv = ["launch.py", *flags]
    sys.path.insert(0, ROOT)
    runpy.run_path(os.path.join(ROOT, "launch.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
