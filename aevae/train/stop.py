"""A training's stop request: Ctrl-C, SIGTERM (kill; Slurm's preemption, requeue, scancel or node failure)
or SIGUSR1 (the notice a Slurm job asks for ahead of its time limit, `--signal=B:USR1@<seconds>`, which the
job script passes on). The first one is a request: the training finishes the batch it is in, saves its
whole state in last.pt, mid-epoch included, and stops (`Stopped`); a run of the same stage resumes from
there bitwise. A second Ctrl-C stops at once, as before (the last complete epoch is kept)."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Stopped(KeyboardInterrupt):
    """The training stopped on request with its state saved: a KeyboardInterrupt, so that the stage exits 130
    and its MLflow run is KILLED, like any interruption; the message says where to resume from."""


class StopSignals:
    """`with StopSignals() as stop:` ... `stop.requested` is the name of the first signal received (None
    until then). Outside the main thread (where Python cannot handle signals) it never requests."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # Once stopping, more SIGTERM/SIGUSR1 (a Slurm job script repeats them until the stage is gone)
            # must not cut the run's last words (its MLflow status) short.
            stopping = self.requested is not None and sig != signal.SIGINT
            signal.signal(sig, signal.SIG_IGN if stopping else handler)
        self._previous = {}

    def __call__(self) -> bool:
        return self.requested is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = self.requested or signal.Signals(signum).name
        # A second Ctrl-C interrupts at once (the batch takes too long). A second SIGTERM or SIGUSR1 changes
        # nothing: Slurm sends SIGTERM to every process of a job and the job script passes its own on too,
        # and Slurm's SIGKILL follows anyway (KillWait).
        signal.signal(signal.SIGINT, signal.default_int_handler)
