"""`aevae slurm submit` and `aevae slurm status`: the study on a Slurm cluster (docs/slurm.md)."""

from __future__ import annotations

from pathlib import Path

import click

from aevae import AevaeError
from aevae.commands.entry import params_option


@click.group()
def slurm() -> None:
    """Run the study on a Slurm cluster: each training a job of one array, gathered through DVC's
    run-cache into one DVC experiment (docs/slurm.md). Needs a DVC remote and a git remote the jobs reach."""


workdir_option = click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path(".dvc/tmp/slurm"),
    show_default=True, help="Where each study keeps its scripts, logs and the jobs' clones: on a cluster, a "
                            "folder every node sees (scratch).")


poll_option = click.option(
    "--poll", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
    help="With --wait: seconds between two looks at the jobs (squeue and the study's status files).")


def _echo_states(rows) -> None:
    width = max(len(r.stage) for r in rows)
    for r in rows:
        line = f"{r.stage:<{width}}  job {r.job:<10}  {r.state}"
        if r.restarts:  # requeued (preempted, time limit, node down): where each run started
            line += f"  requeued {r.restarts}x, ran on {' -> '.join(r.nodes)}"
        click.echo(line + (f"  log: {r.log}" if not r.state.startswith(("ok", "PENDING")) else ""))


@slurm.command()
@click.option("--partition", help="Slurm partition (default: the cluster's).")
@click.option("--cpus", type=click.IntRange(1), default=1, show_default=True, help="CPUs per job.")
@click.option("--mem", help="Memory per job, e.g. 8G (default: the partition's).")
@click.option("--time", "time_limit", help="Time limit per job, e.g. 04:00:00 (default: the partition's).")
@click.option("--gpus", type=click.IntRange(0), default=0, show_default=True, help="GPUs per job (--gres=gpu:N).")
@click.option("--notice", type=click.IntRange(1), default=120, show_default=True,
              help="Seconds ahead of the time limit when a job is told to stop (--signal=B:USR1@N): a training "
                   "saves its state and the job requeues itself, to go on where it stopped.")
@click.option("--name", help="The study's name: its folder and its DVC experiment (default: study-<commit>-<time>).")
@click.option("--git-url", help="Where the jobs clone the commit from (default: origin, or this repository).")
@click.option("--dvc-remote", help="The DVC remote the jobs share through (default: the commit's default remote).")
@click.option("--setup", help="Shell lines each job runs first to get Python and dvc (default: this Python's "
                              "bin folder on PATH), e.g. 'module load cuda; source ~/venv/bin/activate'.")
@workdir_option
@params_option
@click.option("--dry-run", is_flag=True, help="Print the sbatch scripts and submit nothing.")
@click.option("--wait", "wait_", is_flag=True, help="Stay until the study succeeds or a job fails (exit 1).")
@poll_option
def submit(partition, cpus, mem, time_limit, gpus, notice, name, git_url, dvc_remote, setup, workdir, params_file,
           dry_run, wait_, poll) -> None:
    """Submit the current commit's study (every configuration and seed in params.yaml): a prepare job, one
    array task per tuning stage when tune.trials > 0, one array task per training stage, and a final job
    that runs the pipeline as the DVC experiment NAME with every tuning and training restored from the
    run-cache; it is pushed to the git and DVC remotes."""
    from aevae.cluster import jobs
    from aevae.cluster.scripts import scripts
    from aevae.cluster.study import Resources, plan_study
    from aevae.config.load import load_params
    from aevae.files.project import project_root

    if not dry_run:
        jobs.sbatch_path()
    resources = Resources(partition, cpus, mem, time_limit, gpus, notice)
    resources.check()
    study = plan_study(project_root(), load_params(params_file), workdir, git_url=git_url,
                       dvc_remote=dvc_remote, setup=setup, name=name)
    if dry_run:
        for part, text in scripts(study, resources).items():
            click.echo(f"# ---- {part}.sbatch ----\n{text}")
        return
    jobs.submit(study, resources)
    _echo_submitted(study, workdir)
    if wait_:
        _wait_and_report(study, poll)


def _echo_submitted(study, workdir: Path) -> None:
    from aevae.cluster import jobs

    tunings = (f"{len(study.tunings)} tunings as array job {study.jobs['tune']} after prepare {study.jobs['prepare']}, "
               if study.tunings else "")
    click.echo(f"study {study.name}: commit {study.commit[:8]}, {tunings}{len(study.trainings)} trainings as array "
               f"job {study.jobs['train']} after {'them' if study.tunings else 'prepare ' + study.jobs['prepare']}, "
               f"final job {study.jobs['final']}\n"
               f"  folder: {study.path}\n  MLflow: {study.tracking_uri} ({jobs.environment_note()})\n"
               f"  watch:  aevae slurm status {study.name} --workdir {workdir}\n"
               f"  result: dvc exp pull origin {study.name} && dvc exp apply {study.name}")


def _wait_and_report(study, poll: float, timeout: float | None = None) -> None:
    from aevae.cluster import jobs

    rows = jobs.wait(study, poll=poll, timeout=timeout)
    _echo_states(rows)
    outcome = jobs.finished(rows)
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
@poll_option
def status(name: str | None, workdir: Path, wait_: bool, timeout: float | None, poll: float) -> None:
    """Each job of study NAME: pending, running, ok or failed (with its log); without NAME, every study."""
    from aevae.cluster import jobs
    from aevae.cluster.study import Study

    if name is None:
        studies = jobs.list_studies(workdir)
        if not studies:
            raise AevaeError(f"no studies in {workdir}: aevae slurm submit starts one")
        for folder in studies:
            study = Study.load(folder)
            click.echo(f"{study.name}  commit {study.commit[:8]}  {jobs.study_states(study)[-1].state}")
        return
    study = Study.load(workdir / name)
    if wait_:
        _wait_and_report(study, poll, timeout)
        return
    rows = jobs.study_states(study)
    _echo_states(rows)
    if jobs.finished(rows) is False:
        raise AevaeError(f"study {study.name} has a failed job (above): fix it and submit again; finished trainings "
                         "are restored from the run-cache, not run again")

