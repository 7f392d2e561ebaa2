"""DeepSpeed engine from our config: process environment, the DeepSpeed config dict, the engine.

One source of truth: every DeepSpeed setting we rely on is derived from `cfg.train` here
(`build_ds_config`) and the `deepspeed:` section is merged on top last, so any other
DeepSpeed key can still be set. The dict is written to `R/ds_config.json` for the record.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import re
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from ds_linclip.config import ConfigError
from ds_linclip.train import lr_groups

# set by our batch keys; the `deepspeed:` section must not restate them (one statement of batch size)
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
DEFAULT_MASTER_PORT = 29500
# MASTER_PORT of a single process started without a launcher: the OS gives its rendezvous store a
# free port (no other rank needs to find it), so two quick runs on one machine do not collide
ANY_FREE_PORT = 0


class PortInUseError(RuntimeError):
    """The launcher's MASTER_PORT is taken on this machine (another run or job holds it)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm node list (`scontrol show hostnames`, else a small parser)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]  # split on commas outside brackets
    match = re.match(r"^([^\[]+)\[([^\]]+)\]", first)
    if not match:
        return first
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0]


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank/world/local rank from the launcher's variables.

    `RANK`/`WORLD_SIZE`/`LOCAL_RANK` (deepspeed, torchrun) win; else `SLURM_PROCID`/
    `SLURM_NTASKS`/`SLURM_LOCALID` (srun); else one process. MASTER_ADDR defaults to the first
    node of the Slurm allocation (or 127.0.0.1). MASTER_PORT: the launcher's; for a single process
    without one, any free port (ANY_FREE_PORT); else a port derived from the Slurm job id (so two
    jobs sharing a node do not collide) or 29500.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    if not 0 <= rank < world:
        raise RuntimeError(f"rank {rank} is outside world size {world} (check RANK/WORLD_SIZE or SLURM_*)")
    master_addr = env.get("MASTER_ADDR")
    if not master_addr:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        master_addr = _first_slurm_host(nodelist) if nodelist and world > 1 else "127.0.0.1"
    if env.get("MASTER_PORT"):
        master_port = int(env["MASTER_PORT"])
    elif world == 1:
        master_port = ANY_FREE_PORT
    elif env.get("SLURM_JOB_ID", "").isdigit():
        master_port = 20000 + int(env["SLURM_JOB_ID"]) % 40000
    else:
        master_port = DEFAULT_MASTER_PORT
    return DistEnv(rank, world, local_rank, master_addr, master_port)


def export_dist_env(env: DistEnv) -> None:
    """Put the resolved values where torch.distributed's env:// init reads them."""
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
    )


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def all_reduce_floats(values: list[float], op=None) -> list[float]:
    """A few floats reduced over all ranks (op: a torch.distributed.ReduceOp, default SUM) in float64; the values themselves
    without a process group. The tensor lives where the backend reduces: the CPU for gloo, this rank's
    accelerator otherwise (NCCL reduces device tensors only)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    from deepspeed.accelerator import get_accelerator

    device = "cpu" if dist.get_backend() == "gloo" else get_accelerator().current_device_name()
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor.tolist()


def quiet_dependency_output() -> None:
    """Silence what dependencies make torch print on every rank that says nothing about the run
    (the trainer calls it before the process group starts, the eval CLI at start). Our own code
    calls no deprecated API; these come from inside DeepSpeed 0.19 and torch."""
    # DeepSpeed's comm backend (deepspeed/comm/torch.py) calls torch.distributed.all_gather_into_tensor
    # or _all_gather_base for ZeRO's parameter all-gather, and reduce_scatter_tensor or
    # _reduce_scatter_base for ZeRO-3's gradient reduce-scatter; torch 2.14 deprecates them in favour
    # of all_gather_single / reduce_scatter_single and says so with a FutureWarning in each rank
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|_all_gather_base|reduce_scatter_tensor|_reduce_scatter_base)` ",
    )
    # torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when it is
    # imported wherever a CUDA toolkit (nvcc) is installed on a machine without a GPU; DeepSpeed's
    # CPU accelerator imports it at init (to JIT-load its shared-memory comm op), TorchInductor
    # when it compiles the focused feature map (kernels/torch_path.py)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def init_distributed(env: DistEnv, timeout_minutes: float = 10) -> None:
    """Process group over all ranks: gloo on CPU, DeepSpeed's choice (nccl, ...) on accelerators.
    Raises PortInUseError when rank 0 cannot listen on the launcher's MASTER_PORT."""
    import deepspeed
    import torch.distributed as dist

    quiet_dependency_output()
    export_dist_env(env)
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(env.local_rank)
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    try:
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    except dist.DistNetworkError as err:
        if "EADDRINUSE" not in str(err):
            raise
        raise PortInUseError(
            f"MASTER_PORT={env.master_port}: port {env.master_port} on {env.master_addr} is already in use (another "
            "run on this machine?); give the launcher a free port (deepspeed --master_port N, torchrun --master-port N, "
            "MASTER_PORT=N)"
        ) from None
    if accel.device_name() == "cpu":
        release_shm_buffer_name(env)


def shutdown_distributed() -> None:
    """Destroy the process group, if one was started, while the interpreter is still whole. Without
    it a gloo rank that exits right after a collective (a stop signal during start-up) can abort in
    interpreter finalization: gloo's worker thread still holds the finished work and its tensors, and
    freeing them then ends in "terminate called without an active exception" (SIGABRT), which the
    launcher reports as the run's failure. Local to this rank: no collective, so it is safe on every
    exit path, an exception's included."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# DeepSpeed's CPU accelerator reduces through POSIX shared memory when all ranks are on one machine
# (deepspeed/ops/csrc/cpu/comm/shm.cpp): each rank creates /dev/shm/<prefix>_<uid>_<addr>_<port>_<rank>
# (~66 MB), maps every peer's, and never unlinks it, so every multi-rank CPU run, finished or killed,
# left its buffers in /dev/shm (RAM) until reboot: ~130 MB per 2-rank run, on a fresh port each time.
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer_path(env: DistEnv) -> Path:
    """Where DeepSpeed's shared-memory allreduce buffer of this rank lives."""
    return Path("/dev/shm") / f"{SHM_BUFFER_PREFIX}_{os.getuid()}_{env.master_addr}_{env.master_port}_{env.rank}"


def release_shm_buffer_name(env: DistEnv) -> None:
    """Unlink this rank's buffer name once every rank has mapped every peer's buffer (the barrier:
    init returns only after the peers' buffers are open). The mappings stay valid until the process
    ends, and then the kernel frees the memory, whether the process exited or was killed."""
    import torch.distributed as dist

    if env.world_size > 1:  # every rank, so that a stale name of an earlier run cannot split the ranks
        dist.barrier()
    shm_buffer_path(env).unlink(missing_ok=True)  # absent without the shm op (ranks on several machines)


def deep_merge(base: dict, override: Mapping) -> dict:
    """`override` merged into a copy of `base`; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def micro_batches_per_step(train: DictConfig) -> int:
    """Micro-batches per rank per optimizer step: DeepSpeed's gradient_accumulation_steps. One of
    train.grad_accum_steps (each micro-batch its own loss) and train.accum_freq (one loss over all,
    feature-cached) is 1."""
    return int(train.grad_accum_steps) * int(train.accum_freq)


def global_batch_size(train: DictConfig, world_size: int) -> int:
    """Samples per optimizer step over all ranks."""
    return train.micro_batch_size * micro_batches_per_step(train) * world_size


def build_ds_config(cfg: DictConfig, world_size: int, device: str | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` (ZeRO, precision, clipping, accumulation, AdamW,
    warmup+cosine LR per optimizer step), with `cfg.deepspeed` merged on top."""
    train = cfg.train
    device = device or accelerator_name()
    if train.offload_param and train.zero_stage != 3:
        raise ConfigError(
            f"true: parameter offload needs ZeRO stage 3, but train.zero_stage is {train.zero_stage}",
            "train.offload_param",
        )
    if train.offload_optimizer and train.zero_stage == 0:
        raise ConfigError("true: optimizer offload needs ZeRO stage 1, 2 or 3, but train.zero_stage is 0",
                          "train.offload_optimizer")
    for key in ("micro_batch_size", "grad_accum_steps", "accum_freq", "steps"):
        if train[key] < 1:
            raise ConfigError(f"must be >= 1, got {train[key]}", f"train.{key}")
    if train.grad_accum_steps > 1 and train.accum_freq > 1:
        raise ConfigError(
            f"{train.accum_freq}: train.accum_freq (one loss over the cached features of all micro-batches) and "
            f"train.grad_accum_steps={train.grad_accum_steps} (one loss per micro-batch) are two ways to accumulate; "
            "set one of them to 1", "train.accum_freq")
    if train.lr <= 0 or not 0 <= train.min_lr <= train.lr:
        raise ConfigError(f"need 0 < lr and 0 <= min_lr <= lr (lr={train.lr}, min_lr={train.min_lr})", "train.min_lr")

    zero: dict[str, Any] = {"stage": int(train.zero_stage)}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device != "cpu"}
    if train.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device != "cpu"}

    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(train.micro_batch_size),
        # train.accum_freq's micro-batches are DeepSpeed's accumulation steps too (train/accumulate.py)
        "gradient_accumulation_steps": micro_batches_per_step(train),
        "train_batch_size": global_batch_size(train, world_size),
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {
            "enabled": train.precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(train.lr),
                "betas": [float(train.beta1), float(train.beta2)],
                "eps": float(train.adam_eps),
                "weight_decay": float(train.weight_decay),
                # FusedAdam on CPU is a JIT-built op with no gain over torch's foreach AdamW;
                # with optimizer offload DeepSpeed needs its own CPU Adam, so only when not offloading
                "torch_adam": device == "cpu" and not train.offload_optimizer,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": int(train.steps),
                "warmup_num_steps": max(1, int(train.warmup_steps)),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": float(train.min_lr) / float(train.lr),
            },
        },
        "steps_per_print": 10**9,  # our loop logs; keep DeepSpeed's own step prints out of the way
        "wall_clock_breakdown": False,
    }
    passthrough = OmegaConf.to_container(cfg.deepspeed, resolve=True) if isinstance(cfg.deepspeed, DictConfig) else dict(cfg.deepspeed or {})
    for key in _BATCH_KEYS:
        if key in passthrough:
            raise ConfigError(
                "batch size is stated once, in train.micro_batch_size and train.grad_accum_steps / train.accum_freq "
                "(the global batch is derived); remove it from the deepspeed section",
                f"deepspeed.{key}",
            )
    merged = deep_merge(ds, passthrough)
    _check_merged(merged, passthrough)
    return merged


def _check_merged(ds: dict[str, Any], passthrough: Mapping) -> None:
    """Conflicts the `deepspeed:` section can introduce on top of what train.* generated (DeepSpeed
    itself reports them only inside deepspeed.initialize, after the model is built)."""
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    key = "deepspeed.zero_optimization" if "zero_optimization" in passthrough else "train.zero_stage"
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"stage {stage!r} is not a ZeRO stage (0-3)", key)

    def offloads(name: str) -> bool:
        value = zero.get(name)
        return bool(value) and (not isinstance(value, Mapping) or value.get("device", "none") != "none")

    if offloads("offload_param") and stage != 3:
        raise ConfigError(f"offload_param needs ZeRO stage 3, the merged stage is {stage}", key)
    if offloads("offload_optimizer") and stage == 0:
        raise ConfigError("offload_optimizer needs ZeRO stage 1, 2 or 3, the merged stage is 0", key)
    enabled = [name for name in ("bf16", "fp16") if (ds.get(name) or {}).get("enabled")]
    if len(enabled) > 1:
        raise ConfigError("bf16 and fp16 are both enabled; choose one with train.precision", "deepspeed")


def write_ds_config(ds_config: dict, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "ds_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ds_config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_names: Iterable[str] | None = None,
                 lr_scales: Mapping[str, tuple[str, float]] | None = None) -> list[dict]:
    """AdamW groups: decay for weight matrices; none for the names the model exempts (biases,
    norms, embeddings, logit_scale). Both groups are always present (possibly empty) so the
    optimizer state layout does not depend on the model. Parameters with requires_grad=False
    (locked towers, frozen teachers) are in no group: no optimizer state, no update.

    lr_scales (name -> (label, lr scale), `lr_groups.lr_scales`): one decay and one no-decay group per
    label, in the mapping's order, named `<label>.decay` (just `decay` for the label ''), each with
    its scale under `lr_groups.LR_SCALE` (`build_engine` turns it into the group's lr)."""
    exempt = set(no_decay_names if no_decay_names is not None else model.no_weight_decay_names())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    unknown = exempt - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no_weight_decay_names() lists parameters the model does not have: {sorted(unknown)[:5]}")
    if lr_scales is None:
        lr_scales = {n: ("", None) for n, _ in named}
    label_scales: dict[str, float | None] = {}
    for label, scale in lr_scales.values():
        if label_scales.setdefault(label, scale) != scale:
            raise ValueError(f"lr group '{label}' has two lr scales, {label_scales[label]} and {scale}")
    groups: dict[tuple[str, bool], dict] = {}
    for label, scale in label_scales.items():
        for decays in (True, False):
            name = ("decay" if decays else "no_decay") if not label else f"{label}.{'decay' if decays else 'no_decay'}"
            group = {"params": [], "weight_decay": float(weight_decay) if decays else 0.0, "name": name}
            if scale is not None:
                group[lr_groups.LR_SCALE] = float(scale)
            groups[(label, decays)] = group
    for n, p in named:
        groups[(lr_scales[n][0], n not in exempt)]["params"].append(p)
    return list(groups.values())


def promote_scalar_parameters(model: torch.nn.Module) -> list[str]:
    """Replace each 0-dim parameter by a 1-element one with the same value and name; returns the names.

    DeepSpeed 0.19 reinterprets every parameter as bytes (`p.data.view(torch.uint8)`) to broadcast it
    (engine start-up, ZeRO-3 `zero.Init`, `GatheredParameters`), which raises for 0-dim tensors
    ("self.dim() cannot be 0 to view Float as Byte") -- and CLIP's logit_scale is one, as in
    open_clip. A (1,)-shaped logit_scale broadcasts the same in the loss; `export` gives the
    plain model's shapes back.
    """
    promoted = []
    for name, param in list(model.named_parameters()):
        if param.dim() == 0:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attr, torch.nn.Parameter(param.detach().reshape(1).clone(), requires_grad=param.requires_grad))
            promoted.append(name)
    return promoted


def build_engine(cfg: DictConfig, model: torch.nn.Module, ds_config: dict, groups: list[dict] | None = None):
    """deepspeed.initialize with our param groups (or `groups`, e.g. train.linearize's; a group's lr is
    train.lr x its lr_groups.LR_SCALE); returns the engine (optimizer and scheduler inside).
    0-dim parameters become 1-element ones first (see `promote_scalar_parameters`)."""
    import deepspeed

    promote_scalar_parameters(model)
    if groups is None:
        groups = param_groups(model, cfg.train.weight_decay, lr_scales=lr_groups.lr_scales(model, cfg.train))
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g.pop("name", None)
        if lr_groups.LR_SCALE in g:  # DeepSpeed's scheduler scales each group's own start lr
            g["lr"] = float(cfg.train.lr) * g[lr_groups.LR_SCALE]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine
