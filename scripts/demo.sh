#!/usr/bin/env bash
# The README demo, on a fresh machine: install, write Fashion-MNIST shards, train a tiny linear-attention
# CLIP with the DeepSpeed launcher on 2 CPU ranks (ZeRO-2), score it zero-shot on the 10,000 test
# images, print the table. Re-running reuses what is installed, written and trained.
# Extra arguments are config overrides for training, e.g. `bash scripts/demo.sh train.steps=300`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
export DS_ACCELERATOR=cpu            # DeepSpeed's CPU accelerator: gloo, no GPU needed
# one core per rank while the 2 ranks train; the eval job runs alone afterwards and gets every core
# (10,000 images: ~30 s on one core, ~17 s on two). OMP_NUM_THREADS, if set, is used for both.
EVAL_THREADS=${OMP_NUM_THREADS:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CONFIG=configs/demo_fmnist.yaml
# the run folder as the config (and any overrides) say: train.output_dir/train.run_name
RUN_DIR=$(python3 -c 'import sys; from ds_linclip.config import load_config; c = load_config([sys.argv[1]], sys.argv[2:]); print(f"{c.train.output_dir}/{c.train.run_name}")' "$CONFIG" "$@")

echo "== 1/3 shards: data/fmnist (Fashion-MNIST from /usr/share/datasets/fashion-mnist)"
python3 -m ds_linclip.data.writer fashion-mnist --out data/fmnist

echo "== 2/3 train: deepspeed, 2 CPU ranks, ZeRO-2 -> $RUN_DIR"
if [ -f "$RUN_DIR/DONE" ]; then
  echo "   already trained ($RUN_DIR/DONE); delete $RUN_DIR to train again"
else
  deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29517}" --module ds_linclip.train \
    --config "$CONFIG" "$@"
fi

echo "== 3/3 eval: zero-shot on the 10,000 Fashion-MNIST test images"
OMP_NUM_THREADS=$EVAL_THREADS python3 -m ds_linclip.eval --checkpoint "$RUN_DIR/final" --config "$CONFIG" "$@"

echo
echo "TensorBoard logs (training curves and eval/ scalars): tensorboard --logdir $RUN_DIR/tensorboard"
