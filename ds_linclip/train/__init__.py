"""DeepSpeed trainer for CLIP (softmax or linear attention).

- `loss.ClipLoss`: contrastive loss over ranks (local_loss, gather_with_grad).
- `engine`: rank/world from the launcher's environment, the DeepSpeed config built from ours
  (`build_ds_config`), the engine (`build_engine`).
- `loop.train(cfg) -> exit code`: steps, logging, checkpoints, signals, final export;
  `python -m ds_linclip.train` is its CLI.
- `checkpoint`: save/resume with a crash-safe `latest`, pruning that keeps what the eval job has
  not scored; `export`: consolidated fp32 `model.safetensors` + `config.yaml`
  (`python -m ds_linclip.train.export CKPT_DIR`), the package's one fp32 reconstruction.
- `preflight`: the config and file-system checks every rank runs before anything starts
  (`--check`); `signals`: the SIGTERM/SIGUSR1 latch the CLI installs on its first line.

Submodules are imported on use: importing this package does not import DeepSpeed.
"""
