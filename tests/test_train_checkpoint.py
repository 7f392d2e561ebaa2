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


# ----------------------------------------------------------------------------- pruning vs the eval job


def _run_with_tags(tmp_path: Path, steps) -> Path:
    save_dir = tmp_path / "run" / "checkpoints"
    for step in steps:
        _tag(save_dir, step)
    ckpt.write_latest(save_dir, ckpt.tag_for_step(max(steps)))
    return save_dir


def test_unscored_checkpoints_survive_pruning_only_when_the_run_is_evaluated(tmp_path):
    save_dir = _run_with_tags(tmp_path, (1, 2, 3, 4))
    run = save_dir.parent
    assert ckpt.unscored_cap(run, eval_after_checkpoint=False, keep_unscored_max=5) is None  # nobody evaluates
    assert ckpt.unscored_cap(run, eval_after_checkpoint=True, keep_unscored_max=5) == 5
    assert ckpt.unscored_cap(run, eval_after_checkpoint=True, keep_unscored_max=0) is None  # switched off
    (run / "eval").mkdir()
    (run / "eval" / ckpt.WATCH_LOCK).touch()  # a watcher was started on the run
    cap = ckpt.unscored_cap(run, eval_after_checkpoint=False, keep_unscored_max=5)
    assert cap == 5
    ckpt.mark_scored(run, "step_00000002")
    assert ckpt.prune(save_dir, keep_last=1, keep_unscored=cap) == ["step_00000002"]
    assert ckpt.list_tags(save_dir) == ["step_00000001", "step_00000003", "step_00000004"]
    # the watcher's state file counts as scored too (a watcher from before the markers existed)
    (run / "eval" / ckpt.WATCH_STATE).write_text('{"checkpoints": {"step_00000001": {"status": "failed"}}}')
    assert ckpt.prune(save_dir, keep_last=1, keep_unscored=cap) == ["step_00000001"]
    ckpt.mark_scored(run, "step_00000003")
    assert ckpt.prune(save_dir, keep_last=1, keep_unscored=cap) == ["step_00000003"]
    assert ckpt.list_tags(save_dir) == ["step_00000004"]


def test_the_unscored_cap_keeps_the_oldest_and_says_so(tmp_path, caplog):
    save_dir = _run_with_tags(tmp_path, range(1, 8))
    with caplog.at_level("WARNING", logger="ds_linclip.train"):
        deleted = ckpt.prune(save_dir, keep_last=2, keep_unscored=3)
    # the watcher scores oldest first: 1-3 are next in its queue; 4 and 5 go; 6, 7 are the last two
    assert deleted == ["step_00000004", "step_00000005"]
    assert ckpt.list_tags(save_dir) == ["step_00000001", "step_00000002", "step_00000003", "step_00000006",
                                        "step_00000007"]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "train.keep_unscored_max=3 reached" in message and "step_00000004, step_00000005" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="ds_linclip.train"):
        assert ckpt.prune(save_dir, keep_last=2, keep_unscored=3) == []
    assert not caplog.records  # under the cap: silent


def test_eval_reads_deepspeed_checkpoints_through_the_trainers_fp32_path(tmp_path, monkeypatch):
    """One reconstruction: the eval loader calls train.export.fp32_state_dict and its scalar-shape
    restore, so what is scored is what export writes."""
    import torch

    from ds_linclip.config import load_config, to_yaml
    from ds_linclip.eval import checkpoint as eval_ckpt
    from ds_linclip.models import build_model
    from ds_linclip.train import export

    cfg = load_config([], ["model.preset=tiny"])
    state = build_model(cfg.model, load_pretrained_weights=False).state_dict()
    state["logit_scale"] = state["logit_scale"].reshape(1)  # as DeepSpeed holds it
    tag = tmp_path / "run" / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    torch.save({"module": state, "global_steps": 4}, tag / "mp_rank_00_model_states.pt")
    (tag / "config.yaml").write_text(to_yaml(cfg))
    calls = []
    real = export.fp32_state_dict
    monkeypatch.setattr(export, "fp32_state_dict", lambda path: calls.append(Path(path)) or real(path))
    loaded = eval_ckpt.load_checkpoint(tag)
    assert calls == [tag] and loaded.step == 4 and loaded.model.logit_scale.shape == ()
    assert "get_fp32_state_dict_from_zero_checkpoint" not in Path(eval_ckpt.__file__).read_text()
    assert export.restore_scalar_shapes({"a": torch.ones(1), "b": torch.ones(2)},
                                        {"a": torch.Size([]), "b": torch.Size([1, 2])})["b"].shape == (2,)


@pytest.mark.slow
def test_watcher_beside_a_run_with_keep_last_1_scores_every_checkpoint(fmnist_shards, tmp_path):
    """A real trainer (keep_last=1, a checkpoint every 2 steps) and a real watcher started first
    on its run folder: the watcher lags behind (each score loads the model and encodes), yet it
    scores every checkpoint, because pruning keeps what it has not scored yet."""
    import json
    import os
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    run = tmp_path / "watched"
    run.mkdir()
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text(
        f"eval:\n  zeroshot_data: {fmnist_shards}/test/shard-000000.tar\n  classnames: {fmnist_shards}/classnames.txt\n"
        "  templates: simple\n  max_samples: 64\n  batch_size: 32\n  workers: 0\n  device: cpu\n")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "ds_linclip.eval", "--watch", str(run), "--config", str(eval_yaml), "--poll-seconds",
         "0.5", "--no-progress"], env=env, cwd=repo, stdout=open(tmp_path / "watcher.log", "w"),
        stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (run / "eval" / ckpt.WATCH_LOCK).exists():
            assert watcher.poll() is None and time.monotonic() < deadline, (tmp_path / "watcher.log").read_text()
            time.sleep(0.2)
        trainer = subprocess.run(
            [sys.executable, "-m", "ds_linclip.train", "model.preset=tiny",
             f"data.train_shards={fmnist_shards}/train/shard-{{000000..000011}}.tar", "data.workers=1",
             f"train.output_dir={tmp_path}", "train.run_name=watched", "train.steps=8", "train.micro_batch_size=8",
             "train.precision=fp32", "train.zero_stage=1", "train.warmup_steps=2", "train.log_every=1",
             "train.checkpoint_every=2", "train.keep_last=1"],
            env=env, cwd=repo, capture_output=True, text=True, timeout=900)
        assert trainer.returncode == 0, trainer.stdout[-3000:] + trainer.stderr[-3000:]
        assert watcher.wait(timeout=600) == 0, (tmp_path / "watcher.log").read_text()[-3000:]
    finally:
        if watcher.poll() is None:
            watcher.kill()
    state = json.loads((run / "eval" / ckpt.WATCH_STATE).read_text())["checkpoints"]
    expected = [ckpt.tag_for_step(step) for step in (2, 4, 6, 8)]
    assert {tag: entry["status"] for tag, entry in state.items()} == {tag: "ok" for tag in expected}
    assert sorted(p.name for p in (run / "eval").glob("step_*_zeroshot.json")) == [f"{t}_zeroshot.json" for t in expected]
    assert "keep_unscored_max" not in trainer.stderr + trainer.stdout  # the cap (5) was never reached
    # the markers the trainer's pruning read: every checkpoint it deleted had been scored first
    assert sorted(p.name for p in (run / "eval" / ckpt.SCORED_DIR).iterdir()) == expected
