"""DVC stage `report`: metrics/ + models/ -> reports/ (figures, tables, report.md and report.html)."""

import sys
from pathlib import Path

# This checkout's aevae, not an installed copy: inside `dvc exp run` the stage runs in DVC's copy of the
# commit under test, and must run that commit's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging  # noqa: E402

import click  # noqa: E402

from aevae.cli import data_option, models_option, params_option, run  # noqa: E402
from aevae.data import read_manifest  # noqa: E402
from aevae.eval_log import log_report  # noqa: E402
from aevae.files import MetricsDir  # noqa: E402
from aevae.params import load_params  # noqa: E402
from aevae.report import build_report  # noqa: E402
from aevae.runs import Pipeline  # noqa: E402

log = logging.getLogger("report")


@click.command()
@params_option
@data_option
@models_option
@click.option("--metrics", "metrics_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder of the evaluate stage.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for the report.")
def main(params_file: str, data_dir: str, models_dir: str, metrics_dir: str, out: str) -> None:
    """Draw the comparison grid, loss curves, samples and worst cases of the study's models, write the
    metric tables and report.md / report.html, and log them to MLflow as a `report` run under the
    pipeline's parent run."""
    params = load_params(params_file)
    files = build_report(params, Path(data_dir), Path(models_dir), MetricsDir(Path(metrics_dir)), Path(out))
    log_report(files, Pipeline.of(params.flat(), read_manifest(Path(data_dir))["sha256"]))
    log.info("wrote %s: %s", out, ", ".join(p.name for p in files))


if __name__ == "__main__":
    run(main)
