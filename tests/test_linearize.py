"""train.linearize: attention transfer from a softmax teacher, then contrastive fine-tune.

In-process (fast): the stage-1 stream is the softmax model's, the loss reaches only attention
parameters, the transfer loss falls, stage 2 is the plain student, the optimizer/lr plumbing.
Through the `deepspeed` launcher (slow; 2 CPU ranks, ZeRO-2, real Fashion-MNIST shards) from an
open_clip-format file of a randomly initialised open_clip ViT-S-16 (widths and depth shrunk so a
run takes seconds): both stages run, the transfer loss falls in stage 1, only attention
parameters change in stage 1, and kill -9 in stage 1 and again in stage 2 then `resume=auto`
reproduces the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ds_linclip.config import ConfigError, load_config
from ds_linclip.models import build_model
from ds_linclip.train.linearize import (
    GROUP_KEY, STAGE_FINETUNE, STAGE_TRANSFER, TEACHER_KEY, Linearizer, reset_optimizer_state, strip_teacher,
    warmup_cosine,
)
from trainer_launch import DeepSpeedLaunch, steps_logged

WORLD = 2


# ------------------------------------------------------------------------------------ in-process
def small_overrides(attention: str, pretrained: str | None = None, **train) -> list[str]:
    """Both towers `attention`; a `-local3` suffix adds the local branch to the image tower."""
    local = attention.endswith("-local3")
    attention = attention.removesuffix("-local3")
    out = ["model.preset=tiny", "model.embed_dim=32", "model.image.image_size=16", "model.text.context_length=8",
           f"model.image.local_kernel={3 if local else 0}"]
    for tower in ("image", "text"):
        out += [f"model.{tower}.width=32", f"model.{tower}.heads=2", f"model.{tower}.layers=2",
                f"model.{tower}.attention={attention}"]
    if pretrained:
        out.append(f"model.pretrained={pretrained}")
    out += [f"train.{key}={value}" for key, value in train.items()]
    return out


@pytest.fixture()
def softmax_file(tmp_path) -> Path:
    torch.manual_seed(0)
    teacher = build_model(load_config([], small_overrides("softmax")).model)
    path = tmp_path / "softmax.pt"
    torch.save(teacher.state_dict(), path)
    return path


def batch(seed: int = 0, size: int = 4):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 16, 16, generator=generator)
    tokens = torch.randint(1, 1000, (size, 8), generator=generator)
    tokens[:, -1] = 49407  # EOT, pooled
    return images, tokens


def contrastive(image_features, text_features, scale):
    logits = scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0])
    return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


def recipe(softmax_file: Path, attention: str = "linear-affine", **linearize):
    train = {"steps": 20, "lr": 1e-3, "warmup_steps": 2, "linearize.enabled": "true", "linearize.transfer_steps": 10,
             "linearize.transfer_lr": 5e-3, "linearize.transfer_warmup_steps": 2,
             **{f"linearize.{k}": v for k, v in linearize.items()}}
    cfg = load_config([], small_overrides(attention, str(softmax_file), **train))
    model = build_model(cfg.model)
    linearizer = Linearizer(cfg, model)
    optimizer = torch.optim.AdamW(linearizer.param_groups(0.1), lr=1e-3)
    linearizer.attach()
    return cfg, model, linearizer, optimizer


@pytest.mark.parametrize("attention", ["linear-affine", "linear-focused-local3"])
def test_stage1_stream_is_the_softmax_model_and_only_attention_gets_gradients(softmax_file, attention):
    cfg, model, linearizer, optimizer = recipe(softmax_file, attention)
    teacher = build_model(load_config([], small_overrides("softmax", str(softmax_file))).model)
    images, tokens = batch()
    linearizer.prepare(optimizer, 1)
    assert linearizer.stage == STAGE_TRANSFER
    out = model(images, tokens)
    with torch.no_grad():
        want = teacher(images, tokens)
    for got, ref in zip(out, want):
        torch.testing.assert_close(got.reshape(ref.shape), ref, rtol=0, atol=1e-6)  # the teacher's stream: its model
    loss = linearizer.objective(contrastive(*out))
    assert loss.item() > 0
    loss.backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    if attention == "linear-focused-local3":  # the variant's own parameters train too
        assert {n for n in linearizer.trainable if "focus_scale" in n or "local_conv" in n} == {
            *(f"{t}.blocks.{i}.attn.focus_scale" for t in ("visual", "text") for i in (0, 1)),
            *(f"visual.blocks.{i}.attn.local_conv.{w}" for i in (0, 1) for w in ("weight", "bias"))}
    assert names == linearizer.trainable
    assert all(".attn." in n and TEACHER_KEY not in n for n in names)
    assert {n.split(".attn.")[0] for n in names} == {f"{t}.blocks.{i}" for t in ("visual", "text") for i in (0, 1)}
    assert all(not p.requires_grad for n, p in model.named_parameters() if TEACHER_KEY in n)
    # lr 0 for everything that is not stage-1 trainable; the flag survives in the optimizer's groups
    assert {g[GROUP_KEY]: g["lr"] for g in optimizer.param_groups if g["params"]}[False] == 0.0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in linearizer.trainable}
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])}
    assert not changed


def test_transfer_loss_falls_and_stage2_is_the_plain_student(softmax_file):
    cfg, model, linearizer, optimizer = recipe(softmax_file)
    losses = []
    for step in range(1, 11):
        linearizer.prepare(optimizer, step)
        optimizer.zero_grad()
        loss = linearizer.objective(contrastive(*model(*batch(step % 2))))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert "linearize: stage 1" in linearizer.log_window(None, 10)

    linearizer.prepare(optimizer, 11)  # the transition: fresh optimizer state, every group at stage-2 lr
    assert linearizer.stage == STAGE_FINETUNE
    assert all(float(s["step"]) == 0 and s["exp_avg"].abs().sum() == 0 for s in optimizer.state.values())
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(1e-3 / 2)] * 4  # warmup 1 of 2
    student = build_model(cfg.model)
    student.load_state_dict(strip_teacher(model.state_dict()))
    images, tokens = batch(99)
    out = model(images, tokens)
    with torch.no_grad():
        want = student(images, tokens)
    for got, ref in zip(out, want):
        torch.testing.assert_close(got.reshape(ref.shape), ref, rtol=0, atol=0)
    loss = linearizer.objective(contrastive(*out))
    torch.testing.assert_close(loss, contrastive(*want), rtol=0, atol=0)  # weight 0: contrastive only
    assert linearizer.state_dict()["stage"] == STAGE_FINETUNE


def test_finetune_transfer_weight_adds_the_transfer_loss(softmax_file):
    cfg, model, linearizer, optimizer = recipe(softmax_file, finetune_transfer_weight=0.5)
    linearizer.prepare(optimizer, 11)
    out = model(*batch())
    layers = torch.stack([linearizer.losses[i] for i in range(len(linearizer.layers))]).detach()
    plain = contrastive(*out)
    torch.testing.assert_close(linearizer.objective(plain).detach(), plain.detach() + 0.5 * layers.mean())


def test_transfer_params_choices_and_config_errors(softmax_file):
    _, _, qkv_only, _ = recipe(softmax_file, transfer_params="qkv")
    assert qkv_only.trainable and all(".attn.qkv." in n for n in qkv_only.trainable)
    with pytest.raises(ConfigError, match="transfer_params"):
        recipe(softmax_file, transfer_params="variant")  # affine adds no parameters of its own
    _, _, variant, _ = recipe(softmax_file, "linear-focused-local3", transfer_params="variant")
    assert variant.trainable and all(n.endswith("focus_scale") or ".local_conv." in n for n in variant.trainable)
    with pytest.raises(ConfigError, match="transfer_steps"):
        recipe(softmax_file, transfer_steps=21)
    with pytest.raises(ConfigError, match="both towers are softmax"):
        recipe(softmax_file, attention="softmax")
    cfg = load_config([], small_overrides("linear-affine", None, **{"linearize.enabled": "true"}))
    with pytest.raises(ConfigError, match="model.pretrained"):
        Linearizer(cfg, build_model(cfg.model))


def test_lr_schedule_per_stage():
    assert warmup_cosine(1, 10, 2, 1.0, 0.0) == 0.5
    assert warmup_cosine(2, 10, 2, 1.0, 0.0) == 1.0
    assert warmup_cosine(3, 10, 2, 1.0, 0.1) == 1.0
    rates = [warmup_cosine(step, 10, 2, 1.0, 0.1) for step in range(3, 11)]
    assert rates == sorted(rates, reverse=True) and 0.1 < rates[-1] < 0.2  # the last step still learns
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    optimizer.zero_grad()
    optimizer.param_groups[0]["params"][0].grad = torch.ones(2)
    optimizer.step()
    reset_optimizer_state(optimizer)
    state = next(iter(optimizer.state.values()))
    assert float(state["step"]) == 0 and state["exp_avg"].abs().sum() == 0 and state["exp_avg_sq"].abs().sum() == 0


# ------------------------------------------------------------------------------------ deepspeed launcher
# open_clip's ViT-S-16 (patch 16, head width 64, MLP ratio 4, vocab 49408), shrunk to 2 layers of width 128
VITS16_SHRUNK = {"image_size": 64, "width": 128, "layers": 2, "text_width": 128, "text_heads": 2, "embed_dim": 128}
TRANSFER_STEPS, STEPS = 6, 12
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory) -> Path:
    """A randomly initialised open_clip ViT-S-16 (shrunk) saved the way open_clip saves (`state_dict`)."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP as OpenClipCLIP

    config = open_clip.get_model_config("ViT-S-16")
    shrunk = VITS16_SHRUNK
    config["embed_dim"] = shrunk["embed_dim"]
    config["vision_cfg"].update(image_size=shrunk["image_size"], width=shrunk["width"], layers=shrunk["layers"])
    config["text_cfg"].update(width=shrunk["text_width"], heads=shrunk["text_heads"], layers=shrunk["layers"])
    torch.manual_seed(0)
    model = OpenClipCLIP(**config)
    path = tmp_path_factory.mktemp("open_clip") / "open_clip_vit_s16_shrunk.pt"
    torch.save({"epoch": 1, "name": "ViT-S-16-shrunk", "state_dict": model.state_dict()}, path)
    return path


def launcher_overrides(shards: Path, output_dir: Path, run_name: str, pretrained: Path) -> list[str]:
    s = VITS16_SHRUNK
    return [
        "model.preset=vit_s16", f"model.pretrained={pretrained}", f"model.embed_dim={s['embed_dim']}",
        f"model.image.image_size={s['image_size']}", f"model.image.width={s['width']}",
        f"model.image.heads={s['width'] // 64}", f"model.image.layers={s['layers']}",
        f"model.text.width={s['text_width']}", f"model.text.heads={s['text_heads']}",
        f"model.text.layers={s['layers']}", "model.text.context_length=16",
        "model.image.attention=linear-affine", "model.text.attention=linear-affine",
        f"data.train_shards={shards}/train/shard-{{000000..000011}}.tar", "data.workers=1",
        f"train.output_dir={output_dir}", f"train.run_name={run_name}", f"train.steps={STEPS}",
        "train.micro_batch_size=8", "train.precision=fp32", "train.zero_stage=2", "train.lr=5e-4",
        "train.warmup_steps=2", "train.log_every=1", "train.checkpoint_every=3", "train.keep_last=4",
        "train.log_sample_keys=true", "train.resume=auto",
        "train.linearize.enabled=true", f"train.linearize.transfer_steps={TRANSFER_STEPS}",
        "train.linearize.transfer_lr=1e-3", "train.linearize.transfer_warmup_steps=2",
        "train.linearize.log_layers_per_group=1",
    ]


class Launch(DeepSpeedLaunch):
    """`deepspeed --num_gpus 2 --module ds_linclip.train OVERRIDES`, run to the end or killed at a point."""

    def __init__(self, overrides: list[str], log: Path):
        super().__init__(overrides, log, RUN_TIMEOUT_S, world=WORLD)

    def run(self) -> None:
        code = self.wait()
        assert code == 0, f"exit code {code}\n{self.tail()}"

    def kill_when(self, predicate, what: str) -> None:
        self.wait_until(predicate, what)
        self.kill()


def latest_step(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "latest"
    return int(path.read_text().strip().split("_")[1]) if path.is_file() else 0


def scalars(run_dir: Path) -> list[dict[str, dict[int, float]]]:
    """Per event file (oldest first): tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        out.append({tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]})
    return out


@pytest.fixture(scope="module")
def launcher_runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("linearize_runs")


@pytest.fixture(scope="module")
def reference_run(fmnist_shards, launcher_runs, open_clip_file) -> Path:
    name = "reference"
    Launch(launcher_overrides(fmnist_shards, launcher_runs, name, open_clip_file), launcher_runs / f"{name}.log").run()
    return launcher_runs / name


@pytest.mark.slow
def test_both_stages_through_the_deepspeed_launcher_zero2_from_open_clip(reference_run, open_clip_file):
    from ds_linclip.models.convert import from_open_clip_state_dict, read_state_dict
    from ds_linclip.train.export import fp32_state_dict

    run = reference_run
    done = json.loads((run / "DONE").read_text())
    assert done["step"] == STEPS
    (series,) = scalars(run)
    stage = series["linearize/stage"]
    assert stage == {s: float(1 if s <= TRANSFER_STEPS else 2) for s in range(1, STEPS + 1)}
    # stage 1: the transfer loss falls, in every layer group of both towers
    transfer = series["linearize/transfer_loss"]
    assert sorted(transfer) == list(range(1, TRANSFER_STEPS + 1))
    assert transfer[TRANSFER_STEPS] < 0.8 * transfer[1], transfer
    groups = [t for t in series if t.startswith("linearize/transfer/")]
    assert sorted(groups) == [f"linearize/transfer/{tower}/layers_{i}-{i}" for tower in ("image", "text") for i in (0, 1)]
    for tag in groups:
        assert series[tag][TRANSFER_STEPS] < series[tag][1], (tag, series[tag])
    assert sorted(series["linearize/contrastive_loss"]) == list(range(1, STEPS + 1))
    # the optimised loss is the transfer loss in stage 1 and the contrastive loss in stage 2
    for step in range(1, STEPS + 1):
        want = transfer[step] if step <= TRANSFER_STEPS else series["linearize/contrastive_loss"][step]
        assert series["train/loss"][step] == pytest.approx(want, rel=1e-5)
    # stage 1 changed only attention parameters (bitwise): compare the checkpoint at its end with the file
    pretrained = from_open_clip_state_dict(read_state_dict(open_clip_file))
    end_of_transfer = fp32_state_dict(run / "checkpoints" / f"step_{TRANSFER_STEPS:08d}")
    assert not any(TEACHER_KEY in k for k in end_of_transfer)
    changed = {k for k, v in end_of_transfer.items()
               if not torch.equal(v.reshape(-1), pretrained[k].reshape(-1)[: v.numel()] if k.endswith("positional_embedding") and k.startswith("text") else pretrained[k].reshape(-1))}
    assert changed and all(".attn." in k for k in changed), sorted(changed)
    assert {k.rsplit(".attn.", 1)[1] for k in changed} <= {"qkv.weight", "qkv.bias", "out_proj.weight", "out_proj.bias"}
    # stage 2 trained everything; the export is the linear student and loads into the plain model
    from safetensors.torch import load_file

    final = load_file(run / "final" / "model.safetensors")
    assert not torch.equal(final["visual.ln_pre.weight"], pretrained["visual.ln_pre.weight"])
    cfg = load_config([run / "final" / "config.yaml"])
    cfg.model.pretrained = None
    build_model(cfg.model).load_state_dict(final, strict=True)


@pytest.mark.slow
def test_kill9_in_each_stage_then_resume_matches_uninterrupted(fmnist_shards, launcher_runs, open_clip_file, reference_run):
    name = "killed"
    run = launcher_runs / name
    overrides = launcher_overrides(fmnist_shards, launcher_runs, name, open_clip_file)
    # kill -9 in stage 1 (after the step-3 checkpoint), then in stage 2 (after step 9's)
    Launch(overrides, launcher_runs / f"{name}_1.log").kill_when(
        lambda: latest_step(run) == 3 and steps_logged(run) >= 4, "checkpoint 3 and step 4")
    Launch(overrides, launcher_runs / f"{name}_2.log").kill_when(
        lambda: latest_step(run) == 9 and steps_logged(run) >= 10, "checkpoint 9 and step 10")
    assert not (run / "DONE").exists()
    Launch(overrides, launcher_runs / f"{name}_3.log").run()
    assert f"resumed from {run / 'checkpoints' / 'step_00000003'} at step 3" in (launcher_runs / f"{name}_2.log").read_text()
    assert f"resumed from {run / 'checkpoints' / 'step_00000009'} at step 9" in (launcher_runs / f"{name}_3.log").read_text()

    (reference,) = scalars(reference_run)
    segments = scalars(run)
    assert len(segments) == 3
    stitched: dict[str, dict[int, float]] = {}
    for segment in segments:  # a later segment's steps replace an earlier one's (steps redone after a kill)
        for tag, values in segment.items():
            stitched.setdefault(tag, {}).update(values)
    for tag in ("train/loss", "linearize/contrastive_loss", "linearize/transfer_loss", "linearize/stage",
                "linearize/transfer/image/layers_1-1", "train/lr"):
        assert stitched[tag] == reference[tag], tag  # bit for bit
    # each resumed segment starts right after its checkpoint: 3 -> step 4, 9 -> step 10
    assert min(segments[1]["train/loss"]) == 4 and min(segments[2]["train/loss"]) == 10


@pytest.mark.slow
def test_zero3_teacher_is_partitioned_like_the_model(fmnist_shards, launcher_runs, open_clip_file):
    """ZeRO-3: the teachers are frozen parameters that DeepSpeed partitions: each rank's checkpoint holds
    1/world of every teacher tensor, both stages run, and the export is the plain student."""
    name = "zero3"
    overrides = [o for o in launcher_overrides(fmnist_shards, launcher_runs, name, open_clip_file)
                 if not o.startswith(("train.zero_stage=", "train.steps=", "train.linearize.transfer_steps=",
                                      "train.checkpoint_every="))]
    overrides += ["train.zero_stage=3", "train.steps=4", "train.linearize.transfer_steps=2", "train.checkpoint_every=2"]
    Launch(overrides, launcher_runs / f"{name}.log").run()
    run = launcher_runs / name
    (series,) = scalars(run)
    assert series["linearize/stage"] == {1: 1.0, 2: 1.0, 3: 2.0, 4: 2.0}
    full = from_open_clip_state_dict_of(open_clip_file)
    for rank in range(WORLD):
        states = torch.load(run / "checkpoints/step_00000002" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)
        fragments = states["frozen_param_fragments"]
        teacher = {k: v for k, v in fragments.items() if TEACHER_KEY in k}
        assert len(teacher) == 4 * 2 * 2  # 4 tensors x 2 layers x 2 towers
        for key, fragment in teacher.items():
            student_key = key.replace(TEACHER_KEY, ".attn.")
            assert fragment.numel() == -(-full[student_key].numel() // WORLD), key
    from safetensors.torch import load_file

    cfg = load_config([run / "final" / "config.yaml"])
    cfg.model.pretrained = None
    build_model(cfg.model).load_state_dict(load_file(run / "final" / "model.safetensors"), strict=True)


def from_open_clip_state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    from ds_linclip.models.convert import from_open_clip_state_dict, read_state_dict

    return from_open_clip_state_dict(read_state_dict(path))


# ------------------------------------------------------------------------------------ the study's runs
def test_linearize_study_runs_start_from_the_teacher(tmp_path):
    """The study's run folders keep their names; the recipe's keys resolve in the trainer's config."""
    from ds_linclip.experiments.linearize import TeacherRunSpec, from_teacher
    from ds_linclip.experiments.runs import Budget, RunSpec

    scratch = RunSpec("linear-affine", 28, 64, Budget(steps=600, layers=2, width=64))
    short = Budget(steps=60, lr=5e-4, layers=2, width=64)
    teacher = tmp_path / "teacher.safetensors"
    recipe = from_teacher(scratch, short, teacher, label="linearized-n60-t30", finetune_warmup_steps=3,
                          transfer_steps=30, transfer_warmup_steps=3)
    assert recipe.name == "linear-affine-linearized-n60-t30-28px-w64"
    cfg = load_config([], recipe.train_overrides(tmp_path / "data", tmp_path / "runs"))
    assert cfg.model.pretrained == str(teacher) and cfg.model.image.attention == "linear-affine"
    assert (cfg.train.steps, cfg.train.lr, cfg.train.warmup_steps) == (60, 5e-4, 3)
    assert cfg.train.linearize.enabled and cfg.train.linearize.transfer_steps == 30
    assert cfg.train.run_name == recipe.name
    plain = load_config([], from_teacher(scratch, short, teacher, label="finetune-n60").train_overrides(
        tmp_path / "data", tmp_path / "runs"))
    assert not plain.train.linearize.enabled and plain.train.warmup_steps == 6 and plain.model.pretrained == str(teacher)
    assert TeacherRunSpec("linear-affine", 28, 64, scratch.budget, label="norecipe").name == "linear-affine-norecipe-28px-w64"
