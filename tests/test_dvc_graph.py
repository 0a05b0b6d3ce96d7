"""dvc.yaml is the true map: each stage depends on exactly the package modules its script imports (and the
stage scripts' shared helper beside it), so an edit re-runs only the stages whose code it changes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "aevae"


def _module_file(name: str) -> Path | None:
    """The file of package module `name` (a package's __init__.py), or None for a name inside a module."""
    base = REPO / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[Path]:
    """Package modules a file imports anywhere in it (function bodies too), with the packages they sit in,
    and the modules beside a script that it imports (stages/_checkout.py)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from aevae import tracking`
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    found = {path.parent / f"{name}.py" for name in names if path.parent.name == "stages"
             and (path.parent / f"{name}.py").is_file()}
    for name in names:
        if name.split(".")[0] != PACKAGE:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing aevae.x runs aevae/__init__.py first
            if (file := _module_file(".".join(parts[:i]))) is not None:
                found.add(file)
    return found


def import_closure(script: Path) -> set[str]:
    todo, seen = imported_modules(script), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= imported_modules(module)
    return {p.relative_to(REPO).as_posix() for p in seen}


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_every_stage_depends_on_exactly_the_modules_it_imports():
    problems = []
    for name, stage in stages().items():
        scripts = [REPO / s for s in re.findall(r"\S+\.py", stage["cmd"])]
        assert scripts and all(s.is_file() for s in scripts), f"{name}: no script in cmd {stage['cmd']!r}"
        needed = set().union(*(import_closure(s) for s in scripts))
        own = {s.relative_to(REPO).as_posix() for s in scripts}
        listed = {d for d in stage["deps"] if d.endswith(".py") and d not in own}
        if needed - listed:
            problems.append(f"{name} imports but does not depend on {sorted(needed - listed)}")
        if listed - needed:
            problems.append(f"{name} depends on but never imports {sorted(listed - needed)}")
        if not own <= set(stage["deps"]):
            problems.append(f"{name} does not depend on its own script")
    assert not problems, "; ".join(problems)


def test_the_closure_follows_imports_inside_functions(tmp_path):
    """The check itself: a lazy import deep in a module still counts."""
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    from aevae.commands.compare import compare\n")
    closure = import_closure(script)
    # compare's own imports of aevae.compare.runs and, through it, of the MLflow store are inside functions.
    assert {"aevae/__init__.py", "aevae/commands/__init__.py", "aevae/commands/compare.py", "aevae/compare/runs.py",
            "aevae/tracking/store.py"} <= closure


def test_each_training_reads_its_own_configuration_and_not_the_seed_list():
    """Adding a seed or a configuration must not re-run the trainings already done: a training stage lists
    its own models.<name> entry and no study-wide key; evaluation and report read the whole study."""
    train = stages()["train"]
    assert train["matrix"] == {"model": "${models}", "seed": "${train.seeds}"}
    assert "models.${item.model}" in train["params"]
    assert not {"models", "train", "train.seeds", "seed"} & set(train["params"])
    assert "--model ${item.model} --seed ${item.seed}" in train["cmd"]
    for name in ("evaluate", "report"):
        assert {"models", "train.seeds"} <= set(stages()[name]["params"]) and "models" in stages()[name]["deps"]


def test_every_output_of_a_stage_lies_in_a_folder_its_cmd_names():
    """Paths are written once, in dvc.yaml: a stage writes only where its cmd tells it to."""
    for name, stage in stages().items():
        args = set(stage["cmd"].split())
        for out in [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            path = Path(next(iter(out)) if isinstance(out, dict) else out)
            assert {path.as_posix(), *(p.as_posix() for p in path.parents)} & args, \
                f"{name}: {path} is not under a folder passed in its cmd"
