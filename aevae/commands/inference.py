"""`aevae reconstruct` and `aevae sample`: a trained model on your own images."""

from __future__ import annotations

from pathlib import Path

import click

model_argument = click.argument("model", metavar="MODEL")


@click.command()
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
    from aevae.inference.reconstruct import reconstruct_files

    scores = reconstruct_files(model, list(inputs), out, device=device)
    click.echo(f"{len(scores)} image(s): mean PSNR {scores['psnr'].mean():.2f} dB, SSIM {scores['ssim'].mean():.4f}, "
               f"LPIPS {scores['lpips'].mean():.4f}; wrote {out}/ and {out / 'scores.csv'}")


@click.command()
@model_argument
@click.option("-n", "n", default=16, show_default=True, type=click.IntRange(1, 1024), help="How many images.")
@click.option("--out", default="samples.png", show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--between", nargs=2, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Two images: also write the decoded line between them to <out>-interpolation.png.")
@click.option("--steps", default=8, show_default=True, type=click.IntRange(2, 64), help="Points on that line.")
def sample(model: str, n: int, out: Path, seed: int, between: tuple[Path, Path] | None, steps: int) -> None:
    """Draw N images from a generative model's prior, z ~ N(0, I), and optionally interpolate between two
    images through its latent space. MODEL: a checkpoint (models/vae/seed0/best.pt) or an MLflow model URI."""
    from aevae.inference.sample import sample_images

    sample_images(model, out, n=n, seed=seed, between=between or None, steps=steps)
    click.echo(f"wrote {out}" + (f" and {out.with_name(out.stem + '-interpolation.png')}" if between else ""))

