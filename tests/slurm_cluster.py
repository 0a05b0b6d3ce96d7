"""A real Slurm cluster (munged + slurmctld + one slurmd per node) in a directory, for tests and CI.

Everything it needs lives under `root`: its own slurm.conf, munge key and socket, state, spool, logs and pid
files (the sockets move to a short temporary directory when `root`'s path is long), and its own TCP ports picked
at start. So it clashes with neither a system Slurm or munge nor another cluster of this kind, and it needs no
systemd, no cgroups and no hostname setup. One node (the default) is called `localhost` (127.0.0.1) and declares
the machine's hardware. With `nodes=N` there are N slurmd daemons on this machine, node1..nodeN, each declaring
`cpus_per_node` CPUs (1 by default) with its own NodeAddr 127.0.1.k (all of 127/8 is loopback) and its own
`Port=`; `slurmd -N nodeK` picks its node's line, so Debian's build (no --enable-multiple-slurmd) runs them
fine, and %n in SlurmdSpoolDir, SlurmdPidFile and SlurmdLogFile gives each its own (log/slurmd-nodeK.log).
It runs as the user who starts it (the daemons and the jobs, SlurmUser and SlurmdUser: root is not needed,
since every job is that same user's). Install: `apt-get install -y --no-install-recommends slurmctld slurmd
slurm-client munge` (Debian 12: Slurm 22.05).

Job records outlive the jobs twice over: the controller keeps finished jobs for MinJobAge (an hour here), so
`scontrol show job` and `squeue --states=all` see them; and jobcomp/filetxt appends one line per finished job
(completed, failed, cancelled, never started) to `root/jobcomp.log`, read by `job_records()` or by
`sacct --completion`. Plain `sacct` has no data: there is no slurmdbd. A requeued job adds a line per ended
run, with the same JobId: JobState=PENDING after `scontrol requeue`, NODE_FAIL when its node was set DOWN.

Requeue, signals and time limits, as measured on this cluster (Slurm 22.05.8, KillWait=5, cred_expire=5):
- `scontrol requeue <id>` of a running --requeue job: the batch shell and every process below it get SIGCONT
  and SIGTERM at once, SIGKILL KillWait (5 s) later; the job is COMPLETING meanwhile, then PENDING
  (Reason=BeginTime) until cred_expire + 1 s after the kill, and runs again ~11 s after the requeue with
  SLURM_RESTART_COUNT=1 (unset on the first run), Restarts=1, the same job id (an array task keeps its
  `<array>_<task>`). With --open-mode=append the log keeps the first run's lines and slurmstepd's
  "*** JOB n ON node CANCELLED AT ... DUE TO JOB REQUEUE ***"; without it the log is truncated on the rerun.
- `--signal=B:USR1@50 --time=1`: USR1 (with a SIGCONT) reaches the batch shell only, not its children, at the
  controller's next 30 s time check after the 10 s mark (23 s after the start here; 20 s in a rerun). A trap
  that runs `scontrol requeue $SLURM_JOB_ID` requeues it as above (the trap's scontrol may itself be ended by
  the SIGTERM, exit 143, after the requeue is done). Without a requeue the job is killed for its time limit at
  the first 30 s check after 60 s (83 s here): SIGCONT + SIGTERM to all, SIGKILL 5 s later, state TIMEOUT.
  `--signal=USR1@50` without `B:` reaches no process of a batch script that runs no srun (only job steps).
- `scontrol update NodeName=n State=DOWN Reason=x` under a --requeue job: SIGCONT + SIGTERM at once, SIGKILL
  5 s later (the processes do die here); the job is PENDING (BeginTime) at once, Restarts=1, and starts on
  another node 6 s (cred_expire + 1) after: so a KillWait longer than that would let two runs overlap.
  The node stays `down` (ReturnToService=1) until State=RESUME, which makes it idle within a second.
- proctrack/linuxproc finds a job's processes by walking down from its slurmstepd: a child that survives the
  SIGTERM after its batch shell died is reparented to init and never gets the SIGKILL (scancel leaves it
  running). stop() kills such leftovers. (`setsid cmd &` in a batch script does not fork: $! is the new
  session's leader, and `wait $!` waits for it; it forks, and $! exits at once, only under job control.)
"""

from __future__ import annotations

import contextlib
import getpass
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
    """A cluster of `nodes` nodes under `root`: `with SlurmCluster(path) as cluster:` starts it and waits until
    every node is idle; `cluster.env` is the environment for sbatch/squeue/scontrol subprocesses;
    `cluster.nodes` the node names; leaving the block cancels every job and stops the daemons."""

    def __init__(self, root: Path, nodes: int = 1, cpus_per_node: int | None = None,
                 start_timeout: float = 30.0) -> None:
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, not {nodes}")
        self.root = Path(root).resolve()
        self.start_timeout = start_timeout
        # One node: `localhost` on 127.0.0.1 with the machine's hardware. More: node1..nodeN on 127.0.1.1..N,
        # each its own slurmd on its own port, declaring `cpus_per_node` CPUs (1 unless given).
        self.nodes: list[str] = ["localhost"] if nodes == 1 else [f"node{k}" for k in range(1, nodes + 1)]
        self.addresses: dict[str, str] = ({"localhost": "127.0.0.1"} if nodes == 1 else
                                          {name: f"127.0.1.{k}" for k, name in enumerate(self.nodes, 1)})
        self.cpus_per_node = cpus_per_node if cpus_per_node is not None or nodes == 1 else 1
        self.user = getpass.getuser()
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.log"
        self.logs = self.root / "log"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._socket_dir: Path | None = None  # a short directory for the sockets when root's path is too long
        self._spool: Path | None = None  # slurmd's spool (one folder per node when there are several)
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
        spools = [sockets / "spool"] if self.nodes == ["localhost"] else [sockets / "spool" / n for n in self.nodes]
        for sub in (self.root / "state", self.logs, self.root / "munge", *spools):
            sub.mkdir(parents=True, exist_ok=True)
        munge_dir = self.root / "munge"
        munge_socket = sockets / "munge.socket"
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)  # munged wants a key that only its owner can read
        self._spool = sockets / "spool"
        self.conf.write_text(self._slurm_conf(munge_socket, self._spool))
        try:
            # --force: a path munged distrusts (say a group-writable tmp dir) is a warning, not an exit
            self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={munge_socket}",
                                   f"--key-file={key}", f"--log-file={self.logs / 'munged.log'}",
                                   f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'seed'}"])
            self._wait(lambda: munge_socket.exists(), "munged to open its socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            # -N: the node's name in slurm.conf (`localhost` whatever the machine's hostname); each slurmd then
            # listens on its node's Port= and expands %n in its spool, pid and log file names
            for node in self.nodes:
                self._spawn(self._slurmd(node), ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait(self._nodes_idle, "every node to be idle in sinfo")
        except BaseException:
            self.stop()
            raise

    def _slurmd(self, node: str) -> str:
        """The key of a node's slurmd in `processes` and the stem of its .out file."""
        return "slurmd" if self.nodes == ["localhost"] else f"slurmd-{node}"

    def _slurm_conf(self, munge_socket: Path, spool: Path) -> str:
        root = self.root
        hardware = node_hardware()
        if self.cpus_per_node is not None:  # only CPUs: Slurm takes Sockets=CPUs, one core and thread each
            hardware = {"CPUs": str(self.cpus_per_node), "RealMemory": hardware.get("RealMemory", "1")}
        declared = " ".join(f"{key}={value}" for key, value in hardware.items())
        ctld_port, slurmd_port, *node_ports = free_ports(2 + len(self.nodes))
        if self.nodes == ["localhost"]:
            node_lines = [f"NodeName=localhost NodeAddr=127.0.0.1 {declared} State=UNKNOWN"]
            per_node = {"spool": spool, "log": self.logs / "slurmd.log", "pid": root / "slurmd.pid"}
        else:  # %n: each slurmd its own spool, log and pid file
            node_lines = [f"NodeName={node} NodeAddr={self.addresses[node]} Port={port} "
                          f"{declared} State=UNKNOWN" for node, port in zip(self.nodes, node_ports)]
            per_node = {"spool": spool / "%n", "log": self.logs / "slurmd-%n.log", "pid": root / "slurmd-%n.pid"}
        return "\n".join([
            "ClusterName=aevae-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            f"SlurmUser={self.user}",  # the daemons and the jobs run as whoever starts the cluster: root not needed
            f"SlurmdUser={self.user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: a requeued job is eligible again cred_expire + 1 s after its old run ended (120 s by
            # default), and a launch credential lives that long
            f"AuthInfo=socket={munge_socket},cred_expire=5",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={per_node['spool']}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={per_node['log']}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={per_node['pid']}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",  # no cgroups here
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",  # CPUs only: a job without --mem does not take the whole node's memory
            "SlurmdParameters=config_overrides",  # declared hardware wins, so a mismatch never drains the node
            # 1, not 2: a node set DOWN by scontrol stays down until State=RESUME (with 2 its slurmd's next message
            # brings it back at once, and a job requeued off it runs there again); one that stopped answering
            # comes back when its slurmd registers
            "ReturnToService=1",
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
            "KillWait=5",  # SIGTERM to SIGKILL, when a job is cancelled, requeued or runs out of time
            "JobRequeue=1",  # a batch job may be requeued (scontrol requeue, its node down) unless --no-requeue
            *node_lines,
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.logs / f"{name}.out", "ab") as out:  # the child keeps its own copy of the descriptor
            self.processes[name] = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _nodes_idle(self) -> bool:
        return all(state == "idle" for state in self.node_states().values()) and bool(self.node_states())

    def node_states(self) -> dict[str, str]:
        """Each node's state as sinfo says it (idle, mixed, allocated, down, drained, ... with a * when its
        slurmd does not answer); {} when the controller does not answer."""
        result = self.run("sinfo", "--noheader", "--Node", "--format=%N %T", check=False)
        if result.returncode != 0:
            return {}
        return dict(line.split() for line in result.stdout.splitlines() if line.strip())

    def set_node(self, name: str, state: str, reason: str = "test") -> None:
        """`scontrol update NodeName=name State=state Reason=reason`: DOWN (its jobs are killed, requeueable
        ones requeued), DRAIN, RESUME (back to idle)..."""
        args = [f"NodeName={name}", f"State={state}"]
        if state.upper() not in ("RESUME", "IDLE", "UNDRAIN"):
            args.append(f"Reason={reason}")
        self.run("scontrol", "update", *args)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job --oneliner job_id` as a dict (JobState, Reason, Restarts, NodeList, BatchHost...);
        for an array given as `<array>_<task>`, that task. Values with spaces are cut short."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def node_of(self, job_id: str) -> str:
        """The node(s) a job runs or last ran on (scontrol's NodeList; `(null)` when it never ran)."""
        return self.job(job_id).get("NodeList", "")

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
        stems = ["munged", "slurmctld", *(self._slurmd(node) for node in self.nodes)]
        names = [f"{stem}.{ext}" for stem in stems for ext in ("log", "out")]
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

    def _kill_leftover_jobs(self) -> None:
        """SIGKILLs what this cluster's jobs left running after the daemons ended: a slurmstepd is no child of
        slurmd and lives on when the daemons end before it is done, and proctrack/linuxproc only finds a job's
        processes by walking the process tree down from its slurmstepd, so a child that survived SIGTERM after
        its batch shell died (reparented to init) never gets the SIGKILL (see the module's notes). Recognised by
        their batch script's path in this cluster's spool or by SLURM_JOB_ID with this cluster's SLURM_CONF in
        their environment, so another cluster's jobs are never touched."""
        if self._spool is None:
            return
        marker, conf = f"{self._spool}/".encode(), f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                ours = marker in (entry / "cmdline").read_bytes() or (
                    conf in environ and any(item.startswith(b"SLURM_JOB_ID=") for item in environ))
                if not ours:
                    continue
                pid = int(entry.name)
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if (Path("/proc") / str(parent) / "comm").read_text().strip() == "slurmstepd":
                    os.kill(parent, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue

    def stop(self) -> None:
        """Cancels every job, waits for them to leave the nodes, then ends every slurmd, slurmctld and munged,
        and kills what the jobs left running."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", f"--user={os.getuid()}", check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                active = self.run("squeue", "--noheader", "--states=RUNNING,COMPLETING,CONFIGURING",
                                  "--format=%i", check=False)
                if active.returncode != 0 or not active.stdout.strip():
                    break
                time.sleep(0.2)
        slurmds = [self._slurmd(node) for node in self.nodes]
        for name in [*slurmds, "slurmctld", "munged"]:
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
        self._kill_leftover_jobs()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
