"""Parallel trainings share the cores: real processes holding real locks, one of them killed."""

import os
import signal
import subprocess
import sys
import time

import pytest

from aevae.machine.cores import CoreShare

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="advisory file locks (fcntl) are POSIX-only")

HOLDER = """
import sys, time
from pathlib import Path
from aevae.machine.cores import CoreShare
with CoreShare(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(600)
"""


def start_holder(folder) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_training_alone_keeps_every_thread(tmp_path):
    with CoreShare(tmp_path) as cores:
        assert cores.running() == 1 and cores.threads(8) == 8
    assert not list(tmp_path.glob("*.lock"))  # nothing left behind


def test_trainings_split_the_threads_and_a_killed_one_gives_its_share_back(tmp_path):
    others = [start_holder(tmp_path) for _ in range(2)]
    try:
        with CoreShare(tmp_path) as cores:
            assert cores.running() == 3
            assert (cores.threads(8), cores.threads(2)) == (2, 1)  # never below one thread
            os.kill(others[0].pid, signal.SIGKILL)  # no __exit__: its lock file stays, unlocked
            others[0].wait(timeout=30)
            assert cores.running() == 2 and cores.threads(8) == 4
            assert len(list(tmp_path.glob("*.lock"))) == 2  # the dead one's file was removed
            others[1].terminate()
            others[1].wait(timeout=30)
            deadline = time.monotonic() + 10
            while cores.running() != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert cores.threads(8) == 8
    finally:
        for proc in others:
            proc.kill()
            proc.wait(timeout=30)
