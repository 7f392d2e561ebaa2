"""Run specs, run folders and their reuse, reading what a finished run wrote, and `run_one`.

A RunSpec is one training run: an attention variant (`kind`, the models' name grammar, optionally
`<image>+text-<text>`), an image size, a width, a Budget (what every run of a study shares: steps,
batch, seed, lr, ...) and any extra config overrides (`model.image.patch_dropout=0.5`,
`train.lr=1e-3`, ...). Its `name` is its run folder under the runs dir; a folder whose DONE exists
and whose saved config.yaml resolves to the same config as the spec's overrides is reused, not
retrained, so a later run of the same command fills only what is missing.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import hashlib
import json
import shutil
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ds_linclip.experiments.variants import HEAD_DIM, parse_variant

if TYPE_CHECKING:
    from ds_linclip.experiments.launcher import Launcher

REPO_ROOT = Path(__file__).resolve().parents[2]


class ExperimentError(RuntimeError):
    """A run that failed or an input that cannot be used; the message names it."""


class MissingRun(ExperimentError):
    """Training was not allowed (`train=False`) and the run has not finished with this config."""


# ----------------------------------------------------------------------------- log lines

_LOG_PREFIX = ["experiments"]


def set_log_prefix(name: str) -> None:
    """The study's name at the start of every `log` line (`[compare 12:00:00] ...`)."""
    _LOG_PREFIX[0] = name


def log(message: str) -> None:
    """One progress line, written above any tqdm bar."""
    from tqdm import tqdm

    tqdm.write(f"[{_LOG_PREFIX[0]} {dt.datetime.now().strftime('%H:%M:%S')}] {message}")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Budget:
    """What every run of a study shares (the 'same budget'); a RunSpec's `overrides` win over it."""

    steps: int = 200
    batch_size: int = 128
    seed: int = 0
    lr: float = 2.0e-3
    weight_decay: float = 0.1
    layers: int = 4
    width: int = 128
    patch_size: int = 4
    # 16 holds every Fashion-MNIST caption and zero-shot prompt (at most 14 tokens with SOT/EOT)
    context_length: int = 16
    data_workers: int = 1
    eval_samples: int | None = None  # None: the whole test split
    eval_templates: str = "openai"
    eval_batch_size: int = 500

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 10)

    @property
    def log_every(self) -> int:
        # ~40 points on the loss curve
        return max(1, self.steps // 40)


def shape_name(kind: str, image_size: int, width: int) -> str:
    """A variant at one shape: the timing pass's key and the run folder's prefix."""
    return f"{kind}-{image_size}px-w{width}"


def overrides_label(overrides: Sequence[str]) -> str:
    """A short stable label for a list of overrides (`x` + 8 hex digits of their SHA-1)."""
    return "x" + hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunSpec:
    """One training run. Hashable: studies key their results by it.

    kind: attention variant (VARIANT_GRAMMAR); image_size: px; width: both towers' width (heads =
    width / HEAD_DIM, embed dim = width); budget: the shared settings (its steps and seed included).
    overrides: extra `key=value` config overrides, applied after everything the spec sets (so they win);
    `model.*` ones also reach `model_overrides` (FLOPs, the timing pass). label: a readable name for
    them in the run folder; a spec with overrides and no label gets `overrides_label(overrides)`.
    """

    kind: str
    image_size: int
    width: int
    budget: Budget
    overrides: tuple[str, ...] = ()
    label: str = ""

    @property
    def shape_name(self) -> str:
        """Variant and shapes only: what the interleaved timing pass measures (seed and steps do not matter)."""
        return shape_name(self.kind, self.image_size, self.width)

    @property
    def run_label(self) -> str:
        """'' for a spec without overrides (the folder names of earlier runs), else label or the overrides' hash."""
        return self.label or (overrides_label(self.overrides) if self.overrides else "")

    @property
    def name(self) -> str:
        """The run folder: everything that makes a run differ, seed and steps included.
        `<kind>-<px>px-w<width>[-<label>]-<steps>steps-seed<seed>`."""
        label = f"-{self.run_label}" if self.run_label else ""
        return f"{self.shape_name}{label}-{self.budget.steps}steps-seed{self.budget.seed}"

    @property
    def tokens(self) -> int:
        """Image tokens: patches + CLS."""
        return (self.image_size // self.budget.patch_size) ** 2 + 1

    def with_seed(self, seed: int) -> RunSpec:
        return replace(self, budget=replace(self.budget, seed=seed))

    def with_steps(self, steps: int) -> RunSpec:
        return replace(self, budget=replace(self.budget, steps=steps))

    def model_overrides(self) -> list[str]:
        heads = max(1, self.width // HEAD_DIM)
        b = self.budget
        out = ["model.preset=tiny", f"model.embed_dim={self.width}"]
        for tower in ("image", "text"):
            out += [f"model.{tower}.width={self.width}", f"model.{tower}.heads={heads}",
                    f"model.{tower}.layers={b.layers}"]
        out += parse_variant(self.kind).overrides()
        out += [f"model.image.image_size={self.image_size}", f"model.image.patch_size={b.patch_size}",
                f"model.text.context_length={b.context_length}"]
        return out + [o for o in self.overrides if o.startswith("model.")]

    def train_overrides(self, data_dir: Path, runs_dir: Path) -> list[str]:
        b = self.budget
        return self.model_overrides() + [
            f"data.train_shards={data_dir / 'train' / 'shard-*.tar'}",
            f"data.workers={b.data_workers}",
            f"train.output_dir={runs_dir}", f"train.run_name={self.name}",
            f"train.seed={b.seed}", f"train.micro_batch_size={b.batch_size}", "train.grad_accum_steps=1",
            f"train.steps={b.steps}", f"train.lr={b.lr}", f"train.warmup_steps={b.warmup_steps}",
            f"train.weight_decay={b.weight_decay}", "train.precision=fp32", "train.zero_stage=0",
            f"train.log_every={b.log_every}", "train.checkpoint_every=0", "train.keep_last=1",
            "train.resume=none",
        ] + [o for o in self.overrides if not o.startswith("model.")]

    def eval_overrides(self, data_dir: Path) -> list[str]:
        b = self.budget
        out = [f"eval.zeroshot_data={data_dir / 'test' / 'shard-*.tar'}",
               f"eval.classnames={data_dir / 'classnames.txt'}", f"eval.templates={b.eval_templates}",
               f"eval.batch_size={b.eval_batch_size}", "eval.workers=1", "eval.retrieval_data=null"]
        if b.eval_samples:
            out.append(f"eval.max_samples={b.eval_samples}")
        return out


def parse_seeds(values: Sequence[int]) -> list[int]:
    """--seeds N -> seeds 0..N-1; --seeds A B ... (two or more) -> exactly those."""
    if len(values) == 1:
        if values[0] < 1:
            raise ExperimentError(f"--seeds {values[0]}: give a count >= 1, or two or more seeds")
        return list(range(values[0]))
    if len(set(values)) != len(values) or min(values) < 0:
        raise ExperimentError(f"--seeds {' '.join(map(str, values))}: seeds must be distinct and >= 0")
    return list(values)


# ----------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """What one finished run measured. Losses are the trainer's `train/loss`; FLOPs are analytic
    (ds_linclip.models.flops); top1/top5 are fractions (None when the run was not scored)."""

    name: str
    kind: str
    image_size: int
    width: int
    tokens: int
    steps: int
    seed: int
    batch_size: int
    params: int
    attention_flops_per_image: int
    image_flops_per_image: int
    forward_flops_per_sample: int  # one image + one caption
    train_flops: float  # 3 x forward x samples seen
    final_loss: float
    loss_curve: list[tuple[int, float]]
    trainer_images_per_s: float | None
    peak_memory_mib: float | None
    top1: float | None
    top5: float | None
    eval_samples: int
    train_seconds: float | None
    reused: bool

    @property
    def flops_per_step(self) -> float:
        """Training FLOPs of one step: train_flops / steps (to put a loss curve on a compute axis)."""
        return self.train_flops / self.steps

    def loss_at(self, step: int, window: int | None = None) -> float:
        """The training loss at `step` of this run's curve (`window_mean_loss`; window default: 10% of step)."""
        return window_mean_loss(self.loss_curve, step, window)

    def loss_vs_compute(self) -> list[tuple[float, float]]:
        """The logged loss curve on a compute axis: [(step x flops_per_step (FLOPs), loss), ...]."""
        return [(step * self.flops_per_step, loss) for step, loss in self.loss_curve]


def read_scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the trainer's event file(s) in `tensorboard_dir` (not its subfolders):
    {tag: [(step, value), ...]} in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard_dir.is_dir():
        raise ExperimentError(f"no TensorBoard folder {tensorboard_dir}")
    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_curve(run_dir: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """One scalar series of a run folder's TensorBoard events, [(step, value), ...]; raises if absent."""
    scalars = read_scalars(run_dir / "tensorboard")
    if tag not in scalars:
        raise ExperimentError(f"{run_dir / 'tensorboard'} has no {tag} scalars")
    return scalars[tag]


def median_window_rate(series: list[tuple[int, float]]) -> float | None:
    """Median of the logged images/s windows, the first (start-up, allocations) left out when there are more."""
    values = [v for _, v in series]
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


def window_mean_loss(curve: Sequence[tuple[int, float]], step: int, window: int | None = None) -> float:
    """Mean of the logged losses at steps in (step - window, step] (window default max(1, step // 10)); when
    none was logged there, the last one logged at or before `step`. One logged window alone is a mean over a
    few batches only, too noisy to rank variants or fit on."""
    window = max(1, step // 10) if window is None else window
    values = [value for s, value in curve if step - window < s <= step]
    if not values:
        before = [value for s, value in curve if s <= step]
        if not before:
            raise ExperimentError(f"no loss logged at or before step {step}")
        values = [before[-1]]
    return sum(values) / len(values)


def tail_mean_loss(curve: Sequence[tuple[int, float]], steps: int) -> float:
    """Mean of the logged losses over the last 10% of the steps (at least the last window)."""
    return window_mean_loss(curve, steps)


# ----------------------------------------------------------------------------- reuse


def same_config(run_dir: Path, overrides: Sequence[str]) -> bool:
    """A finished run (R/DONE) whose saved config.yaml resolves to the same config as `overrides`."""
    from ds_linclip.config import config_hash, load_config

    saved = run_dir / "config.yaml"
    if not (run_dir / "DONE").is_file() or not saved.is_file():
        return False
    try:
        return config_hash(load_config([saved])) == config_hash(load_config([], overrides))
    except Exception:  # an unreadable/old config: retrain
        return False


def ensure_shards(data_dir: Path) -> Path:
    """Fashion-MNIST shards in data_dir (train/, test/, classnames.txt); written by the writer if missing."""
    data_dir = data_dir.expanduser().resolve()
    complete = (data_dir / "classnames.txt").is_file() and list((data_dir / "train").glob("shard-*.tar")) \
        and list((data_dir / "test").glob("shard-*.tar"))
    if not complete:
        log(f"no Fashion-MNIST shards in {data_dir}: writing them (python -m ds_linclip.data.writer fashion-mnist)")
        from ds_linclip.data.writer import write_fashion_mnist

        write_fashion_mnist(data_dir)
    return data_dir


def _scored(record: dict[str, Any] | None, budget: Budget) -> bool:
    """An eval record scored under this budget's eval settings."""
    if record is None:
        return False
    expected = budget.eval_samples
    return not (expected and record.get("num_samples") != expected
                or not expected and record.get("num_samples", 0) < 10000
                or record.get("templates") != budget.eval_templates)


def model_cost_of(spec: RunSpec) -> Any:
    """ds_linclip.models.flops.model_cost of the spec's model (params, per-tower FLOPs per sample)."""
    from ds_linclip.config import load_config
    from ds_linclip.models.flops import model_cost

    return model_cost(load_config([], spec.model_overrides()).model)


def resolved_run(spec: RunSpec) -> tuple[Any, tuple[float, ...]]:
    """(the run's resolved config, training FLOPs per step of each train.phases entry). Neither depends on the
    step count, so every step count of a spec shares one cached resolution (its config's train.steps is a
    placeholder: `planned_phases` plans the real one); resolving a config is the slow part, and a budget
    search asks about the same spec at many step counts."""
    return _resolved(spec.with_steps(1000))


@functools.lru_cache(maxsize=None)
def _resolved(spec: RunSpec) -> tuple[Any, tuple[float, ...]]:
    from ds_linclip.config import load_config
    from ds_linclip.models.flops import model_cost
    from ds_linclip.train.phases import plan_phases

    cfg = load_config([], spec.train_overrides(Path("data"), Path("runs")))
    per_step = []
    for phase in plan_phases(cfg):
        cost = model_cost(cfg.model, phase.image_size, phase.patch_dropout)
        per_step.append(3.0 * (cost.image.flops + cost.text.flops) * spec.budget.batch_size)
    return cfg, tuple(per_step)


def planned_phases(spec: RunSpec) -> list[Any]:
    """The trainer's phase plan (train.phases -> plan_phases) for the spec's step count."""
    from ds_linclip.train.phases import plan_phases

    cfg, _ = resolved_run(spec)
    cfg = copy.deepcopy(cfg)
    cfg.train.steps = spec.budget.steps
    return plan_phases(cfg)


def phase_flops(spec: RunSpec) -> list[tuple[int, float]]:
    """[(steps, training FLOPs per step)] per phase of `spec`, as the trainer plans them (train.phases ->
    plan_phases): 3 x forward FLOPs of one image + one caption (models.flops at the phase's image size
    and patch dropout) x batch."""
    _, per_step = resolved_run(spec)
    return [(phase.steps, per_step[phase.index]) for phase in planned_phases(spec)]


def train_flops(spec: RunSpec) -> float:
    """Training FLOPs of the whole run (every phase)."""
    return sum(steps * per_step for steps, per_step in phase_flops(spec))


def train_flops_per_step(spec: RunSpec) -> float:
    """Analytic training FLOPs of one step of a run without train.phases (one phase; see `phase_flops`)."""
    per_step = resolved_run(spec)[1]
    if len(per_step) != 1:
        raise ValueError(f"{spec.name} trains in {len(per_step)} phases; its FLOPs per step are phase_flops(spec)")
    return per_step[0]


def run_one(spec: RunSpec, launcher: Launcher, train: bool = True, evaluate: bool = True) -> RunResult:
    """Train (unless an identical finished run exists), evaluate (unless already scored; evaluate=False:
    not at all, top1/top5 None), collect numbers. train=False: a run not finished with this resolved
    config raises MissingRun instead of training."""
    run_dir = launcher.runs_dir / spec.name
    overrides = spec.train_overrides(launcher.data_dir, launcher.runs_dir)
    reused = same_config(run_dir, overrides) or (launcher.reuse_any_finished and (run_dir / "DONE").is_file())
    train_seconds = None
    if reused:
        log(f"{spec.name}: reusing the finished run in {run_dir}")
    elif not train:
        raise MissingRun(f"{spec.name}: no finished run with this config in {run_dir} (--no-train)")
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        log(f"{spec.name}: training {spec.budget.steps} steps x batch {spec.budget.batch_size} "
            f"({spec.tokens} image tokens)")
        train_seconds = launcher.train(spec)
        log(f"{spec.name}: trained in {train_seconds:.0f} s")

    top1 = top5 = None
    eval_samples = 0
    if evaluate:
        eval_json = run_dir / "eval" / "final_zeroshot.json"
        record = json.loads(eval_json.read_text()) if (reused and eval_json.is_file()) else None
        if not _scored(record, spec.budget):
            log(f"{spec.name}: zero-shot eval")
            record = launcher.evaluate(spec)
        top1, top5 = float(record["metrics"]["top1"]), float(record["metrics"]["top5"])
        eval_samples = int(record["num_samples"])
        log(f"{spec.name}: zero-shot top-1 {100 * top1:.2f}%, top-5 {100 * top5:.2f}% on {eval_samples} images")

    scalars = read_scalars(run_dir / "tensorboard")
    if "train/loss" not in scalars:
        raise ExperimentError(f"{run_dir / 'tensorboard'} has no train/loss scalars")
    loss_curve = scalars["train/loss"]
    peak = scalars.get("memory/peak_mb")
    cost = model_cost_of(spec)
    forward = cost.image.flops + cost.text.flops
    return RunResult(
        name=spec.name, kind=spec.kind, image_size=spec.image_size, width=spec.width, tokens=spec.tokens,
        steps=spec.budget.steps, seed=spec.budget.seed, batch_size=spec.budget.batch_size, params=cost.params,
        attention_flops_per_image=cost.image.attention_flops, image_flops_per_image=cost.image.flops,
        forward_flops_per_sample=forward,
        train_flops=train_flops(spec),  # every phase, at its image size and patch dropout
        final_loss=tail_mean_loss(loss_curve, spec.budget.steps), loss_curve=loss_curve,
        trainer_images_per_s=median_window_rate(scalars.get("perf/images_per_s", [])),
        peak_memory_mib=(max(v for _, v in peak) if peak else None) if launcher.mode == "subprocess" else None,
        top1=top1, top5=top5, eval_samples=eval_samples,
        train_seconds=train_seconds, reused=reused,
    )
