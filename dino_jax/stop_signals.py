"""A training run stopped at a step boundary by SIGTERM or SIGINT, so that the step in flight
finishes and is checkpointed (a TPU preemption notice, `kill`, Ctrl-C, Colab's stop button)."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGTERM (a TPU preemption notice, `kill`) and SIGINT
    (Ctrl-C, Colab's interrupt) only set `stop.received` to the signal's name, for the loop to
    stop at a step boundary. A second signal gets the handler that was there before (stop at
    once). Signals are left alone outside the main thread, in a run of several processes (they
    would stop at different steps and wait for each other's checkpoint forever) and where they were
    ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._receive)
        return self

    def _receive(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __exit__(self, *exc_info) -> None:
        self._restore()
