"""A real one-node SLURM cluster on localhost (munged + slurmctld + slurmd), for tests of the sbatch scripts.

Needs root (the daemons, the munge key) and Debian's ``slurm-wlm`` and ``munge`` packages, which
:func:`ensure_slurm_installed` installs with apt-get when ``sbatch`` is missing. Every daemon writes its state, logs
and pid file under one directory; :meth:`SlurmCluster.stop` ends exactly the daemons this module started, by their
pid files, so a munged or SLURM that was already running on the machine is left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import process_alive

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_PID_FILE = MUNGE_RUN_DIR / "munged.pid"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (tests skip with it)."""


def ensure_slurm_installed() -> None:
    """Install slurm-wlm and munge with apt-get when ``sbatch`` is missing; raise SlurmUnavailable if impossible."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("a local SLURM needs root (daemons, munge key)")
    if all(shutil.which(tool) for tool in ("sbatch", "slurmctld", "slurmd", "munged")):
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("sbatch is missing and there is no apt-get to install slurm-wlm and munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _slurm_conf(root: Path, host: str, cpus: int) -> str:
    # proctrack/linuxproc and task/none: no cgroups needed, so this also runs inside containers. Ports of its own so
    # that a second test session (or a system SLURM) on the same machine does not collide with this one.
    return f"""\
ClusterName=local
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    host: str
    cpus: int
    pid_files: list[Path] = field(default_factory=list)  # daemons started here, stopped in reverse order

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for SLURM commands (and the jobs they submit) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env=env or self.env(), cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited {done.returncode}: {done.stderr.strip()}")
        return done

    def submit(self, script: Path, args: list[str], sbatch_flags: list[str], env: dict[str, str],
               cwd: Path) -> int:
        """``sbatch`` a script from ``cwd`` (the job's submit directory); returns the job id."""
        done = self.run("sbatch", "--parsable", *sbatch_flags, str(script), *args, env=self.env(env), cwd=cwd)
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...); {} once SLURM forgot the job."""
        done = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if done.returncode != 0:
            return {}
        return dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)

    def wait_job(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job's state is one of ``states``; TimeoutError with the last state otherwise."""
        wait_until(lambda: self.job(job_id).get("JobState") in states, timeout, f"job {job_id} to be in {states}",
                   lambda: str(self.job(job_id)))
        return self.job(job_id)

    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id), check=False)

    def idle(self) -> bool:
        done = self.run("sinfo", "-h", "-n", self.host, "-o", "%t", check=False)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def stop(self) -> None:
        for pid_file in reversed(self.pid_files):
            _stop_by_pid_file(pid_file)
        self.pid_files.clear()


def _stop_by_pid_file(pid_file: Path, timeout: float = 15.0) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, IndexError):
        return
    try:
        wait_until(lambda: not process_alive(pid), timeout, f"pid {pid} ({pid_file.name}) to exit")
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munge(cluster: SlurmCluster) -> None:
    """Reuse a working munged; else create the key if absent and start one (recorded for stop())."""
    if _munge_works():
        return
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
    MUNGE_RUN_DIR.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_RUN_DIR, "munge", "munge")
    done = subprocess.run(["munged", "--force"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise SlurmUnavailable(f"munged did not start: {done.stderr.strip()}")
    cluster.pid_files.append(MUNGE_PID_FILE)
    wait_until(_munge_works, 10, "munged to answer")


def wait_until(ready: Callable[[], bool], timeout: float, what: str,
               last_seen: Callable[[], str] | None = None) -> None:
    """Poll ``ready`` until true; TimeoutError naming ``what`` (and ``last_seen()``, if given) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    seen = f"; last seen: {last_seen()}" if last_seen else ""
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{seen}")


def start_cluster(root: Path, cpus: int | None = None) -> SlurmCluster:
    """Install if needed, write slurm.conf under ``root`` and start the daemons; the node is idle on return.

    On failure every daemon already started is stopped again and SlurmUnavailable names the log to read.
    """
    ensure_slurm_installed()
    host = socket.gethostname().split(".")[0]  # what `hostname -s` prints: slurmd finds its NodeName by it
    cluster = SlurmCluster(root=root, host=host, cpus=cpus or os.cpu_count() or 1)
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cluster.conf.write_text(_slurm_conf(root, host, cluster.cpus))
    try:
        _start_munge(cluster)
        for daemon in ("slurmctld", "slurmd"):
            done = subprocess.run([daemon, "-f", str(cluster.conf)], capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise SlurmUnavailable(f"{daemon} did not start: {done.stderr.strip()} (see {root}/{daemon}.log)")
            cluster.pid_files.append(root / f"{daemon}.pid")
        wait_until(cluster.idle, 30, f"node {host} to be idle (see {root}/slurmctld.log, {root}/slurmd.log)")
    except TimeoutError as err:
        cluster.stop()
        raise SlurmUnavailable(str(err)) from err
    except BaseException:
        cluster.stop()
        raise
    return cluster
