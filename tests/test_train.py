"""The trainer end to end: 2 CPU ranks (gloo), real Fashion-MNIST shards, the tiny preset.

Ranks are started the way torchrun does it (one `python -m ds_linclip.train` per rank with
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT), each in its own process group so a test can
kill -9 a rank together with its data-loader worker.

Runs (each ~1 min on 2 busy cores), shared between tests through module fixtures:
- ZeRO-1 (image linear-focused with the 3x3 local branch, text softmax): 20 uninterrupted steps = the
  reference run
- the same config killed with SIGKILL on every rank after a checkpoint, resumed with `auto`
- ZeRO-2 (image softmax, text linear-affine), bf16: 20 steps
- ZeRO-3 (linear-affine both towers, activation checkpointing): SIGUSR1 mid-run -> exit 75
  with a checkpoint, then resumed to the end
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_launch import cpu_env, free_port, steps_logged

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 20
RUN_TIMEOUT_S = 900

pytestmark = pytest.mark.slow


def base_overrides(shards: Path, output_dir: Path, run_name: str) -> list[str]:
    return [
        "model.preset=tiny",
        f"data.train_shards={shards}/train/shard-{{000000..000011}}.tar",
        "data.workers=1",
        f"train.output_dir={output_dir}",
        f"train.run_name={run_name}",
        f"train.steps={STEPS}",
        "train.micro_batch_size=8",
        "train.precision=fp32",
        "train.lr=1e-3",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.checkpoint_every=5",
        "train.keep_last=2",
        "train.log_sample_keys=true",
        "train.resume=auto",
    ]


class Ranks:
    """WORLD processes of `python -m ds_linclip.train OVERRIDES`, logs in LOG_DIR/rank<N>.log."""

    def __init__(self, overrides: list[str], log_dir: Path, tag: str):
        port = free_port()
        self.logs = [log_dir / f"{tag}.rank{r}.log" for r in range(WORLD)]
        self.procs = []
        for rank in range(WORLD):
            env = dict(cpu_env(), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "ds_linclip.train", *overrides], env=env, cwd=REPO,
                stdout=open(self.logs[rank], "w"), stderr=subprocess.STDOUT, start_new_session=True,
            ))

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"ranks did not finish in {timeout}s\n{self.tail()}")
        return codes

    def kill(self, sig=signal.SIGKILL) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, sig)  # the rank and its data-loader worker
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.wait(timeout=60)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-lines:]) for p in self.logs)

    def run(self) -> None:
        codes = self.wait()
        assert codes == [0] * WORLD, f"exit codes {codes}\n{self.tail()}"


def wait_for(predicate, ranks: Ranks, timeout: float = RUN_TIMEOUT_S, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(p.poll() is not None for p in ranks.procs):
            pytest.fail(f"a rank exited while waiting for {what}\n{ranks.tail()}")
        if time.monotonic() > deadline:
            ranks.kill()
            pytest.fail(f"timed out waiting for {what}\n{ranks.tail()}")
        time.sleep(0.2)


def scalars(event_path: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar tag, read with TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_path), size_guidance={"scalars": 0})
    acc.Reload()
    return {event.step: event.value for event in acc.Scalars(tag)}


def event_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)


def sample_timeline(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """step -> keys of the step on `rank`; a step written again after a restart replaces the old."""
    timeline: dict[int, list[str]] = {}
    for line in (run_dir / "sample_keys" / f"rank_{rank:05d}.txt").read_text().splitlines():
        step, keys = line.split("\t")
        timeline[int(step)] = keys.split()
    return timeline


def loss_goes_down(losses: dict[int, float]) -> tuple[float, float]:
    ordered = [losses[s] for s in sorted(losses)]
    return sum(ordered[:4]) / 4, sum(ordered[-4:]) / 4


# a variant with parameters of its own (focused scale, local conv), so exact resume covers them too
Z1_ATTENTION = ["train.zero_stage=1", "model.image.attention=linear-focused", "model.image.local_kernel=3",
                "model.text.attention=softmax"]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_runs")


@pytest.fixture(scope="module")
def reference_run(fmnist_shards, runs_root) -> Path:
    """ZeRO-1, image linear-focused-local3 + text softmax, 20 steps uninterrupted."""
    overrides = base_overrides(fmnist_shards, runs_root, "z1_reference") + Z1_ATTENTION
    Ranks(overrides, runs_root, "z1_reference").run()
    return runs_root / "z1_reference"


# ------------------------------------------------------------------------------------ tests
def test_run_dir_layout_and_loss_goes_down_zero1(reference_run):
    run = reference_run
    for name in ("config.yaml", "ds_config.json", "DONE", "final/model.safetensors", "final/config.yaml",
                 "checkpoints/latest"):
        assert (run / name).is_file(), name
    import json

    done = json.loads((run / "DONE").read_text())
    assert done == {"final_tag": "step_00000020", "step": STEPS}
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000020"
    # keep_last=2: of 5, 10, 15, 20 only the newest two remain
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_00000015", "step_00000020"]
    tag_dir = run / "checkpoints/step_00000020"
    assert (tag_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (tag_dir / "client_state").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    ds_config = json.loads((run / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 8 * WORLD and ds_config["zero_optimization"]["stage"] == 1
    losses = scalars(event_files(run)[-1], "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = loss_goes_down(losses)
    assert last < first - 0.05, (first, last, losses)


def test_tensorboard_tags(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference_run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/loss", "train/lr", "train/logit_scale", "train/grad_norm", "train/nonfinite_skipped", "train/epoch",
        "perf/images_per_s", "perf/images_per_s_per_rank", "perf/step_time_s", "perf/data_wait_s",
        "memory/peak_mb", "data/skipped_total", "train/global_batch_size",
    }
    assert expected <= tags, expected - tags
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert max(lr.values()) == pytest.approx(1e-3, rel=0.05)
    assert lr[STEPS] < lr[5]  # cosine decay
    scale = [e.value for e in acc.Scalars("train/logit_scale")]
    assert all(0 < s <= math.log(100) + 1e-6 for s in scale)
    assert all(e.value > 0 for e in acc.Scalars("perf/images_per_s"))
    assert all(e.value > 50 for e in acc.Scalars("memory/peak_mb"))


def test_kill9_every_rank_then_resume_auto_matches_uninterrupted(fmnist_shards, runs_root, reference_run):
    name = "z1_killed"
    overrides = base_overrides(fmnist_shards, runs_root, name) + Z1_ATTENTION
    run = runs_root / name
    ranks = Ranks(overrides, runs_root, name + "_1")
    # kill -9 every rank once a checkpoint exists and training has gone past it
    wait_for(lambda: (run / "checkpoints/latest").is_file() and steps_logged(run) >= 7, ranks,
             what="checkpoint step 5 and step 7")
    ranks.kill(signal.SIGKILL)
    killed_latest = (run / "checkpoints/latest").read_text().strip()
    assert killed_latest in ("step_00000005", "step_00000010")
    resumed_from = int(killed_latest.split("_")[1])
    assert not (run / "DONE").exists()

    Ranks(overrides, runs_root, name + "_2").run()
    log = (runs_root / f"{name}_2.rank0.log").read_text()
    assert f"resumed from {run / 'checkpoints' / killed_latest} at step {resumed_from}" in log

    reference = scalars(event_files(reference_run)[-1], "train/loss")
    resumed = scalars(event_files(run)[-1], "train/loss")
    assert sorted(resumed) == list(range(resumed_from + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), (step, resumed[step], reference[step])

    for rank in range(WORLD):
        timeline = sample_timeline(run, rank)
        assert sorted(timeline) == list(range(1, STEPS + 1))
        keys = [k for step in sorted(timeline) for k in timeline[step]]
        assert len(keys) == len(set(keys)) == STEPS * 8, "a sample was repeated within the epoch"
        # and exactly the samples (in order) of the uninterrupted run
        assert sample_timeline(reference_run, rank) == timeline


def test_exported_safetensors_reload_into_plain_model(reference_run):
    from safetensors.torch import load_file

    from ds_linclip.config import load_config
    from ds_linclip.data.pipeline import tokenize
    from ds_linclip.models import build_model
    from ds_linclip.train.export import to_model_shapes

    final = reference_run / "final"
    cfg = load_config([final / "config.yaml"])
    exported = build_model(cfg.model)
    exported.load_state_dict(load_file(final / "model.safetensors"), strict=True)
    # reference: the full fp32 module DeepSpeed keeps in the ZeRO-1 model states of the same step
    states = torch.load(reference_run / "checkpoints/step_00000020/mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    reference = build_model(cfg.model)
    # (DeepSpeed holds the 0-dim logit_scale as a 1-element tensor: to_model_shapes gives () back)
    reference.load_state_dict(to_model_shapes(states["module"], final / "config.yaml"), strict=True)
    untrained = build_model(cfg.model)

    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    tokens = tokenize(["a photo of a shirt", "a bag", "sneaker", "a dress"], cfg.model.text.context_length)
    exported.eval(), reference.eval(), untrained.eval()
    with torch.no_grad():
        out, ref, init = exported(images, tokens), reference(images, tokens), untrained(images, tokens)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(out[0], init[0], atol=1e-4)  # the weights were trained, not the init

    # the on-demand CLI writes the same weights
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    cli_out = reference_run / "cli_export"
    subprocess.run([sys.executable, "-m", "ds_linclip.train.export", str(reference_run / "checkpoints"), "--out", str(cli_out)],
                   env=env, check=True, capture_output=True, timeout=300)
    a, b = load_file(cli_out / "model.safetensors"), load_file(final / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero2_bf16_softmax_image_linear_text(fmnist_shards, runs_root):
    name = "z2_bf16"
    overrides = base_overrides(fmnist_shards, runs_root, name) + [
        "train.zero_stage=2", "train.precision=bf16", "model.image.attention=softmax",
        "model.text.attention=linear-affine", "train.checkpoint_every=0",
    ]
    Ranks(overrides, runs_root, name).run()
    run = runs_root / name
    losses = scalars(event_files(run)[-1], "train/loss")
    first, last = loss_goes_down(losses)
    assert last < first - 0.05, (first, last, losses)
    from safetensors.torch import load_file

    weights = load_file(run / "final/model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_zero3_grad_checkpointing_sigusr1_requeue_and_resume(fmnist_shards, runs_root):
    name = "z3_ckpt"
    overrides = base_overrides(fmnist_shards, runs_root, name) + [
        "train.zero_stage=3", "train.grad_checkpointing=1", "model.image.attention=linear-affine",
        "model.text.attention=linear-affine", "train.checkpoint_every=0",
    ]
    run = runs_root / name
    ranks = Ranks(overrides, runs_root, name + "_1")
    wait_for(lambda: steps_logged(run) >= 4, ranks, what="step 4")
    os.kill(ranks.procs[1].pid, signal.SIGUSR1)  # one rank gets it; both must stop together
    codes = ranks.wait()
    assert codes == [75, 75], f"{codes}\n{ranks.tail()}"
    latest = (run / "checkpoints/latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 4 <= stopped_at < STEPS
    assert not (run / "DONE").exists()

    Ranks(overrides, runs_root, name + "_2").run()
    losses = scalars(event_files(run)[-1], "train/loss")
    assert sorted(losses) == list(range(stopped_at + 1, STEPS + 1))
    first_run = scalars(event_files(run)[0], "train/loss")
    stitched = {**first_run, **losses}
    first, last = loss_goes_down(stitched)
    assert last < first - 0.05, (first, last, stitched)
    # ZeRO-3 keeps no whole module in the checkpoint: the export is zero_to_fp32's reconstruction
    from safetensors.torch import load_file

    from ds_linclip.config import load_config
    from ds_linclip.models import build_model

    cfg = load_config([run / "final/config.yaml"])
    build_model(cfg.model).load_state_dict(load_file(run / "final/model.safetensors"), strict=True)
