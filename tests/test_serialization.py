"""No code runs from a checkpoint: every reader of the trainer's .pt files (eval, export, resume)
refuses a pickle that would call a function, names the file in one line, and runs nothing; the
classes DeepSpeed saves still load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ds_linclip.serialization import ALLOWED_GLOBALS, UnsafeCheckpointError, check_tag_dir, load_pt


class RunsCode:
    """Unpickling this runs a shell command (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tiny_state() -> dict[str, torch.Tensor]:
    from ds_linclip.config import load_config
    from ds_linclip.models import build_model

    cfg = load_config([], ["model.preset=tiny"])
    state = build_model(cfg.model, load_pretrained_weights=False).state_dict()
    state["logit_scale"] = state["logit_scale"].reshape(1)  # as DeepSpeed holds it
    return state


@pytest.fixture
def hostile_tag(tmp_path) -> tuple[Path, Path]:
    """A run R with config.yaml and a stage-0 tag whose model states carry a code-running object."""
    from ds_linclip.config import load_config, to_yaml

    marker = tmp_path / "code_ran"
    tag = tmp_path / "run" / "checkpoints" / "step_00000004"
    (tag / "client_state").mkdir(parents=True)
    config_yaml = to_yaml(load_config([], ["model.preset=tiny"]))
    (tag / "config.yaml").write_text(config_yaml)
    (tmp_path / "run" / "config.yaml").write_text(config_yaml)
    torch.save({"module": _tiny_state(), "global_steps": 4, "payload": RunsCode(marker)},
               tag / "mp_rank_00_model_states.pt")
    torch.save({"step": 4, "samples_seen": 32, "rank": 0, "world_size": 1}, tag / "client_state" / "rank_00000.pt")
    (tag.parent / "latest").write_text(tag.name + "\n")
    return tag, marker


def _one_line_naming(message: str, path: Path) -> None:
    assert "\n" not in message and str(path) in message and "posix.system" in message, message


def test_the_safe_loader_refuses_a_pickle_that_runs_code(hostile_tag):
    tag, marker = hostile_tag
    states = tag / "mp_rank_00_model_states.pt"
    with pytest.raises(UnsafeCheckpointError) as err:
        load_pt(states)
    _one_line_naming(str(err.value), states)
    with pytest.raises(UnsafeCheckpointError) as err:
        check_tag_dir(tag)
    _one_line_naming(str(err.value), states)
    assert not marker.exists()
    # the same object unpickled the unsafe way does run (the test's payload is real)
    torch.load(states, weights_only=False)
    assert marker.exists()


def test_eval_export_and_resume_refuse_it_in_one_line(hostile_tag, capsys):
    from ds_linclip.config import ConfigError, load_config
    from ds_linclip.eval.checkpoint import load_checkpoint
    from ds_linclip.eval.errors import EvalError
    from ds_linclip.train import export
    from ds_linclip.train.preflight import check_resume

    tag, marker = hostile_tag
    states = tag / "mp_rank_00_model_states.pt"
    with pytest.raises(EvalError) as err:
        load_checkpoint(tag)
    _one_line_naming(str(err.value), states)

    assert export.main([str(tag)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    _one_line_naming(line, states)

    cfg = load_config([tag / "config.yaml"], [f"train.output_dir={tag.parents[2]}", "train.run_name=run",
                                              "train.resume=auto"])
    with pytest.raises(ConfigError) as err:
        check_resume(cfg, world_size=1)
    assert str(err.value).startswith("config key 'train.resume'")
    _one_line_naming(str(err.value), states)

    # a ZeRO folder: DeepSpeed's own fp32 tool is never reached with a hostile optimizer file
    optim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": RunsCode(marker)}}, optim)
    states.unlink()
    torch.save({"module": None, "global_steps": 4}, states)
    with pytest.raises(UnsafeCheckpointError) as err:
        export.fp32_state_dict(tag)
    _one_line_naming(str(err.value), optim)
    assert not marker.exists()


def test_the_classes_deepspeed_saves_load(tmp_path):
    """The allow-list: DeepSpeed's loss scalers, ZeRO stage enum and fragment addresses round-trip
    through weights_only loading."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(2.0 ** 16, 1000, 1.0, 2, False),
             "zero_stage": ZeroStageEnum.gradients, "param_slice_mappings": [{"w": fragment_address(4, 8)}],
             "weights": torch.arange(6.0)}
    torch.save(state, tmp_path / "optim_states.pt")
    check_tag_dir(tmp_path)
    loaded = load_pt(tmp_path / "optim_states.pt")
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["param_slice_mappings"][0]["w"] == fragment_address(4, 8)
    assert loaded["loss_scaler"].cur_scale == 1.0 and loaded["dynamic"].cur_scale == 2.0 ** 16
    assert torch.equal(loaded["weights"], torch.arange(6.0))
    assert sorted(ALLOWED_GLOBALS) == sorted(f"{c.__module__}.{c.__qualname__}" for c in
                                             (DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address))
