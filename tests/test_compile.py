"""train.compile: the model through torch.compile (TorchInductor) before DeepSpeed wraps it.

Graph breaks are counted with torch._dynamo.explain on the tiny model: none on the PyTorch paths
(softmax SDPA, and the linear variants' custom autograd.Functions, which TorchDynamo traces), and on
the Triton path only the breaks around the kernels, which are kept out of the graph on purpose
(torch's lazy `torch._disable_dynamo` on `linear_attention_triton`, which imports TorchDynamo at its
first call, not when the kernels are imported). The slow test trains 4 steps through the
trainer twice, eager and compiled, and compares the logged losses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_launch import REPO, cpu_env

from ds_linclip.config import load_config
from ds_linclip.models import build_model

LAYERS = 2  # per tower: enough to see per-layer breaks, cheap to trace
LINEAR = ["model.image.attention=linear-focused", "model.image.local_kernel=3", "model.text.attention=linear-affine"]


def _explain(*overrides):
    torch.manual_seed(0)
    cfg = load_config([], ["model.preset=tiny", f"model.image.layers={LAYERS}", f"model.text.layers={LAYERS}",
                           *overrides])
    model = build_model(cfg.model)
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 49000, (2, 32))
    tokens[:, -1] = 49407
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(model)(images, tokens)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("overrides", [[], LINEAR, ["model.attention_backend=torch", "model.text.attention=linear-focused"]],
                         ids=["softmax", "linear-focused-local3+affine", "focused-text"])
def test_torch_paths_compile_in_one_graph(overrides):
    explanation = _explain(*overrides)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_triton_path_breaks_only_around_its_kernels():
    explanation = _explain("model.attention_backend=triton", *LINEAR)
    reasons = [b.reason for b in explanation.break_reasons]
    # Dynamo does not trace into the launcher: "skipped" (torch's lazy disable) or "disable" (torch.compiler.disable)
    assert reasons and all("linear_attention_triton" in r and ("skipped" in r or "disable" in r) for r in reasons), reasons
    # at most a few frames (attention, block, tower) resumed per kernel call
    assert explanation.graph_break_count <= 4 * 2 * LAYERS, reasons


def test_importing_the_kernels_does_not_import_dynamo():
    """Every CLI start (--help, --check) and eval job imports the kernels; TorchDynamo (~1.3 s) is not
    imported with them, only where something compiles or calls the Triton launcher."""
    code = ("import sys, ds_linclip.config, ds_linclip.models, kernels; "
            "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], env=cpu_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False", result.stdout


def _train(tmp_path: Path, shards: Path, name: str, *extra: str) -> dict[int, tuple[float, float]]:
    """One rank, 4 steps; step -> (loss, grad norm) from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["model.preset=tiny", *LINEAR, f"data.train_shards={shards}/train/shard-{{000000..000011}}.tar",
            "data.workers=1", f"train.output_dir={tmp_path}", f"train.run_name={name}", "train.steps=4",
            "train.micro_batch_size=8", "train.precision=fp32", "train.lr=1e-3", "train.warmup_steps=1",
            "train.log_every=1", "train.checkpoint_every=0", "train.resume=none", *extra]
    done = subprocess.run([sys.executable, "-m", "ds_linclip.train", *args], env=cpu_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    acc = EventAccumulator(str(tmp_path / name / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    norm = {e.step: e.value for e in acc.Scalars("train/grad_norm")}
    return {step: (loss[step], norm[step]) for step in loss}


@pytest.mark.slow
def test_compiled_training_matches_eager_zero3(fmnist_shards, tmp_path):
    # ZeRO-3: the compiled forward runs with DeepSpeed's parameter-gathering hooks on every submodule
    eager = _train(tmp_path, fmnist_shards, "eager", "train.zero_stage=3")
    compiled = _train(tmp_path, fmnist_shards, "compiled", "train.zero_stage=3", "train.compile=true")
    assert sorted(compiled) == sorted(eager) == [1, 2, 3, 4]
    for step in eager:  # step 4's loss is after a real update (DeepSpeed's warmup gives steps 1-2 lr 0)
        assert compiled[step][0] == pytest.approx(eager[step][0], abs=1e-5), (step, compiled, eager)
        assert compiled[step][1] == pytest.approx(eager[step][1], rel=1e-4), (step, compiled, eager)
