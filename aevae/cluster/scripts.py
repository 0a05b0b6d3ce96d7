"""The sbatch scripts of a study: a prepare job, one array task per tuning stage (when tune.trials > 0), one
array task per training stage, and a final job that runs the pipeline as a DVC experiment with every tuning
and training restored from the run-cache."""

from __future__ import annotations

import shlex

from aevae.cluster.study import FINAL, PREPARE, TRAIN, TUNE, Resources, Study


def _header(study: Study, part: str, resources: Resources, output: str, stage: str) -> list[str]:
    """The directives, then the job's records (for `aevae slurm status`): each start of it appended to
    status/<stage>.starts, and its result, status/<stage>.ok or .failed with the exit code, whatever
    happens but a stop by Slurm (preemption, requeue, a node taken down, scancel: Slurm's own state says
    what follows); then the signal handling and the user's setup."""
    return ["#!/bin/bash",
            f"#SBATCH --job-name=aevae-{part}",
            f"#SBATCH --output={study.path / 'logs' / output}",
            # Preempted, stopped ahead of its time limit, or on a node that failed: back in the queue, and its
            # log goes on after the earlier run's instead of replacing it.
            "#SBATCH --requeue",
            "#SBATCH --open-mode=append",
            # Trainings and tunings: the notice ahead of the time limit, to this script (B:), which passes it
            # on to the training and requeues the job. Prepare and the final job are not told: rerun from their
            # start, they could not get further in the same time.
            *([f"#SBATCH --signal=B:USR1@{resources.notice}"] if part in (TRAIN, TUNE) else []),
            # Prepare decodes images on the CPU: a GPU it held would wait idle while others queue for it.
            *resources.directives(gpus=part != PREPARE),
            f"# aevae study {study.name}: commit {study.commit}",
            "set -euo pipefail",
            stage,
            f"status={shlex.quote(str(study.path / 'status'))}",
            'rm -f "$status/$stage.ok" "$status/$stage.failed"  # a requeued run\'s result is its own',
            'echo "$(date +%FT%T) ${SLURM_JOB_ID:-?} ${SLURMD_NODENAME:-$(hostname)} restart '
            '${SLURM_RESTART_COUNT:-0}" >> "$status/$stage.starts"',
            'stopping=""  # the signal that stops this run: USR1 (time limit near) or TERM (Slurm stops the job)',
            'mark() { code=$?; if [ "$code" = 0 ]; then echo 0 > "$status/$stage.ok"; '
            'elif [ -z "$stopping" ]; then echo "$code" > "$status/$stage.failed"; fi; }',
            "trap mark EXIT",
            *_signal_handling(),
            study.setup,
            f"export MLFLOW_TRACKING_URI={shlex.quote(study.tracking_uri)}",
            # Each job works in a clone of the commit, kept across requeues: a requeued training, on this node
            # or another, finds its last.pt there. A killed dvc's locks go: the job is the clone's only user.
            f'clone() {{ if [ "$(git -C "$1" rev-parse HEAD 2>/dev/null)" = {study.commit} ]; then '
            'echo "aevae: going on in $1"; rm -f "$1/.dvc/tmp/rwlock" "$1/.dvc/tmp/lock"; return; fi; '
            f'rm -rf "$1"; git clone --quiet {shlex.quote(study.git_url)} "$1"; '
            f'git -C "$1" checkout --quiet --detach {study.commit}; '
            f'(cd "$1" && dvc remote default --local {shlex.quote(study.dvc_remote)}); }}',
            # Stopped by USR1: back in the queue, to go on from the saved state; stopped by Slurm: Slurm decides.
            'stopped() { if [ "$stopping" = USR1 ]; then echo "aevae: requeueing job $SLURM_JOB_ID"; '
            'scontrol requeue "$SLURM_JOB_ID"; fi; exit "$1"; }']


def _signal_handling() -> list[str]:
    """How the job script meets a stop signal: it passes it on to the stage and, for USR1, requeues the job."""
    return [
        # Passed on to the stage's process group: the training saves its state after the batch it is in
        # and stops (aevae.train.stop); everything else in that group ignores USR1.
        'pass_on() { stopping=$1; echo "aevae: SIG$1 at $(date +%T) on $(hostname): passed on to the stage (a '
        'training saves its state and stops)"; if [ -n "${child:-}" ]; then kill -"$1" -- -"$child" 2>/dev/null '
        '|| true; fi; }',
        "trap 'pass_on USR1' USR1",
        "trap 'pass_on TERM' TERM",
        # The stage's command in a session of its own (so its whole process group gets the signal), with
        # USR1 ignored by all but the training, which handles it. Polled, not waited on, so that a stop
        # signal is passed on again each second until the group is gone: one that came before the
        # training set its handler is not lost, and a training still saving after dvc died (SIGTERM) is
        # waited for (its repeats are ignored).
        'in_group() { setsid bash -c \'trap "" USR1; exec "$@"\' aevae-stage "$@" & child=$!; '
        # (the child itself, until setsid has made its group; then the group)
        'while kill -0 "$child" 2>/dev/null || kill -0 -- -"$child" 2>/dev/null; do '
        'if [ -n "$stopping" ]; then kill -"$stopping" -- -"$child" 2>/dev/null || true; fi; '
        'sleep 1 & wait $! || true; done; code=0; wait "$child" || code=$?; child=""; return "$code"; }',
    ]


def stage_script(study: Study, resources: Resources, part: str = TRAIN) -> str:
    """An array: task i runs study.stages_of(part)[i], the tunings or the trainings (the prepare job runs
    the same lines for `prepare`)."""
    stages = " ".join(shlex.quote(s) for s in study.stages_of(part))
    pick = f"stages=({stages}); stage=${{stages[$SLURM_ARRAY_TASK_ID]}}"
    return "\n".join([*_header(study, part, resources, f"{part}-%A_%a.out", pick), *_repro_lines(study)]) + "\n"


def prepare_script(study: Study, resources: Resources) -> str:
    return "\n".join([*_header(study, PREPARE, resources, "prepare-%j.out", f"stage={PREPARE}"),
                      *_repro_lines(study)]) + "\n"


def _repro_lines(study: Study) -> list[str]:
    return [f'work={shlex.quote(str(study.path / "jobs"))}/"$stage"',
            'echo "aevae: $stage of commit ' + study.commit[:8] + ' in $work on $(hostname)"',
            'clone "$work" && cd "$work"',
            # --pull restores what any machine pushed before (data, and this stage from the run-cache if it was
            # ever run with these params, data and code); only a missing result runs.
            'code=0; in_group dvc repro --pull "$stage" || code=$?',
            'if [ "$code" != 0 ]; then if [ -n "$stopping" ]; then stopped "$code"; fi; exit "$code"; fi',
            'dvc push --run-cache "$stage"']


def final_script(study: Study, resources: Resources) -> str:
    return "\n".join([
        *_header(study, FINAL, resources, "final-%j.out", f"stage={FINAL}"),
        f'work={shlex.quote(str(study.path / "jobs" / FINAL))}',
        'clone "$work" && cd "$work"',
        # Every tuning and training is in the run-cache now: the experiment restores them and runs the rest.
        f'code=0; in_group dvc exp run --pull -n {shlex.quote(study.name)} || code=$?',
        'if [ "$code" != 0 ]; then if [ -n "$stopping" ]; then stopped "$code"; fi; exit "$code"; fi',
        f"dvc exp push --run-cache origin {shlex.quote(study.name)}",
        f'echo "aevae: experiment {study.name} pushed; get it with: dvc exp pull origin {study.name}"',
    ]) + "\n"


def scripts(study: Study, resources: Resources) -> dict[str, str]:
    tuning = {TUNE: stage_script(study, resources, TUNE)} if study.tunings else {}
    return {PREPARE: prepare_script(study, resources), **tuning, TRAIN: stage_script(study, resources, TRAIN),
            FINAL: final_script(study, resources)}

