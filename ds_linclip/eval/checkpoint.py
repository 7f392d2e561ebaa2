"""Load a model to score from what the trainer writes, without a DeepSpeed engine.

Accepted paths (see `resolve_checkpoint`):
- an exported `model.safetensors` file, or the folder holding it (`R/final`);
- a DeepSpeed tag folder (`R/checkpoints/step_00000100`), or the save folder (`R/checkpoints`,
  its `latest` tag is used); the fp32 weights come from the trainer's own reconstruction
  (`ds_linclip.train.export.fp32_state_dict`: DeepSpeed's ZeRO-to-fp32 tooling, stage 0 from the
  module weights in `mp_rank_00_model_states.pt`), so eval scores exactly what export writes;
- a run folder `R` (its `final/` export if there is one, else `checkpoints/latest`).

The model config comes from the `config.yaml` beside the weights (or the run's `R/config.yaml`),
with the user's config files and overrides on top.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig

from ds_linclip.config import config_hash, load_config
from ds_linclip.eval.errors import EvalError
from ds_linclip.serialization import load_pt

EXPORT_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
_TAG_STEP = re.compile(r"(\d+)$")


@dataclass
class CheckpointRef:
    """Where the weights are and what kind of checkpoint holds them."""

    kind: str  # "deepspeed" | "exported"
    path: Path  # tag folder (deepspeed) or the .safetensors file (exported)
    tag: str  # `step_00000100`, or `final` for an export
    run_dir: Path | None  # R, when the checkpoint sits in a run folder laid out by the trainer


def tag_step(tag: str) -> int | None:
    """The step in a tag name (`step_00000100` -> 100, `global_step14` -> 14)."""
    match = _TAG_STEP.search(tag)
    return int(match.group(1)) if match else None


def _is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() or (path / "checkpoints").is_dir() or (path / "final").is_dir()


def _model_states_files(tag_dir: Path) -> list[Path]:
    return sorted(tag_dir.glob("*model_states.pt"))


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    """Classify a user-given checkpoint path; EvalError if it is missing or is not a checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EvalError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise EvalError(
                f"checkpoint {path} is a file but not a .safetensors export; give a DeepSpeed "
                f"checkpoint folder (e.g. R/checkpoints/step_00000100) or an exported {EXPORT_FILE}"
            )
        folder = path.parent
        run_dir = folder.parent if folder.name == "final" and _is_run_dir(folder.parent) else None
        return CheckpointRef("exported", path, "final" if folder.name == "final" else path.stem, run_dir)
    if (path / EXPORT_FILE).is_file():
        return resolve_checkpoint(path / EXPORT_FILE)
    if _model_states_files(path):
        save_dir = path.parent
        run_dir = save_dir.parent if save_dir.name == "checkpoints" and _is_run_dir(save_dir.parent) else None
        return CheckpointRef("deepspeed", path, path.name, run_dir)
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        if not (path / tag).is_dir():
            raise EvalError(f"{path / 'latest'} names tag '{tag}' but {path / tag} does not exist")
        return resolve_checkpoint(path / tag)
    if (path / "final" / EXPORT_FILE).is_file():
        return resolve_checkpoint(path / "final" / EXPORT_FILE)
    if (path / "checkpoints" / "latest").is_file():
        return resolve_checkpoint(path / "checkpoints")
    raise EvalError(
        f"{path} is not a checkpoint: expected a DeepSpeed tag folder (*model_states.pt), a folder "
        f"with a `latest` file, an exported {EXPORT_FILE} (or its folder), or a run folder"
    )


def find_config_file(ref: CheckpointRef) -> Path | None:
    """config.yaml beside the weights, else the run's R/config.yaml."""
    folder = ref.path if ref.kind == "deepspeed" else ref.path.parent
    for candidate in (folder / CONFIG_FILE, folder.parent / CONFIG_FILE,
                      (ref.run_dir / CONFIG_FILE) if ref.run_dir else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _read_deepspeed(tag_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """fp32 state dict and the engine/client state (step, samples) of a DeepSpeed tag folder."""
    states_files = _model_states_files(tag_dir)
    if not states_files:
        raise EvalError(f"DeepSpeed checkpoint {tag_dir} has no *model_states.pt file")
    states_file = next((f for f in states_files if f.name.startswith("mp_rank_00")), states_files[0])
    try:
        model_states = load_pt(states_file, mmap=True)
    except Exception as err:
        raise EvalError(f"cannot read DeepSpeed checkpoint file {states_file}: {type(err).__name__}: {err}") from err
    if not isinstance(model_states, dict):
        raise EvalError(f"{states_file} does not hold a DeepSpeed checkpoint dict")
    if not list(tag_dir.glob("*optim_states.pt")) and not isinstance(model_states.get("module"), dict):
        raise EvalError(f"{states_file} has no `module` weights and the folder has no ZeRO optimizer files")
    from ds_linclip.train.export import fp32_state_dict

    try:
        state_dict = fp32_state_dict(tag_dir)
    except Exception as err:
        raise EvalError(f"cannot reconstruct fp32 weights from DeepSpeed checkpoint {tag_dir}: "
                        f"{type(err).__name__}: {err}") from err
    return dict(state_dict), model_states


def _read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except Exception as err:
        raise EvalError(f"cannot read exported weights {path}: {type(err).__name__}: {err}") from err
    return tensors, metadata


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def describe_model(cfg: DictConfig) -> str:
    m = cfg.model
    return (
        f"preset '{m.preset}' (embed_dim {m.embed_dim}; image {m.image.image_size}px/patch {m.image.patch_size}, "
        f"width {m.image.width}, {m.image.layers} layers; text context {m.text.context_length}, "
        f"width {m.text.width}, {m.text.layers} layers)"
    )


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, cfg: DictConfig) -> None:
    """Strictly load `state_dict`; EvalError listing missing/unexpected keys and shape mismatches."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    from ds_linclip.train.export import restore_scalar_shapes

    expected = model.state_dict()
    # the trainer holds 0-dim parameters (logit_scale) as 1-element ones under DeepSpeed
    state_dict = restore_scalar_shapes(state_dict, {k: v.shape for k, v in expected.items()})
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        def head(items: list[str]) -> str:
            return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

        problems = []
        if mismatched:
            problems.append(f"shape mismatch: {head(mismatched)}")
        if missing:
            problems.append(f"missing keys: {head(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {head(unexpected)}")
        raise EvalError(f"weights in {source} do not fit the model {describe_model(cfg)}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module  # eval mode, on CPU
    cfg: DictConfig  # checkpoint config + user config files + overrides
    ref: CheckpointRef
    step: int | None
    samples_seen: int | None
    train_config_hash: str  # hash of the checkpoint's own config (identifies the training run)


def _samples_from_client_states(tag_dir: Path) -> int | None:
    """Samples seen by all ranks: the sum of the trainer's per-rank `client_state/rank_*.pt` counts."""
    files = sorted((tag_dir / "client_state").glob("rank_*.pt"))
    if not files:
        return None
    total = 0
    for path in files:
        try:
            value = _int_or_none(load_pt(path).get("samples_seen"))
        except Exception:  # a label only: an unreadable count must not fail the scoring
            return None
        if value is None:
            return None
        total += value
    return total


def _training_progress(ref: CheckpointRef, engine_state: dict) -> tuple[int | None, int | None]:
    """(step, samples seen) from our trainer's client state, else DeepSpeed's counters, else the tag."""
    client = engine_state.get("ds_linclip") if isinstance(engine_state.get("ds_linclip"), dict) else {}
    step = next((s for s in (_int_or_none(client.get("step")), _int_or_none(engine_state.get("step")),
                             _int_or_none(engine_state.get("global_steps")), tag_step(ref.tag)) if s is not None), None)
    samples = _samples_from_client_states(ref.path)
    if samples is None:  # DeepSpeed counts train_batch_size (all ranks) per optimizer step
        samples = _int_or_none(engine_state.get("global_samples"))
    return step, samples


def _export_progress(ref: CheckpointRef, metadata: dict[str, str]) -> tuple[int | None, int | None]:
    """(step, samples seen) of an export: its metadata, R/DONE, and the DeepSpeed tag it came from."""
    step = _int_or_none(metadata.get("step"))
    # the tag folder the export was made from: named in its metadata (a path that may be relative
    # to where training ran), else the final tag that R/DONE names
    candidates = [Path(metadata["source"])] if metadata.get("source") else []
    done_file = ref.run_dir / "DONE" if ref.run_dir else None
    if done_file is not None and done_file.is_file():
        try:
            done = json.loads(done_file.read_text() or "{}")
        except (OSError, ValueError):
            done = {}
        if step is None:
            step = _int_or_none(done.get("step"))
        if done.get("final_tag"):
            candidates.append(ref.run_dir / "checkpoints" / str(done["final_tag"]))
    source_tag = next((c for c in candidates if c.is_dir()), None)
    samples = None
    if source_tag is not None:
        samples = _samples_from_client_states(source_tag)
        if samples is None and _model_states_files(source_tag):
            try:
                states = load_pt(_model_states_files(source_tag)[0], mmap=True)
                samples = _int_or_none(states.get("global_samples"))
            except Exception:  # the export is what we score; the count is only a label
                pass
    return step, samples


def checkpoint_config(
    ref: CheckpointRef, config_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> tuple[DictConfig, str]:
    """(config to evaluate with, hash of the checkpoint's own config). Raises ConfigError/EvalError."""
    own = find_config_file(ref)
    if own is None and not config_files:
        raise EvalError(
            f"no {CONFIG_FILE} beside checkpoint {ref.path} or in its run folder; pass the training "
            "config with --config so the model shape is known"
        )
    own_files = [own] if own is not None else []
    train_hash = config_hash(load_config(own_files)) if own is not None else "unknown"
    cfg = load_config([*own_files, *config_files], overrides)
    return cfg, train_hash


def load_checkpoint(
    path: str | Path, config_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> LoadedCheckpoint:
    """Build the model from the checkpoint's config and load its fp32 weights (CPU, eval mode)."""
    ref = resolve_checkpoint(path)
    cfg, train_hash = checkpoint_config(ref, config_files, overrides)
    if ref.kind == "deepspeed":
        state_dict, engine_state = _read_deepspeed(ref.path)
        step, samples = _training_progress(ref, engine_state)
    else:
        state_dict, metadata = _read_export(ref.path)
        step, samples = _export_progress(ref, metadata)
    from ds_linclip.models import build_model

    model = build_model(cfg.model, load_pretrained_weights=False)  # the checkpoint's weights replace them
    load_weights(model, state_dict, str(ref.path), cfg)
    model.eval()
    return LoadedCheckpoint(model, cfg, ref, step, samples, train_hash)
