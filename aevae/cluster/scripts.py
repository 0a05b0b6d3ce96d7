"""The sbatch scripts of a study: a prepare job, one array task per tuning stage (when tune.trials > 0), one
array task per training stage, and a final job that runs the pipeline as a DVC experiment with every tuning
and training restored from the run-cache."""

from __future__ import annotations

import shlex

from aevae.cluster.study import FINAL, PREPARE, TRAIN, TUNE, Resources, Study


def _header(study: Study, part: str, resources: Resources, output: str, stage: str) -> list[str]:
    """The directives, then the job's result recorded whatever happens (for `aevae slurm status`:
    status/<stage>.ok, or .failed with the exit code), then the user's setup."""
    return ["#!/bin/bash",
            f"#SBATCH --job-name=aevae-{part}",
            f"#SBATCH --output={study.path / 'logs' / output}",
            *resources.directives(),
            f"# aevae study {study.name}: commit {study.commit}",
            "set -euo pipefail",
            stage,
            f"status={shlex.quote(str(study.path / 'status'))}",
            'mark() { code=$?; if [ "$code" = 0 ]; then echo 0 > "$status/$stage.ok"; '
            'else echo "$code" > "$status/$stage.failed"; fi; }',
            "trap mark EXIT",
            study.setup,
            f"export MLFLOW_TRACKING_URI={shlex.quote(study.tracking_uri)}",
            # Each job works in its own clone of the commit; a rerun of the job starts from a fresh one.
            f'clone() {{ rm -rf "$1"; git clone --quiet {shlex.quote(study.git_url)} "$1"; '
            f'git -C "$1" checkout --quiet --detach {study.commit}; '
            f'(cd "$1" && dvc remote default --local {shlex.quote(study.dvc_remote)}); }}']


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
            'dvc repro --pull "$stage"',
            'dvc push --run-cache "$stage"']


def final_script(study: Study, resources: Resources) -> str:
    return "\n".join([
        *_header(study, FINAL, resources, "final-%j.out", f"stage={FINAL}"),
        f'work={shlex.quote(str(study.path / "jobs" / FINAL))}',
        'clone "$work" && cd "$work"',
        # Every tuning and training is in the run-cache now: the experiment restores them and runs the rest.
        f"dvc exp run --pull -n {shlex.quote(study.name)}",
        f"dvc exp push --run-cache origin {shlex.quote(study.name)}",
        f'echo "aevae: experiment {study.name} pushed; get it with: dvc exp pull origin {study.name}"',
    ]) + "\n"


def scripts(study: Study, resources: Resources) -> dict[str, str]:
    tuning = {TUNE: stage_script(study, resources, TUNE)} if study.tunings else {}
    return {PREPARE: prepare_script(study, resources), **tuning, TRAIN: stage_script(study, resources, TRAIN),
            FINAL: final_script(study, resources)}

