"""Everything about a run that the config and the file system can tell, checked before any rank
starts torch.distributed, builds the model or the DeepSpeed engine.

A problem raises `ConfigError` naming the key and its value; the CLIs print it as one line and
exit 2 (`python -m ds_linclip.train` prints it on rank 0 only; every rank runs the same cheap
checks and exits alike, so no rank is left waiting in a rendezvous). Without this, a shard spec
that matches nothing or a DeepSpeed option conflict surfaced only after the model and engine were
built: on a large job, a queue wait and a full start-up per typo.

    check_train(cfg, world_size) -> Plan      the trainer (all ranks), also `--check`
    check_eval_inputs(cfg, tasks)             eval data specs, class-name and template files
                                              (the trainer with train.eval_after_checkpoint,
                                              `python -m ds_linclip.eval`, `eval.submit`)

The checks assume every rank sees the same file system (a rank that sees it differently exits 2
too, but only rank 0 prints).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from ds_linclip.config import ConfigError
from ds_linclip.data import shards as shardlib
from ds_linclip.train.phases import Phase, plan_phases

GIB = 2**30


@dataclass(frozen=True)
class PhaseCost:
    """One phase's per-sample cost (models/flops.py) and estimated activation memory per rank."""

    phase: Phase
    tokens_per_image: int  # what the image blocks see (CLS + kept patches)
    forward_gflops_per_sample: float  # one image + one caption, training forward
    attention_share: float  # of those FLOPs, token mixing
    activation_bytes: int  # one micro-batch, no activation checkpointing
    checkpointed_activation_bytes: int  # with train.grad_checkpointing (1 if it is off), recompute peak included
    checkpoint_every: int

    def row(self) -> list[str]:
        p = self.phase
        return [str(p.index), f"{p.first_step}-{p.last_step}", str(p.steps), str(p.image_size), f"{p.patch_dropout:g}",
                str(self.tokens_per_image), f"{self.forward_gflops_per_sample:.2f}", f"{100 * self.attention_share:.1f}",
                f"{self.activation_bytes / GIB:.2f}", f"{self.checkpointed_activation_bytes / GIB:.2f}"]


def phase_costs(cfg: DictConfig, phases: Sequence[Phase]) -> tuple[PhaseCost, ...]:
    """Per-phase tokens, forward FLOPs and activation memory at train.micro_batch_size."""
    from ds_linclip.models.flops import activation_bytes, model_cost

    bytes_per_element = 4 if cfg.train.precision == "fp32" else 2
    every = int(cfg.train.grad_checkpointing) or 1
    out = []
    for phase in phases:
        cost = model_cost(cfg.model, phase.image_size, phase.patch_dropout)
        flops = cost.image.flops + cost.text.flops
        memory = {k: activation_bytes(cfg.model, int(cfg.train.micro_batch_size), phase.image_size,
                                      phase.patch_dropout, k, bytes_per_element).peak for k in (0, every)}
        out.append(PhaseCost(phase, cost.image.tokens, flops / 1e9,
                             (cost.image.attention_flops + cost.text.attention_flops) / flops,
                             memory[0], memory[every], every))
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """What a run will do, derived from the config (printed by `--check`)."""

    world_size: int
    micro_batch_size: int
    grad_accum_steps: int  # micro-batches per rank per step (train.grad_accum_steps x train.accum_freq)
    global_batch_size: int
    num_shards: int
    samples_per_epoch: int
    samples_per_epoch_source: str  # "data.train_num_samples" | "sizes.json"
    batches_per_epoch: int  # per rank
    steps: int
    resume: str | None  # the checkpoint a start would resume from
    phases: tuple[PhaseCost, ...] = ()

    @property
    def epochs(self) -> float:
        return self.steps * self.grad_accum_steps / max(1, self.batches_per_epoch)

    def summary(self) -> str:
        return "\n".join([
            f"world size:        {self.world_size} rank(s)",
            f"global batch:      {self.global_batch_size} = micro batch {self.micro_batch_size} x accumulation "
            f"{self.grad_accum_steps} x {self.world_size} rank(s)",
            f"shards:            {self.num_shards}",
            f"samples per epoch: {self.samples_per_epoch} (from {self.samples_per_epoch_source}); "
            f"{self.batches_per_epoch} micro-batches per rank per epoch",
            f"steps:             {self.steps} ({self.epochs:.2f} epochs)",
            f"resume from:       {self.resume or 'nothing (a fresh run)'}",
            *self.phase_table(),
        ])

    def phase_table(self) -> list[str]:
        if not self.phases:
            return []
        every = self.phases[0].checkpoint_every
        header = ["phase", "steps", "n", "px", "drop", "tokens/img", "fwd GFLOPs/sample", "attn %",
                  "act GiB/rank", f"act GiB/rank ckpt {every}"]
        rows = [header] + [cost.row() for cost in self.phases]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        return ["phases (activation memory: estimated from shapes at micro batch "
                f"{self.micro_batch_size}; 'ckpt {every}' = train.grad_checkpointing={every}):", *lines]


def _value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key)


def _fail(key: str, value: Any, problem: str) -> ConfigError:
    return ConfigError(f"{value!r}: {problem}", key=key)


# ----------------------------------------------------------------------------- pure config


def check_numbers(cfg: DictConfig) -> None:
    """Ranges the schema's types cannot express (a 0 here would divide by zero hours into a run)."""
    at_least = {
        "train.micro_batch_size": 1, "train.grad_accum_steps": 1, "train.accum_freq": 1, "train.steps": 1, "train.log_every": 1,
        "train.keep_last": 1, "train.checkpoint_every": 0, "train.warmup_steps": 0, "train.max_nonfinite_steps": 1,
        "train.dist_timeout_minutes": 1, "train.keep_unscored_max": 0, "data.workers": 0,
        "data.shuffle_buffer": 0,
    }
    for key, low in at_least.items():
        value = _value(cfg, key)
        if value is not None and value < low:
            raise _fail(key, value, f"must be >= {low}")
    samples = cfg.data.train_num_samples
    if samples is not None and samples < 1:
        raise _fail("data.train_num_samples", samples, "must be >= 1 (or null: read sizes.json)")


def check_loss(cfg: DictConfig) -> None:
    """Loss and accumulation options that do not combine (the choices themselves: config.py)."""
    if cfg.train.accum_freq > 1 and cfg.train.linearize.enabled:
        raise _fail("train.accum_freq", cfg.train.accum_freq,
                    "feature-cached accumulation is not available with train.linearize.enabled=true (its transfer "
                    "loss is per micro-batch); use train.grad_accum_steps")


def check_deepspeed_options(cfg: DictConfig, world_size: int) -> dict:
    """The DeepSpeed config this run would get (build_ds_config's checks: offload vs ZeRO stage,
    batch keys in the `deepspeed:` section, ...), without DeepSpeed."""
    from ds_linclip.train.engine import build_ds_config

    # the device only changes pin_memory and the Adam flavour, never whether options conflict
    return build_ds_config(cfg, world_size, device="cpu")


# ----------------------------------------------------------------------------- file system


def _spec_text(spec) -> str:
    return spec if isinstance(spec, str) else "::".join(map(str, spec))


def check_train_data(cfg: DictConfig, world_size: int) -> tuple[int, int, str, int]:
    """(shards, samples per epoch, where that number came from, micro-batches per rank per epoch);
    the same rules `data.pipeline.build_train_loader` applies, as ConfigErrors."""
    spec = cfg.data.train_shards
    try:
        sources = shardlib.parse_spec(spec)
    except shardlib.ShardSpecError as err:
        raise ConfigError(str(err), key="data.train_shards") from None
    urls = [u for s in sources for u in s.urls]
    workers = max(1, int(cfg.data.workers))
    spec_text = _spec_text(spec)
    if cfg.data.mode == "epoch":
        if any(s.weighted for s in sources):
            raise ConfigError(
                f"{spec_text!r}: source weights (`@w`) need data.mode=resampled (data.mode is 'epoch': an epoch "
                "reads each shard once)", key="data.train_shards")
        try:
            shardlib.check_enough_shards(len(urls), world_size, workers, spec_text)
        except shardlib.ShardSpecError as err:
            raise ConfigError(f"{err} (data.workers={cfg.data.workers})", key="data.train_shards") from None
    samples, source = cfg.data.train_num_samples, "data.train_num_samples"
    if samples is None:
        samples, source = shardlib.num_samples(urls), "sizes.json"
        if samples is None:
            where = sorted({str(Path(u).parent / "sizes.json") for u in urls if not shardlib._is_remote(u)})
            raise ConfigError(
                "not set, and samples per epoch are unknown for data.train_shards="
                f"{spec_text!r}: " + (f"{', '.join(where[:3])} missing or not listing every shard"
                                      if where else "remote/pipe: shards have no sizes.json")
                + "; set data.train_num_samples", key="data.train_num_samples")
    batch = int(cfg.train.micro_batch_size)
    worker_batches = int(samples) // (world_size * workers * batch)
    if worker_batches < 1:
        raise ConfigError(
            f"{batch}: {samples} samples per epoch ({source}) do not fill one batch per dataloader worker "
            f"({world_size} rank(s) x {workers} worker(s) x {batch})", key="train.micro_batch_size")
    return len(urls), int(samples), source, worker_batches * workers


def check_weights_file(path_value: str, key: str) -> None:
    """A weights file (or a folder holding one) that exists and whose container is intact:
    safetensors header, or a torch zip archive's directory (a truncated copy fails here)."""
    from ds_linclip.models.convert import WEIGHT_FILE_NAMES

    path = Path(path_value).expanduser()
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILE_NAMES if (path / name).is_file()]
        if not found:
            raise _fail(key, path_value, f"folder holds none of {', '.join(WEIGHT_FILE_NAMES)}")
        path = found[0]
    if not path.is_file():
        raise _fail(key, path_value, "no such file or folder")
    if not os.access(path, os.R_OK):
        raise _fail(key, path_value, f"{path} is not readable")
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if path.suffix == ".safetensors":
                size = int.from_bytes(head, "little") if len(head) == 8 else 0
                header = handle.read(size) if 0 < size < 100 * 2**20 else b""
                if len(header) != size or size == 0:
                    raise ValueError("truncated safetensors header")
                json.loads(header)
            elif head[:4] == b"PK\x03\x04":  # torch.save's zip format
                zipfile.ZipFile(path).namelist()
            elif not head:
                raise ValueError("empty file")
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise _fail(key, path_value, f"{path} is not a readable weights file ({err})") from None


def check_resume(cfg: DictConfig, world_size: int) -> str | None:
    """The checkpoint `train.resume` resolves to (None for a fresh run); one that cannot be
    loaded by this run is a ConfigError now, not a DeepSpeed traceback after start-up."""
    from ds_linclip.train import checkpoint as ckpt

    resume = str(cfg.train.resume)
    save_dir = Path(cfg.train.output_dir) / cfg.train.run_name / "checkpoints"
    try:
        resolved = ckpt.resolve_resume(resume, save_dir)
    except (FileNotFoundError, ValueError) as err:
        raise _fail("train.resume", resume, str(err)) from None
    if resolved is None:
        return None
    tag_dir = resolved[0] / resolved[1]
    if not any(tag_dir.glob("*model_states.pt")):
        raise _fail("train.resume", resume, f"{tag_dir} is not a checkpoint (no DeepSpeed *model_states.pt; "
                                            "use auto | none | a tag folder like R/checkpoints/step_00001000)")
    states = sorted((tag_dir / ckpt.CLIENT_STATE_DIR).glob("rank_*.pt"))
    if not states:
        raise _fail("train.resume", resume, f"{tag_dir} has no {ckpt.CLIENT_STATE_DIR}/rank_*.pt: not written "
                                            "by ds_linclip.train")
    if len(states) != world_size:
        raise _fail("train.resume", resume, f"{tag_dir} was written by {len(states)} rank(s), this run has "
                                            f"{world_size}; the data-loader position is per rank, so resume with "
                                            "the same world size")
    from ds_linclip.serialization import UnsafeCheckpointError, check_tag_dir

    try:
        check_tag_dir(tag_dir)
    except UnsafeCheckpointError as err:
        raise _fail("train.resume", resume, str(err)) from None
    return str(tag_dir)


def check_output_dir(cfg: DictConfig) -> None:
    value = cfg.train.output_dir
    path = (Path(value).expanduser() / cfg.train.run_name).absolute()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise _fail("train.output_dir", value, f"{parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise _fail("train.output_dir", value, f"{parent} is not writable")
            return


def check_eval_inputs(cfg: DictConfig, tasks: Sequence[str] = ("zeroshot", "retrieval")) -> None:
    """The eval data specs of `tasks` match something, and class-name/template files exist."""
    from ds_linclip.data.benchmark_layout import LayoutError, is_benchmark_layout, read_layout
    from ds_linclip.data.imagefolder import is_image_folder
    from ds_linclip.data.prompts import BUILTIN_CLASSNAMES, BUILTIN_TEMPLATES

    ev = cfg.eval

    def benchmark_folder(key: str) -> bool:
        """`eval.<key>` is a CLIP_benchmark folder whose `eval.split` has its shards."""
        if not is_benchmark_layout(str(ev[key])):
            return False
        try:
            read_layout(str(ev[key]), ev.split)
        except LayoutError as err:
            raise ConfigError(str(err), key="eval.split") from None
        return True

    if "zeroshot" in tasks and ev.zeroshot_data:
        benchmark = benchmark_folder("zeroshot_data")
        folder = not benchmark and is_image_folder(str(ev.zeroshot_data))
        if not (folder or benchmark):
            try:
                shardlib.parse_spec(ev.zeroshot_data)
            except shardlib.ShardSpecError as err:
                raise ConfigError(f"{err} (nor is it an ImageFolder or a CLIP_benchmark folder)",
                                  key="eval.zeroshot_data") from None
        for key, value in (("eval.classnames", ev.classnames), ("eval.templates", ev.templates)):
            if value == "dataset" and not benchmark:
                raise _fail(key, value, f"needs eval.zeroshot_data to be a CLIP_benchmark folder, not {ev.zeroshot_data!r}")
        if ev.classnames == "folders":
            if not folder:
                raise _fail("eval.classnames", ev.classnames,
                            f"needs eval.zeroshot_data to be an ImageFolder, not {ev.zeroshot_data!r}")
        elif ev.classnames not in (*BUILTIN_CLASSNAMES, "dataset") and not Path(ev.classnames).expanduser().is_file():
            raise _fail("eval.classnames", ev.classnames,
                        f"no such file (or use one of {', '.join(BUILTIN_CLASSNAMES)}, folders, dataset)")
        if ev.templates not in (*BUILTIN_TEMPLATES, "dataset") and not Path(ev.templates).expanduser().is_file():
            raise _fail("eval.templates", ev.templates,
                        f"no such file (or use one of {', '.join(BUILTIN_TEMPLATES)}, dataset)")
    if "retrieval" in tasks and ev.retrieval_data and not benchmark_folder("retrieval_data"):
        try:
            shardlib.parse_spec(ev.retrieval_data)
        except shardlib.ShardSpecError as err:
            raise ConfigError(str(err), key="eval.retrieval_data") from None


def check_train(cfg: DictConfig, world_size: int) -> Plan:
    """Every check of a training start, in the order a user would fix them; returns the Plan."""
    if cfg.data.train_shards is None:
        raise ConfigError("a value is required (e.g. data.train_shards='data/train/{000000..000011}.tar')",
                          key="data.train_shards")
    check_numbers(cfg)
    check_loss(cfg)
    phases = plan_phases(cfg)
    check_deepspeed_options(cfg, world_size)
    num_shards, samples, source, batches = check_train_data(cfg, world_size)
    if cfg.model.pretrained:
        check_weights_file(str(cfg.model.pretrained), "model.pretrained")
    if cfg.train.eval_after_checkpoint:
        if not (cfg.eval.zeroshot_data or cfg.eval.retrieval_data):
            raise _fail("train.eval_after_checkpoint", True,
                        "needs eval.zeroshot_data and/or eval.retrieval_data to score each checkpoint on")
        check_eval_inputs(cfg)
    resume = check_resume(cfg, world_size)
    check_output_dir(cfg)
    from ds_linclip.train.engine import global_batch_size, micro_batches_per_step

    tc = cfg.train
    return Plan(
        world_size=world_size, micro_batch_size=int(tc.micro_batch_size), grad_accum_steps=micro_batches_per_step(tc),
        global_batch_size=global_batch_size(tc, world_size), num_shards=num_shards,
        samples_per_epoch=samples, samples_per_epoch_source=source, batches_per_epoch=batches, steps=int(tc.steps),
        resume=resume, phases=phase_costs(cfg, phases),
    )
