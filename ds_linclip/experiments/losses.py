"""CLIP's softmax loss against SigLIP's sigmoid loss, in the comparison's miniature.

    python -m ds_linclip.experiments.losses                  # linear-focused-local3, 56 px, 600 steps, 3 seeds
    python -m ds_linclip.experiments.losses --quick --out /tmp/losses   # tiny, for tests

Each attention variant is trained with `train.loss=clip` and with `train.loss=siglip` (SigLIP's
initial logit scale ln 10 and bias -10) under the comparison's budget otherwise (same shards,
steps, batch, seeds, schedule, width and depth; Fashion-MNIST, zero-shot top-1/top-5 on the test
split by the eval job). The clip-loss runs are exactly the comparison's runs, so a runs folder
shared with `python -m ds_linclip.experiments.compare` reuses them. Zero-shot scoring is the same
dot product for both losses. Writes losses.md and losses.json to --out; a later run of the same
command reuses every finished run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ds_linclip.experiments.launcher import (Launcher, failures_exit_code, parse_study_args, prepare_process, run_specs,
                                             run_study)
from ds_linclip.experiments.report import (aggregate, load_average_1m, machine_sentence, markdown_table, run_meta,
                                          write_json)
from ds_linclip.experiments.runs import Budget, RunSpec, ensure_shards, log, parse_seeds, set_log_prefix
from ds_linclip.experiments.variants import variant_argument

LOSSES = ("clip", "siglip")
QUICK = {"steps": 4, "batch_size": 8, "width": 32, "layers": 1, "image_size": 12, "eval_samples": 100, "seeds": [1]}


def loss_spec(kind: str, loss: str, image_size: int, budget: Budget) -> RunSpec:
    """The run of `kind` under `loss`: the clip loss is the comparison's own run (no override, the same
    folder name); siglip adds `train.loss=siglip` and the label `siglip`."""
    if loss == "clip":
        return RunSpec(kind, image_size, budget.width, budget)
    return RunSpec(kind, image_size, budget.width, budget, overrides=("train.loss=siglip",), label="siglip")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ds_linclip.experiments.losses",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", type=variant_argument, default=["linear-focused-local3"],
                        help="attention variants (the comparison's grammar); default: linear-focused-local3")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--image-size", type=int, default=56, help="image size in px (default 56: 197 tokens)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seeds", nargs="+", type=int, default=[3], help="N (seeds 0..N-1) or a list (default 3)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--no-train", action="store_true", help="report finished runs only")
    parser.add_argument("--data", type=Path, default=Path("data/fmnist"))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/compare"),
                        help="runs folder (default: the comparison's, so its clip-loss runs are reused)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--quick", action="store_true", help="a tiny grid (tests)")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def report(rows, command: str, meta: dict) -> str:
    header = ["attention", "loss", "px (tokens)", "steps", "zero-shot top-1 %", "top-5 %", "final loss", "seeds"]
    table = [[row.kind, "siglip" if row.spec.label == "siglip" else "clip", f"{row.image_size} ({row.tokens})",
              str(row.steps), row.stat("top1").cell(scale=100), row.stat("top5").cell(scale=100),
              row.stat("final_loss").cell(), row.seeds_cell()] for row in rows]
    lines = [
        "# CLIP vs SigLIP loss in the miniature", "",
        f"Command: `{command}`", "",
        "Both losses train the same model under the same budget (Fashion-MNIST shards, steps, batch, seeds, "
        "learning-rate schedule); SigLIP starts from logit scale ln 10 and bias -10. Zero-shot top-1/top-5 on "
        "the test split by the eval job; mean ± std (n) over seeds. The two losses' final values are on "
        "different scales and are not comparable with each other.", "",
        markdown_table(header, table), "",
        machine_sentence(meta), "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    set_log_prefix("losses")
    return run_study(lambda: _main(*parse_study_args(build_parser(), argv, QUICK)))


def _main(args, argv: list[str]) -> int:
    prepare_process(args.threads)
    seeds = parse_seeds(args.seeds)
    budget = Budget(steps=args.steps, batch_size=args.batch_size, seed=seeds[0], lr=args.lr, layers=args.layers,
                    width=args.width, eval_samples=args.eval_samples)
    specs = [loss_spec(kind, loss, args.image_size, replace(budget, seed=seed))
             for seed in seeds for kind in args.kinds for loss in args.losses]
    runs_dir = args.runs_dir.expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher("subprocess", runs_dir, ensure_shards(args.data))
    log(f"{len(specs)} runs ({len(args.kinds)} variants x {len(args.losses)} losses x seeds {seeds}); runs in {runs_dir}")
    start = time.perf_counter()
    meta = run_meta()  # the load average at the start; the end's is added below
    done: dict = {}
    failures = run_specs(specs, launcher, done, jobs=args.jobs, train=not args.no_train)
    rows = aggregate(specs, done)
    command = "python -m ds_linclip.experiments.losses " + shlex.join(argv)
    meta["load_average_end"] = load_average_1m()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "losses.md").write_text(report(rows, command, meta))
    write_json(args.out / "losses.json", {"command": command, **meta, "wall_seconds": time.perf_counter() - start,
                                          "rows": [dict(row.summary(), loss="siglip" if row.spec.label == "siglip"
                                                        else "clip") for row in rows]})
    print((args.out / "losses.md").read_text())
    return failures_exit_code(failures)


if __name__ == "__main__":
    sys.exit(main())
