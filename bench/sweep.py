"""The sweep section of bench/results.md, measured by `python bench/run.py` (or `--sweep-only`): the same
small queued sweep run by the pipeline as it is ("after") and as it was before issue 14 ("before",
rebuilt in a copy of the repository), with one and two queue workers.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from common import OUT, copy_repo, machine, replace_once, sh

# Six experiments: three betas of the VAE configuration share each lr.
SWEEP = ["-S", "lr=0.002,0.004", "-S", "models.vae.beta=0.5,1,2"]
SWEEP_PARAMS = {"epochs": 2, "data": {"builtin_size": 1000}}
TRAIN_OUTS = ("best.pt", "run.json")  # dvc.yaml: the outs of the matrix stage `train`


def make_before(repo: Path) -> None:
    """Rebuild in the copy `repo` what the pipeline did before issue 14: the training stage's outputs with
    `persist: true` (which turns DVC's run-cache off) and every worker training what it was given (no
    aevae.train.dedupe). Every rewrite is checked: one that matches nothing stops the run, so that "before" can
    never silently measure the pipeline as it is."""
    import yaml

    dvc_yaml = repo / "dvc.yaml"
    stages = dvc_yaml.read_text(encoding="utf-8")
    for name in TRAIN_OUTS:
        out = f"      - models/${{item.model}}/seed${{item.seed}}/{name}\n"
        stages = replace_once(stages, out, f"{out[:-1]}:\n          persist: true\n", "dvc.yaml (stage train's outs)")
    outs = yaml.safe_load(stages)["stages"]["train"]["outs"]
    if not all(isinstance(o, dict) and next(iter(o.values())) == {"persist": True} for o in outs):
        raise SystemExit(f"bench: not every out of dvc.yaml's train stage persists after the rewrite: {outs}")
    dvc_yaml.write_text(stages, encoding="utf-8")
    once = repo / "aevae" / "train" / "dedupe.py"
    code = once.read_text(encoding="utf-8")
    if "\ndef training_once(key" not in code or "training_once(" not in (repo / "aevae/train/stage.py").read_text():
        raise SystemExit("bench: aevae.train.dedupe.training_once(key, out, shared) is gone or unused by "
                         "aevae.train.stage: "
                         "update the benchmark's 'before' rewrite of it")
    once.write_text(code + "\n\nfrom contextlib import contextmanager\n\n\n@contextmanager\n"
                    "def training_once(key, out, shared):  # bench: every worker trains\n    yield True\n",
                    encoding="utf-8")


def sweep(variant: str, workers: int) -> dict:
    """The fixed small sweep, queued in a fresh copy of the repository with its own DVC cache and MLflow
    store, run by `dvc queue start -j workers`; wall time from queue start to the last experiment's end.

    variant "before": what the pipeline did before issue 14 (make_before), and every worker on torch's
    default thread count. "after": the pipeline as it is."""
    import torch
    import yaml

    repo = OUT / f"sweep-{variant}-j{workers}"
    copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["epochs"] = SWEEP_PARAMS["epochs"]
    params["data"].update(SWEEP_PARAMS["data"])
    # Both variants in fp32: this row measures the run-cache and the core sharing, not the precision.
    params["train"]["precision"] = "fp32"
    for key in SWEEP[1::2]:  # a key the copy's params.yaml lacks would be a new param, not this sweep
        node = params
        for part in key.split("=")[0].split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            raise SystemExit(f"bench: the sweep sets {key.split('=')[0]}, which params.yaml does not have")
    if variant == "before":
        params["train"]["threads"] = torch.get_num_threads()
        make_before(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    baseline_trainings = len(params["models"]) * len(params["train"]["seeds"])  # train@<config>-<seed>
    env = {**os.environ, "TQDM_DISABLE": "1", "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@b",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@b"}
    env = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "base"], ["dvc", "repro"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"], ["dvc", "exp", "run", "--queue", *SWEEP]):
        sh(cmd, repo, env)
    start = time.perf_counter()
    sh(["dvc", "queue", "start", "-j", str(workers)], repo, env)
    while True:
        status = sh(["dvc", "queue", "status"], repo, env)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    seconds = time.perf_counter() - start
    if "Failed" in status:
        raise SystemExit(f"an experiment of the {variant} -j {workers} sweep failed:\n{status}")
    # Training runs are the MLflow runs tagged with their model configuration (aevae.train.stage).
    count = ("import mlflow; r = mlflow.search_runs(experiment_names=['aevae']); "
             "print(int(r['tags.model_config'].notna().sum()) if 'tags.model_config' in r else 0)")
    store = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    trainings = int(sh([sys.executable, "-c", count], repo, store))
    shutil.rmtree(repo, ignore_errors=True)
    return {"seconds": seconds, "trainings": trainings - baseline_trainings, "experiments": status.count("Success")}


def sweep_rows() -> list[str]:
    results = {(v, j): sweep(v, j) for v in ("before", "after") for j in (1, 2)}
    for key, r in results.items():
        print(f"  sweep {key}: {r}", flush=True)
    base = results[("before", 1)]["seconds"]
    rows = ["| sweep (6 experiments) | wall time | vs before, -j 1 | vs -j 1 of the same code | trainings run |",
            "|---|---|---|---|---|"]
    for (variant, workers), r in results.items():
        same_j1 = results[(variant, 1)]["seconds"]
        rows.append(f"| {variant}, `dvc queue start -j {workers}` | {r['seconds']:.0f} s | {base / r['seconds']:.2f}x "
                    f"| {same_j1 / r['seconds']:.2f}x | {r['trainings']} ({r['experiments']} experiments) |")
    return rows


SWEEP_HEADING = "## Sweeps"


def sweep_section() -> str:
    rows = sweep_rows()
    return "\n".join([
        SWEEP_HEADING, "",
        f"Measured by `python bench/run.py` on {time.strftime('%Y-%m-%d')}: {machine()}.", "",
        f"The same six queued experiments (`dvc exp run --queue {' '.join(SWEEP)}`, epochs "
        f"{SWEEP_PARAMS['epochs']}, {SWEEP_PARAMS['data']['builtin_size']} built-in crops) after a baseline "
        "`dvc repro`, each time in a fresh copy of the repository (its own DVC cache and MLflow store); wall "
        "time from `dvc queue start` until the last experiment ended. *before*: training outputs with "
        "`persist: true` (DVC's run-cache off), every worker on torch's default thread count and no waiting for "
        "a worker that trains the same configuration, as the pipeline was; *after*: the pipeline as it is "
        "(run-cache on, `train.threads: 0` shares the cores, `aevae.train.dedupe`). Both in fp32. "
        "Trainings run: new MLflow training runs (the baseline's not counted).", "", *rows, ""])


