"""The eval job on a really trained model: the tiny CLIP trained by our trainer for a few minutes
on the Fashion-MNIST shards scores well above chance (10%) zero-shot on the 10,000 test images.

The watcher scores the run the trainer leaves (DeepSpeed tag, `latest`, client state, DONE), so
this is also the trainer -> eval integration test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS = 120
BATCH = 64
# chance is 10%; the measured top-1 after these steps is in the eval workstream's report
MIN_TOP1 = 0.35


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.timeout(2400)  # real training: minutes on an idle 2-core machine, far more on a shared one
def test_trained_tiny_model_scores_well_above_chance(fmnist_shards, tmp_path):
    env = dict(
        os.environ, PYTHONPATH=str(REPO_ROOT), DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(),
    )
    run = tmp_path / "runs" / "fmnist"
    train = subprocess.run(
        [sys.executable, "-m", "ds_linclip.train", "model.preset=tiny",
         f"data.train_shards={fmnist_shards}/train/shard-{{000000..000011}}.tar", "data.workers=1",
         f"train.output_dir={tmp_path / 'runs'}", "train.run_name=fmnist", f"train.steps={STEPS}",
         f"train.micro_batch_size={BATCH}", "train.lr=2e-3", "train.warmup_steps=10", "train.weight_decay=0.1",
         "train.precision=fp32", "train.zero_stage=1", f"train.checkpoint_every={STEPS}", "train.log_every=20"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1500,
    )
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-4000:]
    assert (run / "DONE").is_file()

    watch = subprocess.run(
        [sys.executable, "-m", "ds_linclip.eval", "--watch", str(run), "--no-progress",
         f"eval.zeroshot_data={fmnist_shards}/test/shard-{{000000..000009}}.tar", "eval.classnames=fashion_mnist",
         "eval.templates=simple", "eval.batch_size=500", "eval.workers=1", "eval.device=cpu"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert watch.returncode == 0, watch.stdout[-2000:] + watch.stderr[-4000:]
    tag = f"step_{STEPS:08d}"
    record = json.loads((run / "eval" / f"{tag}_zeroshot.json").read_text())
    print(f"\nFashion-MNIST zero-shot after {STEPS} steps x {BATCH}: {record['metrics']}")
    print(watch.stdout)
    assert record["num_samples"] == 10_000 and record["num_classes"] == 10
    assert record["step"] == STEPS and record["samples_seen"] == STEPS * BATCH
    assert record["metrics"]["top1"] > MIN_TOP1, record["metrics"]
    assert json.loads((run / "eval" / "watch_state.json").read_text())["checkpoints"][tag]["status"] == "ok"
