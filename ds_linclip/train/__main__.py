"""`python -m ds_linclip.train --config CONFIG.yaml key=value ...` (also under deepspeed, torchrun, srun)."""

from __future__ import annotations

# First of all, before torch/DeepSpeed/the config are imported (seconds): SIGTERM/SIGUSR1 from
# here on are recorded and honoured at the trainer's next agreement point instead of killing this
# rank while the others wait for it (see ds_linclip/train/signals.py).
from ds_linclip.train import signals as _signals

_signals.install()

import argparse  # noqa: E402
import sys  # noqa: E402

from ds_linclip.config import ConfigError, add_config_arguments, load_config, to_yaml  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.train",
        description=(
            "Train a CLIP model (softmax or linear attention) with DeepSpeed. One process per rank: "
            "`deepspeed --num_gpus N -m ds_linclip.train ...`, `torchrun --nproc_per_node N -m ds_linclip.train ...`, "
            "`srun python -m ds_linclip.train ...`, or plain `python -m ds_linclip.train ...`; rank and world size "
            "come from RANK/WORLD_SIZE/LOCAL_RANK or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. On CPU set "
            "DS_ACCELERATOR=cpu (gloo backend). Before anything starts, every rank checks what the config and "
            "the file system can tell (shards, sizes.json, DeepSpeed options, model.pretrained, eval inputs, "
            "train.resume, the output folder); a problem is one line naming the key, exit 2. Without a launcher "
            "(no MASTER_PORT, one process) the rendezvous takes any free port; a launcher's MASTER_PORT that is in "
            "use is one line naming it, exit 2."
        ),
        epilog=(
            "Outputs go to R = train.output_dir/train.run_name: config.yaml, ds_config.json, tensorboard/, "
            "checkpoints/ (tags step_NNNNNNNN, `latest`), final/model.safetensors + config.yaml, DONE. "
            "Exit codes: 0 done (or --check passed); 75 stopped by SIGTERM/SIGUSR1 (after a checkpoint if "
            "training had started; requeue me); 3 too many non-finite losses in a row; 2 config error. "
            "Example: DS_ACCELERATOR=cpu python -m ds_linclip.train --config configs/demo_fmnist.yaml "
            "train.steps=200 model.image.attention=linear-affine --check"
        ),
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--check", action="store_true",
        help="dry run: check the config and the file system, print the resolved config, the global batch, "
             "the shard count and samples per epoch, per training phase the tokens per image, forward GFLOPs, "
             "attention share and estimated activation memory, and exit 0 without starting anything (run it on a login "
             "node before sbatch)",
    )
    parser.add_argument(
        "--world-size", type=int, default=None, metavar="N",
        help="with --check: the number of ranks to plan for (default: the launcher's, else 1)",
    )
    # the `deepspeed` launcher appends --local_rank=N; the rank comes from LOCAL_RANK in the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _launcher_rank_world() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; (0, 1) for a plain process."""
    from ds_linclip.train.engine import dist_env

    env = dist_env()
    return env.rank, env.world_size


def main(argv: list[str] | None = None) -> int:
    stop = _signals.install()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.world_size is not None and (not args.check or args.world_size < 1):
        parser.error("--world-size N (N >= 1) goes with --check; a real run takes the launcher's world size")
    try:
        rank, world = _launcher_rank_world()
    except RuntimeError as err:  # RANK/WORLD_SIZE that make no sense: every rank says so
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    try:
        cfg = load_config(args.config, args.overrides, required=() if args.print_config else ["data.train_shards"])
        if args.print_config:
            if rank == 0:
                print(to_yaml(cfg), end="")
            return 0
        from ds_linclip.train.preflight import check_train

        plan = check_train(cfg, args.world_size or world)
    except ConfigError as err:
        # every rank found the same problem (same config, same file system) and exits before any
        # rendezvous; one of them says it
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if args.check:
        if rank == 0:
            print(to_yaml(cfg), end="")
            print("# --check: nothing was started")
            print(plan.summary(), flush=True)
        return 0
    from ds_linclip.train.engine import PortInUseError, shutdown_distributed
    from ds_linclip.train.loop import train

    try:
        return train(cfg, stop=stop)
    except PortInUseError as err:  # only the rank that listens (0) finds out; it says so
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
