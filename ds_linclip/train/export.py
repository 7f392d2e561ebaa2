"""Consolidated fp32 weights from a DeepSpeed checkpoint -> `model.safetensors` + `config.yaml`.

    python -m ds_linclip.train.export R/checkpoints/step_00000100 [--out DIR]
    python -m ds_linclip.train.export R/checkpoints            # the tag named by `latest`

The weights come from DeepSpeed's own ZeRO-to-fp32 tooling
(`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`), which merges the fp32
master partitions of every rank (ZeRO 1, 2, 3, and the bf16 optimizer of stage 0). Only a
stage-0 fp32 run has no optimizer partitions; there the model-states file already holds the
full fp32 module. The result loads into `build_model(cfg.model)` without DeepSpeed.

This is the one fp32 reconstruction of the package: the eval job (`ds_linclip.eval.checkpoint`)
reads DeepSpeed checkpoints through `fp32_state_dict` and `restore_scalar_shapes` too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ds_linclip.serialization import check_tag_dir, load_pt
from ds_linclip.train.checkpoint import LATEST, TAG_PATTERN, read_latest

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
DEFAULT_SUBDIR = "fp32"


def resolve_tag_dir(path: str | Path) -> Path:
    """A tag dir as is; a save dir (holding `latest`) -> the tag it names."""
    path = Path(path)
    if (path / LATEST).is_file():
        tag = read_latest(path)
        path = path / tag
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not any(path.glob("*model_states.pt")):
        raise FileNotFoundError(f"{path} holds no DeepSpeed model states (*model_states.pt): not a checkpoint tag dir")
    return path


def fp32_state_dict(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 state dict of a DeepSpeed tag folder (parameter and buffer names as in
    the plain model; 0-dim parameters still 1-element, see `restore_scalar_shapes`).
    Floating tensors come back as fp32, others as they were saved. Raises UnsafeCheckpointError
    for a file that names a class outside the allow-list (ds_linclip.serialization), what DeepSpeed
    raises, or FileNotFoundError/KeyError for a folder that is not a checkpoint."""
    tag_dir = Path(tag_dir)
    if any(tag_dir.glob("*optim_states.pt")):
        check_tag_dir(tag_dir)  # DeepSpeed's tool unpickles with weights_only=False
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints per-file progress lines
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        # ZeRO-1 records no frozen parameters (a locked tower) beside its optimizer partitions (DeepSpeed
        # does from stage 2 on); its model states hold the whole module, frozen parameters included
        model_states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if model_states:
            module = torch.load(model_states[0], map_location="cpu", weights_only=False, mmap=True)["module"]
            state.update({name: tensor for name, tensor in module.items() if name not in state and tensor.numel()})
    else:  # stage 0 in fp32: DeepSpeed keeps no partitions, the module is whole in the model states
        model_states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not model_states:
            raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
        state = load_pt(model_states[0], mmap=True)["module"]
    from ds_linclip.train.linearize import strip_teacher  # train.linearize's frozen teachers are not exported

    return {
        name: (tensor.detach().float() if tensor.is_floating_point() else tensor.detach()).contiguous().clone()
        for name, tensor in strip_teacher(state).items()
    }


def restore_scalar_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Give 0-dim parameters their shape back: the trainer holds them (logit_scale) as 1-element
    tensors under DeepSpeed (`engine.promote_scalar_parameters`). Only 1-element <-> 0-dim
    differences are undone; any other mismatch is left for the caller to report."""
    return {
        name: tensor.reshape(expected[name])
        if name in expected and tensor.shape != expected[name] and tensor.numel() == 1 == math.prod(expected[name])
        else tensor
        for name, tensor in state.items()
    }


def to_model_shapes(state: dict[str, torch.Tensor], config_yaml: str | Path) -> dict[str, torch.Tensor]:
    """Check `state` against the plain model of `config_yaml` (same names) and give each tensor
    the model's shape (the trainer holds 0-dim parameters as 1-element ones, see
    engine.promote_scalar_parameters)."""

    from ds_linclip.config import load_config
    from ds_linclip.models import build_model

    cfg = load_config([config_yaml])
    cfg.model.pretrained = None  # the skeleton only: its names and shapes
    expected = {k: v.shape for k, v in build_model(cfg.model, load_pretrained_weights=False).state_dict().items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model of {config_yaml}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = restore_scalar_shapes(state, expected)
    for name, tensor in out.items():
        if tensor.shape != expected[name]:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} vs model {tuple(expected[name])}")
    return out


def export(tag_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `model.safetensors` + `config.yaml` into out_dir (default TAG_DIR/fp32); returns out_dir.
    The files appear atomically (written to a temp dir, then renamed)."""
    tag_dir = resolve_tag_dir(tag_dir)
    out_dir = Path(out_dir) if out_dir is not None else tag_dir / DEFAULT_SUBDIR
    config = tag_dir / CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: the checkpoint was not written by ds_linclip.train")
    state = to_model_shapes(fp32_state_dict(tag_dir), config)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    step = TAG_PATTERN.match(tag_dir.name)
    save_file(state, str(tmp / WEIGHTS), metadata={"source": str(tag_dir), "step": step.group(1) if step else ""})
    shutil.copyfile(config, tmp / CONFIG)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.train.export",
        description="Consolidate a DeepSpeed checkpoint (any ZeRO stage) into fp32 model.safetensors + config.yaml.",
    )
    parser.add_argument("checkpoint", help="a tag dir (R/checkpoints/step_00000100) or a save dir with `latest`")
    parser.add_argument("--out", default=None, help="output dir (default: CHECKPOINT/fp32)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
