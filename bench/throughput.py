"""Training throughput of our trainer, run by run, optionally beside open_clip's trainer.

    python bench/throughput.py [--shards 'DIR/train/shard-{000000..000011}.tar'] [--preset tiny]
        [--image-size 112] [--patch-size 4] [--runs softmax linear-focused softmax:pd0.5 ...]
        [--baseline open_clip|none] [--device cpu|cuda] [--precision fp32|bf16|fp16] [--zero-stage 0]
        [--batch-size 64] [--steps 40] [--repeats 2] [--out FILE.json]

Each `--runs` entry is an attention name of the one grammar (softmax, linear-focused-local3, ...)
for both towers, optionally with `:pdF` for image patch dropout F (FLIP) during training. Without
`--shards`, synthetic captioned shards are written first (`python -m ds_linclip.data.writer
synthetic`), so the script needs no dataset (the GPU check uses this).

Runs, one process each, one after another, in interleaved rounds (drift hits all alike):
  open_clip  `python -m open_clip_train.main` (softmax attention; the model shape of our preset given
             to it as an open_clip model config through `--model local-dir:`, with the same patch
             dropout; run through a one-line shim that fixes its webdataset incompatibility, see
             _OPEN_CLIP_MAIN), once per patch-dropout value the runs use (`--baseline open_clip`)
  ours       `python -m ds_linclip.train`, one per `--runs` entry
Throughput = global batch / mean step wall time (data wait included, as both trainers time a step),
over the logged intervals after the first `--skip-steps` steps (start-up, allocator warm-up); the
median round is reported, with the peak memory our trainer logs (accelerator allocations on a GPU,
the process's peak RSS on CPU). Ratios: against our first run at the same patch dropout, and
against open_clip at the same patch dropout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def open_clip_model_config(model, patch_dropout: float = 0.0) -> dict:
    """open_clip's model_cfg for our `model` section (CLIP with a separate ViT and text transformer)."""
    image, text = model.image, model.text
    return {
        "embed_dim": int(model.embed_dim),
        "vision_cfg": {
            "image_size": int(image.image_size), "patch_size": int(image.patch_size), "width": int(image.width),
            "layers": int(image.layers), "head_width": int(image.width) // int(image.heads),
            "mlp_ratio": float(image.mlp_ratio), "patch_dropout": float(patch_dropout),
        },
        "text_cfg": {
            "context_length": int(text.context_length), "vocab_size": int(text.vocab_size), "width": int(text.width),
            "heads": int(text.heads), "layers": int(text.layers), "mlp_ratio": float(text.mlp_ratio),
        },
    }


def _run(cmd: list[str], env: dict, log_path: Path, timeout: float) -> str:
    """One run, waited for; stopped at once (SIGKILL to its process group) if this script is stopped or the
    run times out: a trainer's graceful SIGTERM path (finish the step, checkpoint) would hold the device
    into the next measurement."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # its own process group: the trainer and its data-loader workers go down together, and only
        # through this script (a signal to the script's group does not reach them first)
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except BaseException:  # TimeoutExpired, KeyboardInterrupt, SystemExit from SIGTERM
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
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


def run_open_clip(args, cfg, work: Path, env: dict, patch_dropout: float = 0.0) -> dict:
    model_dir = work / f"open_clip_model_pd{patch_dropout:g}"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": open_clip_model_config(cfg.model, patch_dropout)}))
    precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[args.precision]
    cmd = [
        sys.executable, "-c", _OPEN_CLIP_MAIN, "--model", f"local-dir:{model_dir}",
        "--train-data", args.shards, "--dataset-type", "webdataset",
        "--train-num-samples", str(args.steps * args.batch_size), "--epochs", "1",
        "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--precision", precision,
        "--device", args.device, "--lr", str(args.lr), "--warmup", "2", "--wd", "0.2",
        "--log-every-n-steps", str(args.log_every), "--logs", str(work / "open_clip_logs"), "--name", f"throughput_pd{patch_dropout:g}",
        "--save-frequency", "0", "--report-to", "", "--local-loss", "--gather-with-grad", "--seed", "0",
    ]
    text = _run(cmd, env, work / f"open_clip_pd{patch_dropout:g}.log", args.timeout)
    # "Train Epoch: 0 [  320/ 2560 (12%)] Data (t): 0.004 Batch (t): 0.512, ..." ; Batch (t) is the
    # interval mean of the wall time of a step (data included)
    rows = re.findall(r"Train Epoch: \d+ \[\s*(\d+)/.*?Batch \(t\): ([0-9.]+)", text)
    intervals = [(int(samples) // args.batch_size, float(t)) for samples, t in rows]
    return _summarise(Run("open_clip", patch_dropout, baseline=True), intervals, args)


@dataclass(frozen=True)
class Run:
    """One trainer configuration: attention (both towers) and image patch dropout."""

    attention: str
    patch_dropout: float = 0.0
    baseline: bool = False  # open_clip_train rather than ours

    @property
    def label(self) -> str:
        who = "open_clip" if self.baseline else f"ours {self.attention}"
        return who + (f" pd{self.patch_dropout:g}" if self.patch_dropout else "")


def parse_run(text: str) -> Run:
    """`ATTENTION[:pdF]` -> Run; argparse error naming the entry when malformed."""
    from ds_linclip.models.attention import parse_attention_name

    name, _, option = text.partition(":")
    patch_dropout = 0.0
    if option:
        if not option.startswith("pd"):
            raise argparse.ArgumentTypeError(f"{text!r}: the option after ':' is pdF (patch dropout), e.g. softmax:pd0.5")
        try:
            patch_dropout = float(option[2:])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: pd needs a number, e.g. softmax:pd0.5") from None
        if not 0.0 <= patch_dropout < 1.0:
            raise argparse.ArgumentTypeError(f"{text!r}: patch dropout must be in [0, 1)")
    try:
        parse_attention_name(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return Run(name, patch_dropout)


def attention_overrides(name: str) -> list[str]:
    """`model.image.*` / `model.text.*` overrides for `name` in both towers; the text tower is causal,
    so it takes the name without the image tower's local branch."""
    from ds_linclip.models.attention import AttentionSpec, parse_attention_name

    image = parse_attention_name(name)
    text = AttentionSpec(image.linear, 0)
    overrides = {**image.config_overrides("image"), **text.config_overrides("text")}
    return [f"{key}={value}" for key, value in overrides.items()]


def run_ours(args, run: Run, work: Path, env: dict) -> dict:
    name = f"ours_{run.attention}_pd{run.patch_dropout:g}"
    cmd = [
        sys.executable, "-m", "ds_linclip.train", f"model.preset={args.preset}", f"data.train_shards={args.shards}",
        f"data.workers={args.workers}", *attention_overrides(run.attention),
        f"model.image.image_size={args.image_size}", f"model.image.patch_size={args.patch_size}",
        f"train.micro_batch_size={args.batch_size}", f"train.steps={args.steps}", f"train.precision={args.precision}",
        f"train.zero_stage={args.zero_stage}", f"train.lr={args.lr}", "train.warmup_steps=2",
        f"train.log_every={args.log_every}", "train.checkpoint_every=0", f"train.output_dir={work}",
        f"train.run_name={name}", "train.resume=none",
    ] + ([f"model.image.patch_dropout={run.patch_dropout}"] if run.patch_dropout else [])
    text = _run(cmd, env, work / f"{name}.log", args.timeout)
    # "step 20/40 (...) | ... | step 0.512s (data 0.003s) | peak 1,234 MiB | ..."; the step time is the interval mean
    rows = re.findall(r"^step (\d+)/\d+ .*?\| step ([0-9.]+)s \(data.*?\| peak ([0-9,]+) MiB", text, flags=re.M)
    intervals = [(int(step), float(t)) for step, t, _ in rows]
    summary = _summarise(run, intervals, args)
    summary["peak_mib"] = max((float(peak.replace(",", "")) for _, _, peak in rows), default=None)
    return summary


def _summarise(run: Run, intervals: list[tuple[int, float]], args) -> dict:
    kept = [t for step, t in intervals if step - args.log_every >= args.skip_steps]
    if not kept:
        raise RuntimeError(f"{run.label}: no timed intervals after step {args.skip_steps} (parsed {intervals})")
    step_s = statistics.mean(kept)
    return {"run": run, "label": run.label, "step_s": step_s, "images_per_s": args.batch_size / step_s,
            "intervals": intervals}


def tokens_per_image(image_size: int, patch_size: int) -> int:
    return (image_size // patch_size) ** 2 + 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shards", default=None,
                        help="webdataset shard spec (brace range), e.g. 'fmnist/train/shard-{000000..000011}.tar' "
                             "(default: synthetic shards written into the work dir)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=None, help="image size in px (default: the preset's)")
    parser.add_argument("--patch-size", type=int, default=None, help="patch size in px (default: the preset's)")
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run("softmax"), parse_run("linear-focused-local3")],
                        metavar="ATTENTION[:pdF]", help="our runs (default: softmax linear-focused-local3)")
    parser.add_argument("--baseline", choices=["open_clip", "none"], default="open_clip",
                        help="also run open_clip_train.main, once per patch-dropout value of --runs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-steps", type=int, default=10, help="steps not timed (start-up)")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="OMP/torch threads of each run")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of all runs; medians reported")
    parser.add_argument("--keep-logs", default=None, help="keep the runs' logs and outputs in this dir (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


def results_table(results: list[dict], args) -> str:
    """Markdown: one row per run with images/s, peak memory and the ratios."""
    ours_first: dict[float, float] = {}
    open_clip: dict[float, float] = {}
    for r in results:
        run = r["run"]
        target = open_clip if run.baseline else ours_first
        target.setdefault(run.patch_dropout, r["images_per_s"])
    header = ["trainer", "px (tokens)", "step (s)", "images/s", "peak MiB", "vs ours first run", "vs open_clip",
              "vs open_clip same pd", "per-round step (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tokens = f"{args.image_size} ({tokens_per_image(args.image_size, args.patch_size)})"
    for r in results:
        run, ips = r["run"], r["images_per_s"]
        first = ours_first.get(run.patch_dropout) or ours_first.get(0.0)
        cells = [
            r["label"], tokens, f"{r['step_s']:.3f}", f"{ips:.1f}",
            f"{r['peak_mib']:,.0f}" if r.get("peak_mib") else "-",
            f"{ips / first:.2f}x" if first and not run.baseline else "-",
            f"{ips / open_clip[0.0]:.2f}x" if 0.0 in open_clip else "-",
            f"{ips / open_clip[run.patch_dropout]:.2f}x" if run.patch_dropout in open_clip else "-",
            " ".join(f"{t:.3f}" for t in r["rounds_step_s"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (`timeout`, Slurm) leaves through SystemExit, so the running trainer is killed with the script
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from ds_linclip.config import load_config

    cfg = load_config([], [f"model.preset={args.preset}"])
    args.image_size = args.image_size or int(cfg.model.image.image_size)
    args.patch_size = args.patch_size or int(cfg.model.image.patch_size)
    cfg = load_config([], [f"model.preset={args.preset}", f"model.image.image_size={args.image_size}",
                           f"model.image.patch_size={args.patch_size}"])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_PORT"):
        env.pop(key, None)  # one process each: without MASTER_PORT the trainer listens on a free port
    baselines = sorted({run.patch_dropout for run in args.runs}) if args.baseline == "open_clip" else []
    runs: dict[Run, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="linclip_throughput_") as tmp:
        root = Path(args.keep_logs or tmp)
        if args.shards is None:
            from ds_linclip.data.writer import write_synthetic

            samples = max(args.batch_size * (args.steps + 1), 512)
            # at least two shards per data worker: epoch mode deals whole shards to the workers
            shard_size = max(16, samples // (2 * max(args.workers, 1)))
            train = write_synthetic(root / "synthetic", samples=samples, image_size=64, shard_size=shard_size) / "train"
            last = len(json.loads((train / "sizes.json").read_text())) - 1
            args.shards = str(train / f"shard-{{000000..{last:06d}}}.tar")  # a brace range: open_clip does not glob
        print(f"preset {args.preset} at {args.image_size} px / patch {args.patch_size} "
              f"({tokens_per_image(args.image_size, args.patch_size)} tokens), batch {args.batch_size}, {args.steps} steps, "
              f"{args.precision}, ZeRO {args.zero_stage}, {args.device}, {args.workers} data worker(s), "
              f"{args.threads} thread(s), one process each, {args.repeats} round(s)", flush=True)
        for round_index in range(args.repeats):
            work = root / f"round{round_index}"
            work.mkdir(parents=True, exist_ok=True)
            for patch_dropout in baselines:
                print(f"round {round_index}: open_clip_train.main (softmax, patch dropout {patch_dropout:g}) ...", flush=True)
                result = run_open_clip(args, cfg, work, env, patch_dropout)
                runs.setdefault(result["run"], []).append(result)
            for run in args.runs:
                print(f"round {round_index}: ds_linclip.train ({run.label}) ...", flush=True)
                result = run_ours(args, run, work, env)
                runs.setdefault(run, []).append(result)
    results = []
    for run, rounds in runs.items():
        step_s = statistics.median(r["step_s"] for r in rounds)
        peaks = [r["peak_mib"] for r in rounds if r.get("peak_mib")]
        results.append({"run": run, "label": run.label, "step_s": step_s, "images_per_s": args.batch_size / step_s,
                        "peak_mib": max(peaks) if peaks else None, "rounds_step_s": [r["step_s"] for r in rounds]})
    print()
    print(results_table(results, args))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        for r in results:
            r["attention"], r["patch_dropout"], r["baseline"] = r["run"].attention, r["run"].patch_dropout, r["run"].baseline
            del r["run"]
        Path(args.out).write_text(json.dumps({"args": {k: (v if not isinstance(v, list) else [getattr(x, "label", x) for x in v])
                                                      for k, v in vars(args).items()}, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
