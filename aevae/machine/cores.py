"""Trainings that run at once on one machine (parallel DVC queue workers) share its cores.

Each worker would otherwise start as many torch threads as the machine has cores: two workers on two
cores then run four threads that evict each other, and every epoch slows down (bench/results.md,
Sweeps). Here each training holds a lock file while it runs and, before each
epoch, takes torch's own thread count (one per physical core) // (trainings holding one), at least one:
a training alone runs as torch would, and gets every core back when the other finishes.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; every training keeps torch's default
    fcntl = None


class CoreShare:
    """Registers this training among the machine's running aevae trainings (one user's) while open."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or Path(tempfile.gettempdir()) / f"aevae-trainings-{os.getuid()}"
        self._file = None
        self._path: Path | None = None

    def __enter__(self) -> CoreShare:
        if fcntl is None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        # Locked under a temporary name, then renamed: no other training ever sees it unlocked and
        # takes it for the leftover of a dead one.
        tmp = self.folder / f"{os.getpid()}.tmp"
        self._file = open(tmp, "w")  # noqa: SIM115 - held open (and locked) until __exit__
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self._path = self.folder / f"{os.getpid()}.lock"
        tmp.rename(self._path)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._file is not None:
            self._path.unlink(missing_ok=True)
            self._file.close()  # releases the lock
            self._file = None

    def running(self) -> int:
        """Trainings holding a lock now, this one included; leftovers of killed ones are removed."""
        if self._file is None:
            return 1
        count = 0
        for path in self.folder.glob("*.lock"):
            if path == self._path:
                count += 1
                continue
            try:
                with open(path) as other:
                    fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
                path.unlink(missing_ok=True)  # nobody holds it: its training is gone (a kill -9)
            except BlockingIOError:
                count += 1
            except FileNotFoundError:
                pass  # it ended while we looked
        return count

    def threads(self, total: int) -> int:
        """This training's fair share now of `total` threads (torch's default for the machine)."""
        return max(1, total // self.running())
