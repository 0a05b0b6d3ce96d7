"""DVC stage `report`: metrics/ + models/ -> reports/ (figures, tables, report.md and report.html)."""

import logging
from pathlib import Path

import click

from aevae.cli import params_option, run
from aevae.params import load_params
from aevae.report import build_report

log = logging.getLogger("report")


@click.command()
@params_option
@click.option("--data", "data_dir", default="data/prepared", show_default=True, type=click.Path(file_okay=False))
@click.option("--models", "models_root", default="models", show_default=True, type=click.Path(file_okay=False))
@click.option("--metrics", "metrics_dir", default="metrics", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", default="reports", show_default=True, type=click.Path(file_okay=False))
def main(params_file: str, data_dir: str, models_root: str, metrics_dir: str, out: str) -> None:
    """Draw the comparison grid, loss curves, VAE samples and worst cases, write the metric table and
    report.md / report.html, and log them to MLflow as a `report` run."""
    from aevae import tracking

    params = load_params(params_file)
    files = build_report(params, Path(data_dir), Path(models_root), Path(metrics_dir), Path(out))
    tracking.log_report(files, Path(models_root), Path(data_dir), params.flat())
    log.info("wrote %s: %s", out, ", ".join(p.name for p in files))


if __name__ == "__main__":
    run(main)
