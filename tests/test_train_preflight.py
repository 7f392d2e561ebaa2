"""Fail fast: what the config and the file system can tell is checked before the engine starts,
reported as one line naming the key and its value, exit 2 (trainer, eval job, eval.submit), and
`--check` prints the plan without starting anything.

In-process checks for each rule, then the CLIs as real processes: plain `python -m`, and the
trainer under the `deepspeed` launcher with 2 CPU ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds_linclip.config import ConfigError, load_config
from ds_linclip.train.preflight import check_eval_inputs, check_train

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_fmnist.yaml"
# a generous bound for a loaded 2-core CI machine; what it replaces was a model + engine build
# (20-130 s here) ending in a 20-line traceback
FAST_S = 60


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def _cfg(shards: Path, tmp_path: Path, *overrides: str):
    return load_config([], [
        "model.preset=tiny", f"data.train_shards={shards}/train/shard-{{000000..000011}}.tar", "data.workers=1",
        "train.micro_batch_size=8", f"train.output_dir={tmp_path}", "train.run_name=run", *overrides,
    ])


def _error(cfg, world: int = 2) -> str:
    with pytest.raises(ConfigError) as info:
        check_train(cfg, world)
    return str(info.value)


# ----------------------------------------------------------------------------- each rule, in process


def test_plan_of_a_good_config(fmnist_shards, tmp_path):
    plan = check_train(_cfg(fmnist_shards, tmp_path, "train.grad_accum_steps=2", "train.steps=100"), 2)
    assert (plan.global_batch_size, plan.num_shards, plan.samples_per_epoch) == (32, 12, 6000)
    assert plan.samples_per_epoch_source == "sizes.json"
    assert plan.batches_per_epoch == 6000 // (2 * 1 * 8)
    assert plan.resume is None
    assert "global batch:      32 = micro batch 8 x accumulation 2 x 2 rank(s)" in plan.summary()


def test_shards_that_match_nothing_or_are_too_few(fmnist_shards, tmp_path):
    err = _error(_cfg(fmnist_shards, tmp_path, "data.train_shards=/nonexistent/{000..003}.tar"))
    assert err.startswith("config key 'data.train_shards'") and "'/nonexistent/{000..003}.tar'" in err
    assert "matches no shards" in err
    err = _error(_cfg(fmnist_shards, tmp_path, "data.workers=4"), world=4)
    assert "data.train_shards" in err and "12 shard(s)" in err and "4 rank(s) x 4 worker(s) = 16" in err
    assert "data.workers=4" in err
    # weights are for resampled mode only
    err = _error(_cfg(fmnist_shards, tmp_path, f"data.train_shards={fmnist_shards}/train/shard-000000.tar@2"))
    assert "data.train_shards" in err and "data.mode=resampled" in err


def test_missing_sizes_json_needs_train_num_samples(fmnist_shards, tmp_path):
    copy = tmp_path / "shards"
    copy.mkdir()
    for index in range(2):
        shutil.copy(fmnist_shards / "train" / f"shard-{index:06d}.tar", copy)
    cfg = _cfg(fmnist_shards, tmp_path, f"data.train_shards={copy}/shard-{{000000..000001}}.tar")
    err = _error(cfg, world=1)
    assert err.startswith("config key 'data.train_num_samples'") and str(copy / "sizes.json") in err
    cfg.data.train_num_samples = 1000
    assert check_train(cfg, 1).samples_per_epoch_source == "data.train_num_samples"
    cfg.data.train_num_samples = 4  # not one batch per worker
    assert "config key 'train.micro_batch_size'" in _error(cfg, world=1)


def test_deepspeed_option_conflicts(fmnist_shards, tmp_path):
    err = _error(_cfg(fmnist_shards, tmp_path, "train.offload_param=true", "train.zero_stage=2"))
    assert err == ("config key 'train.offload_param': true: parameter offload needs ZeRO stage 3, but "
                   "train.zero_stage is 2")
    assert "train.offload_optimizer" in _error(_cfg(fmnist_shards, tmp_path, "train.offload_optimizer=true",
                                                    "train.zero_stage=0"))
    # the deepspeed: section cannot restate the batch or undo the stage an offload needs
    assert "deepspeed.train_batch_size" in _error(_cfg(fmnist_shards, tmp_path, "+deepspeed.train_batch_size=64"))
    err = _error(_cfg(fmnist_shards, tmp_path, "train.zero_stage=3", "train.offload_param=true",
                      "+deepspeed.zero_optimization.stage=2"))
    assert "deepspeed.zero_optimization" in err and "stage 3" in err
    assert "train.log_every" in _error(_cfg(fmnist_shards, tmp_path, "train.log_every=0"))


def test_accumulation_options(fmnist_shards, tmp_path):
    assert _error(_cfg(fmnist_shards, tmp_path, "train.accum_freq=0")) == (
        "config key 'train.accum_freq': 0: must be >= 1")
    err = _error(_cfg(fmnist_shards, tmp_path, "train.accum_freq=2", "train.grad_accum_steps=2"))
    assert err.startswith("config key 'train.accum_freq': 2:") and "train.grad_accum_steps=2" in err
    assert "train.accum_freq" in _error(_cfg(fmnist_shards, tmp_path, "train.accum_freq=2",
                                             "train.linearize.enabled=true"))
    plan = check_train(_cfg(fmnist_shards, tmp_path, "train.accum_freq=4", "train.loss=siglip"), 2)
    assert (plan.grad_accum_steps, plan.global_batch_size) == (4, 8 * 4 * 2)


def test_pretrained_weights_must_be_readable(fmnist_shards, tmp_path):
    err = _error(_cfg(fmnist_shards, tmp_path, f"model.pretrained={tmp_path / 'nope.pt'}"))
    assert err.startswith("config key 'model.pretrained'") and "nope.pt" in err and "no such file" in err
    (tmp_path / "empty_dir").mkdir()
    assert "holds none of" in _error(_cfg(fmnist_shards, tmp_path, f"model.pretrained={tmp_path / 'empty_dir'}"))
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4)}, good)
    check_train(_cfg(fmnist_shards, tmp_path, f"model.pretrained={good}"), 2)  # only the container is checked
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:12])
    assert "not a readable weights file" in _error(_cfg(fmnist_shards, tmp_path, f"model.pretrained={truncated}"))
    torch.save({"a": torch.zeros(4)}, tmp_path / "w.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "w.pt").read_bytes()[:100])
    assert "not a readable weights file" in _error(_cfg(fmnist_shards, tmp_path, f"model.pretrained={cut}"))


def test_eval_inputs_when_each_checkpoint_is_evaluated(fmnist_shards, tmp_path):
    test_shards = f"{fmnist_shards}/test/shard-{{000000..000009}}.tar"
    base = ["train.eval_after_checkpoint=true"]
    assert "needs eval.zeroshot_data" in _error(_cfg(fmnist_shards, tmp_path, *base))
    err = _error(_cfg(fmnist_shards, tmp_path, *base, "eval.zeroshot_data=/nonexistent/test-{0..3}.tar"))
    assert err.startswith("config key 'eval.zeroshot_data'") and "/nonexistent/test-{0..3}.tar" in err
    err = _error(_cfg(fmnist_shards, tmp_path, *base, f"eval.zeroshot_data={test_shards}",
                      f"eval.classnames={tmp_path / 'classes.txt'}"))
    assert err.startswith("config key 'eval.classnames'") and "classes.txt" in err and "no such file" in err
    err = _error(_cfg(fmnist_shards, tmp_path, *base, f"eval.zeroshot_data={test_shards}", "eval.templates=mine.txt"))
    assert err.startswith("config key 'eval.templates'")
    err = _error(_cfg(fmnist_shards, tmp_path, *base, f"eval.zeroshot_data={test_shards}", "eval.classnames=folders"))
    assert err.startswith("config key 'eval.classnames'") and "ImageFolder" in err
    cfg = _cfg(fmnist_shards, tmp_path, *base, f"eval.retrieval_data={tmp_path}/r-{{0..1}}.tar")
    assert _error(cfg).startswith("config key 'eval.retrieval_data'")
    ok = _cfg(fmnist_shards, tmp_path, *base, f"eval.zeroshot_data={test_shards}",
              f"eval.classnames={fmnist_shards / 'classnames.txt'}")
    check_train(ok, 2)
    check_eval_inputs(ok)


def test_resume_must_be_a_checkpoint_this_run_can_load(fmnist_shards, tmp_path):
    not_a_checkpoint = tmp_path / "some_dir"
    not_a_checkpoint.mkdir()
    err = _error(_cfg(fmnist_shards, tmp_path, f"train.resume={not_a_checkpoint}"))
    assert err.startswith(f"config key 'train.resume': '{not_a_checkpoint}'") and "not a checkpoint" in err
    assert "does not exist" in _error(_cfg(fmnist_shards, tmp_path, f"train.resume={tmp_path / 'gone'}"))
    # a tag written by one rank, resumed by two
    save_dir = tmp_path / "run" / "checkpoints"
    tag = save_dir / "step_00000005"
    (tag / "client_state").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tag / "client_state" / "rank_00000.pt").write_bytes(b"x")
    (save_dir / "latest").write_text("step_00000005\n")
    assert "written by 1 rank(s), this run has 2" in _error(_cfg(fmnist_shards, tmp_path))  # resume=auto
    # files DeepSpeed would unpickle are read-checked first (ds_linclip.serialization)
    err = _error(_cfg(fmnist_shards, tmp_path), world=1)
    assert f"{tag / 'client_state' / 'rank_00000.pt'}: not a torch.save checkpoint file" in err
    torch.save({"module": {}}, tag / "mp_rank_00_model_states.pt")
    torch.save({"step": 5}, tag / "client_state" / "rank_00000.pt")
    assert check_train(_cfg(fmnist_shards, tmp_path), 1).resume == str(tag)
    (save_dir / "latest").write_text("step_00000009\n")
    assert "step_00000009" in _error(_cfg(fmnist_shards, tmp_path), world=1)
    assert check_train(_cfg(fmnist_shards, tmp_path, "train.resume=none"), 1).resume is None


def test_output_dir_must_be_a_folder(fmnist_shards, tmp_path):
    (tmp_path / "file").write_text("x")
    err = _error(_cfg(fmnist_shards, tmp_path, f"train.output_dir={tmp_path / 'file'}"))
    assert err.startswith("config key 'train.output_dir'") and "is not a folder" in err


# ----------------------------------------------------------------------------- the CLIs, as processes


def _run(args: list[str], cwd: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - start


def _trainer(*args: str) -> list[str]:
    return [sys.executable, "-m", "ds_linclip.train", "--config", str(DEMO), *args]


def test_the_issues_two_commands_print_one_line_and_exit_2(tmp_path):
    """Exactly the commands from the issue, run from a fresh folder (no shards there either)."""
    for args, expected in [
        (["data.train_shards=/nonexistent/{000..003}.tar"],
         "error: config key 'data.train_shards': shard spec '/nonexistent/{000..003}.tar' (in "
         "'/nonexistent/{000..003}.tar') matches no shards"),
        (["train.offload_param=true", "train.zero_stage=2"],
         "error: config key 'train.offload_param': true: parameter offload needs ZeRO stage 3, but "
         "train.zero_stage is 2"),
    ]:
        result, seconds = _run(_trainer(*args), tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.splitlines() == [expected], result.stderr
        assert result.stdout == "" and "Traceback" not in result.stderr
        assert seconds < FAST_S, seconds
        assert not (tmp_path / "runs").exists()  # nothing was started, nothing written


def test_check_prints_the_plan_and_starts_nothing(fmnist_shards, tmp_path):
    result, _ = _run(_trainer(f"data.train_shards={fmnist_shards}/train/shard-{{000000..000011}}.tar",
                              "--check", "--world-size", "2"), tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "run_name: demo" in out and "micro_batch_size: 128" in out  # the resolved config
    assert "global batch:      256 = micro batch 128 x accumulation 1 x 2 rank(s)" in out
    assert "shards:            12" in out and "samples per epoch: 6000 (from sizes.json)" in out
    assert not (tmp_path / "runs").exists()
    # the same checks as a real start: a problem is the same one line, exit 2
    result, _ = _run(_trainer(f"data.train_shards={fmnist_shards}/train/shard-{{000000..000011}}.tar",
                              "data.workers=8", "--check", "--world-size", "2"), tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and "2 rank(s) x 8 worker(s)" in result.stderr


@pytest.mark.slow
def test_under_the_deepspeed_launcher_the_error_is_one_line_and_the_exit_code_2(tmp_path):
    """2 CPU ranks: both check, both exit 2 before any rendezvous, rank 0 prints the line. The
    launcher adds its own INFO/ERROR lines on stdout (hostfile, cmd, spawned processes, `Killing
    subprocess`, `... exits with return code = 2`); the error itself is the only line on stderr."""
    result, seconds = _run(["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
                            "ds_linclip.train", "--config", str(DEMO), "train.offload_param=true",
                            "train.zero_stage=2"], tmp_path, timeout=600)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "error: config key 'train.offload_param': true: parameter offload needs ZeRO stage 3, but "
        "train.zero_stage is 2"], result.stderr
    assert "Traceback" not in result.stdout and "[rank" not in result.stdout
    assert all(line.startswith("[20") for line in result.stdout.splitlines()), result.stdout  # launcher log lines
    assert "exits with return code = 2" in result.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- eval and eval.submit


@pytest.fixture()
def corrupt_export(tmp_path) -> Path:
    """A run folder whose exported weights cannot be read: any check that came after loading them
    would end in exit 1 ("cannot read exported weights") instead of the config error."""
    from ds_linclip.config import to_yaml

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    (run / "config.yaml").write_text(to_yaml(load_config([], ["model.preset=tiny"])))
    (run / "DONE").write_text(json.dumps({"final_tag": "step_00000001", "step": 1}))
    return run


def test_eval_and_submit_check_inputs_before_loading_or_submitting(fmnist_shards, corrupt_export, capsys):
    from ds_linclip.eval import job, submit

    shard = fmnist_shards / "test" / "shard-000000.tar"
    cases = [
        (["eval.zeroshot_data=/nonexistent/{0..3}.tar"], "config key 'eval.zeroshot_data'"),
        ([f"eval.zeroshot_data={shard}", "eval.classnames=/nonexistent/names.txt"], "config key 'eval.classnames'"),
        ([f"eval.retrieval_data={corrupt_export}/nothing-*.tar"], "config key 'eval.retrieval_data'"),
    ]
    for overrides, expected in cases:
        for main, extra in ((job.main, ["--no-progress"]), (submit.main, ["--cluster", "local"])):
            assert main(["--checkpoint", str(corrupt_export / "final"), *extra, *overrides]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"error: {expected}"), err
        assert job.main(["--watch", str(corrupt_export), "--once", "--no-progress", *overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {expected}"), err
    assert not (corrupt_export / "eval").exists()  # no job was submitted, no watcher started
    # with the inputs fixed, the weights are what fails: exit 1, as before
    assert job.main(["--checkpoint", str(corrupt_export / "final"), "--no-progress", f"eval.zeroshot_data={shard}",
                     f"eval.classnames={fmnist_shards / 'classnames.txt'}"]) == 1
    assert "cannot read exported weights" in capsys.readouterr().err


def test_eval_cli_error_is_one_line_as_a_process(corrupt_export, tmp_path):
    result, seconds = _run([sys.executable, "-m", "ds_linclip.eval", "--checkpoint", str(corrupt_export / "final"),
                            "eval.zeroshot_data=/nonexistent/{0..3}.tar"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "error: config key 'eval.zeroshot_data': shard spec '/nonexistent/{0..3}.tar' (in '/nonexistent/{0..3}.tar') "
        "matches no shards (nor is it an ImageFolder or a CLIP_benchmark folder)"], result.stderr
    assert seconds < FAST_S
