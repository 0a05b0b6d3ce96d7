"""DVC stages `train_<model>`: data/prepared -> models/<model>/."""

import sys
from pathlib import Path

# This checkout's aevae, not an installed copy: inside `dvc exp run` the stage runs in DVC's copy of the
# commit under test, and must run that commit's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from aevae.cli import data_option, params_option, run  # noqa: E402
from aevae.files import ModelDir  # noqa: E402
from aevae.models import MODEL_KINDS  # noqa: E402
from aevae.params import load_params  # noqa: E402
from aevae.train import train  # noqa: E402


@click.command()
@click.option("--model", "kind", type=click.Choice(MODEL_KINDS), required=True, help="Which model to train.")
@params_option
@data_option
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder for best.pt, last.pt, history.csv and run.json.")
def main(kind: str, params_file: str, data_dir: str, out: str) -> None:
    """Train one model; write its checkpoints, history and MLflow run id to --out, and log the run to
    MLflow (MLFLOW_TRACKING_URI, or mlflow.db at the repository root)."""
    params = load_params(params_file)
    train(kind, params, Path(data_dir), ModelDir(Path(out)))


if __name__ == "__main__":
    run(main)
