"""Reading the trainer's `.pt` files (DeepSpeed model/optimizer states, our per-rank client state)
without running code from them.

A `.pt` file is a pickle, and unpickling can call any importable function (`os.system`, ...).
`load_pt` unpickles with `torch.load(weights_only=True)`: tensors, containers and numbers only,
plus the few classes DeepSpeed puts into its checkpoints (`ALLOWED_GLOBALS`), allow-listed
through `torch.serialization.safe_globals`. Where DeepSpeed reads a checkpoint itself with
`weights_only=False` (resume: `engine.load_checkpoint`; ZeRO partitions:
`zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`), `check_tag_dir` first scans every
`.pt` file of the folder (statically, nothing is unpickled) and refuses one that names anything
outside the same allow-list. A refused file is an `UnsafeCheckpointError`: one line naming the
file and what it would import.

This module sits below train and eval (both read checkpoints through it) and imports no other
project module.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

# `module.qualname` of every class a checkpoint of ours may name besides what torch allows by
# default, and why it is there. All are plain data holders: unpickling one sets attributes.
ALLOWED_GLOBALS = {
    # ZeRO 1/2/3 and the bf16 optimizer save their loss scaler object (static, or dynamic for fp16)
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "ZeRO / bf16 optimizer states",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": "ZeRO / bf16 optimizer states (fp16)",
    # ZeRO optimizer states record their stage as this IntEnum
    "deepspeed.runtime.zero.config.ZeroStageEnum": "ZeRO optimizer states",
    # ZeRO 1/2 and the bf16 optimizer map each parameter to its slice of the flat partition
    "deepspeed.utils.tensor_fragment.fragment_address": "ZeRO / bf16 optimizer states (param_slice_mappings)",
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file names a global outside the allow-list: it could run code when unpickled."""


def _resolve(name: str) -> Any:
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def unsafe_globals(path: str | Path) -> list[str]:
    """What the pickle in `path` (a torch.save file) would import beyond torch's defaults and our
    allow-list, found statically (nothing is unpickled). Raises ValueError if `path` is not a
    torch.save zip file."""
    import torch

    needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return sorted(name for name in needed if name not in ALLOWED_GLOBALS)


def _refuse(path: Path, names: list[str]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refusing to read this checkpoint file: unpickling it would import {', '.join(names)}, which "
        f"is not on the allow-list of checkpoint classes (ds_linclip.serialization.ALLOWED_GLOBALS) and could run code"
    )


def load_pt(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` with the allow-listed DeepSpeed classes. Raises
    UnsafeCheckpointError (nothing unpickled) if the file names anything else; what torch.load
    raises for a missing or corrupt file."""
    import torch

    path = Path(path)
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except ValueError:  # not a zip checkpoint (legacy format): weights_only alone decides below
        needed = []
    refused = sorted(name for name in needed if name not in ALLOWED_GLOBALS)
    if refused:
        raise _refuse(path, refused)
    try:
        with torch.serialization.safe_globals([_resolve(name) for name in needed]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # a global the static scan could not see
        raise UnsafeCheckpointError(f"{path}: refusing to read this checkpoint file: "
                                    f"{str(err).splitlines()[0]}") from None


def check_tag_dir(tag_dir: str | Path) -> None:
    """Before DeepSpeed unpickles a checkpoint folder itself (with weights_only=False): every
    `*.pt` file in it (client_state/ included) names only allow-listed globals. Raises
    UnsafeCheckpointError for the first one that does not, or ValueError for a file that is not
    a torch.save zip."""
    for path in sorted(Path(tag_dir).rglob("*.pt")):
        try:
            refused = unsafe_globals(path)
        except ValueError as err:
            raise UnsafeCheckpointError(f"{path}: not a torch.save checkpoint file ({err})") from None
        if refused:
            raise _refuse(path, refused)
