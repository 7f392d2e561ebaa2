"""Learning rate per tower and layer-wise lr decay: which lr each parameter's optimizer group gets.

Each parameter gets a group label and an lr scale, its peak lr over `train.lr`:

    tower parameters   (train.<tower>_lr or train.lr) / train.lr  x  decay^(L + 1 - layer id)
    logit_scale        1 (train.lr)

with the layer ids of models/groups.py (BEiT / EVA-CLIP's convention, L blocks): embeddings
decay^(L+1), block i (0-based) decay^(L-i), final norm and projection decay^0. EVA-CLIP's
`LayerDecayValueAssigner` gives the same factors (`ld ** (L + 1 - layer_id)`).

`engine.param_groups` splits every label into decay / no-decay groups; each group carries its scale
under LR_SCALE and DeepSpeed's scheduler multiplies each group's own lr (WarmupCosineLR keeps one
start lr per group), so warmup and cosine shape every group alike. With the defaults every label is
empty and the groups are exactly `decay` and `no_decay` at train.lr, as without this module.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import nn

from ds_linclip.models.groups import layer_ids

# optimizer param-group key: the group's lr over train.lr (DeepSpeed keeps extra keys in its groups)
LR_SCALE = "lr_scale"
# the CLIP module names of the towers, by config name
TOWER_MODULES = {"image": "visual", "text": "text"}


def layer_label(layer_id: int, layers: int) -> str:
    """`embed`, `block03`, `head` for layer ids 0, 4, L + 1 of a tower of `layers` blocks."""
    if layer_id == 0:
        return "embed"
    if layer_id == layers + 1:
        return "head"
    return f"block{layer_id - 1:02d}"


def lr_scales(model: nn.Module, train: Any) -> dict[str, tuple[str, float]]:
    """Parameter name -> (group label, lr scale) for every parameter of `model` (a CLIP) under `train`
    (the `train` config section). Labels name only what differs: '' for all with the defaults, the tower
    when a tower lr or a layer decay is set, and the layer when that tower's decay is not 1."""
    split_towers = train.image_lr is not None or train.text_lr is not None or \
        train.image_layer_decay != 1.0 or train.text_layer_decay != 1.0
    out: dict[str, tuple[str, float]] = {}
    for tower, module_name in TOWER_MODULES.items():
        module = getattr(model, module_name)
        tower_lr = train[f"{tower}_lr"]
        tower_scale = 1.0 if tower_lr is None else float(tower_lr) / float(train.lr)
        decay = float(train[f"{tower}_layer_decay"])
        layers = len(module.blocks)
        for name, layer_id in layer_ids(module).items():
            label = tower if split_towers else ""
            if decay != 1.0:
                label += "." + layer_label(layer_id, layers)
            out[f"{module_name}.{name}"] = (label, tower_scale * decay ** (layers + 1 - layer_id))
    for name, _ in model.named_parameters():
        out.setdefault(name, ("other" if split_towers else "", 1.0))
    return out


def scheduled_lr(param_groups: Iterable[Mapping[str, Any]]) -> float:
    """train.lr as the schedule has it now, from the optimizer's groups (their lr over their scale);
    0.0 when every group has scale 0."""
    for group in param_groups:
        scale = group.get(LR_SCALE, 1.0)
        if scale > 0:
            return float(group["lr"]) / scale
    return 0.0


def describe_groups(groups: list[dict], base_lr: float, frozen_params: int = 0) -> str:
    """The start-up table: one row per non-empty group (name, parameters, peak lr, weight decay)."""
    rows = [(g.get("name", "?"), sum(p.numel() for p in g["params"]), base_lr * g.get(LR_SCALE, 1.0),
             g["weight_decay"]) for g in groups if g["params"]]
    width = max([len("group")] + [len(r[0]) for r in rows])
    lines = [f"{'group':<{width}}  {'params':>12}  {'peak lr':>10}  {'wd':>6}"]
    lines += [f"{name:<{width}}  {count:>12,}  {lr:>10.3g}  {wd:>6.3g}" for name, count, lr, wd in rows]
    lines.append(f"{'total':<{width}}  {sum(r[1] for r in rows):>12,}")
    if frozen_params:
        lines.append(f"{'frozen':<{width}}  {frozen_params:>12,}  (locked: not in the optimizer)")
    return "\n".join(lines)
