"""Training phases (`train.phases`): consecutive step ranges with their own image resolution and
patch dropout, e.g. 90% of the steps at 112 px with patch dropout 0.5, then 10% at 224 px without
(FLIP / CLIPA-style schedules that buy many cheap steps and fix the resolution at the end).

Only the image size and the dropout change between phases: the global batch, the learning-rate
schedule (over all of train.steps) and the data order run on as one run. The model keeps its
position embedding at model.image.image_size and interpolates it for another phase's size
(`VisionTransformer.pos_embed_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from ds_linclip.config import ConfigError

FRACTION_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Phase:
    """Steps first_step..last_step (1-based, inclusive) at `image_size` px with `patch_dropout`."""

    index: int  # 0-based: train.phases[index]
    first_step: int
    last_step: int
    image_size: int
    patch_dropout: float

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1

    def describe(self) -> str:
        return (f"phase {self.index}: steps {self.first_step}-{self.last_step} ({self.steps}), "
                f"{self.image_size} px, patch dropout {self.patch_dropout:g}")


def _share_kind(entry, key: str) -> str:
    has_fraction, has_steps = entry.fraction is not None, entry.steps is not None
    if has_fraction == has_steps:
        raise ConfigError("give exactly one of fraction (of train.steps) and steps", key=f"{key}.fraction")
    return "fraction" if has_fraction else "steps"


def plan_phases(cfg: DictConfig) -> list[Phase]:
    """The phases of a run, in order, covering steps 1..train.steps exactly. Raises ConfigError
    naming the key (`train.phases[1].fraction`, ...). No phases configured: one phase."""
    image = cfg.model.image
    total = int(cfg.train.steps)
    entries = list(cfg.train.phases or [])
    if not entries:
        return [Phase(0, 1, total, int(image.image_size), float(image.patch_dropout))]
    kind = _share_kind(entries[0], "train.phases[0]")
    ends: list[int] = []
    done = 0
    cumulative = 0.0
    for index, entry in enumerate(entries):
        key = f"train.phases[{index}]"
        if _share_kind(entry, key) != kind:
            raise ConfigError(f"phase {index} gives its share as {_share_kind(entry, key)}, train.phases[0] as "
                              f"{kind}: use the same in every phase", key=f"{key}.{_share_kind(entry, key)}")
        if kind == "fraction":
            fraction = float(entry.fraction)
            if not 0 < fraction <= 1:
                raise ConfigError(f"{fraction}: must be in (0, 1]", key=f"{key}.fraction")
            cumulative += fraction
            end = total if index == len(entries) - 1 else int(math.floor(cumulative * total + 0.5))
        else:
            if int(entry.steps) < 1:
                raise ConfigError(f"{entry.steps}: must be >= 1", key=f"{key}.steps")
            end = done + int(entry.steps)
        if end <= done:
            raise ConfigError(f"{entry[kind]} of train.steps={total} is less than one step", key=f"{key}.{kind}")
        ends.append(end)
        done = end
    if kind == "fraction" and abs(cumulative - 1) > FRACTION_TOLERANCE:
        raise ConfigError(f"the fractions sum to {cumulative:g}, not 1", key="train.phases")
    if kind == "steps" and done != total:
        raise ConfigError(f"the phases' steps sum to {done}, not train.steps={total}", key="train.phases")

    phases, first = [], 1
    for index, (entry, end) in enumerate(zip(entries, ends)):
        key = f"train.phases[{index}]"
        size = int(image.image_size if entry.image_size is None else entry.image_size)
        if size < image.patch_size or size % image.patch_size:
            raise ConfigError(f"{size} is not a positive multiple of model.image.patch_size={image.patch_size}",
                              key=f"{key}.image_size")
        dropout = float(image.patch_dropout if entry.patch_dropout is None else entry.patch_dropout)
        if not 0 <= dropout < 1:
            raise ConfigError(f"{dropout} is not in [0, 1)", key=f"{key}.patch_dropout")
        phases.append(Phase(index, first, end, size, dropout))
        first = end + 1
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that runs 1-based `step` (the last one past the end)."""
    for phase in phases:
        if step <= phase.last_step:
            return phase
    return phases[-1]
