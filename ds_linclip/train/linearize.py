"""Linearise a pretrained softmax CLIP in two stages under the ordinary trainer (`train.linearize`).

Stage 1, attention transfer (steps 1..transfer_steps), after LoLCATs: every linear-attention layer
of the student is fitted to the softmax attention it replaces. In each block the frozen softmax
teacher and the linear student read the *same* input (the teacher's hidden stream: the block adds
the teacher's output to the residual, so the stream is exactly the pretrained softmax model's),
and the loss is the mean over layers of `|student - teacher|^2 / |teacher|^2` per layer (the
teacher output's mean square normalises each layer; `normalize_loss`). The student's input is
detached, so each layer's loss reaches only that layer's attention parameters; only those train
(`transfer_params`): qkv, out_proj and whatever the variant adds (focus_scale, local_conv, ...).

Stage 2, fine-tune (the rest of train.steps): ordinary contrastive training of the whole model on
the student's own stream, plus `finetune_transfer_weight` x the transfer loss computed on the
student's own inputs (off by default). Stage 2 starts from a fresh AdamW state (moments and step
counts zeroed), i.e. exactly what a new optimizer would start from.

The teacher is not a second model. With every non-attention weight frozen and identical, teacher
and student differ only in their attention projections, so each linear `Attention` gets a frozen
copy of its pretrained softmax qkv/out_proj as a child module `attn.teacher` (a softmax `Attention`),
made before the DeepSpeed engine exists. Those are ordinary parameters of the model with
requires_grad=False: ZeRO-1/2 keep them replicated like any non-optimised parameter (two small
matrices per layer), ZeRO-3 partitions them like every other parameter and gathers one layer's
teacher only while that layer's forward runs, so no rank ever holds a full teacher copy. They
are in every checkpoint (resume is exact without re-reading the pretrained file) and are dropped
from exports (`strip_teacher`), which hold the linear student only.

One optimizer for both stages: every parameter that trains in either stage is in it from the start,
in four groups (stage-1 trainable or not) x (decay or not). In stage 1 the others get no gradient
(the loss does not depend on them; DeepSpeed fills zeros) and learning rate 0, so AdamW leaves them
bitwise unchanged. The learning rate of every group is set here before each step (warmup + cosine
per stage: `transfer_lr`/`transfer_warmup_steps` in stage 1, `train.lr`/`train.warmup_steps` in
stage 2, both decaying to `train.min_lr / train.lr` of their peak), over DeepSpeed's scheduler.
The stage lives in the checkpoint's client state (`state_dict`); a resumed run continues the right
stage at the right step, and the stage-2 optimizer reset happens once, at the transition.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ds_linclip.config import ConfigError
from ds_linclip.models.attention import SOFTMAX
from ds_linclip.train.lr_groups import LR_SCALE

TEACHER = "teacher"  # child module name under each linear Attention
TEACHER_KEY = f".attn.{TEACHER}."  # in parameter / state-dict names
STAGE_TRANSFER, STAGE_FINETUNE = 1, 2
TRANSFER_PARAMS = ("attention", "qkv", "variant")
# every Attention has these; anything else under `attn.` is a parameter the variant adds
BASE_ATTENTION_PARAMS = ("qkv.weight", "qkv.bias", "out_proj.weight", "out_proj.bias")
GROUP_KEY = "linearize_transfer"  # param-group flag: trains in stage 1


def strip_teacher(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """`state_dict` without the frozen teacher copies (what an export of the student holds)."""
    return {key: value for key, value in state_dict.items() if TEACHER_KEY not in key}


def stage_for_step(step: int, transfer_steps: int) -> int:
    """Stage of the 1-based optimizer step `step`."""
    return STAGE_TRANSFER if step <= transfer_steps else STAGE_FINETUNE


def warmup_cosine(step: int, steps: int, warmup: int, peak: float, min_ratio: float) -> float:
    """LR of the `step`-th (1-based) of `steps` steps: linear warmup to `peak` over `warmup` steps, then
    cosine towards min_ratio * peak (open_clip's schedule: the last step still gets a non-zero rate)."""
    warmup = max(1, min(warmup, steps))
    if step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - 1 - warmup) / max(1, steps - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def layer_loss(student: torch.Tensor, teacher: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Mean squared error of one layer's attention output (fp32), optionally / the teacher's mean square."""
    teacher = teacher.detach().float()
    error = (student.float() - teacher).pow(2).mean()
    if normalize:
        error = error / teacher.pow(2).mean().clamp_min(1e-12)
    return error


def reset_optimizer_state(optimizer: Any) -> None:
    """Zero every state tensor and step count of the torch optimizer inside a DeepSpeed wrapper
    (ZeRO 1-3, bf16, plain): the state a freshly built AdamW starts from."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(optimizer).__name__}")
    for state in inner.state.values():
        for key, value in list(state.items()):
            if torch.is_tensor(value):
                value.zero_()
            elif isinstance(value, (int, float)):
                state[key] = type(value)(0)
    for group in inner.param_groups:
        if "step" in group:
            group["step"] = 0


@dataclass
class Layer:
    """One linear-attention layer of the student and its teacher."""

    tower: str  # image | text
    index: int  # block index in its tower
    name: str  # module name of the Attention, e.g. visual.blocks.3.attn
    attn: nn.Module


def validate(cfg: Any) -> None:
    """ConfigError naming the key for a train.linearize setting that cannot work."""
    lc, steps = cfg.train.linearize, int(cfg.train.steps)
    if lc.transfer_params not in TRANSFER_PARAMS:
        raise ConfigError(f"'{lc.transfer_params}' is not one of {', '.join(TRANSFER_PARAMS)}",
                          "train.linearize.transfer_params")
    if not 0 <= lc.transfer_steps <= steps:
        raise ConfigError(f"must be in 0..train.steps ({steps}), got {lc.transfer_steps}",
                          "train.linearize.transfer_steps")
    if lc.transfer_lr <= 0:
        raise ConfigError(f"must be > 0, got {lc.transfer_lr}", "train.linearize.transfer_lr")
    if lc.transfer_weight <= 0 or lc.finetune_transfer_weight < 0:
        raise ConfigError("need transfer_weight > 0 and finetune_transfer_weight >= 0",
                          "train.linearize.transfer_weight")
    if lc.log_layers_per_group < 1:
        raise ConfigError("must be >= 1", "train.linearize.log_layers_per_group")
    if not cfg.model.pretrained:
        raise ConfigError("train.linearize starts from pretrained softmax weights: set model.pretrained "
                          "(an open_clip checkpoint or one of ours)", "model.pretrained")


class Linearizer:
    """The recipe's state and hooks. Call order in the trainer:
    `Linearizer(cfg, model)` (adds the teachers; before the engine) -> `param_groups()` for the engine
    -> `attach()` (after the engine, so our forward hooks run after DeepSpeed's) -> per step
    `prepare(optimizer, step)`, forward, `objective(contrastive)`; `log_window` every log step
    (on every rank); `state_dict()` into checkpoints, `load_state_dict` on resume."""

    def __init__(self, cfg: Any, model: nn.Module):
        validate(cfg)
        lc = cfg.train.linearize
        self.model = model
        self.transfer_steps = int(lc.transfer_steps)
        self.steps = int(cfg.train.steps)
        self.transfer_lr, self.transfer_warmup = float(lc.transfer_lr), int(lc.transfer_warmup_steps)
        self.finetune_lr, self.finetune_warmup = float(cfg.train.lr), int(cfg.train.warmup_steps)
        self.min_ratio = float(cfg.train.min_lr) / float(cfg.train.lr)
        self.transfer_weight, self.finetune_weight = float(lc.transfer_weight), float(lc.finetune_transfer_weight)
        self.normalize = bool(lc.normalize_loss)
        self.layers = self._add_teachers(model)
        if not self.layers:
            raise ConfigError("train.linearize needs linear attention in at least one tower "
                              "(both towers are softmax)", "model.image.attention")
        self.trainable = self._transfer_parameter_names(str(lc.transfer_params))
        self.groups = self._log_groups(int(lc.log_layers_per_group))
        self.stage = 0  # none prepared yet
        self.losses: dict[int, torch.Tensor] = {}  # layer -> transfer loss of the current forward
        self._handles: list[Any] = []
        self._reset_window()

    # ------------------------------------------------------------------ model
    @staticmethod
    def _add_teachers(model: nn.Module) -> list[Layer]:
        layers: list[Layer] = []
        for tower, prefix, module in (("image", "visual", model.visual), ("text", "text", model.text)):
            for index, block in enumerate(module.blocks):
                attn = block.attn
                if attn.spec.linear is None:
                    continue
                teacher = copy.deepcopy(attn)  # the pretrained softmax projections, as loaded
                teacher.set_spec(SOFTMAX)  # drops what the variant added (focus scale, local conv)
                teacher.requires_grad_(False)
                attn.add_module(TEACHER, teacher)
                layers.append(Layer(tower, index, f"{prefix}.blocks.{index}.attn", attn))
        return layers

    def _transfer_parameter_names(self, which: str) -> set[str]:
        names: set[str] = set()
        for layer in self.layers:
            for inner, _ in layer.attn.named_parameters():
                if inner.startswith(TEACHER + "."):
                    continue
                base = inner in BASE_ATTENTION_PARAMS
                if which == "attention" or (which == "qkv" and (inner.startswith("qkv.") or not base)) \
                        or (which == "variant" and not base):
                    names.add(f"{layer.name}.{inner}")
        if not names:
            raise ConfigError(f"'{which}' selects no parameters: this attention variant adds none of its own",
                              "train.linearize.transfer_params")
        return names

    def _log_groups(self, per_group: int) -> list[tuple[str, list[int]]]:
        """(TensorBoard tag, layer positions in self.layers) per run of `per_group` blocks of a tower."""
        groups: list[tuple[str, list[int]]] = []
        for tower in ("image", "text"):
            positions = [i for i, layer in enumerate(self.layers) if layer.tower == tower]
            for start in range(0, len(positions), per_group):
                chunk = positions[start:start + per_group]
                first, last = self.layers[chunk[0]].index, self.layers[chunk[-1]].index
                groups.append((f"linearize/transfer/{tower}/layers_{first}-{last}", chunk))
        return groups

    def param_groups(self, weight_decay: float, lr_scales: Mapping[str, tuple[str, float]] | None = None) -> list[dict]:
        """AdamW groups for the engine: (stage-1 trainable, frozen in stage 1) x engine.param_groups'
        (decay, no decay, per lr label with `lr_scales`). Teachers are not in them (requires_grad=False).
        Empty groups are kept out by build_engine."""
        from ds_linclip.train.engine import param_groups, promote_scalar_parameters

        promote_scalar_parameters(self.model)  # as build_engine does: the names stay, the objects change
        trainable = {id(p) for n, p in self.model.named_parameters() if n in self.trainable}
        base = param_groups(self.model, weight_decay, lr_scales=lr_scales)
        return [
            {**group, "params": [p for p in group["params"] if (id(p) in trainable) == transfer],
             "name": f"{'transfer' if transfer else 'frozen'}_{group['name']}", GROUP_KEY: transfer}
            for transfer in (True, False) for group in base
        ]

    def attach(self) -> None:
        """Register the hooks. After deepspeed.initialize: our forward hook then sees the output as
        ZeRO-3's hooks wrapped it, so the transfer loss's backward re-gathers the layer's parameters."""
        for position, layer in enumerate(self.layers):
            self._handles.append(layer.attn.register_forward_pre_hook(
                self._detach_input, prepend=True, with_kwargs=True))
            self._handles.append(layer.attn.register_forward_hook(
                lambda module, args, kwargs, output, position=position: self._transfer(position, module, args, kwargs, output),
                with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _computes_transfer(self, stage: int | None = None) -> bool:
        stage = self.stage if stage is None else stage
        return stage == STAGE_TRANSFER or (stage == STAGE_FINETUNE and self.finetune_weight > 0)

    def _detach_input(self, module, args, kwargs):
        # stage 1: the student reads the teacher's stream but sends no gradient into it
        if self.stage != STAGE_TRANSFER:
            return None
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, {**kwargs, "x": kwargs["x"].detach()}

    def _transfer(self, position: int, module, args, kwargs, output):
        if not self._computes_transfer():
            return None
        inputs = args[0] if args else kwargs["x"]
        with torch.no_grad():
            target = getattr(module, TEACHER)(inputs)
        self.losses[position] = layer_loss(output, target, self.normalize)
        # stage 1: the residual stream carries the teacher's output (the softmax model's stream)
        return target if self.stage == STAGE_TRANSFER else None

    # ------------------------------------------------------------------ steps
    def lr_at(self, step: int) -> float:
        if stage_for_step(step, self.transfer_steps) == STAGE_TRANSFER:
            return warmup_cosine(step, self.transfer_steps, self.transfer_warmup, self.transfer_lr, self.min_ratio)
        return warmup_cosine(step - self.transfer_steps, self.steps - self.transfer_steps, self.finetune_warmup,
                             self.finetune_lr, self.min_ratio)

    def prepare(self, optimizer: Any, step: int) -> None:
        """Before optimizer step `step` (1-based): enter its stage (stage 1 -> 2 resets the optimizer
        state, once) and set every group's learning rate. Idempotent for the same step."""
        stage = stage_for_step(step, self.transfer_steps)
        if stage != self.stage:
            if self.stage == STAGE_TRANSFER and stage == STAGE_FINETUNE:
                reset_optimizer_state(optimizer)
            self.stage = stage
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            if GROUP_KEY not in group:
                raise RuntimeError("an optimizer param group lacks the linearize flag: build the engine with "
                                   "Linearizer.param_groups()")
            # train.image_lr / text_lr / layer decay scale both stages' schedules alike
            group["lr"] = lr * group.get(LR_SCALE, 1.0) if (stage == STAGE_FINETUNE or group[GROUP_KEY]) else 0.0

    def objective(self, contrastive: torch.Tensor) -> torch.Tensor:
        """The loss to optimise this micro-batch, from the contrastive loss and the recorded layers."""
        transfer = None
        if self._computes_transfer():
            if len(self.losses) != len(self.layers):
                raise RuntimeError(f"transfer loss recorded for {len(self.losses)} of {len(self.layers)} layers")
            per_layer = torch.stack([self.losses[i] for i in range(len(self.layers))])
            transfer = per_layer.mean()
            # summed where the loss is (no host sync per micro-batch); read once per log window
            sums = per_layer.detach().double()
            self._window_layers = sums if self._window_layers is None else self._window_layers + sums
        self.losses = {}
        self._window_contrastive += float(contrastive.detach())
        self._window_count += 1
        self._window_stage = self.stage
        if self.stage == STAGE_TRANSFER:
            return self.transfer_weight * transfer
        if transfer is not None:
            return contrastive + self.finetune_weight * transfer
        return contrastive

    # ------------------------------------------------------------------ logging, checkpoints
    def _reset_window(self) -> None:
        self._window_layers: torch.Tensor | None = None  # per-layer transfer-loss sums (float64)
        self._window_contrastive = 0.0
        self._window_count = 0
        self._window_stage = self.stage

    def log_window(self, writer, step: int) -> str:
        """Average the window over micro-batches and ranks (collective: every rank calls it);
        rank 0 (the one with a writer) writes `linearize/*`. Returns the console summary."""
        from ds_linclip.train.engine import all_reduce_floats

        layer_sums = [0.0] * len(self.layers) if self._window_layers is None else self._window_layers.tolist()
        totals = torch.tensor(all_reduce_floats(layer_sums + [self._window_contrastive, float(self._window_count)]),
                              dtype=torch.float64)
        count = max(1.0, float(totals[-1]))
        layers, contrastive = totals[:len(self.layers)] / count, float(totals[-2]) / count
        transfer = float(layers.mean())  # the mean over micro-batches of the per-layer mean
        stage = self._window_stage
        has_transfer = self._computes_transfer(stage)
        self._reset_window()
        if writer is not None:
            writer.add_scalar("linearize/stage", float(stage), step)
            writer.add_scalar("linearize/contrastive_loss", contrastive, step)
            if has_transfer:
                writer.add_scalar("linearize/transfer_loss", transfer, step)
                for tag, positions in self.groups:
                    writer.add_scalar(tag, float(layers[positions].mean()), step)
        summary = f"linearize: stage {stage} | contrastive {contrastive:.4f}"
        if has_transfer:
            summary += f" | transfer {transfer:.4f} (" + ", ".join(
                f"{tag.split('/', 2)[2]} {float(layers[positions].mean()):.4f}" for tag, positions in self.groups) + ")"
        return summary

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "transfer_steps": self.transfer_steps}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        self.stage = int(state["stage"]) if state else 0
        self._window_stage = self.stage
