"""`python -m ds_linclip.train --config CONFIG.yaml key=value ...` (also under deepspeed, torchrun, srun)."""

from __future__ import annotations

import argparse

from ds_linclip.config import add_config_arguments, cli_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.train",
        description=(
            "Train a CLIP model (softmax or linear attention) with DeepSpeed. One process per rank: "
            "`deepspeed --num_gpus N -m ds_linclip.train ...`, `torchrun --nproc_per_node N -m ds_linclip.train ...`, "
            "`srun python -m ds_linclip.train ...`, or plain `python -m ds_linclip.train ...`; rank and world size "
            "come from RANK/WORLD_SIZE/LOCAL_RANK or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. On CPU set "
            "DS_ACCELERATOR=cpu (gloo backend)."
        ),
        epilog=(
            "Outputs go to R = train.output_dir/train.run_name: config.yaml, ds_config.json, tensorboard/, "
            "checkpoints/ (tags step_NNNNNNNN, `latest`), final/model.safetensors + config.yaml, DONE. "
            "Exit codes: 0 done; 75 stopped by SIGTERM/SIGUSR1 after a checkpoint (requeue me); "
            "3 too many non-finite losses in a row; 2 config error. "
            "Example: DS_ACCELERATOR=cpu python -m ds_linclip.train --config configs/demo_fmnist.yaml "
            "train.steps=200 model.image.attention=linear-affine"
        ),
    )
    add_config_arguments(parser)
    # the `deepspeed` launcher appends --local_rank=N; the rank comes from LOCAL_RANK in the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = cli_config(args, required=["data.train_shards"])
    from ds_linclip.train.loop import train

    return train(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
