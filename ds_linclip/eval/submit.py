"""Submit the eval job with submitit: a Slurm job where there is Slurm, a local process otherwise.

The job runs exactly the command `slurm/eval.sh` runs by hand, `python -m ds_linclip.eval ...`,
so both paths score the same way. Partition, GPUs, CPUs and the time limit come from `eval.*`
(`eval.partition`, `eval.gpus`, `eval.cpus`, `eval.time_minutes`, `eval.cluster`).

    python -m ds_linclip.eval.submit --checkpoint runs/demo/checkpoints/step_00000500 eval.zeroshot_data=...
    python -m ds_linclip.eval.submit --watch runs/demo --cluster slurm eval.partition=gpu

The trainer runs this command (`--checkpoint TAG_DIR`, the run's `eval` section from the tag's
config.yaml) after each checkpoint when `train.eval_after_checkpoint` is set.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

import submitit
from omegaconf import DictConfig, OmegaConf

import ds_linclip
from ds_linclip.config import EVAL_CLUSTERS as CLUSTERS
from ds_linclip.config import ConfigError, add_config_arguments
from ds_linclip.eval.checkpoint import resolve_checkpoint
from ds_linclip.eval.errors import EvalError, exit_with

log = logging.getLogger("ds_linclip.eval.submit")

# the folder that holds the `ds_linclip` package, so the job's python imports this same code
CODE_ROOT = Path(ds_linclip.__file__).resolve().parent.parent


def make_executor(eval_cfg: DictConfig, folder: str | Path, cluster: str | None = None) -> submitit.AutoExecutor:
    """An AutoExecutor sized from `eval_cfg` (the `eval` config section)."""
    cluster = cluster or eval_cfg.cluster
    if cluster not in CLUSTERS:
        raise ConfigError(f"'{cluster}' is not one of {', '.join(CLUSTERS)}", key="eval.cluster")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=None if cluster == "auto" else cluster)
    gpus = int(eval_cfg.gpus)
    if executor.cluster == "local":
        # a local job gets CUDA_VISIBLE_DEVICES=0..gpus-1; never more devices than this machine has
        import torch

        gpus = min(gpus, torch.cuda.device_count())
    setup = [f"export PYTHONPATH={shlex.quote(str(CODE_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    executor.update_parameters(
        name="linclip-eval",
        timeout_min=int(eval_cfg.time_minutes),
        gpus_per_node=gpus,
        cpus_per_task=int(eval_cfg.cpus),
        tasks_per_node=1,
        nodes=1,
        slurm_setup=setup,
        local_setup=setup,
        **({"slurm_partition": eval_cfg.partition} if eval_cfg.partition else {}),
    )
    return executor


def eval_command(target_flag: str, target: str | Path, config_files: Sequence[str | Path] = (),
                 overrides: Sequence[str] = ()) -> list[str]:
    """argv of the eval job (absolute paths: the job may start in another folder)."""
    command = [sys.executable, "-m", "ds_linclip.eval", target_flag, str(Path(target).expanduser().resolve()),
               "--no-progress"]
    for path in config_files:
        command += ["--config", str(Path(path).expanduser().resolve())]
    return command + list(overrides)


def default_folder(target: Path, watch: bool) -> Path:
    """R/eval/submitit for a run (or a checkpoint in one), else beside the checkpoint."""
    if watch:
        return target / "eval" / "submitit"
    ref = resolve_checkpoint(target)
    if ref.run_dir is not None:
        return ref.run_dir / "eval" / "submitit"
    folder = ref.path.parent if ref.path.is_file() else ref.path
    return folder / "eval" / "submitit"


def submit(
    eval_cfg: DictConfig,
    command: list[str],
    folder: str | Path,
    cluster: str | None = None,
) -> submitit.Job:
    """Submit `command` (see `eval_command`); the job's result is its stdout (the summary table)."""
    executor = make_executor(eval_cfg, folder, cluster)
    function = submitit.helpers.CommandFunction(command, verbose=True, cwd=os.getcwd())
    job = executor.submit(function)
    log.info("submitted eval job %s (%s) -> logs in %s", job.job_id, executor.cluster, folder)
    return job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.eval.submit",
        description=(
            "Submit `python -m ds_linclip.eval` as a submitit job: Slurm where `srun` exists, a local "
            "process otherwise. Resources come from eval.partition, eval.gpus, eval.cpus, eval.time_minutes; "
            "logs go to R/eval/submitit (or eval.submitit_folder)."
        ),
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", metavar="PATH", help="checkpoint to score (as for `python -m ds_linclip.eval`)")
    target.add_argument("--watch", metavar="RUN_DIR", help="run a watcher job on a training run folder")
    parser.add_argument("--cluster", choices=CLUSTERS, help="override eval.cluster (default: auto)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its output")
    add_config_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ds_linclip.eval.checkpoint import checkpoint_config
    from ds_linclip.eval.job import run_config, tasks_for
    from ds_linclip.train.preflight import check_eval_inputs

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.watch:
            target, flag = Path(args.watch), "--watch"
            cfg = run_config(target, args.config, args.overrides)
        else:
            target, flag = Path(args.checkpoint), "--checkpoint"
            cfg, _ = checkpoint_config(resolve_checkpoint(target), args.config, args.overrides)
        if args.print_config:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        # fail here, not in the queue, when there is nothing to evaluate or an input does not exist
        check_eval_inputs(cfg, tasks_for(cfg))
        folder = Path(cfg.eval.submitit_folder or default_folder(target, watch=bool(args.watch)))
        job = submit(cfg.eval, eval_command(flag, target, args.config, args.overrides), folder, args.cluster)
        print(f"submitted eval job {job.job_id}; logs: {folder}")
        if args.wait:
            print(job.result())
        return 0
    except (ConfigError, EvalError) as err:
        return exit_with(err)
    except submitit.core.utils.FailedJobError as err:
        print(f"error: the eval job failed:\n{err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
