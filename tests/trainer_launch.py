"""Launching the trainer from tests: a free port and `deepspeed --module ds_linclip.train` on CPU ranks.

One place for what the launcher tests (training signals, linearisation) share: the CPU environment,
the launcher in its own process group with its output in a log file, waiting with a deadline, and
killing the whole group (launcher, ranks, their data-loader workers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict[str, str]:
    """This environment for a CPU run of the repo: DeepSpeed's CPU accelerator, one thread per rank,
    and no distributed variables of an outer launcher."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


class DeepSpeedLaunch:
    """`deepspeed --num_gpus WORLD --module ds_linclip.train ARGS` in its own process group, output in `log`."""

    def __init__(self, args: list[str], log: Path, timeout: float, world: int = 2):
        self.log, self.timeout, self.port = log, timeout, free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_port",
             str(self.port), "--module", "ds_linclip.train", *args],
            env=cpu_env(), cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def shm_buffers(self) -> list[Path]:
        """DeepSpeed's shared-memory allreduce buffers still named in /dev/shm for this launch's port."""
        from ds_linclip.train.engine import SHM_BUFFER_PREFIX

        return sorted(Path("/dev/shm").glob(f"{SHM_BUFFER_PREFIX}_*_{self.port}_*"))

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher, the ranks, their loader workers
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float | None = None,
                   poll: float = 0.1) -> None:
        """Poll `predicate`; fail (killing the group on a timeout) if the launcher exits or time runs out first."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(f"the launcher exited ({self.proc.returncode}) while waiting for {what}\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}\n{self.tail()}")
            time.sleep(poll)

    def wait(self) -> int:
        """The launcher's exit code; fails (killing the group) if it does not exit within the timeout."""
        try:
            return self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"no exit within {self.timeout}s\n{self.tail()}")


def steps_logged(run_dir: Path, rank: int = 0) -> int:
    """The last step a rank logged to its `train.log_sample_keys` file (0 before the first)."""
    path = run_dir / "sample_keys" / f"rank_{rank:05d}.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    return int(lines[-1].split("\t")[0]) if lines else 0
