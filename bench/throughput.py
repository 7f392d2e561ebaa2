"""Training throughput: our DeepSpeed trainer vs open_clip's trainer, same shards/model/batch/precision.

    python bench/throughput.py --shards 'DIR/train/shard-{000000..000011}.tar' [--preset tiny]
        [--batch-size 64] [--steps 40] [--precision fp32] [--workers 1] [--threads 2] [--out FILE.json]

Runs, one process each, one after another (the same machine state for all):
  open_clip  `python -m open_clip_train.main` (softmax attention; the model shape of our preset given
             to it as an open_clip model config through `--model local-dir:`; run through a one-line
             shim that fixes its webdataset incompatibility, see _OPEN_CLIP_MAIN)
  ours       `python -m ds_linclip.train`, softmax attention (ZeRO stage 0: one process shards nothing)
  ours       the same with linear-affine attention in both towers
Throughput = global batch / mean step wall time (data wait included, as both trainers time a step),
over the logged intervals after the first `--skip-steps` steps (start-up, allocator warm-up);
the trainers take turns for `--repeats` rounds and the median round is reported.
The ratios ours/open_clip are printed; the target is softmax >= 1.0x.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def open_clip_model_config(model) -> dict:
    """open_clip's model_cfg for our `model` section (CLIP with a separate ViT and text transformer)."""
    image, text = model.image, model.text
    return {
        "embed_dim": int(model.embed_dim),
        "vision_cfg": {
            "image_size": int(image.image_size), "patch_size": int(image.patch_size), "width": int(image.width),
            "layers": int(image.layers), "head_width": int(image.width) // int(image.heads),
            "mlp_ratio": float(image.mlp_ratio),
        },
        "text_cfg": {
            "context_length": int(text.context_length), "vocab_size": int(text.vocab_size), "width": int(text.width),
            "heads": int(text.heads), "layers": int(text.layers), "mlp_ratio": float(text.mlp_ratio),
        },
    }


def _run(cmd: list[str], env: dict, log_path: Path, timeout: float) -> str:
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    text = log_path.read_text()
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode} (log {log_path}):\n{tail}")
    print(f"  finished in {time.perf_counter() - start:.0f}s, log {log_path}", flush=True)
    return text


# `python -m open_clip_train.main ARGS`, with one fix: open_clip_train 3.3's tar reader predates
# webdataset's end-of-shard marker (`tar_file_expander(..., eof_value={})`, webdataset >= 0.2.96) and
# fails on it with KeyError 'fname' (webdataset issue 384, open_clip issue 935); the fix given there
# is eof_value=None, which is what this passes. Nothing else of open_clip's trainer is touched.
_OPEN_CLIP_MAIN = (
    "import functools, sys, webdataset.tariterators as tariterators, open_clip_train.data as data; "
    "data.tar_file_expander = functools.partial(tariterators.tar_file_expander, eof_value=None); "
    "from open_clip_train.main import main; main(sys.argv[1:])"
)


def run_open_clip(args, cfg, work: Path, env: dict) -> dict:
    model_dir = work / "open_clip_model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip_model_config(cfg.model)}))
    precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[args.precision]
    cmd = [
        sys.executable, "-c", _OPEN_CLIP_MAIN, "--model", f"local-dir:{model_dir}",
        "--train-data", args.shards, "--dataset-type", "webdataset",
        "--train-num-samples", str(args.steps * args.batch_size), "--epochs", "1",
        "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--precision", precision,
        "--device", "cpu", "--lr", str(args.lr), "--warmup", "2", "--wd", "0.2",
        "--log-every-n-steps", str(args.log_every), "--logs", str(work / "open_clip_logs"), "--name", "throughput",
        "--save-frequency", "0", "--report-to", "", "--local-loss", "--gather-with-grad", "--seed", "0",
    ]
    text = _run(cmd, env, work / "open_clip.log", args.timeout)
    # "Train Epoch: 0 [  320/ 2560 (12%)] Data (t): 0.004 Batch (t): 0.512, ..." ; Batch (t) is the
    # interval mean of the wall time of a step (data included)
    rows = re.findall(r"Train Epoch: \d+ \[\s*(\d+)/.*?Batch \(t\): ([0-9.]+)", text)
    intervals = [(int(samples) // args.batch_size, float(t)) for samples, t in rows]
    return _summarise("open_clip (softmax)", intervals, args)


def run_ours(args, attention: str, work: Path, env: dict) -> dict:
    name = f"ours_{attention}"
    cmd = [
        sys.executable, "-m", "ds_linclip.train", f"model.preset={args.preset}", f"data.train_shards={args.shards}",
        f"data.workers={args.workers}", f"model.image.attention={attention}", f"model.text.attention={attention}",
        f"train.micro_batch_size={args.batch_size}", f"train.steps={args.steps}", f"train.precision={args.precision}",
        "train.zero_stage=0", f"train.lr={args.lr}", "train.warmup_steps=2", f"train.log_every={args.log_every}",
        "train.checkpoint_every=0", f"train.output_dir={work}", f"train.run_name={name}", "train.resume=none",
    ]
    text = _run(cmd, env, work / f"{name}.log", args.timeout)
    # "step 20/40 (...) | ... | step 0.512s (data 0.003s) | ..."; the step time is the interval mean
    rows = re.findall(r"^step (\d+)/\d+ .*?\| step ([0-9.]+)s \(data", text, flags=re.M)
    intervals = [(int(step), float(t)) for step, t in rows]
    return _summarise(f"ours ({attention})", intervals, args)


def _summarise(label: str, intervals: list[tuple[int, float]], args) -> dict:
    kept = [t for step, t in intervals if step - args.log_every >= args.skip_steps]
    if not kept:
        raise RuntimeError(f"{label}: no timed intervals after step {args.skip_steps} (parsed {intervals})")
    step_s = statistics.mean(kept)
    return {"label": label, "step_s": step_s, "images_per_s": args.batch_size / step_s, "intervals": intervals}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shards", required=True, help="webdataset shard spec (brace range), e.g. 'fmnist/train/shard-{000000..000011}.tar'")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-steps", type=int, default=10, help="steps not timed (start-up)")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="OMP/torch threads of each run")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (open_clip, ours softmax, ours linear); medians reported")
    parser.add_argument("--keep-logs", default=None, help="keep the runs' logs and outputs in this dir (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from ds_linclip.config import load_config

    cfg = load_config([], [f"model.preset={args.preset}"])
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)  # one process
    env["MASTER_PORT"] = env.get("MASTER_PORT", "29533")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="linclip_throughput_") as tmp:
        print(f"preset {args.preset}, batch {args.batch_size}, {args.steps} steps, {args.precision}, "
              f"{args.workers} data worker(s), {args.threads} thread(s), one CPU process each, "
              f"{args.repeats} round(s)", flush=True)
        for round_index in range(args.repeats):  # rounds interleave the trainers: drift hits all alike
            work = Path(args.keep_logs or tmp) / f"round{round_index}"
            work.mkdir(parents=True, exist_ok=True)
            print(f"round {round_index}: open_clip_train.main (softmax) ...", flush=True)
            result = run_open_clip(args, cfg, work, env)
            runs.setdefault(result["label"], []).append(result)
            for attention in ("softmax", "linear-affine"):
                print(f"round {round_index}: ds_linclip.train ({attention}) ...", flush=True)
                result = run_ours(args, attention, work, env)
                runs.setdefault(result["label"], []).append(result)
    results = []
    for label, rounds in runs.items():
        step_s = statistics.median(r["step_s"] for r in rounds)
        results.append({"label": label, "step_s": step_s, "images_per_s": args.batch_size / step_s,
                        "rounds_step_s": [r["step_s"] for r in rounds], "rounds": rounds})
    base = results[0]["images_per_s"]
    print(f"\n{'trainer':<24} {'step (s)':>9} {'images/s':>9} {'vs open_clip':>13}   per-round step (s)")
    for r in results:
        r["ratio_vs_open_clip"] = r["images_per_s"] / base
        rounds = " ".join(f"{t:.3f}" for t in r["rounds_step_s"])
        print(f"{r['label']:<24} {r['step_s']:>9.3f} {r['images_per_s']:>9.1f} {r['ratio_vs_open_clip']:>12.2f}x   {rounds}")
    softmax_ratio = results[1]["ratio_vs_open_clip"]
    print(f"\nours softmax / open_clip softmax = {softmax_ratio:.2f}x (target >= 1.0x: "
          f"{'met' if softmax_ratio >= 1.0 else 'NOT met'}); linear-affine / open_clip softmax = "
          f"{results[2]['ratio_vs_open_clip']:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
