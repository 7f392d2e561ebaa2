"""The one config schema: dataclasses -> OmegaConf structured config.

Resolution order (later wins): schema defaults -> `model.preset` shapes -> YAML files (each may
list parts under `defaults:`, paths relative to that file) -> CLI dotlist overrides.

Every error names the key, the source it came from (file or `override`) and the closest
valid key, and the CLIs exit with code 2 on it (see `ConfigError`, `cli_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import math
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ds_linclip.models.attention import ATTENTION_KINDS, AttentionSpecError, resolve_attention
from ds_linclip.models.groups import num_lock_groups

ATTENTION_BACKENDS = ("auto", "torch", "triton")
PRECISIONS = ("bf16", "fp16", "fp32")
EVAL_CLUSTERS = ("auto", "slurm", "local", "debug")
DATA_MODES = ("epoch", "resampled")
LOSSES = ("clip", "siglip")
SIGLIP_DISTS = ("bidir", "gather")
# open_clip's initialisation for SigLIP (init_logit_scale, init_logit_bias): logits 10 * cos - 10
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0
RESUME_MODES_HINT = "auto | none | PATH"


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    # softmax | linear (feature map from `feature_map`) | linear-affine (the paper's) | linear-focused
    # | linear-elu | linear-relu | linear-pola (shorthands naming the feature map; docs/attention_variants.md)
    attention: str = "softmax"
    # linear only: affine | focused | elu | relu | pola; null = the shorthand's (or affine for `linear`)
    feature_map: Optional[str] = None
    # linear only, the normaliser: `count` divides by the token count (the paper's), `kernel` by
    # sum_j sim(q_i, k_j), `mala` magnitude-aware (rows sum to one, sharpen with |phi(q)|; not with affine);
    # null = the feature map's default (affine: count, the others: kernel)
    denominator: Optional[str] = None
    # focused map: the power p of phi = |y| y^p / |y^p| (FLatten: 3)
    focused_power: float = 3.0
    # local branch: 0 (off) | 3 | 5: depthwise k x k conv of V over the patch grid, added to the
    # attention output of the patch tokens (the CLS token gets nothing)
    local_kernel: int = 0
    # FLIP patch dropout in [0, 1): the fraction of patch tokens each training image drops after the
    # position embedding (the CLS token is always kept; eval keeps all). 0 = off
    patch_dropout: float = 0.0
    # LiT: freeze this tower (open_clip --lock-image); its parameters get no optimizer state at all
    lock: bool = False
    # with lock: leave the last N of the tower's layers + 2 groups trainable (open_clip's groups:
    # [patch_embed, class/pos embedding, ln_pre], block 0, ..., [last block, ln_post], [proj])
    unlocked_groups: int = 0
    # output gate: the attention output times SiLU(W_g x + b_g) before out_proj (one more width x width)
    output_gate: bool = False
    # hybrid tower: these layers (0-based, negative from the end, e.g. [-1] or [3, 7, 11]) run softmax,
    # the others the linear variant above; [] = none
    softmax_layers: list[int] = field(default_factory=list)


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    # as model.image.* (causal; no local branch)
    attention: str = "softmax"
    feature_map: Optional[str] = None
    denominator: Optional[str] = None
    focused_power: float = 3.0
    # freeze this tower (open_clip --lock-text), but the last `unlocked_layers` of its layers + 2 groups:
    # [token/pos embedding], block 0, ..., [last block, ln_final], [text_projection]
    lock: bool = False
    unlocked_layers: int = 0
    # false: the frozen groups' LayerNorms still train (open_clip's HF text tower semantics)
    freeze_layer_norm: bool = True
    # as model.image.*: output gate, hybrid tower
    output_gate: bool = False
    softmax_layers: list[int] = field(default_factory=list)


@dataclass
class ModelConfig:
    # vit_s16 | vit_b16 | vit_l16 | tiny; fills the shapes below unless a file/override sets them
    preset: Optional[str] = None
    embed_dim: int = 512
    image: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # where linear attention runs: auto (CUDA -> Triton, else PyTorch) | torch | triton
    attention_backend: str = "auto"
    # ln of the initial inverse temperature; unset with train.loss=siglip: SIGLIP_INIT_LOGIT_SCALE (ln 10)
    init_logit_scale: float = math.log(1 / 0.07)
    # a learned logit bias starting here (SigLIP's); null = none. Unset with train.loss=siglip:
    # SIGLIP_INIT_LOGIT_BIAS (-10); the clip loss has no use for one
    init_logit_bias: Optional[float] = None
    # optional weights to start from: an open_clip state dict (.pt/.bin/.safetensors) or ours
    pretrained: Optional[str] = None


@dataclass
class DataConfig:
    # webdataset shard spec: brace ranges, globs, lists, `::`-joined sources, `pipe:` commands
    train_shards: Optional[str] = None
    # samples per epoch over all ranks; None -> read sizes.json beside the shards
    train_num_samples: Optional[int] = None
    # epoch: deterministic shuffled pass per epoch | resampled: infinite seeded stream
    mode: str = "epoch"
    workers: int = 2
    shuffle_buffer: int = 1000
    image_keys: str = "jpg;jpeg;png;webp"
    caption_keys: str = "txt;json"
    # json field to read the caption from when the caption key is json
    caption_json_field: str = "caption"
    # random resized crop scale range for training
    crop_scale_min: float = 0.9
    crop_scale_max: float = 1.0


@dataclass
class LinearizeConfig:
    """train.linearize: turn a pretrained softmax CLIP (model.pretrained) into the linear attention
    of model.*.attention in two stages (ds_linclip/train/linearize.py). Steps 1..transfer_steps
    are stage 1 (attention transfer: per-layer loss against a frozen softmax teacher, only attention
    parameters train); the rest of train.steps is stage 2 (contrastive fine-tune of everything)."""

    enabled: bool = False
    # stage 1 length, counted in train.steps (stage 2 = train.steps - transfer_steps)
    transfer_steps: int = 100
    # stage 1 learning rate (warmup + cosine over stage 1); stage 2 uses train.lr / train.warmup_steps
    transfer_lr: float = 1.0e-3
    transfer_warmup_steps: int = 10
    # what trains in stage 1: attention (qkv, out_proj and the variant's own parameters) |
    # qkv (qkv + variant parameters; out_proj frozen) | variant (only the parameters the variant adds)
    transfer_params: str = "attention"
    # stage 1 loss = transfer_weight x mean over layers of the per-layer transfer loss
    transfer_weight: float = 1.0
    # stage 2 loss = contrastive + finetune_transfer_weight x transfer loss (on the student's own inputs)
    finetune_transfer_weight: float = 0.0
    # per-layer loss: mean squared error, divided by the teacher output's mean square when true
    normalize_loss: bool = True
    # TensorBoard: one transfer-loss curve per this many consecutive layers of a tower
    log_layers_per_group: int = 4


@dataclass
class PhaseConfig:
    """One entry of train.phases (ds_linclip/train/phases.py): a share of train.steps with its own
    image resolution and patch dropout (e.g. FLIP / CLIPA: most steps at low resolution with patch
    dropout, then a short phase at full resolution without)."""

    # the phase's share of train.steps: a fraction (every phase's fractions sum to 1) or a step count
    # (they sum to train.steps); exactly one of the two, the same one in every phase
    fraction: Optional[float] = None
    steps: Optional[int] = None
    # null = model.image.image_size (where the position embedding is stored; other sizes interpolate it)
    image_size: Optional[int] = None
    # null = model.image.patch_dropout
    patch_dropout: Optional[float] = None


@dataclass
class TrainConfig:
    output_dir: str = "runs"
    run_name: str = "linclip"
    seed: int = 0
    micro_batch_size: int = 64
    grad_accum_steps: int = 1
    steps: int = 1000
    lr: float = 5.0e-4
    # peak lr of each tower's parameters; null = train.lr (logit_scale always gets train.lr)
    image_lr: Optional[float] = None
    text_lr: Optional[float] = None
    # layer-wise lr decay (BEiT / EVA-CLIP): block i of L gets decay^(L-i), embeddings decay^(L+1),
    # final norm + projection decay^0; 1.0 = off
    image_layer_decay: float = 1.0
    text_layer_decay: float = 1.0
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1.0e-6
    grad_clip: float = 1.0
    # bf16 | fp16 | fp32
    precision: str = "bf16"
    zero_stage: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    # activation checkpointing: 0 = off, k = every k-th block
    grad_checkpointing: int = 0
    # clip (softmax over the batch, CLIP's) | siglip (sigmoid per pair, SigLIP's; adds model.init_logit_bias)
    loss: str = "clip"
    # clip only: each rank scores its own rows against the global batch; gradients through the gather
    local_loss: bool = True
    gather_with_grad: bool = True
    # siglip only: how other ranks' text features arrive: bidir (neighbour exchange round the ring) | gather
    siglip_dist: str = "bidir"
    # feature-cached accumulation: one optimizer step over accum_freq micro-batches per rank whose
    # contrastive loss contrasts all of them (open_clip's --accum-freq; see docs/losses.md). Not
    # together with grad_accum_steps > 1, whose micro-batches each see only their own negatives
    accum_freq: int = 1
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 3
    # with an eval watcher on the run (R/eval/watch_state.json or its lock) or eval_after_checkpoint,
    # pruning also keeps checkpoints the eval job has not scored yet (R/eval/scored/<tag>), at most
    # this many beyond keep_last (the oldest; newer ones beyond it are pruned and logged); 0: off
    keep_unscored_max: int = 5
    # auto (resume from latest if any) | none | a checkpoint dir
    resume: str = "auto"
    # this many non-finite losses in a row stop the run
    max_nonfinite_steps: int = 5
    # a collective that waits longer than this fails the run (a dead rank must not hold the others)
    dist_timeout_minutes: int = 10
    # submit an eval job (ds_linclip.eval.submit) after each checkpoint
    eval_after_checkpoint: bool = False
    # append each step's sample keys to R/sample_keys/rank_NNNNN.txt: audits exactly-once data
    # order across restarts (tests, debugging); off by default since it costs a little I/O per step
    log_sample_keys: bool = False
    # torch.compile the model (TorchInductor) before DeepSpeed wraps it; Triton linear attention stays
    # its own kernels (a graph break around each call)
    compile: bool = False
    # two-stage linearisation of a pretrained softmax CLIP (off by default)
    linearize: LinearizeConfig = field(default_factory=LinearizeConfig)
    # training phases in order (empty: one phase, model.image.* for all steps); see PhaseConfig
    phases: list[PhaseConfig] = field(default_factory=list)


@dataclass
class EvalConfig:
    # labelled shards (`cls` key), an ImageFolder, or a CLIP_benchmark dataset folder (its
    # webdataset layout: SPLIT/nshards.txt + SPLIT/{0..n-1}.tar, classnames.txt, templates) for zero-shot
    zeroshot_data: Optional[str] = None
    # class names in label order: `imagenet1k` (open_clip's), `fashion_mnist`, a file (one per line;
    # e.g. ImageNet-21K's names, not shipped), `folders` (an ImageFolder's folder names) or
    # `dataset` (a CLIP_benchmark folder's classnames.txt)
    classnames: str = "imagenet1k"
    # openai | simple | dataset (a CLIP_benchmark folder's templates) | a file with one template per
    # line, `{}` for the class name
    templates: str = "openai"
    # captioned shards for image<->text retrieval, or a CLIP_benchmark retrieval folder (a `txt` of
    # one caption per line per image)
    retrieval_data: Optional[str] = None
    # the split of a CLIP_benchmark folder to score (its SPLIT/ subfolder)
    split: str = "test"
    batch_size: int = 256
    workers: int = 2
    # rows of the similarity matrix computed at once (retrieval)
    chunk_size: int = 1024
    # stop after this many samples (None = all)
    max_samples: Optional[int] = None
    # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    device: str = "auto"
    # autocast dtype while encoding: fp32 (none) | bf16 | fp16; metrics are always computed in fp32
    precision: str = "fp32"
    # submitit / Slurm settings for `python -m ds_linclip.eval.submit`
    partition: Optional[str] = None
    gpus: int = 1
    cpus: int = 8
    time_minutes: int = 60
    # auto (Slurm when `srun` exists, else local processes) | slurm | local | debug (in-process)
    cluster: str = "auto"
    # submitit's job folder (logs, pickles); None -> R/eval/submitit for checkpoints in a run folder
    submitit_folder: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # passed through to DeepSpeed's config as is, on top of what we generate
    deepspeed: dict[str, Any] = field(default_factory=dict)


# keys whose values must be one of a fixed set: (dotted key pattern, choices)
_CHOICES: dict[str, Sequence[str]] = {
    "model.image.attention": ATTENTION_KINDS,
    "model.text.attention": ATTENTION_KINDS,
    "model.attention_backend": ATTENTION_BACKENDS,
    "data.mode": DATA_MODES,
    "train.precision": PRECISIONS,
    "train.loss": LOSSES,
    "train.siglip_dist": SIGLIP_DISTS,
    "eval.precision": PRECISIONS,
    "eval.cluster": EVAL_CLUSTERS,
}


class ConfigError(ValueError):
    """A config problem tied to one key; `str()` is the message a user sees."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None):
        self.key, self.source = key, source
        where = f" (from {source})" if source else ""
        prefix = f"config key '{key}'{where}: " if key else f"config{where}: "
        super().__init__(prefix + message)


def all_keys(node: Any = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (leaves and sections)."""
    keys: list[str] = []
    for f in fields(node):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if is_dataclass(default):
            keys.extend(all_keys(type(default), dotted + "."))
    return keys


def closest_key(key: str) -> str | None:
    """The schema key nearest to a misspelt one, for 'did you mean' hints."""
    candidates = all_keys()
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not match:  # compare the last component too: `train.micro_batch` -> `train.micro_batch_size`
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in candidates}
        leaf_match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        match = [by_leaf[leaf_match[0]]] if leaf_match else []
    return match[0] if match else None


def _error_from_omegaconf(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        hint = closest_key(key)
        return ConfigError(
            "unknown key" + (f"; did you mean '{hint}'?" if hint else ""), key=key, source=source
        )
    return ConfigError(msg, key=key, source=source)


def _load_yaml_with_parts(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[DictConfig, str]]:
    """A YAML file and the parts it lists under `defaults:`, in merge order, with their sources."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"circular `defaults:` through {path}", source=str(path))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", source=str(seen[-1]) if seen else "--config")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml syntax errors and the like
        raise ConfigError(f"cannot parse YAML: {err}", source=str(path)) from err
    if not isinstance(node, DictConfig):
        raise ConfigError("top level must be a mapping", source=str(path))
    parts: list[tuple[DictConfig, str]] = []
    defaults = node.pop("defaults", None) if "defaults" in node else None
    for part in defaults or []:
        part_path = Path(str(part))
        if not part_path.suffix:
            part_path = part_path.with_suffix(".yaml")
        parts.extend(_load_yaml_with_parts(path.parent / part_path, seen + (path,)))
    parts.append((node, str(path)))
    return parts


def _check_choices(cfg: DictConfig, sources: dict[str, str]) -> None:
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.3)
            raise ConfigError(
                f"'{value}' is not one of {', '.join(choices)}"
                + (f"; did you mean '{hint[0]}'?" if hint else ""),
                key=key,
                source=sources.get(key, "default"),
            )
    stage = cfg.train.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{stage} is not a ZeRO stage (0-3)", "train.zero_stage", sources.get("train.zero_stage"))
    for tower in ("image", "text"):
        try:
            resolve_attention(cfg.model[tower], causal=tower == "text")
        except AttentionSpecError as err:
            key = f"model.{tower}.{err.key}"
            raise ConfigError(str(err), key, sources.get(key, "default")) from None
    for tower in ("image", "text"):
        t = cfg.model[tower]
        if t.width % t.heads:
            raise ConfigError(
                f"width {t.width} is not divisible by heads {t.heads}", f"model.{tower}.heads",
                sources.get(f"model.{tower}.heads", "preset"),
            )
    dropout = cfg.model.image.patch_dropout
    if not 0 <= dropout < 1:
        raise ConfigError(f"{dropout} is not in [0, 1)", "model.image.patch_dropout",
                          sources.get("model.image.patch_dropout", "default"))
    if cfg.model.image.image_size % cfg.model.image.patch_size:
        raise ConfigError(
            f"image_size {cfg.model.image.image_size} is not a multiple of patch_size {cfg.model.image.patch_size}",
            "model.image.image_size", sources.get("model.image.image_size", "preset"),
        )


def _check_phase_keys(node: DictConfig, source: str) -> None:
    """Name a bad key inside a `train.phases` entry by its index (OmegaConf names only the leaf)."""
    phases = OmegaConf.select(node, "train.phases", default=None)
    if phases is None or not OmegaConf.is_list(phases):
        return
    known = [f.name for f in fields(PhaseConfig)]
    for index, entry in enumerate(phases):
        key = f"train.phases[{index}]"
        if not OmegaConf.is_dict(entry):
            raise ConfigError(f"'{entry}' is not a mapping (e.g. {{fraction: 0.9, image_size: 112}})", key, source)
        for name in entry.keys():
            if name not in known:
                hint = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
                raise ConfigError("unknown key" + (f"; did you mean '{key}.{hint[0]}'?" if hint else
                                                   f" (known: {', '.join(known)})"), f"{key}.{name}", source)
            value = entry._get_node(name)._value()
            if (value is not None and not isinstance(value, (int, float))) or isinstance(value, bool):
                raise ConfigError(f"{value!r} is not a number", f"{key}.{name}", source)


def _check_lock_and_lrs(cfg: DictConfig, sources: dict[str, str]) -> None:
    """model.*.lock / unlocked groups against the tower's group count; per-tower lrs and layer decay;
    train.compile's one exclusion."""
    for tower, unlocked_key in (("image", "unlocked_groups"), ("text", "unlocked_layers")):
        section = cfg.model[tower]
        key = f"model.{tower}.{unlocked_key}"
        unlocked, groups = section[unlocked_key], num_lock_groups(section.layers)
        if unlocked and not section.lock:
            raise ConfigError(f"{unlocked} is set but model.{tower}.lock is false (set it to true to lock the "
                              "tower)", key, sources.get(key, "default"))
        if not 0 <= unlocked <= groups:
            raise ConfigError(f"{unlocked} is not in 0..{groups}: the {tower} tower has {groups} lock groups "
                              f"({section.layers} layers + 2)", key, sources.get(key, "default"))
    if not cfg.model.text.freeze_layer_norm and not cfg.model.text.lock:
        key = "model.text.freeze_layer_norm"
        raise ConfigError("false only applies to a locked tower; model.text.lock is false", key,
                          sources.get(key, "default"))
    for tower in ("image", "text"):
        key = f"train.{tower}_lr"
        lr = cfg.train[f"{tower}_lr"]
        if lr is not None and not lr >= 0:
            raise ConfigError(f"{lr} must be >= 0 (or null: train.lr)", key, sources.get(key, "default"))
        key = f"train.{tower}_layer_decay"
        decay = cfg.train[f"{tower}_layer_decay"]
        if not 0 < decay <= 1:
            raise ConfigError(f"{decay} must be in (0, 1] (1.0 = no layer-wise decay)", key,
                              sources.get(key, "default"))
    if cfg.train.compile and cfg.train.linearize.enabled:
        # linearize's per-layer forward hooks record losses and swap outputs: not verified under TorchDynamo
        raise ConfigError("true is not supported together with train.linearize.enabled=true", "train.compile",
                          sources.get("train.compile", "default"))


def _leaf_sources(node: DictConfig, source: str, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key in node.keys():
        dotted = f"{prefix}{key}"
        value = node._get_node(key)
        if isinstance(value, DictConfig) and not dotted.startswith("deepspeed"):
            out.update(_leaf_sources(value, source, dotted + "."))
        else:
            out[dotted] = source
    return out


def load_config(
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    required: Sequence[str] = (),
) -> DictConfig:
    """Resolve files + dotlist overrides against the schema; raise ConfigError naming the key.

    `required` lists dotted keys that must end up set (not None / MISSING) for the caller.
    """
    layers: list[tuple[DictConfig, str]] = []
    for path in config_files:
        layers.extend(_load_yaml_with_parts(Path(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value", source="override")
        # a leading `+` (Hydra's "add a key") is accepted and means the same as without it
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        try:
            layers.append((OmegaConf.from_dotlist([f"{key}={value}"]), f"override '{item}'"))
        except OmegaConfBaseException as err:
            raise ConfigError(str(err).splitlines()[0], key=key, source=f"override '{item}'") from err

    # The preset is decided first (the last layer that names one wins), then applied under the layers.
    preset = None
    for node, _ in layers:
        value = OmegaConf.select(node, "model.preset", default=None)
        if value is not None:
            preset = value
    cfg = OmegaConf.structured(Config)
    sources: dict[str, str] = {}
    if preset is not None:
        from ds_linclip.models.presets import PRESETS

        if preset not in PRESETS:
            hint = difflib.get_close_matches(str(preset), list(PRESETS), n=1, cutoff=0.3)
            src = next(s for n, s in reversed(layers) if OmegaConf.select(n, "model.preset", default=None) == preset)
            raise ConfigError(
                f"unknown preset '{preset}' (known: {', '.join(PRESETS)})"
                + (f"; did you mean '{hint[0]}'?" if hint else ""),
                key="model.preset", source=src,
            )
        cfg = OmegaConf.merge(cfg, {"model": PRESETS[preset]})
    for node, source in layers:
        _check_phase_keys(node, source)
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as err:
            raise _error_from_omegaconf(err, source) from err
        sources.update(_leaf_sources(node, source))
    try:
        missing = OmegaConf.missing_keys(cfg)
    except OmegaConfBaseException:
        missing = set()
    for key in list(missing) + list(required):
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if key in missing or value is None:
            raise ConfigError(
                "a value is required (set it in a config file or as an override, e.g. "
                f"{key}=...)",
                key=key, source=sources.get(key, "nowhere: not set"),
            )
    _check_choices(cfg, sources)
    _check_lock_and_lrs(cfg, sources)
    _apply_loss_defaults(cfg, sources)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _apply_loss_defaults(cfg: DictConfig, sources: dict[str, str]) -> None:
    """train.loss=siglip: the logit scale and bias no file or override set start where SigLIP's do
    (ln 10, -10); a logit bias under the clip loss is an error (it would never get a gradient)."""
    if cfg.train.loss == "siglip":
        if "model.init_logit_scale" not in sources:
            cfg.model.init_logit_scale = SIGLIP_INIT_LOGIT_SCALE
        if "model.init_logit_bias" not in sources:
            cfg.model.init_logit_bias = SIGLIP_INIT_LOGIT_BIAS
    elif cfg.model.init_logit_bias is not None:
        raise ConfigError(
            f"{cfg.model.init_logit_bias}: a logit bias is used by train.loss=siglip only (train.loss is "
            f"'{cfg.train.loss}'); set model.init_logit_bias=null or train.loss=siglip",
            key="model.init_logit_bias", source=sources.get("model.init_logit_bias", "default"),
        )


def config_hash(cfg: DictConfig) -> str:
    """A short stable hash of the resolved config (for result records)."""
    return hashlib.sha256(OmegaConf.to_yaml(cfg, sort_keys=True).encode()).hexdigest()[:12]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", action="append", default=[], metavar="YAML",
        help="config file (repeatable; later files win). Files may list parts under `defaults:`.",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="dotted overrides on top of the files, e.g. train.micro_batch_size=64 model.image.attention=linear-affine",
    )


def cli_config(args: argparse.Namespace, required: Sequence[str] = ()) -> DictConfig:
    """Load the config for a CLI: exit 2 with the message on a config error; honour --print-config."""
    try:
        cfg = load_config(args.config, args.overrides, required=() if args.print_config else required)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg
