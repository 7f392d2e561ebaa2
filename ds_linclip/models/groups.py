"""A tower's parameters by depth: open_clip's lock groups (LiT) and BEiT/EVA-CLIP's layer ids (layer-wise lr decay).

Both towers have the same four roles, named by class attributes on the tower:
`EMBEDDING_PARAMS` (what comes before the blocks), `blocks`, `FINAL_NORM_PARAMS` and `PROJECTION_PARAMS`.
Every parameter of a tower falls in exactly one role (`_role` raises for one that does not, so a
parameter added later cannot silently escape a lock). Parameters a linear variant adds to an attention
layer (`attn.focus_scale`, `attn.local_conv.*`) belong to that layer's block, like its qkv.

Lock groups, first to last, as open_clip's `VisionTransformer.lock` and `lock_text_tower` build them:

    [embeddings (+ ln_pre)], block 0, ..., block L-2, [block L-1 + final norm], [projection]   (L + 2 groups)

`unlocked` = n leaves the last n groups trainable (open_clip's `unlocked_groups` / `unlocked_layers`).

Layer ids, BEiT/EVA-CLIP's `get_num_layer_for_vit` convention (L blocks): embeddings 0, block i
(0-based) i + 1, everything after the blocks (final norm, projection) L + 1. Layer-wise decay gives id
`j` the factor decay^(L + 1 - j): embeddings decay^(L+1), block i decay^(L-i), final norm and projection 1.
"""

from __future__ import annotations

from torch import nn


def _role(tower: nn.Module, name: str) -> tuple[str, int]:
    """(role, block index or -1) of a tower-relative parameter name."""
    head = name.split(".", 1)[0]
    if head == "blocks":
        return "block", int(name.split(".", 2)[1])
    if head in tower.EMBEDDING_PARAMS:
        return "embedding", -1
    if head in tower.FINAL_NORM_PARAMS:
        return "final_norm", -1
    if head in tower.PROJECTION_PARAMS:
        return "projection", -1
    raise ValueError(f"{type(tower).__name__} parameter '{name}' has no place in the lock groups / layer ids "
                     "(add it to EMBEDDING_PARAMS, FINAL_NORM_PARAMS or PROJECTION_PARAMS)")


def num_lock_groups(layers: int) -> int:
    """How many lock groups a tower of `layers` blocks has (open_clip's count): L + 2."""
    return layers + 2


def lock_groups(tower: nn.Module) -> list[list[str]]:
    """Tower-relative parameter names per lock group, first (embeddings) to last (projection)."""
    layers = len(tower.blocks)
    groups: list[list[str]] = [[] for _ in range(num_lock_groups(layers))]
    for name, _ in tower.named_parameters():
        role, block = _role(tower, name)
        if role == "embedding":
            groups[0].append(name)
        elif role == "block":
            groups[1 + block].append(name)
        elif role == "final_norm":  # joins the last block, as in open_clip
            groups[layers].append(name)
        else:
            groups[layers + 1].append(name)
    return groups


def layer_ids(tower: nn.Module) -> dict[str, int]:
    """Tower-relative parameter name -> BEiT/EVA layer id in 0..L+1 (see the module docstring)."""
    layers = len(tower.blocks)
    ids: dict[str, int] = {}
    for name, _ in tower.named_parameters():
        role, block = _role(tower, name)
        ids[name] = 0 if role == "embedding" else block + 1 if role == "block" else layers + 1
    return ids


def lock_tower(tower: nn.Module, unlocked: int = 0, freeze_layer_norm: bool = True) -> list[str]:
    """Freeze a tower (requires_grad=False) but its last `unlocked` lock groups; returns the frozen names.

    freeze_layer_norm=False keeps every LayerNorm weight and bias of the frozen groups trainable (what
    open_clip's HF text tower does with it; its built-in TextTransformer accepts only True).
    """
    groups = lock_groups(tower)
    if not 0 <= unlocked <= len(groups):
        raise ValueError(f"unlocked groups must be in 0..{len(groups)} (the tower has {len(groups)}), got {unlocked}")
    norm_params = {f"{module_name}.{param_name}" for module_name, module in tower.named_modules()
                   if isinstance(module, nn.LayerNorm) for param_name, _ in module.named_parameters(recurse=False)}
    frozen_names = {name for group in groups[:len(groups) - unlocked] for name in group}
    if not freeze_layer_norm:
        frozen_names -= norm_params
    for name, param in tower.named_parameters():
        param.requires_grad_(name not in frozen_names)
    return sorted(frozen_names)
