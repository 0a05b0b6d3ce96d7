"""How the suite runs as a whole: on every core (pytest-xdist), the longest tests first, and never green with
a part left out. conftest.py imports these hooks; docs/development.md (Tests) says what they change for you.

- Workers: `-n auto` (pyproject.toml) asks `pytest_xdist_auto_num_workers`: one per core, at least two
  (most end-to-end tests spend much of their time waiting on daemons, servers and their own subprocesses),
  at most eight (each worker holds torch and MLflow: about 1 GiB). `-n 0` runs in this process.
- Order: `--dist loadgroup` sends the tests to the workers in collection order, one scope at a time (a
  test, or every test of one `xdist_group`, which share a fixture). Sorting by `slow(seconds)` puts the
  long ones first, so no worker starts a three-minute test when the others are nearly done. A run shuffled
  by pytest-random-order (`--random-order`) is left shuffled.
- Skips: a run that skipped anything says so in red at its end, with each reason; under CI (`CI` set, as
  `.ci/run` sets it) a skip fails the run, since CI installs everything the suite needs.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

QUICK_SECONDS = 0  # a test without the slow mark: seconds at most, it goes after every slow one
SLOW_SECONDS = 30  # `slow` without a figure


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(2, min(cores, 8))


def expected_seconds(item: pytest.Item) -> float:
    """What the test's `slow` mark says it takes (its first argument), for the order."""
    mark = item.get_closest_marker("slow")
    if mark is None:
        return QUICK_SECONDS
    return float(mark.args[0]) if mark.args else SLOW_SECONDS


def _group_names(item: pytest.Item) -> list[str]:
    marks = item.iter_markers("xdist_group")
    return sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks})


def _mark_groups_for_xdist(config: pytest.Config, items: list[pytest.Item]) -> None:
    """pytest-xdist 3.8 learns a test's group from an "@group" suffix that its workers append to the nodeid
    through `item._nodeid`; pytest 9.2 builds nodeids from `item._id`, so the suffix never arrives and
    `--dist loadgroup` silently spreads a group over the workers, each building its fixture again
    (pytest-dev/pytest-xdist#1386, fixed the same way in the pending #1388). Here, in the workers only, the
    suffix goes where pytest 9.2 reads it; with a fixed pytest-xdist the nodeid has it already."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import NodeId

    for item in items:
        names = _group_names(item)
        if names and hasattr(item, "_id") and not item.nodeid.endswith("@" + "_".join(names)):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")


def _shuffled(config: pytest.Config) -> bool:
    """Whether pytest-random-order was asked to shuffle (--random-order, or one of its bucket or seed options)."""
    try:
        from random_order.config import Config
    except ImportError:
        return False
    return config.pluginmanager.hasplugin("random_order") and Config(config).is_enabled


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest first; a group's tests keep their place after its longest (xdist sends a group whole).
    A shuffled run (`--random-order-bucket=global`, docs/development.md) keeps the shuffled order."""
    _mark_groups_for_xdist(config, items)
    if _shuffled(config):
        return
    group_seconds: dict[str, float] = {}
    for item in items:
        if names := _group_names(item):
            group_seconds["_".join(names)] = group_seconds.get("_".join(names), 0) + expected_seconds(item)

    def cost(item: pytest.Item) -> float:
        names = _group_names(item)
        return group_seconds["_".join(names)] if names else expected_seconds(item)

    items.sort(key=cost, reverse=True)  # stable: equal costs keep the files' order


def _skipped(session: pytest.Session) -> list[pytest.TestReport]:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    return list(reporter.stats.get("skipped", [])) if reporter else []


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return longrepr[2].removeprefix("Skipped: ") if isinstance(longrepr, tuple) else str(longrepr)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped or hasattr(config, "workerinput"):
        return
    terminalreporter.section("NOT THE WHOLE SUITE", sep="!", red=True, bold=True)
    for reason, count in Counter(_reason(r) for r in skipped).most_common():
        terminalreporter.write_line(f"{count} test(s) skipped: {reason}", red=True)
    terminalreporter.write_line("The README says what the whole suite needs (Two commands). CI fails on any skip.",
                                red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") and not hasattr(session.config, "workerinput") and _skipped(session):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
