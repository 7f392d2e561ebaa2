"""Signals at any moment: SIGTERM/SIGUSR1 from process start to exit end in a clean exit 75,
with a loadable checkpoint when training had started, never a hang and never a bad `latest`.

The trainer runs under the `deepspeed` launcher (its runner, `python -m deepspeed.launcher.runner`,
is what the `deepspeed` command runs) with 2 CPU ranks, and a test signals rank processes
directly, as Slurm does: during start-up (imports, before the old trainer installed its handlers
~20 s in), in the first step, and while a checkpoint is being written. One rank alone or both at
different moments: the ranks must agree and leave together. The launcher's exit code is the
ranks' (it stops the other ranks once one has exited non-zero, so they must be past every
collective by then).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from trainer_launch import DeepSpeedLaunch

TIMEOUT_S = 600

pytestmark = pytest.mark.slow


class Launch(DeepSpeedLaunch):
    """`deepspeed --num_gpus 2 --module ds_linclip.train OVERRIDES` with its output in a log file."""

    def __init__(self, shards: Path, out: Path, name: str, *overrides: str):
        self.run = out / name
        args = [
            "model.preset=tiny", f"data.train_shards={shards}/train/shard-{{000000..000011}}.tar", "data.workers=1",
            f"train.output_dir={out}", f"train.run_name={name}", "train.steps=40", "train.micro_batch_size=8",
            "train.precision=fp32", "train.zero_stage=1", "train.warmup_steps=2", "train.log_every=1",
            "train.keep_last=2", *overrides,
        ]
        super().__init__(args, out / f"{name}.log", TIMEOUT_S)

    def ranks(self) -> dict[int, "psutil.Process"]:  # noqa: F821
        """local rank -> the rank's process (the launcher's children; not their loader workers)."""
        import psutil

        found = {}
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return found
        for child in children:
            try:
                cmdline, parent = child.cmdline(), child.parent()
                if "ds_linclip.train" in cmdline and parent and "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
                    found[next(int(a.split("=")[1]) for a in cmdline if a.startswith("--local_rank="))] = child
            except (psutil.Error, StopIteration):
                pass
        return found

    def signal(self, rank: int, sig: int) -> None:
        self.ranks()[rank].send_signal(sig)


def _latest(run: Path) -> str | None:
    path = run / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def _assert_loadable(run: Path, tag: str, latest: bool = True) -> None:
    """A complete checkpoint (`latest` by default): every rank's client state, and the fp32 weights rebuild."""
    from ds_linclip.eval.checkpoint import load_checkpoint
    from ds_linclip.train.checkpoint import resolve_resume

    save_dir = run / "checkpoints"
    if latest:
        assert resolve_resume("auto", save_dir) == (save_dir, tag)
    assert sorted(p.name for p in (save_dir / tag / "client_state").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    loaded = load_checkpoint(save_dir / tag)
    assert loaded.step == int(tag.split("_")[1]) and loaded.model.logit_scale.shape == ()


def test_signal_during_start_up_exits_75_before_training(fmnist_shards, tmp_path):
    """One rank gets SIGUSR1 a moment after it started (importing torch): both ranks leave at the
    first agreement point, before any step, with nothing to checkpoint."""
    launch = Launch(fmnist_shards, tmp_path, "init")
    launch.wait_until(lambda: len(launch.ranks()) == 2, "the two rank processes", poll=0.01)
    time.sleep(1.0)  # the rank is past the interpreter's start-up, inside its imports or init
    launch.signal(1, signal.SIGUSR1)
    code = launch.wait()
    log = launch.text()
    assert code == 75, f"exit {code}\n{launch.tail()}"
    assert "got SIGUSR1" in log and "before any training step: nothing new to checkpoint; exit 75" in log
    assert "stopped on SIGUSR1" in log  # rank 0 reports the signal rank 1 got
    assert "Traceback" not in log and "step 1/40" not in log
    assert _latest(launch.run) is None


def test_signal_in_the_first_step_checkpoints_it(fmnist_shards, tmp_path):
    launch = Launch(fmnist_shards, tmp_path, "first_step", "train.checkpoint_every=0")
    launch.wait_until(lambda: "2 rank(s), micro batch 8" in launch.text(), "the start of training", poll=0.005)
    launch.signal(0, signal.SIGTERM)
    code = launch.wait()
    assert code == 75, f"exit {code}\n{launch.tail()}"
    tag = _latest(launch.run)
    assert tag in ("step_00000001", "step_00000002"), launch.tail()  # the step in flight, or the next
    assert f"stopped at step {int(tag[5:])} on SIGTERM; exit 75 for requeue" in launch.text()
    assert "Traceback" not in launch.text()
    _assert_loadable(launch.run, tag)


def test_signal_during_a_checkpoint_save_keeps_latest_complete(fmnist_shards, tmp_path):
    """Both ranks get SIGTERM, a moment apart, while checkpoint step 3 is being written (its folder
    exists, `latest` does not name it yet): the save completes, the next step is checkpointed too,
    exit 75, and `latest` never named a half-written tag."""
    launch = Launch(fmnist_shards, tmp_path, "save", "train.checkpoint_every=3")
    save_dir = launch.run / "checkpoints"
    launch.wait_until(lambda: len(launch.ranks()) == 2, "the two rank processes", poll=0.01)
    ranks = launch.ranks()  # looked up now: the signals below must not wait for a process scan
    launch.wait_until(lambda: (save_dir / "step_00000003").is_dir(), "the save of step 3", poll=0.002)
    ranks[1].send_signal(signal.SIGTERM)
    latest_at_signal = _latest(launch.run)  # read after the signal: still unset = it landed mid-save
    time.sleep(0.05)
    ranks[0].send_signal(signal.SIGTERM)
    code = launch.wait()
    log = launch.text()
    assert code == 75, f"exit {code}\n{launch.tail()}"
    assert latest_at_signal is None, "the signal came after the save had finished: the test did not hit the save"
    assert _latest(launch.run) == "step_00000004", launch.tail()
    assert "stopped at step 4 on SIGTERM; exit 75 for requeue" in log and "Traceback" not in log
    _assert_loadable(launch.run, "step_00000004")
    _assert_loadable(launch.run, "step_00000003", latest=False)
