"""Checkpoint bookkeeping without DeepSpeed processes: `latest`, pruning, resume resolution,
the non-finite guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds_linclip.train import checkpoint as ckpt
from ds_linclip.train.loop import NonFiniteGuard, NonFiniteLossError


def _tag(save_dir: Path, step: int) -> Path:
    path = save_dir / ckpt.tag_for_step(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    return path


def test_tag_names():
    assert ckpt.tag_for_step(100) == "step_00000100"
    assert ckpt.step_of_tag("step_00000100") == 100
    with pytest.raises(ValueError, match="not a checkpoint tag"):
        ckpt.step_of_tag("global_step100")


def test_latest_is_atomic_and_read_back(tmp_path):
    assert ckpt.read_latest(tmp_path) is None
    ckpt.write_latest(tmp_path, "step_00000005")
    assert ckpt.read_latest(tmp_path) == "step_00000005"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temp file left behind


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path):
    _tag(tmp_path, 5)
    ckpt.write_latest(tmp_path, "step_00000005")
    _tag(tmp_path, 10)  # a save that died before every rank finished: `latest` never moved
    assert ckpt.resolve_resume("auto", tmp_path) == (tmp_path, "step_00000005")
    # the next completed save supersedes it; the abandoned dir is never resumed from
    ckpt.write_latest(tmp_path, "step_00000007")
    _tag(tmp_path, 7)
    deleted = ckpt.prune(tmp_path, keep_last=2)
    assert deleted == ["step_00000010"]
    assert ckpt.list_tags(tmp_path) == ["step_00000005", "step_00000007"]


def test_prune_keeps_last_k(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _tag(tmp_path, step)
    ckpt.write_latest(tmp_path, "step_00000005")
    assert ckpt.prune(tmp_path, keep_last=3) == ["step_00000001", "step_00000002"]
    assert ckpt.list_tags(tmp_path) == ["step_00000003", "step_00000004", "step_00000005"]
    (tmp_path / "not_a_tag").mkdir()
    ckpt.prune(tmp_path, keep_last=1)
    assert ckpt.list_tags(tmp_path) == ["step_00000005"] and (tmp_path / "not_a_tag").is_dir()


def test_resolve_resume_modes(tmp_path):
    save_dir = tmp_path / "checkpoints"
    assert ckpt.resolve_resume("auto", save_dir) is None  # fresh run
    assert ckpt.resolve_resume("none", save_dir) is None
    tag = _tag(save_dir, 3)
    assert ckpt.resolve_resume("auto", save_dir) is None  # a tag without `latest` is incomplete
    ckpt.write_latest(save_dir, tag.name)
    assert ckpt.resolve_resume("auto", save_dir) == (save_dir, "step_00000003")
    assert ckpt.resolve_resume("none", save_dir) is None
    assert ckpt.resolve_resume(str(tag), tmp_path / "elsewhere") == (save_dir, "step_00000003")
    assert ckpt.resolve_resume(str(save_dir), tmp_path / "elsewhere") == (save_dir, "step_00000003")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "missing"), save_dir)
    ckpt.write_latest(save_dir, "step_00000009")
    with pytest.raises(FileNotFoundError, match="step_00000009"):
        ckpt.resolve_resume("auto", save_dir)


def test_export_refuses_non_checkpoints(tmp_path):
    from ds_linclip.train.export import main, resolve_tag_dir

    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_tag_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_states"):
        resolve_tag_dir(tmp_path / "empty")
    assert main([str(tmp_path / "nope")]) == 2


def test_nonfinite_guard_counts_and_stops_after_k_in_a_row():
    guard = NonFiniteGuard(limit=3)
    for finite in (True, False, False, True, False, False):
        guard.update(finite, step=1)
    assert guard.total == 4 and guard.in_a_row == 2
    with pytest.raises(NonFiniteLossError, match="3 micro-batches in a row"):
        guard.update(False, step=9)


def test_cli_accepts_the_deepspeed_launchers_local_rank_and_names_bad_keys(capsys):
    from ds_linclip.config import cli_config
    from ds_linclip.train.__main__ import build_parser

    args = build_parser().parse_args(["--local_rank=1", "model.preset=tiny", "data.train_shards=x.tar", "train.steps=3"])
    assert cli_config(args, required=["data.train_shards"]).train.steps == 3
    with pytest.raises(SystemExit) as exit_info:
        cli_config(build_parser().parse_args(["model.preset=tiny", "data.train_shards=x.tar", "train.stepz=3"]))
    assert exit_info.value.code == 2
    assert "train.steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_config(build_parser().parse_args(["model.preset=tiny"]), required=["data.train_shards"])
    assert exit_info.value.code == 2 and "data.train_shards" in capsys.readouterr().err
