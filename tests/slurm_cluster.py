"""A real one-node Slurm cluster on this machine, for tests and CI (no systemd, no slurmdbd).

    python tests/slurm_cluster.py up       # start munged + slurmctld + slurmd; prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py status   # daemons, node state; exit 1 if not up
    python tests/slurm_cluster.py down     # stop the daemons by their PID files

From Python (the pytest fixture in tests/test_slurm.py): `cluster = LocalSlurm(); cluster.up()`,
then run Slurm commands with `env=cluster.env()`; `cluster.down()` at the end.

Everything lives under one directory (`DS_LINCLIP_SLURM_DIR`, default /tmp/ds_linclip_slurm):
slurm.conf, its own munge key and socket (so a system munged, if any, is left alone), state,
spool, logs and PID files. Ports are picked free at the first `up` and kept in slurm.conf.
Needs root (slurmd launches jobs as their user; munged runs as the `munge` user) and the Debian
packages `slurmctld slurmd slurm-client munge`.

Settings measured to work in a container without systemd or cgroups: proctrack/linuxproc,
task/none, select/cons_tres with CR_Core, SlurmUser=root, ReturnToService=2. No accounting
(`sacct` fails): submitit still sees a job end through its result file.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("DS_LINCLIP_SLURM_DIR", "/tmp/ds_linclip_slurm"))
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order; start order is the reverse
REQUIRED_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
APT_PACKAGES = "slurmctld slurmd slurm-client munge"
PARTITION = "debug"


class ClusterUnavailable(RuntimeError):
    """Slurm cannot run here (not installed, not root); the message says which and how to fix it."""


def unavailable_reason() -> str | None:
    """Why a local Slurm cluster cannot be started on this machine, or None if it can."""
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}); apt-get install -y {APT_PACKAGES}"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no `munge` user (the munge package creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie counts as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _node_name() -> str:
    """This machine's short host name, the Slurm node name; `localhost` if the name does not
    resolve (jobs use the node name as MASTER_ADDR, so it must resolve)."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
    except OSError:
        return "localhost"
    return name


class LocalSlurm:
    def __init__(self, root: Path | str = DEFAULT_DIR):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.hostname = _node_name()

    # ---- paths --------------------------------------------------------------------------------
    def pid_file(self, daemon: str) -> Path:
        if daemon == "munged":
            return self.munge_dir / "munged.pid"
        return self.root / "run" / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        if daemon == "munged":
            return self.munge_dir / "munged.log"
        return self.root / "log" / f"{daemon}.log"

    def env(self, base: dict | None = None) -> dict:
        """Environment for Slurm client commands (sbatch, squeue, submitit) talking to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def pid(self, daemon: str) -> int | None:
        try:
            pid = int(self.pid_file(daemon).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    # ---- state ----------------------------------------------------------------------------------
    def node_state(self) -> str | None:
        """`idle`, `alloc`, `down*`, ... of our node as sinfo reports it; None if slurmctld does not answer."""
        if not self.conf.exists():
            return None
        try:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], env=self.env(), capture_output=True, text=True, timeout=10
            )
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0 or not out.stdout.strip():
            return None
        return out.stdout.split()[0]

    def is_up(self) -> bool:
        return all(self.pid(d) for d in DAEMONS) and self.node_state() in ("idle", "mixed", "allocated", "completing")

    # ---- bring-up -----------------------------------------------------------------------------
    def _node_line(self) -> str:
        """slurmd -C's own description of this machine (CPUs, sockets, cores, RealMemory), renamed."""
        out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        line = next(l for l in out.splitlines() if l.startswith("NodeName="))
        fields = dict(item.split("=", 1) for item in line.split())
        fields.pop("NodeName")
        desc = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"NodeName={self.hostname} NodeAddr=127.0.0.1 {desc} State=UNKNOWN"

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        r = self.root
        self.conf.write_text(
            f"""# written by tests/slurm_cluster.py: one node, this machine
ClusterName=linclip
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd.%n
SlurmctldPidFile={self.pid_file('slurmctld')}
SlurmdPidFile={self.pid_file('slurmd')}
SlurmctldLogFile={self.log_file('slurmctld')}
SlurmdLogFile={self.log_file('slurmd')}
SlurmctldDebug=info
SlurmdDebug=info
# containers without systemd/cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
# requeue and signals are what the tests exercise
JobRequeue=1
KillWait=30
# completed jobs stay visible to squeue/scontrol for a while (there is no accounting DB)
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
{self._node_line()}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        self.munge_dir.chmod(0o755)
        key = self.munge_dir / "munge.key"
        if not key.exists():  # our own key: a system munged (if any) keeps its own
            key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        for stale in (self.munge_socket, Path(str(self.munge_socket) + ".lock")):
            stale.unlink(missing_ok=True)
        subprocess.run(
            [
                "munged", f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={self.pid_file('munged')}", f"--log-file={self.log_file('munged')}",
                f"--seed-file={self.munge_dir / 'munged.seed'}", "--force",
            ],
            user=munge.pw_uid, group=munge.pw_gid, check=True, capture_output=True, text=True,
        )

    def _start(self, daemon: str, *args: str) -> None:
        log = self.log_file(daemon)
        result = subprocess.run(
            [daemon, "-f", str(self.conf), *args], env=self.env(), capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{daemon} failed to start (exit {result.returncode}): {result.stderr.strip()}\n"
                f"see {log}:\n{self._tail(log)}"
            )

    @staticmethod
    def _tail(path: Path, lines: int = 20) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def up(self, timeout: float = 60.0) -> float:
        """Start whatever is not running and wait until the node is idle; seconds it took."""
        start = time.monotonic()
        if self.is_up():
            return 0.0
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        self.down()  # half-up leftovers
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_conf()
        try:
            self._start_munged()
        except subprocess.CalledProcessError as err:
            raise RuntimeError(
                f"munged failed to start: {err.stderr.strip()}\n{self._tail(self.log_file('munged'))}"
            ) from None
        # -c: a clean start (no state from an earlier cluster in this dir)
        self._start("slurmctld", "-c")
        self._start("slurmd", "-N", self.hostname)
        deadline = start + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.node_state()
            if state == "idle":
                return time.monotonic() - start
            if state and state.startswith(("down", "drain")) and time.monotonic() - start > 10:
                # a node that registers with less than configured is drained; ask once to resume it
                subprocess.run(
                    ["scontrol", "update", f"NodeName={self.hostname}", "State=RESUME"],
                    env=self.env(), capture_output=True,
                )
            time.sleep(0.2)
        raise RuntimeError(
            f"the Slurm node is not idle after {timeout:.0f}s (state {state!r});\n"
            f"slurmctld log:\n{self._tail(self.log_file('slurmctld'))}\n"
            f"slurmd log:\n{self._tail(self.log_file('slurmd'))}"
        )

    def down(self, timeout: float = 20.0) -> None:
        """Cancel jobs, then stop the daemons by their PID files (TERM, then KILL)."""
        if self.pid("slurmctld"):
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env(), capture_output=True, timeout=20)
        for daemon in DAEMONS:
            pid = self.pid(daemon)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    def status(self) -> str:
        lines = [f"dir: {self.root}", f"SLURM_CONF={self.conf}"]
        for daemon in reversed(DAEMONS):
            pid = self.pid(daemon)
            lines.append(f"{daemon}: {'running, pid ' + str(pid) if pid else 'not running'}")
        lines.append(f"node {self.hostname}: {self.node_state() or 'no answer from slurmctld'}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start/stop a one-node Slurm cluster on this machine (root, Debian slurm packages).",
        epilog="`eval \"$(python tests/slurm_cluster.py up)\"` starts it and sets SLURM_CONF in your shell.",
    )
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help=f"cluster directory (default {DEFAULT_DIR}; env DS_LINCLIP_SLURM_DIR)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the node to be idle")
    args = parser.parse_args(argv)
    cluster = LocalSlurm(args.dir)
    if args.action == "up":
        try:
            seconds = cluster.up(timeout=args.timeout)
        except ClusterUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 3
        print(f"Slurm cluster up in {seconds:.1f}s (node {cluster.hostname}, dir {cluster.root})", file=sys.stderr)
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    if args.action == "down":
        cluster.down()
        print("Slurm cluster stopped", file=sys.stderr)
        return 0
    print(cluster.status())
    return 0 if cluster.is_up() else 1


if __name__ == "__main__":
    raise SystemExit(main())
