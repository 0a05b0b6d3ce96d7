"""How long the test suite takes and where its time goes: the README's test command, timed whole from a fresh
clone of this commit, and the time of each test file from pytest's JUnit XML (the setup, call and teardown of
its tests, summed: on several workers the files' times add up to more than the wall time).

    python bench/suite.py                        # a fresh clone: .ci/setup --tests, pytest, pytest -m "not slow"
    python bench/suite.py --here                 # in this checkout and its .venv (no clone, no setup)
    python bench/suite.py --files new.xml --vs old.xml   # two saved runs' files side by side

It prints markdown for bench/results.md (Test suite): the machine, each command's wall time and test counts,
and the per-file table. The JUnit files it writes stay in bench/out/suite/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from common import OUT, REPO, machine


def per_file(junit: Path) -> dict[str, tuple[int, float]]:
    """{test file: (tests, seconds)} from a JUnit XML report."""
    files: dict[str, list[float]] = defaultdict(list)
    for case in ET.parse(junit).iter("testcase"):
        files[case.get("classname", "").replace(".", "/") + ".py"].append(float(case.get("time", 0)))
    return {name: (len(times), sum(times)) for name, times in files.items()}


def counts(junit: Path) -> str:
    suite = next(ET.parse(junit).iter("testsuite"))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped, tests = int(suite.get("skipped", 0)), int(suite.get("tests", 0))
    return f"{tests - failed - skipped} passed" + (f", {failed} failed" if failed else "") + (
        f", {skipped} skipped" if skipped else "")


def table(new: Path, old: Path | None = None) -> str:
    """Markdown: one row per test file, slowest first; with `old`, its seconds beside."""
    ours, theirs = per_file(new), per_file(old) if old else {}
    head = "| file | tests | seconds |" + (" before: tests | before: seconds |" if old else "")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in sorted(set(ours) | set(theirs), key=lambda n: -max(ours.get(n, (0, 0))[1], theirs.get(n, (0, 0))[1])):
        n, s = ours.get(name, (0, 0.0))
        row = f"| {name} | {n} | {s:.0f} |"
        if old:
            m, t = theirs.get(name, (0, 0.0))
            row += f" {m} | {t:.0f} |"
        rows.append(row)
    total = sum(s for _, s in ours.values())
    rows.append(f"| all | {sum(n for n, _ in ours.values())} | {total:.0f} |" + (
        f" {sum(n for n, _ in theirs.values())} | {sum(s for _, s in theirs.values()):.0f} |" if old else ""))
    return "\n".join(rows)


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    start = time.monotonic()
    code = subprocess.run(cmd, cwd=cwd, env=env).returncode
    return time.monotonic() - start, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--here", action="store_true", help="run in this checkout and its .venv, not a fresh clone")
    parser.add_argument("--files", type=Path, help="only print the per-file table of this JUnit XML")
    parser.add_argument("--vs", type=Path, help="with --files: a second JUnit XML, shown beside as 'before'")
    args = parser.parse_args()
    if args.files:
        print(table(args.files, args.vs))
        return
    out = OUT / "suite"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.here:
        root, setup_s = REPO, None
    else:
        root = Path(tempfile.mkdtemp(prefix="aevae-suite-")) / "aevae"
        subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
        setup_s, code = timed(["bash", ".ci/setup", "--tests"], root, env)
        if code:
            raise SystemExit(f"bench/suite.py: .ci/setup --tests failed in {root}")
    python = str(root / ".venv" / "bin" / "python")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout
    print(f"Measured by `python bench/suite.py{' --here' if args.here else ''}` on {time.strftime('%Y-%m-%d')}: "
          f"{machine()}; commit {commit.strip()}" + (f"; `.ci/setup --tests` {setup_s:.0f} s" if setup_s else ""))
    for name, extra in (("suite", []), ("quick", ["-m", "not slow"])):
        junit = out / f"{name}.xml"
        seconds, code = timed([python, "-m", "pytest", f"--junitxml={junit}", *extra], root, env)
        print(f"- `pytest{' ' + ' '.join(repr(e) if ' ' in e else e for e in extra) if extra else ''}`: "
              f"{seconds:.0f} s, {counts(junit)} (exit {code})")
    print(table(out / "suite.xml"))


if __name__ == "__main__":
    main()
