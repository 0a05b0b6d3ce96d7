"""DVC stage `report`: metrics/ + models/ -> reports/ (figures, tables, report.md and report.html)."""

import logging
from pathlib import Path

import _checkout  # noqa: F401 - first: this checkout's aevae
import click

from aevae.commands.entry import data_option, models_option, params_option, run
from aevae.config.load import load_params
from aevae.data.load import read_manifest
from aevae.evaluate.params import load_eval_params
from aevae.report.build import build_report
from aevae.report.params import load_report_params
from aevae.results.metrics_dir import MetricsDir
from aevae.tracking.provenance import Pipeline
from aevae.tracking.runs import log_files_run

log = logging.getLogger("report")


@click.command()
@params_option
@data_option
@models_option
@click.option("--metrics", "metrics_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder of the evaluate stage.")
@click.option("--tuned", "tuned_dir", type=click.Path(file_okay=False),
              help="Output folder of the tuning stages (tuned/): the report's Tuning section, when they ran trials.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for the report.")
def main(params_file: str, data_dir: str, models_dir: str, metrics_dir: str, tuned_dir: str | None, out: str) -> None:
    """Draw the comparison grid, loss curves, samples and worst cases of the study's models, write the
    metric tables and report.md / report.html, and log them to MLflow as a `report` run under the
    pipeline's parent run."""
    params = load_params(params_file)
    bootstrap_samples = load_eval_params(params_file).bootstrap_samples  # named in the report's text
    files = build_report(params, load_report_params(params_file), bootstrap_samples, Path(data_dir),
                         Path(models_dir), MetricsDir(Path(metrics_dir)), Path(out),
                         Path(tuned_dir) if tuned_dir else None)
    log_files_run("report", files, Pipeline.of(params.flat(), read_manifest(Path(data_dir))["sha256"]), "report")
    log.info("wrote %s: %s", out, ", ".join(p.name for p in files))


if __name__ == "__main__":
    run(main)
