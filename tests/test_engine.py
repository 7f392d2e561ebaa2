"""DeepSpeed config generation, launcher environment, weight-decay groups (no processes)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ds_linclip.config import ConfigError, load_config
from ds_linclip.train.engine import build_ds_config, deep_merge, dist_env, param_groups, write_ds_config


def _cfg(*overrides):
    return load_config([], ["model.preset=tiny", *overrides])


def test_batch_sizes_stated_once_and_global_derived():
    ds = build_ds_config(_cfg("train.micro_batch_size=8", "train.grad_accum_steps=3"), world_size=4, device="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_and_offload(stage):
    ds = build_ds_config(_cfg(f"train.zero_stage={stage}"), 2, device="cpu")
    assert ds["zero_optimization"] == {"stage": stage}
    if stage:
        ds = build_ds_config(_cfg(f"train.zero_stage={stage}", "train.offload_optimizer=true"), 2, device="cuda")
        assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        # DeepSpeed's CPU Adam is required with optimizer offload
        assert ds["optimizer"]["params"]["torch_adam"] is False


def test_offload_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.offload_param"):
        build_ds_config(_cfg("train.zero_stage=2", "train.offload_param=true"), 1, device="cpu")
    with pytest.raises(ConfigError, match="train.offload_optimizer"):
        build_ds_config(_cfg("train.zero_stage=0", "train.offload_optimizer=true"), 1, device="cpu")
    ds = build_ds_config(_cfg("train.zero_stage=3", "train.offload_param=true"), 1, device="cpu")
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_precision(precision):
    ds = build_ds_config(_cfg(f"train.precision={precision}"), 1, device="cpu")
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_optimizer_scheduler_clipping():
    cfg = _cfg("train.lr=1e-3", "train.min_lr=1e-5", "train.warmup_steps=7", "train.steps=50",
               "train.weight_decay=0.1", "train.grad_clip=2.5", "train.beta2=0.95")
    ds = build_ds_config(cfg, 1, device="cpu")
    assert ds["gradient_clipping"] == 2.5
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["optimizer"]["params"]["torch_adam"] is True
    sched = ds["scheduler"]["params"]
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert sched["total_num_steps"] == 50 and sched["warmup_num_steps"] == 7
    assert math.isclose(sched["cos_min_ratio"], 1e-2)


def test_lr_schedule_is_warmup_then_cosine_through_deepspeed_scheduler():
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    params = build_ds_config(_cfg("train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=4", "train.steps=12"), 1, "cpu")["scheduler"]["params"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(optimizer, **params)
    lrs = []
    for _ in range(12):
        sched.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75])  # linear warmup
    assert max(lrs) == pytest.approx(1.0, abs=0.05)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-6)  # ends at min_lr
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # decays monotonically


def test_passthrough_merged_last_and_batch_keys_refused(tmp_path):
    cfg = _cfg("deepspeed.zero_optimization.reduce_bucket_size=1000", "deepspeed.gradient_clipping=0.5",
               "deepspeed.flops_profiler.enabled=true")
    ds = build_ds_config(cfg, 1, device="cpu")
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert ds["gradient_clipping"] == 0.5
    assert ds["flops_profiler"] == {"enabled": True}
    with pytest.raises(ConfigError, match="deepspeed.train_batch_size"):
        build_ds_config(_cfg("deepspeed.train_batch_size=64"), 1, device="cpu")
    path = write_ds_config(ds, tmp_path)
    assert json.loads(path.read_text()) == ds


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    out = deep_merge(base, {"a": {"b": 5}, "d": {"x": 1}})
    assert out == {"a": {"b": 5, "c": 2}, "d": {"x": 1}}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


def test_dist_env_sources():
    assert dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}) == (
        dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    )
    env = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                    "SLURM_PROCID": "0", "SLURM_NTASKS": "8"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 4, 1, "h", 1234)
    env = dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                    "SLURM_JOB_NODELIST": "gpu[012-015,020],cpu7", "SLURM_JOB_ID": "40123"})
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert env.master_addr in ("gpu012",)  # scontrol's answer or our parser's: the first node
    assert env.master_port == 20000 + 40123 % 40000
    env = dist_env({})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (0, 1, 0, "127.0.0.1", 0)
    # one process needs no agreed port (any free one), even in a Slurm job; two or more ranks do
    assert dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "40123"}).master_port == 0
    assert dist_env({"RANK": "0", "WORLD_SIZE": "2"}).master_port == 29500
    with pytest.raises(RuntimeError, match="outside world size"):
        dist_env({"RANK": "2", "WORLD_SIZE": "2"})


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.logit_scale = torch.nn.Parameter(torch.ones(()))

    def no_weight_decay_names(self):
        return {"proj.bias", "norm.weight", "norm.bias", "logit_scale"}


def test_param_groups_exempt_the_named_parameters():
    model = _Toy()
    decay, no_decay = param_groups(model, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert [p is model.proj.weight for p in decay["params"]] == [True]
    assert {id(p) for p in no_decay["params"]} == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias), id(model.logit_scale)}
    with pytest.raises(ValueError, match="does not have"):
        param_groups(model, 0.2, no_decay_names={"nope"})
