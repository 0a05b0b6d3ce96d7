"""aevae: a reproducible AutoEncoder-vs-VAE experiment pipeline (DVC + MLflow)."""

__version__ = "0.1.0"


class AevaeError(Exception):
    """An error the user can fix: the message names the file or key and how to fix it."""
