"""What the benchmark scripts share: a measurement in a fresh process, the machine in words, a copy of
the repository, and the small text edits they make (checked, so that a rewrite that matched nothing
stops the run instead of measuring something else).

Imported by bench/run.py and bench/scale.py (their folder is on sys.path when run as scripts).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"  # everything the benchmarks write but their reports (git-ignored)
if str(REPO) not in sys.path:  # this checkout's aevae, also when an installed copy is elsewhere
    sys.path.insert(0, str(REPO))


def child(script: Path | str, name: str, *args: str) -> dict:
    """Run the measurement `name` of `script` (its `--child name args...`) in a fresh process; return the
    JSON object it printed last, plus its peak RSS as `peak_mib` (that process's own, nothing else's)."""
    proc = subprocess.Popen([sys.executable, str(script), "--child", name, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{Path(script).name}: benchmark step {name} failed (status {status})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mib": usage.ru_maxrss / 1024}


def answer_child(functions: dict[str, Callable[..., dict]], prefix: str, argv: list[str]) -> None:
    """The child's side of `child`: call `prefix + name` with the arguments (digits as ints), print JSON."""
    name, *args = argv
    print(json.dumps(functions[f"{prefix}{name}"](*[int(a) if a.isdigit() else a for a in args])))


def machine() -> str:
    """This machine in words: CPU, cores, the instruction set torch's kernels use (aevae.machine.device.cpu_isa:
    torch's vector capability plus native bf16 units), torch, Python and OS."""
    import torch

    from aevae.machine.device import cpu_isa

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        cpuinfo = []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor() or platform.machine())
    return (f"{cpu}, {os.cpu_count()} cores, vector ISA {cpu_isa()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {platform.system()}")


def copy_repo(dst: Path) -> None:
    """A fresh copy of the repository's git-tracked files (as they are in the working tree) in `dst`:
    no outputs, caches or stores, so what runs there starts from scratch. `dst` is replaced."""
    shutil.rmtree(dst, ignore_errors=True)
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if not (REPO / name).is_file():  # deleted in the working tree, not yet in the index
            continue
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dst / name)


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run `cmd`; its stdout, or SystemExit with the tail of its output when it fails."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout


def replace_once(text: str, old: str, new: str, where: str) -> str:
    """`text` with `old` replaced by `new`, which must occur exactly once: a rewrite that matches nothing
    (the file changed since it was written) stops the benchmark instead of silently measuring the unchanged
    file."""
    count = text.count(old)
    if count != 1:
        raise SystemExit(f"bench: expected exactly one {old!r} in {where}, found {count}: the file changed; "
                         "update the benchmark's rewrite of it")
    return text.replace(old, new)


def replace_section(text: str, heading: str, section: str) -> str:
    """`text` with the section under `heading` (up to the next `## `) replaced by `section`, or appended."""
    if heading not in text:
        return text.rstrip() + "\n\n" + section
    before, rest = text.split(heading, 1)
    after = rest.split("\n## ", 1)
    return before + section + ("\n## " + after[1] if len(after) > 1 else "")
