"""Training phases (train.phases): the plan and its validation, the loader switching resolution
without losing its place, the --check plan (tokens, GFLOPs, attention share, activation memory, the
latter against what autograd really saves), and the high-resolution recipe configs."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

from ds_linclip.config import ConfigError, load_config
from ds_linclip.models.flops import activation_bytes, model_cost
from ds_linclip.train.phases import Phase, phase_at, plan_phases
from ds_linclip.train.preflight import check_train

REPO = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str, steps: int = 1000):
    return load_config(overrides=["model.preset=tiny", f"train.steps={steps}", *overrides])


# ----------------------------------------------------------------------------- the plan


def test_no_phases_is_one_phase_of_the_model_config():
    assert plan_phases(_cfg("model.image.patch_dropout=0.25")) == [Phase(0, 1, 1000, 32, 0.25)]


def test_fractions_and_steps_cover_every_step_once():
    fractions = plan_phases(_cfg("train.phases=[{fraction: 0.9, image_size: 16, patch_dropout: 0.5}, "
                                 "{fraction: 0.1}]"))
    assert fractions == [Phase(0, 1, 900, 16, 0.5), Phase(1, 901, 1000, 32, 0.0)]
    thirds = plan_phases(_cfg("train.phases=[{fraction: 0.3333333}, {fraction: 0.3333333}, {fraction: 0.3333334}]",
                              steps=10))
    assert [(p.first_step, p.last_step) for p in thirds] == [(1, 3), (4, 7), (8, 10)]
    steps = plan_phases(_cfg("train.phases=[{steps: 4, image_size: 16}, {steps: 6, patch_dropout: 0.75}]", steps=10))
    assert steps == [Phase(0, 1, 4, 16, 0.0), Phase(1, 5, 10, 32, 0.75)]
    assert [phase_at(steps, s).index for s in range(1, 12)] == [0] * 4 + [1] * 7


@pytest.mark.parametrize("phases,key", [
    ("[{fraction: 0.9}, {fraction: 0.2}]", "train.phases"),
    ("[{fraction: 0.9}, {image_size: 16}]", "train.phases[1].fraction"),
    ("[{fraction: 0.9}, {fraction: 0.1, steps: 10}]", "train.phases[1].fraction"),
    ("[{fraction: 0.9}, {steps: 100}]", "train.phases[1].steps"),
    ("[{fraction: 1.5}]", "train.phases[0].fraction"),
    ("[{fraction: 0.9999}, {fraction: 0.0001}]", "train.phases[1].fraction"),  # rounds to no step
    ("[{steps: 500}, {steps: 400}]", "train.phases"),
    ("[{steps: 1000}, {steps: 0}]", "train.phases[1].steps"),
    ("[{fraction: 0.5, image_size: 30}, {fraction: 0.5}]", "train.phases[0].image_size"),
    ("[{fraction: 0.5}, {fraction: 0.5, patch_dropout: 1.0}]", "train.phases[1].patch_dropout"),
])
def test_bad_phases_name_the_key(phases, key):
    with pytest.raises(ConfigError) as info:
        plan_phases(_cfg(f"train.phases={phases}"))
    assert f"config key '{key}'" in str(info.value)


@pytest.mark.parametrize("phases,key,message", [
    ("[{fraction: 0.9}, {fracton: 0.1}]", "train.phases[1].fracton", "did you mean 'train.phases[1].fraction'"),
    ("[{fraction: 0.5}, {fraction: half}]", "train.phases[1].fraction", "'half' is not a number"),
    ("[0.5, 0.5]", "train.phases[0]", "is not a mapping"),
])
def test_bad_phase_entries_name_the_key_as_the_config_loads(phases, key, message):
    with pytest.raises(ConfigError) as info:
        _cfg(f"train.phases={phases}")
    assert f"config key '{key}'" in str(info.value) and message in str(info.value)


# ----------------------------------------------------------------------------- the loader


def test_loader_changes_resolution_between_iterations_without_losing_its_place(fmnist_shards):
    from ds_linclip.data.pipeline import build_train_loader

    cfg = load_config(overrides=["model.preset=tiny", f"data.train_shards={fmnist_shards}/train/shard-{{000000..000011}}.tar",
                                 "data.workers=1", "train.micro_batch_size=8"])
    reference = [keys for _, _, keys in islice(build_train_loader(cfg, 0, 2, with_keys=True), 6)]
    loader = build_train_loader(cfg, 0, 2, with_keys=True)
    batches = iter(loader)
    first = [next(batches) for _ in range(3)]
    batches.close()  # what the trainer does at a phase boundary (prefetched batches are dropped)
    loader.set_image_size(16)
    second = list(islice(iter(loader), 3))
    assert [tuple(images.shape) for images, _, _ in first] == [(8, 3, 32, 32)] * 3
    assert [tuple(images.shape) for images, _, _ in second] == [(8, 3, 16, 16)] * 3
    assert [keys for _, _, keys in first + second] == reference


# ----------------------------------------------------------------------------- activation memory


def _measured_saved_bytes(overrides: dict, checkpoint_every: int, batch: int = 4) -> int:
    from ds_linclip.experiments.timing import contrastive_loss, saved_activation_bytes
    from ds_linclip.models import build_model
    from ds_linclip.models.clip import model_config

    torch.manual_seed(0)
    model = build_model(model_config("tiny", {**overrides, "attention_backend": "torch"}))
    model.set_grad_checkpointing(checkpoint_every)
    images, tokens = torch.randn(batch, 3, 32, 32), torch.randint(0, 49000, (batch, 32))
    saved, _ = saved_activation_bytes(lambda: contrastive_loss(*model(images, tokens)), model.parameters())
    return saved


@pytest.mark.parametrize("attention,local", [("softmax", 0), ("linear-focused", 3), ("linear-affine", 0)])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("every", [0, 1, 2])
def test_activation_estimate_is_within_a_third_of_what_autograd_saves(attention, local, dropout, every):
    """The estimate lists each op's saved inputs (16·tokens·width per block): it leaves out per-row
    statistics and small tensors, so it may only be low, and by less than a factor 4/3 (the largest
    gap, ~0.77, is full checkpointing of the tiny model, where those small tensors are a big share)."""
    overrides = {"image.attention": attention, "image.local_kernel": local, "image.patch_dropout": dropout}
    from ds_linclip.models.clip import model_config

    estimate = activation_bytes(model_config("tiny", overrides), 4, patch_dropout=dropout, checkpoint_every=every,
                                bytes_per_element=4).saved_after_forward
    measured = _measured_saved_bytes(overrides, every)
    assert 0.75 * measured <= estimate <= 1.02 * measured, (estimate, measured, estimate / measured)


def test_checkpointing_adds_one_block_to_the_peak():
    from ds_linclip.models.clip import model_config

    cfg = model_config("vit_b16")
    full, checkpointed = activation_bytes(cfg, 256), activation_bytes(cfg, 256, checkpoint_every=1)
    assert full.recompute_peak == 0 and full.peak == full.saved_after_forward
    assert checkpointed.recompute_peak == 256 * 197 * 768 * 16 * 2  # one image block, bf16
    assert checkpointed.peak < full.peak / 5


# ----------------------------------------------------------------------------- --check and the recipes

RECIPES = {
    # config: (tokens per image per phase, patch dropout per phase, px per phase)
    "vit_b16_laion400m_focused_448": ((197, 785), (0.0, 0.0), (224, 448)),
    "vit_b16_laion400m_softmax_flip_448": ((99, 393), (0.5, 0.5), (224, 448)),
    "vit_l16_laion400m_focused_336": ((197, 442), (0.0, 0.0), (224, 336)),
    "vit_l16_laion400m_softmax_flip_336": ((99, 221), (0.5, 0.5), (224, 336)),
}


def _recipe(name: str, shards: Path, tmp_path: Path):
    return load_config([REPO / "configs" / f"{name}.yaml"], [
        f"data.train_shards={shards}/train/shard-{{000000..000011}}.tar", "data.workers=0",
        f"train.output_dir={tmp_path}"])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_plans(name, fmnist_shards, tmp_path):
    tokens, dropouts, sizes = RECIPES[name]
    cfg = _recipe(name, fmnist_shards, tmp_path)
    plan = check_train(cfg, 128)
    assert plan.global_batch_size == 32768
    low, high = plan.phases
    assert (low.phase.first_step, low.phase.last_step, high.phase.last_step) == (1, 351563, 390625)
    assert (low.tokens_per_image, high.tokens_per_image) == tokens
    assert (low.phase.patch_dropout, high.phase.patch_dropout) == dropouts
    assert (low.phase.image_size, high.phase.image_size) == sizes
    for cost in plan.phases:
        model = model_cost(cfg.model, cost.phase.image_size, cost.phase.patch_dropout)
        assert cost.forward_gflops_per_sample == pytest.approx((model.image.flops + model.text.flops) / 1e9)
        assert cost.checkpointed_activation_bytes < cost.activation_bytes / 4
    ratio = high.forward_gflops_per_sample / low.forward_gflops_per_sample
    if "softmax" in name:
        assert high.attention_share > low.attention_share  # quadratic token mixing grows its share
    else:
        assert abs(high.attention_share - low.attention_share) < 0.005  # linear: the share stays put
        assert ratio < tokens[1] / tokens[0]  # the text tower's cost does not grow
    # the model stores its position embedding at the high-resolution phase's size
    assert cfg.model.image.image_size == sizes[1]


def test_check_prints_the_phase_plan(fmnist_shards, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ds_linclip.train", "--config", str(REPO / "configs/vit_b16_laion400m_focused_448.yaml"),
         f"data.train_shards={fmnist_shards}/train/shard-{{000000..000011}}.tar", "data.workers=0",
         f"train.output_dir={tmp_path}", "--check", "--world-size", "128"],
        env=dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["phase", "steps"])
    assert lines[header + 1].split()[:6] == ["0", "1-351563", "351563", "224", "0", "197"]
    assert lines[header + 2].split()[:6] == ["1", "351564-390625", "39062", "448", "0", "785"]
    assert "train.grad_checkpointing=1" in lines[header - 1]
    assert not (tmp_path / "vit_b16_focused_448_laion400m").exists()
