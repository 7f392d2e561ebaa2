"""The eval job end to end: checkpoint loading (export and DeepSpeed), result files, TensorBoard,
bad input -> clear errors, the watcher across a restart, and submitit's local executor.

Real pieces throughout: real Fashion-MNIST shards (`fmnist_shards`), our tiny model, DeepSpeed's
own `save_checkpoint` (a CPU engine in a subprocess) and TensorBoard's EventAccumulator.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ds_linclip.config import load_config, to_yaml
from ds_linclip.eval import job
from ds_linclip.eval.checkpoint import load_checkpoint
from ds_linclip.models import build_model

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.preset=tiny"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


@pytest.fixture(scope="module")
def eval_overrides(fmnist_shards) -> list[str]:
    """Both tasks on the first 96 test images (the test shards carry `cls` and a caption)."""
    shard = fmnist_shards / "test" / "shard-000000.tar"
    return [
        f"eval.zeroshot_data={shard}", f"eval.retrieval_data={shard}",
        f"eval.classnames={fmnist_shards / 'classnames.txt'}", "eval.templates=simple",
        "eval.max_samples=96", "eval.batch_size=32", "eval.workers=0", "eval.device=cpu",
    ]


def _export_run(root: Path, seed: int = 0, step: int = 7) -> Path:
    """A run folder as the trainer leaves it after export: config.yaml, final/, DONE."""
    from safetensors.torch import save_file

    cfg = load_config([], TINY)
    torch.manual_seed(seed)
    model = build_model(cfg.model, load_pretrained_weights=False)
    run = root / "run"
    (run / "final").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run / "final" / "model.safetensors")
    for path in (run / "config.yaml", run / "final" / "config.yaml"):
        path.write_text(to_yaml(cfg))
    (run / "DONE").write_text(json.dumps({"final_tag": f"step_{step:08d}", "step": step}))
    return run


@pytest.fixture(scope="module")
def export_run(tmp_path_factory) -> Path:
    return _export_run(tmp_path_factory.mktemp("export"))


# ----------------------------------------------------------------------------- one checkpoint


def test_checkpoint_cli_writes_json_tensorboard_and_table(export_run, eval_overrides, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert job.main(["--checkpoint", str(export_run / "final"), "--no-progress", *eval_overrides]) == 0
    table = capsys.readouterr().out
    assert "zeroshot" in table and "retrieval" in table and "top-1" in table and "i→t R@1" in table

    zeroshot = json.loads((export_run / "eval" / "final_zeroshot.json").read_text())
    retrieval = json.loads((export_run / "eval" / "final_retrieval.json").read_text())
    assert zeroshot["step"] == 7 and zeroshot["num_samples"] == 96 and zeroshot["num_classes"] == 10
    assert zeroshot["model"] == {"preset": "tiny", "embed_dim": 128, "image_attention": "softmax",
                                 "text_attention": "softmax", "image_size": 32}
    assert set(zeroshot["metrics"]) == {"top1", "top5", "mean_per_class_recall"}
    assert 0.0 <= zeroshot["metrics"]["top1"] <= zeroshot["metrics"]["top5"] <= 1.0
    assert len(zeroshot["config_hash"]) == 12 and zeroshot["dataset"].endswith("shard-000000.tar")
    assert retrieval["num_samples"] == 96 and len(retrieval["metrics"]) == 6

    accumulator = EventAccumulator(str(export_run / "tensorboard" / "eval"))
    accumulator.Reload()
    for record in (zeroshot, retrieval):
        for name, value in record["metrics"].items():
            (event,) = accumulator.Scalars(f"eval/{record['task']}/{name}")
            assert event.step == 7 and event.value == pytest.approx(value, abs=1e-6)


def test_exported_weights_load_exactly(export_run):
    from safetensors.torch import load_file

    loaded = load_checkpoint(export_run / "final" / "model.safetensors")
    saved = load_file(export_run / "final" / "model.safetensors")
    assert loaded.ref.kind == "exported" and loaded.ref.run_dir == export_run and loaded.step == 7
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def _main_error(args: list[str], capsys) -> tuple[int, str]:
    code = job.main([*args, "--no-progress"])
    return code, capsys.readouterr().err


def test_bad_inputs_are_clear_errors(export_run, eval_overrides, tmp_path, capsys):
    # missing checkpoint
    code, err = _main_error(["--checkpoint", str(tmp_path / "nope"), *eval_overrides], capsys)
    assert code == 1 and f"checkpoint not found: {tmp_path / 'nope'}" in err

    # corrupt export (truncated file)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(export_run / "final", corrupt / "final")
    shutil.copy(export_run / "config.yaml", corrupt / "config.yaml")
    data = (corrupt / "final" / "model.safetensors").read_bytes()
    (corrupt / "final" / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, err = _main_error(["--checkpoint", str(corrupt / "final"), *eval_overrides], capsys)
    assert code == 1 and "cannot read exported weights" in err and "model.safetensors" in err

    # weights that do not fit the model the config describes
    code, err = _main_error(["--checkpoint", str(export_run / "final"), "model.image.width=64",
                             "model.image.heads=2", *eval_overrides], capsys)
    assert code == 1 and "do not fit the model preset 'tiny'" in err and "shape mismatch" in err
    assert "visual.class_embedding: checkpoint (128,) vs model (64,)" in err

    # an empty dataset: a shard with no samples
    import webdataset as wds

    empty = tmp_path / "empty.tar"
    with open(empty, "wb") as handle:
        wds.TarWriter(handle).close()
    code, err = _main_error(["--checkpoint", str(export_run / "final"), *eval_overrides,
                             f"eval.zeroshot_data={empty}", "eval.retrieval_data=null"], capsys)
    assert code == 1 and "empty.tar" in err and ("no usable sample" in err or "no samples" in err)

    # a class file listing a name twice
    classes = tmp_path / "classes.txt"
    classes.write_text("coat\nbag\ncoat\n")
    code, err = _main_error(["--checkpoint", str(export_run / "final"), *eval_overrides,
                             f"eval.classnames={classes}"], capsys)
    assert code == 1 and "'coat' (lines 1 and 3)" in err

    # nothing to evaluate / a misspelt key: config errors, exit 2
    code, err = _main_error(["--checkpoint", str(export_run / "final")], capsys)
    assert code == 2 and "eval.zeroshot_data" in err
    code, err = _main_error(["--checkpoint", str(export_run / "final"), "eval.batchsize=3"], capsys)
    assert code == 2 and "eval.batch_size" in err


def test_cli_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "ds_linclip.eval", "--help"], capture_output=True, text=True,
                            env=_env(), timeout=120)
    assert result.returncode == 0 and "--watch RUN_DIR" in result.stdout and "exit codes" in result.stdout


# ----------------------------------------------------------------------------- DeepSpeed checkpoints

_DEEPSPEED_RUN = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    import deepspeed, torch
    import torch.nn.functional as F
    from ds_linclip.config import load_config, to_yaml
    from ds_linclip.models import build_model

    run = Path(sys.argv[1])
    cfg = load_config([], ["model.preset=tiny"])
    torch.manual_seed(0)
    model = build_model(cfg.model, load_pretrained_weights=False)
    deepspeed.init_distributed(dist_backend="gloo")
    # as the trainer does: DeepSpeed cannot broadcast the 0-dim logit_scale, so it trains a (1,) one
    from ds_linclip.train.engine import promote_scalar_parameters
    assert promote_scalar_parameters(model) == ["logit_scale"]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1},
        # torch's AdamW as the trainer takes it on CPU (engine.build_ds_config): DeepSpeed's FusedAdam
        # would be JIT-compiled first (minutes on 2 cores, on every fresh machine)
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    for step in range(1, 4):
        images, tokens = torch.randn(8, 3, 32, 32), torch.randint(1, 49000, (8, 32))
        image_features, text_features, scale = engine(images, tokens)
        logits = scale * image_features @ text_features.T
        labels = torch.arange(8)
        engine.backward((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
        engine.step()
        tag = f"step_{step:08d}"
        # the trainer's layout: its client state under `ds_linclip`, per-rank copies, config.yaml
        client = {"step": step, "samples_seen": 8 * step}
        engine.save_checkpoint(str(run / "checkpoints"), tag=tag, client_state={"ds_linclip": client})
        (run / "checkpoints" / tag / "client_state").mkdir()
        torch.save({**client, "rank": 0, "world_size": 1}, run / "checkpoints" / tag / "client_state" / "rank_00000.pt")
        (run / "checkpoints" / tag / "config.yaml").write_text(to_yaml(cfg))
        torch.save(engine.module.state_dict(), run / f"weights_{tag}.pt")
    """
)


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory) -> Path:
    """Three real ZeRO-1 checkpoints (steps 1-3, different weights) of the tiny model."""
    run = tmp_path_factory.mktemp("deepspeed") / "source"
    script = run.parent / "make_checkpoints.py"
    script.write_text(_DEEPSPEED_RUN)
    result = subprocess.run([sys.executable, str(script), str(run), _free_port()], env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_deepspeed_checkpoint_loads_through_zero_to_fp32(deepspeed_run):
    for step in (1, 3):
        tag = f"step_{step:08d}"
        loaded = load_checkpoint(deepspeed_run / "checkpoints" / tag)
        expected = torch.load(deepspeed_run / f"weights_{tag}.pt")
        assert loaded.ref.kind == "deepspeed" and loaded.step == step and loaded.samples_seen == 8 * step
        for key, value in loaded.model.state_dict().items():
            assert torch.equal(value, expected[key].reshape(value.shape)), key
        assert expected["logit_scale"].shape == (1,) and loaded.model.logit_scale.shape == ()
    # the save folder means its `latest` tag
    assert load_checkpoint(deepspeed_run / "checkpoints").ref.tag == "step_00000003"


def _publish(source: Path, run: Path, step: int, corrupt: bool = False) -> None:
    """Copy a checkpoint into the watched run the way the trainer completes one: tag, then `latest`."""
    tag = f"step_{step:08d}"
    source_tag = source / "checkpoints" / (tag if not corrupt else "step_00000003")
    shutil.copytree(source_tag, run / "checkpoints" / tag)
    if corrupt:
        states = run / "checkpoints" / tag / "mp_rank_00_model_states.pt"
        states.write_bytes(states.read_bytes()[:200])
    (run / "checkpoints" / "latest").write_text(tag)


def _watch_command(run: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "ds_linclip.eval", "--watch", str(run), "--poll-seconds", "0.5",
            "--no-progress", *overrides]


def _state(run: Path) -> dict:
    path = run / "eval" / "watch_state.json"
    return json.loads(path.read_text())["checkpoints"] if path.is_file() else {}


@pytest.mark.slow
def test_watcher_scores_each_checkpoint_once_across_a_restart(deepspeed_run, eval_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(deepspeed_run / "config.yaml", run / "config.yaml")
    _publish(deepspeed_run, run, 1)
    _publish(deepspeed_run, run, 2)
    # a half-written newer tag (no `latest` for it yet) must not be touched
    (run / "checkpoints" / "step_00000009").mkdir()

    # first watcher: scores 1 and 2, then is stopped (SIGTERM) while waiting for more
    watcher = subprocess.Popen(_watch_command(run, eval_overrides), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(_state(run)) < 2 and watcher.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    watcher.send_signal(signal.SIGTERM)
    output = watcher.communicate(timeout=120)[0]
    assert watcher.returncode == 0, output
    assert {tag: v["status"] for tag, v in _state(run).items()} == {"step_00000001": "ok", "step_00000002": "ok"}
    first_results = {p.name: p.stat().st_mtime_ns for p in (run / "eval").glob("step_*.json")}
    assert len(first_results) == 4

    # the run goes on: checkpoint 3, a corrupt checkpoint 4, then DONE; a restarted watcher
    # scores 3, records 4 as failed, stops at DONE, and exits 1 because of the failure
    shutil.rmtree(run / "checkpoints" / "step_00000009")
    _publish(deepspeed_run, run, 3)
    _publish(deepspeed_run, run, 4, corrupt=True)
    (run / "DONE").write_text(json.dumps({"final_tag": "step_00000004", "step": 4}))
    second = subprocess.run(_watch_command(run, eval_overrides), env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 1, second.stdout + second.stderr
    state = _state(run)
    assert [(tag, v["status"]) for tag, v in sorted(state.items())] == [
        ("step_00000001", "ok"), ("step_00000002", "ok"), ("step_00000003", "ok"), ("step_00000004", "failed")]
    assert "mp_rank_00_model_states.pt" in state["step_00000004"]["error"]
    assert "FAILED step_00000004" in second.stdout
    # nothing from the first session was redone
    assert {p.name: p.stat().st_mtime_ns for p in (run / "eval").glob("step_0000000[12]_*.json")} == first_results
    assert sorted(p.name for p in (run / "eval").glob("step_*.json")) == [
        f"step_0000000{s}_{t}.json" for s in (1, 2, 3) for t in ("retrieval", "zeroshot")]

    # TensorBoard: one point per checkpoint, at its step, equal to the JSON
    accumulator = EventAccumulator(str(run / "tensorboard" / "eval"))
    accumulator.Reload()
    events = accumulator.Scalars("eval/zeroshot/top1")
    assert [e.step for e in events] == [1, 2, 3]
    for event in events:
        record = json.loads((run / "eval" / f"step_{event.step:08d}_zeroshot.json").read_text())
        assert event.value == pytest.approx(record["metrics"]["top1"], abs=1e-6)
        assert record["samples_seen"] == 8 * event.step
    # the checkpoints differ, so the scores are not all the same number
    retrieval = [json.loads((run / "eval" / f"step_0000000{s}_retrieval.json").read_text())["metrics"]
                 for s in (1, 2, 3)]
    assert len({json.dumps(m) for m in retrieval}) > 1

    # a third start has nothing left to do
    third = subprocess.run(_watch_command(run, eval_overrides), env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stderr
    assert _state(run) == state


# ----------------------------------------------------------------------------- submitit


@pytest.mark.slow
def test_submitit_local_executor_runs_the_eval_job(deepspeed_run, eval_overrides, tmp_path, monkeypatch):
    from ds_linclip.train.loop import EvalSubmissions

    # the trainer hook on a DeepSpeed checkpoint whose config.yaml holds the run's eval settings: the
    # submission runs beside training (submit returns at once), close() waits for it and logs its answer
    cfg = load_config([deepspeed_run / "config.yaml"], [*eval_overrides, "eval.cluster=local"])
    target = tmp_path / "hook"
    tag_dir = target / "checkpoints" / "step_00000002"
    shutil.copytree(deepspeed_run / "checkpoints" / "step_00000002", tag_dir)
    (tag_dir / "config.yaml").write_text(to_yaml(cfg))
    (target / "config.yaml").write_text(to_yaml(cfg))
    monkeypatch.chdir(REPO_ROOT)  # the hook's `python -m` imports this checkout
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    submissions = EvalSubmissions()
    started = time.monotonic()
    submissions.submit(tag_dir)
    assert time.monotonic() - started < 2.0 and len(submissions.running) == 1  # not waited for
    submissions.close()
    assert not submissions.running
    assert "submitted eval job" in (target / "eval" / "submit" / "step_00000002.log").read_text()

    # the CLI: submit, wait, print the job's table
    run = _export_run(tmp_path / "cli", seed=1)
    cli = subprocess.run(
        [sys.executable, "-m", "ds_linclip.eval.submit", "--checkpoint", str(run / "final"), "--cluster", "local",
         "--wait", *eval_overrides],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "submitted eval job" in cli.stdout and "top-1" in cli.stdout
    assert (run / "eval" / "final_zeroshot.json").is_file() and (run / "eval" / "submitit").is_dir()

    record_file = target / "eval" / "step_00000002_zeroshot.json"
    deadline = time.monotonic() + 300
    while not record_file.is_file() and time.monotonic() < deadline:
        time.sleep(1)
    record = json.loads(record_file.read_text())
    assert record["step"] == 2 and record["num_samples"] == 96 and record["samples_seen"] == 16

def test_image_folder_zero_shot(export_run, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for name in ("ankle_boot", "bag", "coat"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (28, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    common = ["--checkpoint", str(export_run / "final"), "--results-dir", str(tmp_path / "results"),
              f"eval.zeroshot_data={root}", "eval.templates=simple", "eval.batch_size=5", "eval.workers=0"]
    assert job.main([*common, "eval.classnames=folders", "--no-progress"]) == 0
    record = json.loads((tmp_path / "results" / "final_zeroshot.json").read_text())
    assert record["num_samples"] == 12 and record["num_classes"] == 3
    assert record["metrics"]["top5"] == 1.0  # three classes: every label is in the top 5
    code, err = _main_error([*common, "eval.classnames=fashion_mnist"], capsys)
    assert code == 1 and "has 3 class folders but eval.classnames=fashion_mnist gives 10 names" in err


def test_watcher_stop_flag_and_config_errors(export_run, eval_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    shutil.copy(export_run / "config.yaml", run / "config.yaml")
    (run / "eval" / "STOP").touch()  # no checkpoint yet and no DONE: only the flag ends this watcher
    records, failures = job.watch(run, overrides=eval_overrides, poll_seconds=0.1, progress=False)
    assert records == [] and failures == [] and not (run / "eval" / "STOP").exists()
    # nothing to evaluate is refused up front (exit 2), not recorded against every checkpoint
    assert job.main(["--watch", str(run), "--once"]) == 2
    assert "eval.zeroshot_data" in capsys.readouterr().err
    assert not (run / "eval" / "watch_state.json").exists()


def test_eval_submissions_run_beside_training_and_failures_are_logged_not_fatal(tmp_path, caplog, monkeypatch):
    import logging

    from ds_linclip.train.loop import EvalSubmissions

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    tag = tmp_path / "run" / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)  # no config.yaml, no weights: the submission must fail
    caplog.set_level(logging.INFO, logger="ds_linclip.train")
    failing = EvalSubmissions()
    failing.submit(tag)
    assert len(failing.running) == 1 and not caplog.records  # nothing waited for, nothing reported yet
    failing.running[0][2].wait(timeout=120)
    failing.poll()  # what the next checkpoint's submit does first: report the finished ones
    assert not failing.running
    failing.close()  # nothing left: no second report
    log_file = tmp_path / "run" / "eval" / "submit" / "step_00000004.log"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not submit the eval job" in warnings[0] and str(log_file) in warnings[0]
    assert log_file.read_text().strip()  # the submitter's own error, kept for the user

    caplog.clear()
    slow = EvalSubmissions(wait_s=0.2)  # the interpreter alone takes longer to start
    slow.submit(tag)
    slow.close()
    assert not slow.running
    assert any("no answer after 0.2 s" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
