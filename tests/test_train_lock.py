"""Locked towers through the trainer: `deepspeed` launcher, 2 CPU ranks, ZeRO-3, from an open_clip file.

The image tower (linear-focused with a 3x3 local branch: variant parameters of its own) is locked but
its projection; the text tower but its last block + ln_final and its projection, with layer-wise lr
decay on what trains. A run of 3 steps, then the same run resumed from its step-3 checkpoint to step 5.
Asserted on the checkpoints themselves: every locked parameter is bitwise the pretrained value after
training and after the resume, every unlocked one moved, and DeepSpeed's optimizer holds exactly the
unlocked parameters (ZeRO-3 lists the others as frozen).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_convert import tiny_open_clip
from trainer_launch import DeepSpeedLaunch

from ds_linclip.config import load_config
from ds_linclip.models import build_model
from ds_linclip.models.convert import from_open_clip_state_dict

WORLD = 2
RUN_TIMEOUT_S = 900

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("open_clip") / "open_clip_tiny.pt"
    torch.save({"epoch": 1, "state_dict": tiny_open_clip().state_dict()}, path)
    return path


def overrides(shards: Path, output_dir: Path, pretrained: Path, steps: int) -> list[str]:
    return [
        "model.preset=tiny", f"model.pretrained={pretrained}",
        "model.image.attention=linear-focused", "model.image.local_kernel=3",
        "model.image.lock=true", "model.image.unlocked_groups=1",
        "model.text.lock=true", "model.text.unlocked_layers=2", "train.text_layer_decay=0.5",
        f"data.train_shards={shards}/train/shard-{{000000..000011}}.tar", "data.workers=1",
        f"train.output_dir={output_dir}", "train.run_name=lit", f"train.steps={steps}",
        "train.micro_batch_size=8", "train.precision=fp32", "train.zero_stage=3", "train.lr=1e-3",
        "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=0", "train.keep_last=3",
        "train.resume=auto",
    ]


def test_locked_towers_zero3_unchanged_through_training_and_resume(fmnist_shards, tmp_path, pretrained):
    from ds_linclip.train.export import fp32_state_dict

    runs = tmp_path / "runs"
    first = DeepSpeedLaunch(overrides(fmnist_shards, runs, pretrained, 3), tmp_path / "first.log", RUN_TIMEOUT_S, WORLD)
    assert first.wait() == 0, first.tail()
    resumed = DeepSpeedLaunch(overrides(fmnist_shards, runs, pretrained, 5), tmp_path / "resumed.log", RUN_TIMEOUT_S,
                              WORLD)
    assert resumed.wait() == 0, resumed.tail()
    checkpoints = runs / "lit" / "checkpoints"
    assert f"resumed from {checkpoints / 'step_00000003'} at step 3" in resumed.text()

    model = build_model(load_config([runs / "lit" / "config.yaml"]).model)  # locks as the trainer did
    locked = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"visual.blocks.0.attn.focus_scale", "visual.blocks.3.attn.local_conv.weight", "visual.ln_post.weight",
            "text.blocks.2.mlp.c_fc.weight", "text.token_embedding.weight"} <= locked
    assert {"visual.proj", "text.blocks.3.attn.qkv.weight", "text.ln_final.bias", "text.text_projection",
            "logit_scale"} <= trainable
    # the start-up table: the text groups with their decayed lrs, the locked count
    frozen_count = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert f"{frozen_count:,}  (locked: not in the optimizer)" in first.text()
    assert "text.block03.decay" in first.text() and "text.embed" not in first.text()

    pretrained_state = from_open_clip_state_dict(torch.load(pretrained, weights_only=True)["state_dict"])
    steps = {step: fp32_state_dict(checkpoints / f"step_{step:08d}") for step in (3, 5)}
    for step, state in steps.items():
        for name in locked:
            # variant parameters the open_clip file lacks start at 0 (convert.load_pretrained)
            expected = pretrained_state.get(name, torch.zeros_like(state[name]))
            assert torch.equal(state[name], expected), (step, name)
        moved = {n for n in trainable if not torch.equal(state[n].reshape(-1), pretrained_state[n].reshape(-1))}
        assert moved == trainable, (step, sorted(trainable - moved))
    assert not any(torch.equal(steps[3][n], steps[5][n]) for n in trainable if n != "logit_scale")

    # ZeRO-3: the optimizer partitions hold exactly the unlocked parameters, the locked ones are frozen
    for rank in range(WORLD):
        states = torch.load(checkpoints / "step_00000005" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)
        in_optimizer = {name for group in states["param_shapes"] for name in group}
        assert in_optimizer == trainable
        assert set(states["frozen_param_shapes"]) == locked


def test_zero1_export_holds_the_locked_tower(fmnist_shards, tmp_path, pretrained):
    """ZeRO-1 checkpoints list no frozen parameters beside the optimizer partitions (DeepSpeed does from
    stage 2 on); the export takes them from the whole module in the model states."""
    import subprocess
    import sys

    from safetensors.torch import load_file
    from trainer_launch import REPO, cpu_env

    args = [o for o in overrides(fmnist_shards, tmp_path, pretrained, 2) if not o.startswith("train.zero_stage=")]
    done = subprocess.run([sys.executable, "-m", "ds_linclip.train", *args, "train.zero_stage=1"], env=cpu_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = load_file(tmp_path / "lit" / "final" / "model.safetensors")
    model = build_model(load_config([tmp_path / "lit" / "final" / "config.yaml"]).model)
    model.load_state_dict(final, strict=True)
    pretrained_state = from_open_clip_state_dict(torch.load(pretrained, weights_only=True)["state_dict"])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(final[name], pretrained_state.get(name, torch.zeros_like(final[name]))), name
