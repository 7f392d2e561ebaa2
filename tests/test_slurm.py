"""slurm/*.sh against a REAL one-node Slurm cluster (tests/slurm_cluster.py), on CPU.

One training job carries most of the checks, because on 2 CPU cores each trainer start costs
about a minute: `sbatch --wait slurm/train_vitl.sh` (tiny preset, 1 node x 2 tasks, CPU) is sent
USR1 through its batch shell after its first checkpoint, checkpoints, requeues itself, resumes and
finishes; then `sbatch --wait` returns 0. The tests below each check one promise on that run,
then an eval job goes through submitit to the same cluster and scores the exported checkpoint.

Skipped (with the reason) only where Slurm cannot run: not installed, or not root.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "slurm"

_spec = importlib.util.spec_from_file_location("slurm_cluster", Path(__file__).with_name("slurm_cluster.py"))
slurm_cluster = importlib.util.module_from_spec(_spec)
sys.modules["slurm_cluster"] = slurm_cluster
_spec.loader.exec_module(slurm_cluster)

pytestmark = pytest.mark.slurm

STEPS = 8
MICRO_BATCH = 16
TASKS = 2
REQUEUE_EXIT_CODE = 75
# Slurm's sbatch options that shrink the ViT-L/16 header (16 nodes x 8 GPUs) to this machine
CPU_JOB = ["--nodes=1", f"--ntasks-per-node={TASKS}", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]


@pytest.fixture(scope="session")
def slurm() -> "slurm_cluster.LocalSlurm":
    """The local cluster: reused if already up (CI starts it in .ci/run), else started and stopped here."""
    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    cluster = slurm_cluster.LocalSlurm()
    was_up = cluster.is_up()
    seconds = cluster.up()
    print(f"\nSlurm cluster {'reused' if was_up else f'up in {seconds:.1f}s'} ({cluster.root})")
    yield cluster
    if not was_up:
        cluster.down()


def job_fields(cluster, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (jobs stay visible MinJobAge=600 s after they end)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)], env=cluster.env(), capture_output=True, text=True, check=True
    ).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def tiny_overrides(shards: Path, output_dir: Path, run_name: str) -> list[str]:
    """Trainer overrides that turn configs/vit_l16_laion400m.yaml into a CPU-sized run on
    Fashion-MNIST (its ZeRO-2 and activation checkpointing stay as the ViT-L/16 config has them)."""
    return [
        "model.preset=tiny",
        f"data.train_shards={shards}/train/shard-{{000000..000011}}.tar",
        "data.train_num_samples=null",
        "data.mode=epoch",
        "data.workers=1",
        "data.shuffle_buffer=100",
        f"train.micro_batch_size={MICRO_BATCH}",
        f"train.steps={STEPS}",
        "train.warmup_steps=2",
        "train.precision=fp32",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.log_sample_keys=true",
        f"train.output_dir={output_dir}",
        f"train.run_name={run_name}",
    ]


def cpu_env(cluster) -> dict:
    env = cluster.env()
    env["DS_ACCELERATOR"] = "cpu"
    env.pop("LINCLIP_PYTHON", None)
    return env


class TrainJob:
    def __init__(self, job_id: str, returncode: int, submit_dir: Path, run_dir: Path, sbatch_stderr: str):
        self.job_id, self.returncode, self.submit_dir, self.run_dir = job_id, returncode, submit_dir, run_dir
        self.sbatch_stderr = sbatch_stderr

    @property
    def log(self) -> Path:
        return self.submit_dir / "logs" / f"linclip-vitl16-{self.job_id}.out"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else f"(no log at {self.log})"


@pytest.fixture(scope="module")
def preempted_run(slurm, fmnist_shards, tmp_path_factory) -> TrainJob:
    """`sbatch --wait slurm/train_vitl.sh` sent USR1 (`scancel --signal=USR1 --batch`) after its
    first checkpoint; returns when sbatch --wait does."""
    submit_dir = tmp_path_factory.mktemp("slurm_train")
    (submit_dir / "logs").mkdir()
    run_dir = submit_dir / "runs" / "vitl_tiny"
    started = time.monotonic()
    sbatch = subprocess.Popen(
        ["sbatch", "--wait", "--parsable", *CPU_JOB, str(SCRIPTS / "train_vitl.sh"),
         *tiny_overrides(fmnist_shards, submit_dir / "runs", "vitl_tiny")],
        cwd=submit_dir, env=cpu_env(slurm), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    job_id = sbatch.stdout.readline().strip().split(";")[0]
    try:
        assert job_id.isdigit(), f"sbatch printed {job_id!r}: {sbatch.stderr.read() if sbatch.poll() is not None else ''}"
        # the first checkpoint proves the trainer is in its loop with its signal handlers set
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists() or sbatch.poll() is not None,
                 timeout=420, what="the first checkpoint")
        assert sbatch.poll() is None, f"the job ended before the signal:\n{(submit_dir / 'logs').glob('*')}"
        # to the batch shell only: the script must forward it to the srun step
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm.env(), check=True)
        print(f"\nsent USR1 to job {job_id} {time.monotonic() - started:.0f}s after submission")
        sbatch.wait(timeout=600)
    finally:
        if sbatch.poll() is None:
            subprocess.run(["scancel", job_id], env=slurm.env())
            sbatch.kill()
    print(f"job {job_id}: sbatch --wait returned {sbatch.returncode} after {time.monotonic() - started:.0f}s")
    return TrainJob(job_id, sbatch.returncode, submit_dir, run_dir, sbatch.stderr.read())


# ------------------------------------------------------------------------------------- the cluster
def test_cluster_runs_a_two_task_batch_job(slurm, tmp_path):
    out = tmp_path / "hello.out"
    result = subprocess.run(
        ["sbatch", "--wait", "--ntasks=2", f"--output={out}",
         "--wrap", "srun bash -c 'echo rank=$SLURM_PROCID of $SLURM_NTASKS on $(hostname -s)'"],
        env=slurm.env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = sorted(out.read_text().split("\n"))
    assert [l.split()[0] for l in lines if l] == ["rank=0", "rank=1"], out.read_text()


def test_headers_are_sized_for_real_runs():
    """What the scripts ask for when nothing is overridden (their shapes match the configs)."""
    def header(script: str) -> dict[str, str]:
        opts = {}
        for line in (SCRIPTS / script).read_text().splitlines():
            if line.startswith("#SBATCH --"):
                key, _, value = line[len("#SBATCH --"):].partition("=")
                opts[key] = value
        return opts

    expected_nodes = {"train_vits.sh": "8", "train_vitb.sh": "16", "train_vitl.sh": "16"}
    for script, nodes in expected_nodes.items():
        opts = header(script)
        assert opts["nodes"] == nodes, script
        assert opts["ntasks-per-node"] == opts["gpus-per-node"] == "8", script
        assert opts["signal"] == "USR1@120" and "requeue" in opts, script
        assert opts["output"] == "logs/%x-%j.out" and opts["open-mode"] == "append", script
        assert int(opts["cpus-per-task"]) >= 8 and re.fullmatch(r"\d+:00:00", opts["time"]), script
        config = re.search(r"linclip_train (configs/\S+\.yaml)", (SCRIPTS / script).read_text()).group(1)
        assert (REPO / config).is_file(), config
    eval_opts = header("eval.sh")
    assert eval_opts["gpus-per-node"] == "1" and eval_opts["ntasks"] == "1"
    for script in [*expected_nodes, "eval.sh", "_common.sh"]:
        subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)


# -------------------------------------------------------------------- train_vitl.sh, preempted once
@pytest.mark.slow
def test_train_job_exits_0_with_checkpoints_export_and_log(preempted_run):
    run = preempted_run
    log = run.log_text()
    assert run.returncode == 0, f"sbatch --wait returned {run.returncode}: {run.sbatch_stderr}\n{log}"
    assert run.log.exists(), f"no log in logs/%x-%j.out: {list((run.submit_dir / 'logs').iterdir())}"
    assert f"done: {STEPS} steps" in log, log
    done = json.loads((run.run_dir / "DONE").read_text())
    assert done == {"final_tag": f"step_{STEPS:08d}", "step": STEPS}
    assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"

    from safetensors.torch import load_file
    from omegaconf import OmegaConf

    weights = load_file(run.run_dir / "final" / "model.safetensors")
    assert "logit_scale" in weights and len(weights) > 50
    final_cfg = OmegaConf.load(run.run_dir / "final" / "config.yaml")
    assert final_cfg.model.preset == "tiny" and final_cfg.model.image.attention == "linear-affine"
    # the ViT-L/16 config's own choices survived the overrides
    assert final_cfg.train.zero_stage == 2 and final_cfg.train.grad_checkpointing == 1


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_to_the_planned_step(preempted_run, slurm):
    run = preempted_run
    log = run.log_text()
    job = job_fields(slurm, run.job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
    assert job["Restarts"] == "1", f"expected exactly one requeue: {job}\n{log}"
    assert "batch shell got USR1" in log, log
    assert f"asked to be requeued (exit {REQUEUE_EXIT_CODE})" in log and f"scontrol requeue {run.job_id}" in log, log
    assert "restart 0:" in log and "restart 1:" in log, log
    stopped = re.search(r"stopped at step (\d+) on SIGUSR1", log)
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", log)
    assert stopped and resumed, log
    assert 2 <= int(stopped.group(1)) == int(resumed.group(1)) == int(resumed.group(2)) < STEPS


@pytest.mark.slow
def test_one_continuous_tensorboard_run(preempted_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = preempted_run.run_dir / "tensorboard"
    event_files = sorted(tb.glob("events.out.tfevents.*"))
    assert len(event_files) == 2, f"one event file per job start, in the same run dir: {event_files}"
    # purge_orphaned_data=False keeps repeated steps visible instead of silently dropping them
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    steps = [event.step for event in acc.Scalars("train/loss")]
    assert steps == list(range(1, STEPS + 1)), steps


@pytest.mark.slow
def test_no_sample_repeated_across_the_requeue(preempted_run):
    key_files = sorted((preempted_run.run_dir / "sample_keys").glob("rank_*.txt"))
    assert len(key_files) == TASKS, key_files
    seen: dict[str, tuple] = {}
    for rank, path in enumerate(key_files):
        steps = []
        for line in path.read_text().splitlines():
            step, keys = line.split("\t")
            steps.append(int(step))
            keys = keys.split()
            assert len(keys) == MICRO_BATCH, line
            for key in keys:
                assert key not in seen, f"sample {key} seen twice: rank {rank} step {step} and {seen[key]}"
                seen[key] = (rank, int(step))
        assert steps == list(range(1, STEPS + 1)), f"rank {rank} steps {steps}"
    assert len(seen) == STEPS * MICRO_BATCH * TASKS


# ------------------------------------------------------------------- eval through submitit, same cluster
EVAL_SAMPLES = 500


def eval_overrides(shards: Path) -> list[str]:
    return [
        f"eval.zeroshot_data={shards}/test/shard-{{000000..000009}}.tar", "eval.classnames=fashion_mnist",
        "eval.templates=simple", f"eval.max_samples={EVAL_SAMPLES}", "eval.batch_size=100", "eval.workers=1",
        "eval.device=cpu",
    ]


@pytest.fixture(scope="module")
def submitit_eval(preempted_run, slurm, fmnist_shards, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m ds_linclip.eval.submit --cluster slurm --wait` on the exported final weights."""
    assert preempted_run.returncode == 0, "the training job failed; nothing to score"
    checkpoint = preempted_run.run_dir / "final" / "model.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "ds_linclip.eval.submit", "--checkpoint", str(checkpoint), "--cluster", "slurm",
         "--wait", *eval_overrides(fmnist_shards), "eval.gpus=0", "eval.cpus=1", "eval.time_minutes=10"],
        cwd=tmp_path_factory.mktemp("submitit_eval"), env={**slurm.env(), "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )
    return result, preempted_run.run_dir / "eval" / "final_zeroshot.json"


@pytest.mark.slow
def test_eval_job_through_submitit_scores_the_checkpoint(submitit_eval, slurm):
    result, record_path = submitit_eval
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"submitted eval job (\d+)", result.stdout).group(1)
    job = job_fields(slurm, job_id)  # a Slurm job of this cluster, not a local process
    assert job["JobName"] == "linclip-eval" and job["JobState"] == "COMPLETED", job
    assert record_path.exists(), f"no {record_path}:\n{result.stdout}"
    record = json.loads(record_path.read_text())
    assert record["step"] == STEPS and record["num_samples"] == EVAL_SAMPLES, record
    assert 0.0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 1.0, record


@pytest.mark.slow
def test_eval_sh_scores_the_deepspeed_checkpoint_like_the_export(submitit_eval, preempted_run, slurm, fmnist_shards):
    """`sbatch slurm/eval.sh` on the last DeepSpeed checkpoint: the same weights as the fp32 export
    that the submitit job scored, so the same numbers."""
    run = preempted_run
    result = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
         str(SCRIPTS / "eval.sh"), "--checkpoint", str(run.run_dir / "checkpoints" / f"step_{STEPS:08d}"),
         *eval_overrides(fmnist_shards)],
        cwd=run.submit_dir, env=cpu_env(slurm), capture_output=True, text=True, timeout=600,
    )
    job_id = result.stdout.strip().split(";")[0]
    log = run.submit_dir / "logs" / f"linclip-eval-{job_id}.out"
    assert result.returncode == 0, result.stderr + (log.read_text() if log.exists() else f"(no {log})")
    record = json.loads((run.run_dir / "eval" / f"step_{STEPS:08d}_zeroshot.json").read_text())
    exported = json.loads(submitit_eval[1].read_text())
    assert record["step"] == exported["step"] == STEPS
    assert record["metrics"] == pytest.approx(exported["metrics"], abs=1e-6), (record, exported)


# ------------------------------------------------------------------- scancel is not a preemption
@pytest.mark.slow
def test_cancelled_job_checkpoints_and_is_not_requeued(slurm, fmnist_shards, tmp_path):
    """scancel sends SIGTERM: the trainer still checkpoints and exits 75, but the script must not
    requeue a job its user cancelled."""
    (tmp_path / "logs").mkdir()
    run_dir = tmp_path / "runs" / "cancelled"
    job_id = subprocess.run(
        ["sbatch", "--parsable", *CPU_JOB, str(SCRIPTS / "train_vitl.sh"),
         *tiny_overrides(fmnist_shards, tmp_path / "runs", "cancelled"), "train.steps=100"],
        cwd=tmp_path, env=cpu_env(slurm), capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]
    try:
        log = tmp_path / "logs" / f"linclip-vitl16-{job_id}.out"
        # a finished first step: the trainer's signal handlers are set (and its loader workers run)
        wait_for(lambda: log.exists() and re.search(r"(?m)^step 1/", log.read_text()), timeout=420,
                 what="the first training step")
        subprocess.run(["scancel", job_id], env=slurm.env(), check=True)
        # the script's last word: "not requeueing" (trainer exited 75) or "trainer failed ..."
        wait_for(lambda: re.search(r"not requeueing|trainer failed|trainer finished", log.read_text()),
                 timeout=120, what="the script to see the trainer exit")
        text = log.read_text()
        # the trainer names whichever arrived first: Slurm's own SIGTERM to the step, or the script's
        # forwarded USR1; either way it checkpointed and exited 75, and the script, which got TERM, does
        # not requeue
        assert re.search(r"stopped at step \d+ on SIG(TERM|USR1)", text) and "not requeueing" in text, text[-3000:]
        # a requeued job would be pending again within Slurm's requeue delay (cred_expire=10 s)
        time.sleep(15)
        job = job_fields(slurm, job_id)
        assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", job
    finally:
        subprocess.run(["scancel", job_id], env=slurm.env())
