"""How the suite runs (tests/suite.py), checked on small suites of its own run by a real pytest in a subprocess:
a skip is said at the end and fails the run under CI, a group stays on one worker, the longest go first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CONFTEST = f"""import sys
sys.path.insert(0, {str(REPO)!r})
from tests.suite import (pytest_collection_modifyitems, pytest_sessionfinish, pytest_terminal_summary,
                         pytest_xdist_auto_num_workers)
"""
INI = "[pytest]\nmarkers =\n    slow(seconds): long\n"


def pytest_in(folder: Path, tests: str, *args: str, ci: bool = False) -> subprocess.CompletedProcess:
    """A real pytest over a suite of one file, `tests`, with the project's hooks, in `folder`."""
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "pytest.ini").write_text(INI)
    (folder / "test_small.py").write_text(tests)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=folder, env={**env, **({"CI": "true"} if ci else {})}, capture_output=True, text=True)


SKIPPING = """import pytest
def test_runs(): pass
def test_needs_a_daemon(): pytest.skip("the daemon is not installed (apt-get install it)")
"""


@pytest.mark.slow(25)
def test_a_skip_is_said_at_the_end_and_fails_the_run_under_ci(tmp_path):
    """Guards pytest_terminal_summary and pytest_sessionfinish: a run that skipped says so in its last lines,
    with the reason; exit 0 for a user, 1 under CI (.ci/run sets CI), in one process and on workers. Slow
    (~25 s): four real pytest runs, two of them with two workers."""
    user = pytest_in(tmp_path, SKIPPING, "-n", "2")
    assert user.returncode == 0, user.stdout[-2000:]
    tail = user.stdout[user.stdout.index("NOT THE WHOLE SUITE"):]
    assert "1 test(s) skipped: the daemon is not installed (apt-get install it)" in tail, user.stdout[-2000:]
    for args in (["-n", "0"], ["-n", "2"]):
        ci = pytest_in(tmp_path, SKIPPING, *args, ci=True)
        assert ci.returncode == 1 and "1 passed, 1 skipped" in ci.stdout, ci.stdout[-2000:]
    clean = pytest_in(tmp_path, "def test_runs(): pass\n", "-n", "2", ci=True)
    assert clean.returncode == 0 and "NOT THE WHOLE SUITE" not in clean.stdout, clean.stdout[-2000:]


GROUPED = """import os, pytest
def note(name):
    with open("workers.txt", "a") as f:
        f.write(f"{name} {os.environ['PYTEST_XDIST_WORKER']}\\n")
@pytest.mark.xdist_group("cluster")
def test_a(): note("a")
@pytest.mark.xdist_group("cluster")
def test_b(): note("b")
@pytest.mark.xdist_group("cluster")
def test_c(): note("c")
def test_d(): note("d")
def test_e(): note("e")
"""


def test_a_group_runs_whole_on_one_worker(tmp_path):
    """Guards the group marks (tests/suite.py: pytest-xdist 3.8 under pytest 9.2 would spread a group over
    the workers, each building the group's fixture again)."""
    result = pytest_in(tmp_path, GROUPED, "-n", "2", "--dist", "loadgroup")
    assert result.returncode == 0, result.stdout[-2000:]
    worker = dict(line.split() for line in (tmp_path / "workers.txt").read_text().splitlines())
    assert sorted(worker) == ["a", "b", "c", "d", "e"]
    assert worker["a"] == worker["b"] == worker["c"], worker


ORDERED = """import pytest
def test_quick(): pass
@pytest.mark.slow(5)
def test_five(): pass
@pytest.mark.slow(60)
def test_sixty(): pass
@pytest.mark.slow
def test_slow_without_a_figure(): pass
"""


def test_the_longest_tests_go_first(tmp_path):
    """Guards pytest_collection_modifyitems' order: by `slow(seconds)`, 30 for a bare `slow`, quick tests last."""
    result = pytest_in(tmp_path, ORDERED, "-n", "0", "--collect-only", "-q")
    listed = [line.split("::")[1] for line in result.stdout.splitlines() if "::" in line]
    assert listed == ["test_sixty", "test_slow_without_a_figure", "test_five", "test_quick"], result.stdout
