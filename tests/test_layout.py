"""The house by job: a package of small single-job modules whose import rules CI enforces (lint-imports,
pyproject.toml), one helper where every stage script needs the same thing, and the model contract as the
only door to a kind."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "aevae"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 50


def outside_models() -> list[Path]:
    return [p for p in MODULES if PACKAGE / "models" not in p.parents]


def test_every_subpackage_init_is_empty():
    """An __init__ with code would be a DVC dependency of every stage that imports anything of its package."""
    inits = [p for p in MODULES if p.name == "__init__.py" and p.parent != PACKAGE]
    assert len(inits) >= 10
    assert [p.relative_to(REPO).as_posix() for p in inits if p.read_text()] == []


def test_modules_and_functions_are_short():
    long_modules = [f"{p.relative_to(REPO)} ({n})" for p in MODULES
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    long_functions = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - (node.decorator_list[0].lineno if node.decorator_list else node.lineno) + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.name} ({lines})")
    assert long_modules == [] and long_functions == []


def test_stage_scripts_share_one_path_helper_and_copy_no_sys_path_block():
    scripts = sorted((REPO / "stages").glob("[!_]*.py"))
    assert len(scripts) == 6  # prepare, tune, train, features, evaluate, report
    for script in scripts:
        text = script.read_text()
        assert "sys.path" not in text, script.name
        imports = [n for n in ast.parse(text).body if isinstance(n, ast.Import | ast.ImportFrom)]
        top = [(n.module if isinstance(n, ast.ImportFrom) else n.names[0].name).split(".")[0] for n in imports]
        first = next(name for name in top if name not in sys.stdlib_module_names)  # before click, before aevae
        assert first == "_checkout", script.name


def test_one_checked_weights_search_serves_lpips_and_inception():
    defined = {p.relative_to(REPO).as_posix(): [n.name for n in ast.walk(ast.parse(p.read_text()))
                                                if isinstance(n, ast.ClassDef | ast.FunctionDef)] for p in MODULES}
    where = lambda name: sorted(path for path, names in defined.items() if name in names)  # noqa: E731
    assert where("WeightsRefused") == ["aevae/evaluate/weights.py"]
    assert where("first_checked") == ["aevae/evaluate/weights.py"]
    assert where("sha256_file") == ["aevae/evaluate/weights.py"]
    for loader in ("aevae/evaluate/lpips.py", "aevae/evaluate/inception.py"):
        text = (REPO / loader).read_text()
        assert "first_checked(" in text and "for source, load in" not in text, loader


# What only a kind knows: its layers and methods, its settings and loss terms, its name. Outside aevae/models
# code asks the contract (generative, rate_term, neg_elbo_term, interpolate, elbo_words, and for a model with an
# ELBO has_elbo, posterior, decode, trained_sigma) instead.
KIND_ATTRIBUTES = {"encode", "latent_mean", "kl_weight", "latent_dim", "to_mu", "to_logvar"}
KIND_WORDS = {"beta", "model.beta", "params.model.beta", "kl", "kl_nats", "recon_nats", "neg_elbo_nats", "vae", "ae",
              "ae_code", "VAE", "AE"}
# Names as data, not questions: the default study of params.yaml, and a key of params.yaml's earlier versions.
ALLOWED = {("aevae/config/schema.py", "_default_models"), ("aevae/config/load.py", "MOVED")}


def _on_a_model(receiver: ast.expr) -> bool:
    """`model.x`, `t.model.x`, `self.model.x`: not `text.encode()`."""
    names = [n.id for n in ast.walk(receiver) if isinstance(n, ast.Name)]
    names += [n.attr for n in ast.walk(receiver) if isinstance(n, ast.Attribute)]
    return any("model" in name for name in names)


def kind_questions(path: Path) -> list[str]:
    """Where code in `path` asks a model for a kind's own attribute, or names a kind or its terms."""
    tree, found, where = ast.parse(path.read_text()), [], path.relative_to(REPO).as_posix()
    allowed = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.Assign)
               and (where, n.name if isinstance(n, ast.FunctionDef) else getattr(n.targets[0], "id", "")) in ALLOWED]
    skip = {id(n) for block in allowed for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Attribute) and node.attr in KIND_ATTRIBUTES and _on_a_model(node.value):
            found.append(f"{where}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in KIND_WORDS:
            found.append(f"{where}:{node.lineno} {node.value!r}")
    return found


def test_nothing_outside_models_asks_a_kind_what_only_the_contract_may(tmp_path):
    assert [q for path in outside_models() for q in kind_questions(path)] == []
    leak = tmp_path / "aevae" / "report" / "leak.py"  # the check itself: the old figures.py leak is found
    leak.parent.mkdir(parents=True)
    leak.write_text("def line(t, x):\n    return t.model.encode(x) if t.model.config['beta'] else None\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules[__name__], "REPO", tmp_path)
        assert sorted(kind_questions(leak)) == ["aevae/report/leak.py:2 'beta'", "aevae/report/leak.py:2 .encode"]


@pytest.mark.parametrize("breach", [
    ("aevae/tracking/view.py", "from aevae.evaluate import scores  # noqa"),
    ("aevae/report/tables.py", "from aevae.tracking import store  # noqa"),
    ("aevae/data/split.py", "from aevae.models import contract  # noqa"),
    ("aevae/models/conv.py", "from aevae.train import loop  # noqa"),
])
def test_the_import_contracts_hold_and_catch_a_breach(tmp_path, breach):
    """lint-imports (pyproject.toml's contracts) passes on the package, and fails on a copy with one
    forbidden import added."""
    lint = Path(sys.executable).with_name("lint-imports")
    kept = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True)
    assert kept.returncode == 0, kept.stdout[-3000:]
    copy = tmp_path / "repo"
    copy.mkdir()
    subprocess.run(["cp", "-r", str(PACKAGE), str(REPO / "pyproject.toml"), str(copy)], check=True)
    module, line = breach
    with open(copy / module, "a", encoding="utf-8") as f:
        f.write(f"\n{line}\n")
    broken = subprocess.run([str(lint), "--no-cache"], cwd=copy, capture_output=True, text=True,
                            env={"PATH": str(lint.parent), "PYTHONPATH": str(copy)})
    assert broken.returncode == 1 and "BROKEN" in broken.stdout, broken.stdout[-3000:] + broken.stderr[-2000:]
