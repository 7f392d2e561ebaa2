"""train.compile on CPU: training-step time of the compiled model (TorchInductor) against eager.

    python bench/compile.py [--preset tiny] [--batch-size 32] [--steps 20] [--threads 1] [--out FILE.json]

For each attention setting, one process per mode (eager, compiled: `nn.Module.compile()`, as the
trainer does before DeepSpeed wraps the model) times a full training step: forward, the contrastive
loss, backward, AdamW step, on random images and tokens. The first step (compilation) is reported on
its own; the median of the remaining `--steps` steps is the step time. Prints a table with the ratio
eager / compiled (> 1: compiled is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {
    "softmax": [],
    "linear-focused-local3 + text linear-focused": [
        "model.image.attention=linear-focused", "model.image.local_kernel=3", "model.text.attention=linear-focused"],
    "linear-affine": ["model.image.attention=linear-affine", "model.text.attention=linear-affine"],
}


def time_steps(preset: str, overrides: list[str], batch: int, steps: int, compiled: bool) -> dict:
    """(in this process) first-step seconds and the per-step seconds of the next `steps` steps."""
    import time

    import torch

    from ds_linclip.config import load_config
    from ds_linclip.models import build_model
    from ds_linclip.train.loss import ClipLoss

    torch.manual_seed(0)
    cfg = load_config([], [f"model.preset={preset}", *overrides])
    model = build_model(cfg.model)
    if compiled:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    side = int(cfg.model.image.image_size)
    images = torch.randn(batch, 3, side, side)
    tokens = torch.randint(1, 49000, (batch, int(cfg.model.text.context_length)))
    tokens[:, -1] = 49407
    loss_fn = ClipLoss()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(*model(images, tokens))
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"first_step_s": times[0], "step_s": statistics.median(times[1:]), "loss": float(loss)}


def _child(args) -> int:
    result = time_steps(args.preset, json.loads(args.overrides), args.batch_size, args.steps, args.compiled)
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    rows = []
    for name, overrides in SETTINGS.items():
        row = {"attention": name}
        for mode in ("eager", "compiled"):
            cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--overrides", json.dumps(overrides)]
            cmd += ["--compiled"] if mode == "compiled" else []
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=1800)
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        row["ratio"] = row["eager"]["step_s"] / row["compiled"]["step_s"]
        rows.append(row)
        print(f"{name}: eager {row['eager']['step_s'] * 1e3:.1f} ms, compiled {row['compiled']['step_s'] * 1e3:.1f} ms",
              file=sys.stderr, flush=True)
    header = (f"preset {args.preset}, batch {args.batch_size}, {args.threads} thread(s), median of {args.steps} steps "
              "after the first (forward + loss + backward + AdamW)")
    lines = [header, "", "| attention | eager ms/step | compiled ms/step | eager / compiled | compile (first step) s |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['attention']} | {row['eager']['step_s'] * 1e3:.1f} | {row['compiled']['step_s'] * 1e3:.1f} "
                     f"| {row['ratio']:.2f}x | {row['compiled']['first_step_s']:.0f} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
