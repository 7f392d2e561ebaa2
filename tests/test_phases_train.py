"""Phases and patch dropout through the real trainer under the `deepspeed` launcher on 2 CPU ranks.

- kill -9 across a phase boundary, twice (once with the checkpoint before the boundary, once after
  it), resumed with `auto`: the same steps, losses and samples, in the same order, as an
  uninterrupted run, and TensorBoard's `train/phase` / `train/image_size` per step;
- patch dropout with the local branch under ZeRO-3 with activation checkpointing, across phases.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_train import event_files, sample_timeline, scalars
from trainer_launch import DeepSpeedLaunch, steps_logged

TIMEOUT_S = 900
WORLD = 2
STEPS = 12
BATCH = 8
# 6 steps at 16 px (16 patches of the tiny 4 px grid) dropping half, then 6 at 32 px keeping all
PHASES = "train.phases=[{steps: 6, image_size: 16, patch_dropout: 0.5}, {steps: 6}]"

pytestmark = pytest.mark.slow


def _launch(shards: Path, out: Path, name: str, log_name: str, *overrides: str) -> DeepSpeedLaunch:
    args = [
        "model.preset=tiny", "model.image.attention=linear-focused", "model.image.local_kernel=3",
        f"data.train_shards={shards}/train/shard-{{000000..000011}}.tar", "data.workers=1",
        f"train.output_dir={out}", f"train.run_name={name}", f"train.steps={STEPS}", f"train.micro_batch_size={BATCH}",
        "train.precision=fp32", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=1",
        "train.checkpoint_every=4", "train.keep_last=3", "train.log_sample_keys=true", "train.resume=auto", PHASES,
        *overrides,
    ]
    return DeepSpeedLaunch(args, out / f"{log_name}.log", TIMEOUT_S, world=WORLD)


def _latest(run: Path) -> str | None:
    path = run / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def _kill_when(launch: DeepSpeedLaunch, run: Path, checkpoint: str, step: int) -> str:
    """kill -9 the launcher, its ranks and their workers once `checkpoint` is latest and `step` ran."""
    launch.wait_until(lambda: _latest(run) == checkpoint and steps_logged(run) >= step,
                      f"{checkpoint} and step {step}")
    launch.kill()
    assert not (run / "DONE").exists()
    assert not launch.shm_buffers(), "a killed run left DeepSpeed's shm buffers in /dev/shm"
    return _latest(run)


def test_kill9_across_a_phase_boundary_resumes_into_the_phase(fmnist_shards, tmp_path):
    reference = _launch(fmnist_shards, tmp_path, "reference", "reference")
    assert reference.wait() == 0, reference.tail()
    reference_run = tmp_path / "reference"
    ref_log = reference.text()
    assert "step 1: phase 0: steps 1-6 (6), 16 px, patch dropout 0.5" in ref_log
    assert "step 7: phase 1: steps 7-12 (6), 32 px, patch dropout 0" in ref_log
    ref_events = event_files(reference_run)[-1]
    assert scalars(ref_events, "train/phase") == {s: 0.0 if s <= 6 else 1.0 for s in range(1, STEPS + 1)}
    assert scalars(ref_events, "train/image_size") == {s: 16.0 if s <= 6 else 32.0 for s in range(1, STEPS + 1)}

    run = tmp_path / "killed"
    # 1: killed in phase 1 (step 7+) with the last checkpoint in phase 0 (step 4)
    first = _launch(fmnist_shards, tmp_path, "killed", "killed_1")
    killed_at = [_kill_when(first, run, "step_00000004", 7)]
    # 2: resumes into phase 0 at step 4, crosses the boundary again; killed after the step-8 checkpoint
    second = _launch(fmnist_shards, tmp_path, "killed", "killed_2")
    killed_at.append(_kill_when(second, run, "step_00000008", 9))
    # 3: resumes into phase 1 at step 8 and finishes
    third = _launch(fmnist_shards, tmp_path, "killed", "killed_3")
    assert third.wait() == 0, third.tail()
    assert not third.shm_buffers() and not reference.shm_buffers()  # nothing left in RAM by finished runs
    assert killed_at[0] == "step_00000004", "the run got past the step-8 checkpoint before the kill"
    second_log, third_log = second.text(), third.text()
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4" in second_log
    assert "step 5: phase 0: steps 1-6 (6), 16 px, patch dropout 0.5" in second_log
    assert "step 7: phase 1: steps 7-12 (6), 32 px, patch dropout 0" in second_log
    assert f"resumed from {run / 'checkpoints' / 'step_00000008'} at step 8" in third_log
    assert "step 9: phase 1: steps 7-12 (6), 32 px, patch dropout 0" in third_log

    # the same losses as the uninterrupted run: same samples, same resolution, same dropped patches
    ref_losses = scalars(ref_events, "train/loss")
    resumed_losses = scalars(event_files(run)[-1], "train/loss")
    assert sorted(resumed_losses) == list(range(9, STEPS + 1))
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), (step, loss, ref_losses[step])
    second_losses = scalars(event_files(run)[-2], "train/loss")
    for step in range(5, 9):
        assert second_losses[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), step
    assert scalars(event_files(run)[-1], "train/phase") == {s: 1.0 for s in range(9, STEPS + 1)}

    # every rank: each step's samples exactly those of the uninterrupted run, none twice, none skipped
    for rank in range(WORLD):
        timeline = sample_timeline(run, rank)
        assert sorted(timeline) == list(range(1, STEPS + 1))
        keys = [key for step in sorted(timeline) for key in timeline[step]]
        assert len(keys) == len(set(keys)) == STEPS * BATCH
        assert timeline == sample_timeline(reference_run, rank)


def test_patch_dropout_under_zero3_with_activation_checkpointing(fmnist_shards, tmp_path):
    launch = _launch(fmnist_shards, tmp_path, "zero3", "zero3", "train.zero_stage=3", "train.grad_checkpointing=1",
                     "train.steps=4", "train.phases=[{steps: 2, image_size: 16, patch_dropout: 0.5}, "
                     "{steps: 2, patch_dropout: 0.25}]", "train.log_sample_keys=false")
    assert launch.wait() == 0, launch.tail()
    run = tmp_path / "zero3"
    assert (run / "DONE").is_file()
    events = event_files(run)[-1]
    losses = scalars(events, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert scalars(events, "train/patch_dropout") == {1: 0.5, 2: 0.5, 3: 0.25, 4: 0.25}
    assert scalars(events, "train/image_size") == {1: 16.0, 2: 16.0, 3: 32.0, 4: 32.0}
    assert all(v > 0 for v in scalars(events, "train/grad_norm").values())
