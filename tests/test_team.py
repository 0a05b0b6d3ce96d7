"""A team's setup, as docs/team.md builds it: a tracking server that lets no one in unasked, and
sweeps run on several machines gathered in one place (a bare git remote, a DVC remote, one MLflow server).
Every part is real: `mlflow server` with its basic-auth app, git, dvc."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import (
    MODELS,
    REPO,
    TrackingServer,
    copy_project,
    exp_metrics,
    one_line_error,
    project_env,
    run,
    train_command,
)

pytestmark = pytest.mark.slow(30)

USERS = {"alice": "alice-Pw-4417-x", "bob": "bob-Pw-9052-xyz", "carol": "carol-Pw-1268-x"}  # MLflow: 12+ chars


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return project_env(tmp_path_factory.mktemp("env"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, env):
    """A basic-auth MLflow server with three team members' accounts."""
    server = TrackingServer(tmp_path_factory.mktemp("server"), env, auth=True)
    server.start()
    server.create_users(USERS)
    yield server
    server.kill()


def as_user(env: dict[str, str], server: TrackingServer, name: str | None, password: str | None = None) -> dict:
    """The environment of one team member: the server's URI and their login (none for `name` None)."""
    env = {**env, "MLFLOW_TRACKING_URI": server.uri}
    if name:
        env.update(MLFLOW_TRACKING_USERNAME=name, MLFLOW_TRACKING_PASSWORD=password or USERS[name])
    return env


def train_stage(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The AE training stage on a tiny prepared set, as `dvc repro` runs it."""
    params = copy_project(tmp_path / "project") / "params.yaml"
    if not (tmp_path / "prepared").exists():
        run([sys.executable, str(REPO / "stages/prepare.py"), "--params", str(params), "--out", "prepared"],
            tmp_path, env)
    return subprocess.run(train_command(params, "prepared", "models"), cwd=tmp_path, env=env, capture_output=True,
                          text=True)


@pytest.mark.xdist_group("team-server")
@pytest.mark.slow(45)
def test_anonymous_clients_are_refused_and_a_wrong_password_stops_before_training(tmp_path, env, server):
    """Slow (~45 s): the real training stage, four times (two refused at the start), and a prepare."""
    client = mlflow.MlflowClient(server.uri)
    with pytest.raises(mlflow.exceptions.MlflowException, match="401"):
        client.search_experiments()  # reading is refused as well as writing: the runs are not public

    for name, password, says in [(None, None, "asks for a login: set MLFLOW_TRACKING_USERNAME and "
                                               "MLFLOW_TRACKING_PASSWORD"),
                                 ("alice", "not-her-password", "refused the login of 'alice'")]:
        failed = train_stage(tmp_path, as_user(env, server, name, password))
        assert one_line_error(failed).startswith(f"Error: MLflow at {server.uri} {says}"), failed.stderr
        assert not (tmp_path / "models/ae/seed0/history.csv").exists(), "an epoch ran before the login was checked"
        assert "not-her-password" not in failed.stderr

    done = train_stage(tmp_path, as_user(env, server, "alice"))
    assert done.returncode == 0, done.stderr[-3000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", "carol")  # another member reads it: default_permission EDIT
        patch.setenv("MLFLOW_TRACKING_PASSWORD", USERS["carol"])
        experiment = client.get_experiment_by_name("aevae")
        found = client.search_runs([experiment.experiment_id], "tags.aevae_role = 'stage'")
    # The runs of this test's trainings (the group's experiments, when they ran first, have theirs): the two
    # refused ones made none.
    here = [r for r in found if "dvc_exp_name" not in r.data.tags]
    assert [(r.info.run_name, r.info.status) for r in here] == [("ae-seed0", "FINISHED")]
    assert here[0].info.run_id == json.loads((tmp_path / "models/ae/seed0/run.json").read_text())["run_id"]
    assert "val_loss" in here[0].data.metrics


@dataclass
class Sweeps:
    """Two members' experiments, met in a third clone (the `sweeps` fixture)."""

    logs: dict[str, str]  # what `dvc exp run` printed on each member's machine
    outputs: dict[str, dict[str, bytes]]  # each member's best.pt per configuration
    lead: Path  # carol's clone, both experiments pulled
    carol: dict[str, str]  # her environment: the server and her login
    shown: dict[str, dict]  # `dvc exp show` there


EXPERIMENTS = {"alice": "models.vae.beta=2", "bob": "models.vae.beta=0.5"}  # the same AE and AE-128


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, env, server) -> Sweeps:
    """alice and bob each clone the project, run an experiment and push it (git refs to the shared git
    remote, outputs and run history to the shared DVC remote); bob's experiment shares alice's AE
    configuration. carol clones and pulls both. Shared by the tests of the group `team-server`."""
    root = tmp_path_factory.mktemp("team")
    origin, dvc_remote = root / "origin.git", root / "dvc-remote"
    run(["git", "init", "-q", "--bare", "--initial-branch=main", str(origin)], root, env)
    project = copy_project(root / "project")
    for cmd in (["git", "init", "-q", "--initial-branch=main"],
                ["dvc", "remote", "add", "-d", "shared", str(dvc_remote)],  # in .dvc/config, so in every clone
                ["git", "add", "-A"], ["git", "commit", "-qm", "project"],
                ["git", "remote", "add", "origin", str(origin)], ["git", "push", "-q", "origin", "main"]):
        run(cmd, project, env)
    outputs, logs = {}, {}
    for name, override in EXPERIMENTS.items():
        clone = root / name
        run(["git", "clone", "-q", str(origin), str(clone)], root, env)
        member = as_user(env, server, name)
        # --pull: a stage the team ran before (the DVC remote's run-cache) is restored from there
        logs[name] = run(["dvc", "exp", "run", "--pull", "-n", f"{name}-exp", "-S", override], clone, member).stdout
        run(["dvc", "exp", "push", "--run-cache", "origin", f"{name}-exp"], clone, member)
        outputs[name] = {kind: (clone / f"models/{kind}/seed0/best.pt").read_bytes() for kind in MODELS}
    lead = root / "carol"
    run(["git", "clone", "-q", str(origin), str(lead)], root, env)
    carol = as_user(env, server, "carol")
    run(["dvc", "exp", "pull", "origin", "alice-exp", "bob-exp"], lead, carol)
    return Sweeps(logs, outputs, lead, carol, exp_metrics(lead, carol))


@pytest.mark.xdist_group("team-server")
@pytest.mark.slow(100)
def test_sweeps_from_two_machines_meet_in_a_third_clone(tmp_path, sweeps):
    """bob's machine restores alice's AEs instead of training them; carol sees both experiments in `dvc exp
    show`, in their outputs and, through the one MLflow server, in `aevae compare`."""
    logs, outputs, lead, carol, shown = sweeps.logs, sweeps.outputs, sweeps.lead, sweeps.carol, sweeps.shown
    assert "Running stage 'train@ae-0'" in logs["alice"]
    for stage in ("train@ae-0", "train@ae_code-0"):
        assert f"Stage '{stage}' is cached - skipping run" in logs["bob"], logs["bob"]
    assert "Running stage 'train@vae-0'" in logs["bob"]
    assert outputs["bob"]["ae"] == outputs["alice"]["ae"]

    assert set(shown) == {"alice-exp", "bob-exp"}
    assert shown["bob-exp"]["ae"]["psnr"] == pytest.approx(shown["alice-exp"]["ae"]["psnr"], abs=1e-6)
    for name in EXPERIMENTS:  # the outputs came through the DVC remote, not only the git refs
        run(["dvc", "exp", "apply", f"{name}-exp"], lead, carol)
        for kind in MODELS:
            assert (lead / f"models/{kind}/seed0/best.pt").read_bytes() == outputs[name][kind], (name, kind)

    run(["aevae", "compare", "--csv", str(tmp_path / "all.csv")], lead, carol)
    table = pd.read_csv(tmp_path / "all.csv")
    table = table[~table["pipeline"].str.startswith("unknown-")]  # the login test's training, outside DVC
    trained = sorted(zip(table["pipeline"], table["model"]))  # each distinct training once, on one machine
    assert trained == [("alice-exp", "ae"), ("alice-exp", "ae_code"), ("alice-exp", "vae"), ("bob-exp", "vae")]
    for name in EXPERIMENTS:
        row = table[(table["pipeline"] == f"{name}-exp") & (table["model"] == "vae")].iloc[0]
        assert row["test_psnr"] == pytest.approx(shown[f"{name}-exp"]["vae"]["psnr"], abs=1e-5)


@pytest.mark.xdist_group("team-server")
@pytest.mark.slow(5)
def test_the_pipeline_logs_to_a_tracking_server_unchanged(sweeps, server):
    """alice's experiment, as `dvc exp run` sent it to the server (MLFLOW_TRACKING_URI and a login, nothing
    else): every run of it, the override among the params, the test scores, the checkpoints; and `aevae ui`
    gives the address of the runs table there, with the view the experiment holds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
        patch.setenv("MLFLOW_TRACKING_PASSWORD", USERS["carol"])
        client = mlflow.MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("aevae")
        found = client.search_runs([experiment.experiment_id], "tags.dvc_exp_name = 'alice-exp'")
        runs = {r.info.run_name: r for r in found}
        assert sorted(runs) == ["ae-seed0", "ae_code-seed0", "alice-exp", "report", "vae-seed0"]
        assert float(runs["vae-seed0"].data.params["model.beta"]) == 2 and runs["ae-seed0"].data.params["lr"] == "0.002"
        assert "test_psnr" in runs["ae-seed0"].data.metrics and "test_psnr" in runs["vae-seed0"].data.metrics
        assert "checkpoints/best.pt" in {a.path for a in client.list_artifacts(runs["ae-seed0"].info.run_id,
                                                                                 "checkpoints")}
    address = run(["aevae", "ui"], sweeps.lead, sweeps.carol).stdout.strip()
    assert address == (f"{server.uri}/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey=aevae"
                       "&workflowType=machine_learning")
    view = json.loads(experiment.tags["mlflow.sharedViewState.aevae"])
    assert {"metrics.`vae_test_psnr`", "params.`models.vae.beta`"} <= set(view["selectedColumns"])
