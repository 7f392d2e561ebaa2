"""Activation checkpointing: identical loss and gradients, lower measured peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_linclip.config import load_config
from ds_linclip.models import build_model
from ds_linclip.train.loss import ClipLoss

REPO = Path(__file__).resolve().parents[1]


def _loss_and_grads(every: int, images, tokens, attention=("model.image.attention=linear-affine",)):
    torch.manual_seed(0)
    model = build_model(load_config([], ["model.preset=tiny", *attention]).model)
    model.set_grad_checkpointing(every)
    loss = ClipLoss()(*model(images, tokens))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", [
    ("model.image.attention=linear-affine",),
    # the local branch needs the patch grid, which must reach the recomputed blocks too
    ("model.image.attention=linear-focused", "model.image.local_kernel=3", "model.text.attention=linear-focused"),
], ids=["affine", "focused-local3"])
def test_same_loss_and_gradients(attention):
    torch.manual_seed(1)
    images = torch.randn(6, 3, 32, 32)
    tokens = torch.randint(1, 49000, (6, 32))
    tokens[:, -1] = 49407  # EOT: the pooled position
    loss_off, grads_off = _loss_and_grads(0, images, tokens, attention)
    for every in (1, 2):
        loss_on, grads_on = _loss_and_grads(every, images, tokens, attention)
        assert torch.equal(loss_on, loss_off) or torch.allclose(loss_on, loss_off, rtol=0, atol=1e-6)
        assert grads_on.keys() == grads_off.keys()
        for name in grads_off:
            torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-6, msg=name)


# One training step in a fresh process. Linux resets the peak-RSS mark (VmHWM) on
# `echo 5 > /proc/self/clear_refs`, so the peak of just this step is measured.
_PEAK_SCRIPT = r"""
import json, sys, torch
from ds_linclip.config import load_config
from ds_linclip.models import build_model
from ds_linclip.train.loss import ClipLoss
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
every, batch = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = build_model(load_config([], ["model.preset=tiny"]).model)
model.set_grad_checkpointing(every)
images = torch.randn(batch, 3, 32, 32)
tokens = torch.randint(1, 49000, (batch, 32)); tokens[:, -1] = 49407
loss = ClipLoss()(*model(images[:2], tokens[:2])); loss.backward()  # grads allocated, kernels warm
before = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
loss = ClipLoss()(*model(images, tokens)); loss.backward()
peak = status_kib("VmHWM")
print(json.dumps({"peak_growth_mib": (peak - before) / 1024, "loss": loss.item()}))
"""


def _peak_growth(every: int, batch: int = 64) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(every), str(batch)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_lower_measured_peak_memory():
    off, on = _peak_growth(0), _peak_growth(1)
    print(f"peak RSS growth of one training step: off {off['peak_growth_mib']:.0f} MiB, "
          f"every block {on['peak_growth_mib']:.0f} MiB")
    assert abs(off["loss"] - on["loss"]) < 1e-5
    assert on["peak_growth_mib"] < 0.6 * off["peak_growth_mib"], (off, on)
