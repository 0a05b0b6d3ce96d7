"""A real one-node Slurm cluster (munged + slurmctld + slurmd) in a directory, for tests and CI.

Everything it needs lives under `root`: its own slurm.conf, munge key and socket, state, spool, logs and pid
files (the sockets move to a short temporary directory when `root`'s path is long), and its own TCP ports picked
at start. So it clashes with neither a system Slurm or munge nor another cluster of this kind, and it needs no
systemd, no cgroups and no hostname setup: the node is called `localhost`.
It runs as root (the daemons and the jobs). Install: `apt-get install -y --no-install-recommends slurmctld
slurmd slurm-client munge` (Debian 12: Slurm 22.05).

Job records outlive the jobs twice over: the controller keeps finished jobs for MinJobAge (an hour here), so
`scontrol show job` and `squeue --states=all` see them; and jobcomp/filetxt appends one line per finished job
(completed, failed, cancelled, never started) to `root/jobcomp.log`, read by `job_records()` or by
`sacct --completion`. Plain `sacct` has no data: there is no slurmdbd.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

DAEMONS = ("munged", "slurmctld", "slurmd")
BINARIES = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", *DAEMONS)


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on now (the kernel picks them; all are held
    open together so none is picked twice), so the cluster never meets a system Slurm on 6817/6818."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def node_hardware() -> dict[str, str]:
    """The machine as `slurmd -C` sees it (CPUs, Boards, SocketsPerBoard, ..., RealMemory), so the node's
    declared hardware matches what slurmd registers and the controller does not drain it."""
    slurmd = shutil.which("slurmd", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    out = subprocess.run([slurmd or "slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return {key: fields[key] for key in keys if key in fields}


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file, or a note that it does not exist."""
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class SlurmCluster:
    """A one-node cluster under `root`: `with SlurmCluster(path) as cluster:` starts it and waits until the
    node is idle; `cluster.env` is the environment for sbatch/squeue/scontrol subprocesses; leaving the block
    cancels every job and stops the daemons."""

    def __init__(self, root: Path, start_timeout: float = 30.0) -> None:
        self.root = Path(root).resolve()
        self.start_timeout = start_timeout
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.log"
        self.logs = self.root / "log"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._socket_dir: Path | None = None  # a short directory for the sockets when root's path is too long
        self.env: dict[str, str] = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)  # SLURM_* from an enclosing job would redirect sbatch's defaults
        # The daemons live in /usr/sbin, which a non-login shell's PATH may lack.
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), "/usr/sbin", "/sbin"])

    @staticmethod
    def is_installed() -> bool:
        """Whether the Slurm client and daemons and munged are on PATH (or in /usr/sbin)."""
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        return all(shutil.which(name, path=path) for name in BINARIES)

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A Slurm client command (`run("squeue", "-h")`) against this cluster; stdout and stderr captured."""
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def start(self) -> None:
        """Writes the key and slurm.conf, starts munged, slurmctld and slurmd in the foreground as our children
        (so stop() can end them by pid), and waits for the node to be idle."""
        # Unix sockets live in slurmd's spool (one per job step, ~30 bytes of name) and munge's directory, and a
        # socket's path has at most 107 bytes: under a long root they go to a short directory of their own.
        sockets = self.root / "run"
        if len(str(sockets)) > 60:
            self._socket_dir = sockets = Path(tempfile.mkdtemp(prefix="slurm-"))
        for sub in (self.root / "state", self.logs, self.root / "munge", sockets / "spool"):
            sub.mkdir(parents=True, exist_ok=True)
        munge_dir = self.root / "munge"
        munge_socket = sockets / "munge.socket"
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)  # munged wants a key that only its owner can read
        self.conf.write_text(self._slurm_conf(munge_socket, sockets / "spool"))
        try:
            # --force: a path munged distrusts (say a group-writable tmp dir) is a warning, not an exit
            self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={munge_socket}",
                                   f"--key-file={key}", f"--log-file={self.logs / 'munged.log'}",
                                   f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'seed'}"])
            self._wait(lambda: munge_socket.exists(), "munged to open its socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            # -N: the node is `localhost` whatever the machine's hostname
            self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
            self._wait(self._node_idle, "the node to be idle in sinfo")
        except BaseException:
            self.stop()
            raise

    def _slurm_conf(self, munge_socket: Path, spool: Path) -> str:
        root = self.root
        hardware = " ".join(f"{key}={value}" for key, value in node_hardware().items())
        ctld_port, slurmd_port = free_ports(2)
        return "\n".join([
            "ClusterName=aevae-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd.log'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",  # no cgroups here
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",  # CPUs only: a job without --mem does not take the whole node's memory
            "SlurmdParameters=config_overrides",  # declared hardware wins, so a mismatch never drains the node
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "MinJobAge=3600",  # finished jobs stay in the controller (scontrol show job, squeue -t all) an hour
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",  # pending jobs (dependencies) are looked at every second
            "MailProg=/bin/true",
            "InactiveLimit=0",
            "KillWait=5",
            f"NodeName=localhost NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.logs / f"{name}.out", "ab") as out:  # the child keeps its own copy of the descriptor
            self.processes[name] = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _node_idle(self) -> bool:
        result = self.run("sinfo", "--noheader", "--nodes=localhost", "--format=%T", check=False)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if ready():
                return
            dead = [name for name, proc in self.processes.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"timed out after {self.start_timeout:.0f} s"
                raise RuntimeError(f"Slurm cluster in {self.root}: waiting for {what}: {why}\n{self.log_tails()}")
            time.sleep(0.2)

    def log_tails(self, lines: int = 30) -> str:
        """The ends of the daemons' logs and captured output, for an error message."""
        names = [f"{name}.{ext}" for name in DAEMONS for ext in ("log", "out")]
        return "\n".join(f"--- {name}\n{tail(self.logs / name, lines)}" for name in names
                         if (self.logs / name).exists())

    def job_records(self) -> list[dict[str, str]]:
        """One dict per finished job from the jobcomp file, in the order they finished: JobId, Name, JobState
        (COMPLETED, FAILED, CANCELLED, TIMEOUT...), ExitCode ("3:0"), StartTime, EndTime, NodeCnt (0: never ran),
        WorkDir... An array task also has ArrayJobId and ArrayTaskId, and its JobId is its own id (the last task
        keeps the array's). Values are split on spaces, so a job name or directory with a space is cut short."""
        if not self.jobcomp.exists():
            return []
        records = []
        for line in self.jobcomp.read_text().splitlines():
            records.append(dict(item.split("=", 1) for item in line.split() if "=" in item))
        return records

    def stop(self) -> None:
        """Cancels every job, waits for them to leave the node, then ends slurmd, slurmctld and munged."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", f"--user={os.getuid()}", check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                active = self.run("squeue", "--noheader", "--states=RUNNING,COMPLETING,CONFIGURING",
                                  "--format=%i", check=False)
                if active.returncode != 0 or not active.stdout.strip():
                    break
                time.sleep(0.2)
        for name in reversed(DAEMONS):
            proc = self.processes.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
