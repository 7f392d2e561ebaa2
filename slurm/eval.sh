#!/bin/bash
# Score checkpoints with the eval job on one GPU (what `python -m ds_linclip.eval.submit` does via submitit).
#
#   mkdir -p logs
#   sbatch slurm/eval.sh --checkpoint runs/vit_b16_linear_laion400m/final/model.safetensors \
#       --config configs/vit_b16_laion400m.yaml
#   sbatch slurm/eval.sh --watch runs/vit_b16_linear_laion400m --config configs/vit_b16_laion400m.yaml
#
# Every argument is passed to `python -m ds_linclip.eval` (see its --help); #SBATCH lines can be
# overridden on the sbatch command line. No GPU: DS_ACCELERATOR=cpu sbatch --gpus-per-node=0 ...
#SBATCH --job-name=linclip-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

script=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
source "${LINCLIP_ROOT:-$(dirname "${script:-$0}")/..}/slurm/_common.sh" || exit 2

linclip_eval "$@"
