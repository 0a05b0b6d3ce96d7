"""The `aevae` command: what users run besides the pipeline (which runs with `dvc repro`)."""

from __future__ import annotations

from pathlib import Path

import click

from aevae import AevaeError
from aevae.cli import params_option, run

param_filter = click.option(
    "--param", "where", multiple=True, metavar="KEY=VALUE",
    help="Only runs with this param (a params.yaml key, e.g. lr=0.002); repeatable.")
experiment_option = click.option("--experiment", default="aevae", show_default=True, help="MLflow experiment name.")


def _parse_where(where: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for item in where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AevaeError(f"--param {item!r} is not KEY=VALUE: write e.g. --param lr=0.002")
        pairs[key] = value
    return pairs


def _echo_table(table) -> None:
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 250, "display.float_format", "{:.4f}".format):
        click.echo(table.to_string(index=False))


def _runs(experiment: str, where: tuple[str, ...]):
    from aevae.store import tracking_uri
    from aevae.sweeps import filter_params, model_runs

    runs = model_runs(experiment)
    if runs.empty:
        raise AevaeError(f"no model runs in experiment '{experiment}' of {tracking_uri()}: run dvc repro first")
    runs = filter_params(runs, _parse_where(where))
    if runs.empty:
        raise AevaeError(f"no model run has {' and '.join(where)}: check the values with aevae compare")
    return runs


@click.group()
@click.version_option(package_name="aevae")
def aevae() -> None:
    """aevae: AutoEncoder vs VAE experiments. The pipeline itself runs with `dvc repro`; these commands
    read what its runs logged to MLflow (MLFLOW_TRACKING_URI, or mlflow.db here)."""


@aevae.command()
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the table to this CSV file.")
@click.option("--by-seed", is_flag=True,
              help="Group trainings that differ only in train.seed: mean and sd across seeds, next to the "
                   "mean half-width of each run's 95% interval over test images.")
@param_filter
@experiment_option
def compare(csv_path: str | None, by_seed: bool, where: tuple[str, ...], experiment: str) -> None:
    """Compare the model runs in the MLflow store: DVC experiment, key params and test metrics, one row
    per run (or, with --by-seed, one row per model and configuration)."""
    from aevae.sweeps import run_table, seed_groups

    runs = _runs(experiment, where)
    table = seed_groups(runs) if by_seed else run_table(runs)
    _echo_table(table)
    if csv_path:
        table.to_csv(csv_path, index=False)
        click.echo(f"wrote {csv_path}", err=True)


@aevae.command("rate-distortion")
@click.option("--out", default="rate_distortion.png", show_default=True, type=click.Path(dir_okay=False),
              help="The plot; the table goes beside it with the suffix .csv.")
@param_filter
@experiment_option
def rate_distortion(out: str, where: tuple[str, ...], experiment: str) -> None:
    """Plot the VAE's distortion (test PSNR and per-pixel MSE) against its rate (test KL, nats per
    image) at each model.beta of separate experiments, mean and sd over training seeds, with the models
    without a rate as reference lines. (One study's own betas are in its report.)"""
    import pandas as pd

    from aevae.sweeps import beta_steps, plot_rate_distortion
    from aevae.sweeps import rate_distortion as trade_off

    vae, refs = trade_off(_runs(experiment, where))
    path = Path(out)
    plot_rate_distortion(vae, refs, path)
    table = vae.assign(model="VAE")
    table = pd.concat([table, refs.rename(columns={"label": "model"})], ignore_index=True)
    table.to_csv(path.with_suffix(".csv"), index=False)
    _echo_table(table)
    for line in beta_steps(vae):
        click.echo(line)
    click.echo(f"wrote {path} and {path.with_suffix('.csv')}", err=True)


model_argument = click.argument("model", metavar="MODEL")


@aevae.command()
@model_argument
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", default="reconstructions", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for one side-by-side PNG per image and scores.csv.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def reconstruct(model: str, inputs: tuple[Path, ...], out: Path, device: str) -> None:
    """Reconstruct your own images (files or folders) with a trained MODEL: a checkpoint (e.g.
    models/vae/seed0/best.pt) or a model logged to MLflow (e.g. runs:/<run id>/model, models:/aevae-vae/1).
    Writes a PNG per image (input | reconstruction) and scores.csv with PSNR, SSIM, LPIPS and MSE per
    image. Images are center-cropped and resized to the model's size, as prepare does."""
    from aevae.apply import reconstruct_files

    scores = reconstruct_files(model, list(inputs), out, device=device)
    click.echo(f"{len(scores)} image(s): mean PSNR {scores['psnr'].mean():.2f} dB, SSIM {scores['ssim'].mean():.4f}, "
               f"LPIPS {scores['lpips'].mean():.4f}; wrote {out}/ and {out / 'scores.csv'}")


@aevae.command()
@model_argument
@click.option("-n", "n", default=16, show_default=True, type=click.IntRange(1, 1024), help="How many images.")
@click.option("--out", default="samples.png", show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--between", nargs=2, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Two images: also write the decoded line between them to <out>-interpolation.png.")
@click.option("--steps", default=8, show_default=True, type=click.IntRange(2, 64), help="Points on that line.")
def sample(model: str, n: int, out: Path, seed: int, between: tuple[Path, Path] | None, steps: int) -> None:
    """Draw N images from a VAE's prior, z ~ N(0, I), and optionally interpolate between two images
    through the VAE's latent space. MODEL: a checkpoint (models/vae/seed0/best.pt) or an MLflow model URI."""
    from aevae.apply import sample_images

    sample_images(model, out, n=n, seed=seed, between=between or None, steps=steps)
    click.echo(f"wrote {out}" + (f" and {out.with_name(out.stem + '-interpolation.png')}" if between else ""))


@aevae.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to serve on.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
def ui(host: str, port: int) -> None:
    """Open the runs in MLflow's UI: start it on this project's store (mlflow.db here) and print the
    address of the runs table, one row per experiment with its params and every model's test scores.
    With MLFLOW_TRACKING_URI pointing at a server, only print that server's address."""
    import os
    import shutil
    import sys

    from aevae.store import EXPERIMENT, existing_experiment_id, tracking_uri, ui_address

    uri, experiment_id = tracking_uri(), existing_experiment_id()
    if experiment_id is None:
        raise AevaeError(f"no '{EXPERIMENT}' experiment in {uri}: run dvc repro first")
    if uri.startswith(("http://", "https://")):
        click.echo(ui_address(uri.rstrip("/"), experiment_id))
        return
    beside = Path(sys.executable).with_name("mlflow")  # the venv's, also when it is not activated
    mlflow = str(beside) if beside.exists() else shutil.which("mlflow")
    if mlflow is None:
        raise AevaeError("no mlflow command beside this Python or on PATH: pip install -e . in the project's venv")
    click.echo(f"aevae runs: {ui_address(f'http://{host}:{port}', experiment_id)}", err=True)
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)])


@aevae.command()
def sync() -> None:
    """Send to MLflow what trainings could not log while the tracking server was unreachable (kept in
    .dvc/tmp/mlflow-pending/ of this repository), oldest first; every aevae stage also does this first."""
    from aevae.files import pending_dir
    from aevae.outbox import deliver_pending
    from aevae.store import tracking_uri

    delivered, waiting = deliver_pending()
    if waiting:
        raise AevaeError(f"{tracking_uri()} does not answer: {waiting} run(s) still wait in {pending_dir()}; "
                         "run aevae sync again when it does")
    click.echo(f"{delivered} run(s) completed in {tracking_uri()}" if delivered else "nothing was waiting")


@aevae.group()
def slurm() -> None:
    """Run the study on a Slurm cluster: each training a job of one array, gathered through DVC's
    run-cache into one DVC experiment (docs/slurm.md). Needs a DVC remote and a git remote the jobs reach."""


workdir_option = click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path(".dvc/tmp/slurm"),
    show_default=True, help="Where each study keeps its scripts, logs and the jobs' clones: on a cluster, a "
                            "folder every node sees (scratch).")


def _echo_states(rows) -> None:
    width = max(len(r.stage) for r in rows)
    for r in rows:
        line = f"{r.stage:<{width}}  job {r.job:<10}  {r.state}"
        click.echo(line + (f"  log: {r.log}" if not r.state.startswith(("ok", "PENDING")) else ""))


@slurm.command()
@click.option("--partition", help="Slurm partition (default: the cluster's).")
@click.option("--cpus", type=click.IntRange(1), default=1, show_default=True, help="CPUs per job.")
@click.option("--mem", help="Memory per job, e.g. 8G (default: the partition's).")
@click.option("--time", "time_limit", help="Time limit per job, e.g. 04:00:00 (default: the partition's).")
@click.option("--gpus", type=click.IntRange(0), default=0, show_default=True, help="GPUs per job (--gres=gpu:N).")
@click.option("--name", help="The study's name: its folder and its DVC experiment (default: study-<commit>-<time>).")
@click.option("--git-url", help="Where the jobs clone the commit from (default: origin, or this repository).")
@click.option("--dvc-remote", help="The DVC remote the jobs share through (default: the commit's default remote).")
@click.option("--setup", help="Shell lines each job runs first to get Python and dvc (default: this Python's "
                              "bin folder on PATH), e.g. 'module load cuda; source ~/venv/bin/activate'.")
@workdir_option
@params_option
@click.option("--dry-run", is_flag=True, help="Print the sbatch scripts and submit nothing.")
@click.option("--wait", "wait_", is_flag=True, help="Stay until the study succeeds or a job fails (exit 1).")
def submit(partition, cpus, mem, time_limit, gpus, name, git_url, dvc_remote, setup, workdir, params_file, dry_run,
           wait_) -> None:
    """Submit the current commit's study (every configuration and seed in params.yaml): a prepare job, one
    array task per training stage, and a final job that runs the pipeline as the DVC experiment NAME with
    every training restored from the run-cache; it is pushed to the git and DVC remotes."""
    from aevae import slurm as cluster
    from aevae.files import project_root
    from aevae.params import load_params

    if not dry_run:
        cluster.sbatch_path()
    resources = cluster.Resources(partition, cpus, mem, time_limit, gpus)
    study = cluster.plan_study(project_root(), load_params(params_file), workdir, git_url=git_url,
                               dvc_remote=dvc_remote, setup=setup, name=name)
    if dry_run:
        for part, text in cluster.scripts(study, resources).items():
            click.echo(f"# ---- {part}.sbatch ----\n{text}")
        return
    cluster.submit(study, resources)
    click.echo(f"study {study.name}: commit {study.commit[:8]}, {len(study.trainings)} trainings as array job "
               f"{study.jobs['train']} after prepare {study.jobs['prepare']}, final job {study.jobs['final']}\n"
               f"  folder: {study.path}\n  MLflow: {study.tracking_uri} ({cluster.environment_note()})\n"
               f"  watch:  aevae slurm status {study.name} --workdir {workdir}\n"
               f"  result: dvc exp pull origin {study.name} && dvc exp apply {study.name}")
    if wait_:
        _wait_and_report(cluster, study)


def _wait_and_report(cluster, study, timeout: float | None = None) -> None:
    rows = cluster.wait(study, poll=5.0, timeout=timeout)
    _echo_states(rows)
    outcome = cluster.finished(rows)
    if outcome is False:
        failed = next(r for r in rows if not r.state.startswith(("ok", "PENDING", "RUNNING")))
        raise AevaeError(f"study {study.name}: {failed.stage} {failed.state}; its log: {failed.log}")
    if outcome is None:
        raise AevaeError(f"study {study.name} still runs after {timeout:g} s: aevae slurm status {study.name}")
    click.echo(f"study {study.name} done: dvc exp pull origin {study.name}")


@slurm.command()
@click.argument("name", required=False)
@workdir_option
@click.option("--wait", "wait_", is_flag=True, help="Stay until the study succeeds or a job fails (exit 1).")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds (exit 1).")
def status(name: str | None, workdir: Path, wait_: bool, timeout: float | None) -> None:
    """Each job of study NAME: pending, running, ok or failed (with its log); without NAME, every study."""
    from aevae import slurm as cluster

    if name is None:
        studies = cluster.list_studies(workdir)
        if not studies:
            raise AevaeError(f"no studies in {workdir}: aevae slurm submit starts one")
        for folder in studies:
            study = cluster.Study.load(folder)
            click.echo(f"{study.name}  commit {study.commit[:8]}  {cluster.study_states(study)[-1].state}")
        return
    study = cluster.Study.load(workdir / name)
    if wait_:
        _wait_and_report(cluster, study, timeout)
        return
    rows = cluster.study_states(study)
    _echo_states(rows)
    if cluster.finished(rows) is False:
        raise AevaeError(f"study {study.name} has a failed job (above): fix it and submit again; finished trainings "
                         "are restored from the run-cache, not run again")


def main() -> None:
    """Entry point of the `aevae` command."""
    run(aevae)
