"""Linearising a pretrained softmax CLIP, measured in miniature on Fashion-MNIST (train.linearize).

    python -m ds_linclip.experiments.linearize                       # the README's table
    python -m ds_linclip.experiments.linearize --kinds linear-affine --teacher-steps 100 --linearize-steps 10

Every run goes through the experiments' shared pieces (`ds_linclip.experiments.runs` / `.launcher`: our
trainer and our eval job as subprocesses, one process, fp32, the same shards, seed and shapes):

(a) teacher: a softmax CLIP trained for --teacher-steps;
then, per linear kind (both towers):
(b) scratch: the same linear model trained from scratch for --teacher-steps (the full budget);
(c) no recipe: the teacher's weights loaded into the linear model and scored as they are;
(c') today's path: the teacher's weights loaded (`model.pretrained`), then --linearize-steps of
     ordinary contrastive training;
(d) linearised: the teacher's weights, then train.linearize for --linearize-steps in all:
     --transfer-steps of attention transfer, the rest contrastive fine-tune.
(c') and (d) share the fine-tune learning rate and warmup, so only the recipe differs.

Also timed, in this process (plain PyTorch + AdamW, the linear kind's model, a batch of the training
shape, alternating, median of --timing-rounds): one ordinary training step vs one stage-1 step
(teacher + student attention, transfer loss, backward, optimizer), against a <= 1.5x target.

Writes linearize.md and linearize.json to --out; runs go to --runs-dir and finished runs with the
same resolved config are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ds_linclip.experiments.launcher import Launcher, prepare_process, run_study
from ds_linclip.experiments.report import markdown_table, run_meta, write_json
from ds_linclip.experiments.runs import Budget, RunSpec, ensure_shards, log, read_scalars, run_one, set_log_prefix
from ds_linclip.experiments.timing import contrastive_loss, synthetic_batch, time_alternating


@dataclass(frozen=True)
class TeacherRunSpec(RunSpec):
    """A run of this study, named `<kind>-<label>-<px>px-w<width>` (no steps or seed: the label says them)."""

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.label}-{self.image_size}px-w{self.width}"


def from_teacher(kind_spec: RunSpec, budget: Budget, pretrained: Path, label: str,
                 finetune_warmup_steps: int | None = None, transfer_steps: int | None = None,
                 transfer_lr: float = 1.0e-3, transfer_warmup_steps: int = 3,
                 finetune_transfer_weight: float = 0.0) -> TeacherRunSpec:
    """A run that starts from the teacher's weights (`model.pretrained`): ordinary fine-tune, or
    train.linearize with `transfer_steps` of attention transfer when transfer_steps is not None."""
    overrides = [f"model.pretrained={pretrained}"]
    if finetune_warmup_steps is not None:
        overrides.append(f"train.warmup_steps={finetune_warmup_steps}")
    if transfer_steps is not None:
        overrides += ["train.linearize.enabled=true", f"train.linearize.transfer_steps={transfer_steps}",
                      f"train.linearize.transfer_lr={transfer_lr}",
                      f"train.linearize.transfer_warmup_steps={transfer_warmup_steps}",
                      f"train.linearize.finetune_transfer_weight={finetune_transfer_weight}",
                      "train.linearize.log_layers_per_group=1"]
    return TeacherRunSpec(kind_spec.kind, kind_spec.image_size, kind_spec.width, budget, tuple(overrides), label)


def score_without_training(kind_spec: RunSpec, teacher_dir: Path, launcher: Launcher) -> dict[str, Any]:
    """(c): the teacher's weights loaded the way `model.pretrained` loads them into the linear model (the
    parameters a variant adds start at their neutral init), saved as an export, scored by the eval job."""
    from safetensors.torch import save_file

    from ds_linclip.config import load_config, to_yaml
    from ds_linclip.models import build_model

    spec = TeacherRunSpec(kind_spec.kind, kind_spec.image_size, kind_spec.width, kind_spec.budget, label="norecipe")
    final = launcher.runs_dir / spec.name / "final"
    final.mkdir(parents=True, exist_ok=True)
    cfg = load_config([teacher_dir / "final" / "config.yaml"],
                      kind_spec.model_overrides() + [f"model.pretrained={teacher_dir / 'final' / 'model.safetensors'}"])
    model = build_model(cfg.model)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(final / "model.safetensors"))
    cfg.model.pretrained = None
    (final / "config.yaml").write_text(to_yaml(cfg))
    return launcher.evaluate(spec)


def stage1_timing(kind_spec: RunSpec, teacher_file: Path, transfer_steps: int, rounds: int, batch_size: int) -> dict:
    """Seconds per training step, median over rounds, alternating: ordinary vs stage 1 of the recipe."""
    import torch

    from ds_linclip.config import load_config
    from ds_linclip.models import build_model
    from ds_linclip.train.engine import param_groups
    from ds_linclip.train.linearize import Linearizer

    overrides = kind_spec.model_overrides() + [
        f"model.pretrained={teacher_file}", f"train.steps={2 * transfer_steps}", "train.linearize.enabled=true",
        f"train.linearize.transfer_steps={transfer_steps}"]
    cfg = load_config([], overrides)
    images, tokens = synthetic_batch(batch_size, kind_spec.image_size, kind_spec.budget.context_length)
    ordinary = build_model(cfg.model).train()
    ordinary_opt = torch.optim.AdamW([g for g in param_groups(ordinary, 0.1) if g["params"]], lr=1e-4)
    student = build_model(cfg.model).train()
    linearizer = Linearizer(cfg, student)
    student_opt = torch.optim.AdamW([g for g in linearizer.param_groups(0.1) if g["params"]], lr=1e-4)
    linearizer.attach()
    linearizer.prepare(student_opt, 1)

    def ordinary_step() -> None:
        ordinary_opt.zero_grad(set_to_none=True)
        contrastive_loss(*ordinary(images, tokens)).backward()
        ordinary_opt.step()

    def transfer_step() -> None:
        student_opt.zero_grad(set_to_none=True)
        linearizer.objective(contrastive_loss(*student(images, tokens))).backward()
        student_opt.step()

    steps = {"ordinary": ordinary_step, "stage1": transfer_step}
    for fn in steps.values():  # warm-up
        fn()
    seconds = time_alternating(steps, rounds)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"batch_size": batch_size, "rounds": rounds, "seconds": seconds, "ordinary_s": median["ordinary"],
            "stage1_s": median["stage1"], "ratio": median["stage1"] / median["ordinary"]}


def other_settings(runs_dir: Path, args: argparse.Namespace, shown: set) -> list[dict[str, Any]]:
    """Finished, scored runs from the teacher with other recipe / fine-tune settings (name, top-1), so a
    table shows every setting that was tried, not only the chosen one."""
    out = []
    for kind in args.kinds:
        for pattern in (f"{kind}-linearized-*-{args.image_size}px-w{args.width}",
                        f"{kind}-finetune-*-{args.image_size}px-w{args.width}"):
            for run in sorted(runs_dir.glob(pattern)):
                result = run / "eval" / "final_zeroshot.json"
                if run.name in shown or not (run / "DONE").is_file() or not result.is_file():
                    continue
                out.append({"run": run.name, "top1": float(json.loads(result.read_text())["metrics"]["top1"])})
    return out


def trainer_step_times(series: Sequence[tuple[int, float]], first: int, last: int) -> float | None:
    """Median of a run's logged perf/step_time_s (`read_scalars` series) over steps first..last."""
    values = [v for s, v in series if first <= s <= last]
    return statistics.median(values) if values else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.experiments.linearize",
        description="Train a softmax CLIP teacher, linearise it with train.linearize in a fraction of its steps, and "
                    "compare zero-shot top-1 with the teacher, the linear model from scratch, and the teacher's "
                    "weights loaded without the recipe (scored as is, and after ordinary fine-tuning).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kinds", nargs="+", default=["linear-affine", "linear-focused"], metavar="KIND",
                        help="linear variants to linearise into, both towers (names as ds_linclip.models.attention's "
                             "NAME_GRAMMAR, e.g. linear-affine, linear-focused-local3; default %(default)s)")
    parser.add_argument("--teacher-steps", type=int, default=600, help="teacher and scratch steps (default %(default)s)")
    parser.add_argument("--linearize-steps", type=int, default=60,
                        help="steps of the recipe in all, and of (c') (default %(default)s: 10%% of the teacher's)")
    parser.add_argument("--transfer-steps", type=int, default=30, help="stage-1 steps of them (default %(default)s)")
    parser.add_argument("--transfer-lr", type=float, default=1.0e-3, help="stage-1 peak lr (default %(default)s)")
    parser.add_argument("--finetune-lr", type=float, default=5.0e-4,
                        help="peak lr of the fine-tune, (c') and stage 2 of (d) (default %(default)s)")
    parser.add_argument("--finetune-transfer-weight", type=float, default=0.0,
                        help="stage-2 weight of the transfer loss (default %(default)s)")
    parser.add_argument("--recipe-only", action="store_true",
                        help="only the teacher's rows (a), (c') and (d): for trying recipe settings while (b) trains elsewhere")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2.0e-3, help="teacher/scratch peak lr (default %(default)s)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--timing-rounds", type=int, default=7, help="0 = no timing pass (default %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("data/fmnist"))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/linearize"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default %(default)s)")
    parser.add_argument("--reuse-finished", action="store_true",
                        help="reuse every finished run folder of the same name even when its resolved config differs "
                             "from today's (e.g. schema keys added by a later commit); without it such a run is retrained")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not 0 <= args.transfer_steps <= args.linearize_steps:
        print("error: need 0 <= --transfer-steps <= --linearize-steps", file=sys.stderr)
        return 2
    set_log_prefix("linearize")
    prepare_process(args.threads)
    return run_study(lambda: _main(args, argv))


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    command = "python -m ds_linclip.experiments.linearize " + shlex.join(argv)
    data_dir = ensure_shards(args.data)
    runs_dir = args.runs_dir.expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher("subprocess", runs_dir, data_dir, reuse_any_finished=args.reuse_finished)
    common = dict(batch_size=args.batch_size, seed=args.seed, layers=args.layers, width=args.width,
                  eval_samples=args.eval_samples)
    full = Budget(steps=args.teacher_steps, lr=args.lr, **common)
    short = Budget(steps=args.linearize_steps, lr=args.finetune_lr, **common)
    finetune_steps = args.linearize_steps - args.transfer_steps
    finetune_warmup = max(1, finetune_steps // 10)

    teacher_spec = RunSpec("softmax", args.image_size, args.width, full)
    teacher = run_one(teacher_spec, launcher)
    teacher_dir = runs_dir / teacher_spec.name
    teacher_file = teacher_dir / "final" / "model.safetensors"
    rows: list[dict[str, Any]] = [{"label": "(a) softmax teacher", "kind": "softmax", "steps": args.teacher_steps,
                                   "transfer_steps": 0, "top1": teacher.top1, "top5": teacher.top5,
                                   "final_loss": teacher.final_loss}]
    timing: dict[str, Any] = {}
    for kind in args.kinds:
        scratch_spec = RunSpec(kind, args.image_size, args.width, full)
        if not args.recipe_only:
            record = score_without_training(scratch_spec, teacher_dir, launcher)
            log(f"{kind} with the teacher's weights, no training: top-1 {100 * record['metrics']['top1']:.2f}%")
            rows.append({"label": "(c) teacher weights, no training", "kind": kind, "steps": 0, "transfer_steps": 0,
                     "top1": float(record["metrics"]["top1"]), "top5": float(record["metrics"]["top5"]),
                     "final_loss": None})
        plain = run_one(from_teacher(scratch_spec, short, teacher_file,
                                     label=f"finetune-n{args.linearize_steps}-flr{args.finetune_lr:g}"), launcher)
        rows.append({"label": "(c') teacher weights + ordinary fine-tune", "kind": kind, "run": plain.name,
                     "steps": args.linearize_steps,
                     "transfer_steps": 0, "top1": plain.top1, "top5": plain.top5, "final_loss": plain.final_loss})
        recipe_spec = from_teacher(
            scratch_spec, short, teacher_file,
            label=f"linearized-n{args.linearize_steps}-t{args.transfer_steps}-tlr{args.transfer_lr:g}"
                  f"-flr{args.finetune_lr:g}" + (f"-ftw{args.finetune_transfer_weight:g}" if args.finetune_transfer_weight else ""),
            finetune_warmup_steps=finetune_warmup, transfer_steps=args.transfer_steps, transfer_lr=args.transfer_lr,
            transfer_warmup_steps=max(1, args.transfer_steps // 10),
            finetune_transfer_weight=args.finetune_transfer_weight)
        linearized = run_one(recipe_spec, launcher)
        # (b) last: the longest run, after the cheap rows of this kind
        scratch = None if args.recipe_only else run_one(scratch_spec, launcher)
        if scratch is not None:
            rows.append({"label": "(b) from scratch", "kind": kind, "steps": args.teacher_steps, "transfer_steps": 0,
                     "top1": scratch.top1, "top5": scratch.top5, "final_loss": scratch.final_loss})
        scalars = read_scalars(runs_dir / recipe_spec.name / "tensorboard")
        transfer_curve = scalars.get("linearize/transfer_loss", [])
        step_times = scalars.get("perf/step_time_s", [])
        rows.append({"label": "(d) linearised (train.linearize)", "kind": kind, "run": recipe_spec.name,
                     "steps": args.linearize_steps,
                     "transfer_steps": args.transfer_steps, "top1": linearized.top1, "top5": linearized.top5,
                     "final_loss": linearized.final_loss,
                     "transfer_loss_first": transfer_curve[0][1] if transfer_curve else None,
                     "transfer_loss_last": transfer_curve[-1][1] if transfer_curve else None,
                     "trainer_stage1_step_s": trainer_step_times(step_times, 2, args.transfer_steps),
                     "trainer_stage2_step_s": trainer_step_times(step_times, args.transfer_steps + 2,
                                                                 args.linearize_steps),
                     "trainer_scratch_step_s": None if scratch is None else trainer_step_times(
                         read_scalars(runs_dir / scratch_spec.name / "tensorboard").get("perf/step_time_s", []),
                         2, args.teacher_steps)})
        if args.timing_rounds > 0:
            log(f"{kind}: interleaved timing, ordinary step vs stage-1 step, {args.timing_rounds} rounds")
            timing[kind] = stage1_timing(scratch_spec, teacher_file, args.transfer_steps, args.timing_rounds,
                                         args.batch_size)
            log(f"  ordinary {timing[kind]['ordinary_s']:.3f} s, stage 1 {timing[kind]['stage1_s']:.3f} s "
                 f"({timing[kind]['ratio']:.2f}x)")
    order = {"(a)": 0, "(b)": 1, "(c)": 2, "(c')": 3, "(d)": 4}
    kinds = ["softmax", *args.kinds]
    rows.sort(key=lambda row: (kinds.index(row["kind"]), order[row["label"].split()[0]]))
    for row in rows:
        row["of_teacher_pct"] = 100 * row["top1"] / teacher.top1
    report = {"command": command, **run_meta(),
              "budget": {"teacher": dataclasses.asdict(full), "linearize": dataclasses.asdict(short),
                         "transfer_steps": args.transfer_steps, "transfer_lr": args.transfer_lr,
                         "finetune_lr": args.finetune_lr, "image_size": args.image_size},
              "rows": rows, "timing": timing}
    table = markdown_table(
        ["model", "attention", "steps (transfer)", "zero-shot top-1 %", "top-5 %", "% of teacher top-1", "final loss"],
        [[r["label"], r["kind"], f"{r['steps']}" + (f" ({r['transfer_steps']})" if r["transfer_steps"] else ""),
          f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}", f"{r['of_teacher_pct']:.1f}",
          "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"] for r in rows])
    tried = other_settings(runs_dir, args, {row.get("run") for row in rows})
    if tried:
        report["other_settings"] = tried
    timing_lines = [f"- {kind}: ordinary step {t['ordinary_s'] * 1000:.0f} ms, stage-1 step {t['stage1_s'] * 1000:.0f} ms "
                    f"= {t['ratio']:.2f}x (interleaved, median of {t['rounds']}, batch {t['batch_size']})"
                    for kind, t in timing.items()]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "linearize.json", report, indent=2)
    parts = [f"`{command}`", "", table, "", *timing_lines, ""]
    if tried:
        parts += ["Other settings tried from the same teacher (every finished run of this runs dir; n = steps in all, "
                  "t = transfer steps, tlr / flr = stage-1 / fine-tune peak lr):", "",
                  markdown_table(["run", "zero-shot top-1 %", "% of teacher top-1"],
                                 [[t["run"], f"{100 * t['top1']:.2f}", f"{100 * t['top1'] / teacher.top1:.1f}"]
                                  for t in tried]), ""]
    markdown = "\n".join(parts)
    (out / "linearize.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
