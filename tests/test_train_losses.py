"""train.loss=siglip with train.accum_freq=2 through the `deepspeed` launcher on 2 CPU ranks.

One run of 12 steps (ZeRO-2, fp32, a 2-layer tiny model with linear-pola attention in both towers,
Fashion-MNIST shards): the sigmoid loss
goes down, the logit bias is logged, trained, in the DeepSpeed checkpoint and in the fp32 export;
each step consumes 2 micro-batches per rank. A second run resumed from its step-6 checkpoint
repeats steps 7-12 exactly: the same losses and the same samples (the saved data position counts
both micro-batches of every step).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_launch import DeepSpeedLaunch

WORLD, STEPS, MICRO, ACCUM, RESUME_AT = 2, 12, 8, 2, 6
RUN_TIMEOUT_S = 900

pytestmark = pytest.mark.slow


def overrides(shards: Path, output_dir: Path, run_name: str, resume: str = "auto") -> list[str]:
    return [
        "model.preset=tiny", "model.image.layers=2", "model.text.layers=2",
        # the polarity map in both towers: its scale and power train, are checkpointed and resume like any weight
        "model.image.attention=linear-pola", "model.text.attention=linear-pola",
        f"data.train_shards={shards}/train/shard-{{000000..000011}}.tar", "data.workers=1",
        f"train.output_dir={output_dir}", f"train.run_name={run_name}", f"train.steps={STEPS}",
        f"train.micro_batch_size={MICRO}", f"train.accum_freq={ACCUM}", "train.loss=siglip",
        "train.precision=fp32", "train.zero_stage=2", "train.lr=2e-3", "train.warmup_steps=2",
        "train.log_every=1", f"train.checkpoint_every={RESUME_AT}", "train.keep_last=2",
        "train.log_sample_keys=true", f"train.resume={resume}",
    ]


def launch(args: list[str], log: Path) -> None:
    run = DeepSpeedLaunch(args, log, RUN_TIMEOUT_S, world=WORLD)
    code = run.wait()
    assert code == 0, f"exit code {code}\n{run.tail()}"


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the run's (one) event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (path,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def sample_timeline(run_dir: Path, rank: int) -> dict[int, list[str]]:
    lines = (run_dir / "sample_keys" / f"rank_{rank:05d}.txt").read_text().splitlines()
    return {int(step): keys.split() for step, keys in (line.split("\t") for line in lines)}


@pytest.fixture(scope="module")
def runs(fmnist_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("siglip_runs")
    launch(overrides(fmnist_shards, root, "siglip"), root / "siglip.log")
    checkpoint = root / "siglip" / "checkpoints" / f"step_{RESUME_AT:08d}"
    launch(overrides(fmnist_shards, root, "resumed", resume=str(checkpoint)), root / "resumed.log")
    return root


def test_siglip_loss_goes_down_and_the_bias_trains_and_is_saved(runs):
    from safetensors.torch import load_file

    from ds_linclip.config import load_config
    from ds_linclip.models import build_model
    from ds_linclip.train.export import fp32_state_dict

    run = runs / "siglip"
    series = scalars(run)
    losses = [series["train/loss"][step] for step in range(1, STEPS + 1)]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    bias = series["train/logit_bias"]
    assert sorted(bias) == list(range(1, STEPS + 1))
    assert bias[STEPS] != pytest.approx(-10.0, abs=1e-3), bias  # it trains
    assert series["train/global_batch_size"][0] == MICRO * ACCUM * WORLD
    # in the DeepSpeed checkpoint (ZeRO-2 partitions, merged) and in the fp32 export, same value as logged
    checkpointed = fp32_state_dict(run / "checkpoints" / f"step_{STEPS:08d}")
    assert float(checkpointed["logit_bias"]) == pytest.approx(bias[STEPS], abs=1e-6)
    exported = load_file(run / "final" / "model.safetensors")
    assert exported["logit_bias"].shape == () and float(exported["logit_bias"]) == pytest.approx(bias[STEPS], abs=1e-6)
    # the polarity map's own parameters trained (init 0) and are saved alike in the checkpoint and the export
    pola_keys = [key for key in exported if key.endswith((".pola_power", ".focus_scale"))]
    assert len(pola_keys) == 2 * 2 * 2  # two per layer, two layers per tower, two towers
    for key in pola_keys:
        assert exported[key].abs().max() > 0, key
        torch.testing.assert_close(exported[key], checkpointed[key], rtol=0, atol=0)
    cfg = load_config([run / "final" / "config.yaml"])
    assert (cfg.train.loss, cfg.model.init_logit_bias) == ("siglip", -10.0)
    model = build_model(cfg.model)
    model.load_state_dict(exported, strict=True)
    assert len(model(torch.randn(2, 3, 32, 32), torch.ones(2, cfg.model.text.context_length, dtype=torch.long))) == 4
    # a step is ACCUM micro-batches per rank, each sample once
    for rank in range(WORLD):
        timeline = sample_timeline(run, rank)
        assert sorted(timeline) == list(range(1, STEPS + 1))
        assert all(len(keys) == MICRO * ACCUM for keys in timeline.values())
        keys = [k for step in timeline for k in timeline[step]]
        assert len(set(keys)) == len(keys)


def test_resume_repeats_the_steps_exactly(runs):
    reference, resumed = scalars(runs / "siglip"), scalars(runs / "resumed")
    assert sorted(resumed["train/loss"]) == list(range(RESUME_AT + 1, STEPS + 1))
    for step in resumed["train/loss"]:
        for tag in ("train/loss", "train/logit_bias", "train/logit_scale"):
            assert resumed[tag][step] == pytest.approx(reference[tag][step], rel=1e-6, abs=1e-6), (tag, step)
    for rank in range(WORLD):
        reference_keys = sample_timeline(runs / "siglip", rank)
        assert sample_timeline(runs / "resumed", rank) == {s: reference_keys[s] for s in range(RESUME_AT + 1, STEPS + 1)}
