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
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds_linclip.config import ConfigError, load_config
from ds_linclip.models import build_model
from ds_linclip.train.linearize import (
    GROUP_KEY, STAGE_FINETUNE, STAGE_TRANSFER, TEACHER_KEY, Linearizer, reset_optimizer_state, strip_teacher,
    warmup_cosine,
)

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


# ------------------------------------------------------------------------------------ in-process
def small_overrides(attention: str, pretrained: str | None = None, **train) -> list[str]:
    out = ["model.preset=tiny", "model.embed_dim=32", "model.image.image_size=16", "model.text.context_length=8"]
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


def test_stage1_stream_is_the_softmax_model_and_only_attention_gets_gradients(softmax_file):
    cfg, model, linearizer, optimizer = recipe(softmax_file)
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
    assert warmup_cosine(10, 10, 2, 1.0, 0.1) == pytest.approx(0.1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    optimizer.zero_grad()
    optimizer.param_groups[0]["params"][0].grad = torch.ones(2)
    optimizer.step()
    reset_optimizer_state(optimizer)
    state = next(iter(optimizer.state.values()))
    assert float(state["step"]) == 0 and state["exp_avg"].abs().sum() == 0 and state["exp_avg_sq"].abs().sum() == 0
