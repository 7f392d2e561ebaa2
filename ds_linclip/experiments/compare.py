"""The paper's comparison in miniature: softmax vs linear attention CLIPs on Fashion-MNIST.

    python -m ds_linclip.experiments.compare                 # 4 kinds x 2 image sizes
    python -m ds_linclip.experiments.compare --scale         # + 3 widths, loss-vs-compute fits
    python -m ds_linclip.experiments.compare --quick --out /tmp/cmp   # tiny, for tests

Every run uses OUR trainer (`python -m ds_linclip.train`, one process, DeepSpeed, fp32 on CPU) and
OUR eval job (`python -m ds_linclip.eval --checkpoint R/final`, zero-shot top-1/top-5 on the
Fashion-MNIST test split) under the same budget: same shards, steps, batch, seed, learning-rate
schedule; only the attention kind of both towers (and, with --scale, the width) changes.

Measured per run: zero-shot top-1/top-5, final training loss, the trainer's images/s (median of its
logged windows) and peak memory (the trainer process's peak RSS on CPU / max allocated on GPU),
all read from the run's TensorBoard events (tensorboard's EventAccumulator) and eval JSON.
Analytic: attention FLOPs per image and training compute (ds_linclip.models.flops).

The machine this was written for is small and shared, so a run's own images/s is noisy: other
work may land on one run and not the next. The comparison therefore also runs an *interleaved
timing pass* in this process: for each image size it builds every kind's model (same shapes,
plain PyTorch, AdamW) and times one training step (forward + contrastive loss + backward +
optimizer step) on a batch of the training shape, alternating the kinds and rotating their order
each round, and reports the median over rounds. The same pass measures activation memory: the
bytes of the tensors autograd saves for backward in one step (parameters excluded), which is what
the attention kind changes; process RSS is mostly the framework.

Outputs in --out: compare.md (method + table), compare.json (every number), compare_loss.png
(loss vs step), compare_accuracy_vs_compute.png, compare_throughput.png and, with --scale,
scale_loss_vs_compute.png and its fitted power laws (in compare.md/json). Runs go to --runs-dir;
a run whose R/DONE exists with the same resolved config is reused, not retrained.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]

# label -> (model.*.attention, model.*.denominator); the label names the run and the table row
KINDS: dict[str, tuple[str, str]] = {
    "softmax": ("softmax", "count"),
    "linear-affine": ("linear-affine", "count"),
    "linear-affine-kernel": ("linear-affine", "kernel"),
    "linear-elu": ("linear-elu", "count"),
    "linear-relu": ("linear-relu", "count"),
}
DEFAULT_KINDS = ("softmax", "linear-affine", "linear-affine-kernel", "linear-elu")
SCALE_KINDS = ("softmax", "linear-affine")
HEAD_DIM = 32  # heads = width / 32 at every width, so only the width changes with --scale
COLORS = {"softmax": "tab:blue", "linear-affine": "tab:orange", "linear-affine-kernel": "tab:green",
          "linear-elu": "tab:red", "linear-relu": "tab:purple"}


class CompareError(RuntimeError):
    """A run that failed or an input that cannot be used; the message names it."""


# ----------------------------------------------------------------------------- settings and runs


@dataclass(frozen=True)
class Budget:
    """What every run shares (the 'same budget')."""

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


@dataclass(frozen=True)
class RunSpec:
    kind: str
    image_size: int
    width: int
    budget: Budget

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.image_size}px-w{self.width}"

    @property
    def tokens(self) -> int:
        return (self.image_size // self.budget.patch_size) ** 2 + 1

    def model_overrides(self) -> list[str]:
        attention, denominator = KINDS[self.kind]
        heads = max(1, self.width // HEAD_DIM)
        b = self.budget
        out = ["model.preset=tiny", f"model.embed_dim={self.width}"]
        for tower in ("image", "text"):
            out += [f"model.{tower}.width={self.width}", f"model.{tower}.heads={heads}",
                    f"model.{tower}.layers={b.layers}", f"model.{tower}.attention={attention}",
                    f"model.{tower}.denominator={denominator}"]
        out += [f"model.image.image_size={self.image_size}", f"model.image.patch_size={b.patch_size}",
                f"model.text.context_length={b.context_length}"]
        return out

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
        ]

    def eval_overrides(self, data_dir: Path) -> list[str]:
        b = self.budget
        out = [f"eval.zeroshot_data={data_dir / 'test' / 'shard-*.tar'}",
               f"eval.classnames={data_dir / 'classnames.txt'}", f"eval.templates={b.eval_templates}",
               f"eval.batch_size={b.eval_batch_size}", "eval.workers=1", "eval.retrieval_data=null"]
        if b.eval_samples:
            out.append(f"eval.max_samples={b.eval_samples}")
        return out


@dataclass
class RunResult:
    name: str
    kind: str
    image_size: int
    width: int
    tokens: int
    steps: int
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
    top1: float
    top5: float
    eval_samples: int
    train_seconds: float | None
    reused: bool


# ----------------------------------------------------------------------------- helpers


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[compare {dt.datetime.now().strftime('%H:%M:%S')}] {message}")
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    """Environment for the trainer/eval subprocesses: this repo importable, CPU accelerator without
    CUDA, and the same intra-op thread count as this process (see --threads)."""
    import torch

    env = dict(os.environ)
    threads = str(torch.get_num_threads())
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env["MASTER_PORT"] = str(free_port())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def ensure_shards(data_dir: Path) -> Path:
    """Fashion-MNIST shards in data_dir (train/, test/, classnames.txt); written by the writer if missing."""
    data_dir = data_dir.expanduser().resolve()
    complete = (data_dir / "classnames.txt").is_file() and list((data_dir / "train").glob("shard-*.tar")) \
        and list((data_dir / "test").glob("shard-*.tar"))
    if not complete:
        _log(f"no Fashion-MNIST shards in {data_dir}: writing them (python -m ds_linclip.data.writer fashion-mnist)")
        from ds_linclip.data.writer import write_fashion_mnist

        write_fashion_mnist(data_dir)
    return data_dir


def read_scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the trainer's event file(s) in `tensorboard_dir` (not its subfolders)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard_dir.is_dir():
        raise CompareError(f"no TensorBoard folder {tensorboard_dir}")
    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def median_window_rate(series: list[tuple[int, float]]) -> float | None:
    """Median of the logged images/s windows, the first (start-up, allocations) left out when there are more."""
    values = [v for _, v in series]
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


def tail_mean_loss(curve: Sequence[tuple[int, float]], steps: int) -> float:
    """Mean of the logged losses over the last 10% of the steps (at least the last window): one
    logged window alone is a mean over a few batches only, too noisy to rank kinds or fit on."""
    tail = max(1, steps // 10)
    values = [value for step, value in curve if step > steps - tail] or [curve[-1][1]]
    return sum(values) / len(values)


def _same_config(run_dir: Path, overrides: Sequence[str]) -> bool:
    from ds_linclip.config import config_hash, load_config

    saved = run_dir / "config.yaml"
    if not (run_dir / "DONE").is_file() or not saved.is_file():
        return False
    try:
        return config_hash(load_config([saved])) == config_hash(load_config([], overrides))
    except Exception:  # an unreadable/old config: retrain
        return False


# ----------------------------------------------------------------------------- launching


class Launcher:
    """Runs the trainer and the eval job, as subprocesses (default) or in this process."""

    def __init__(self, mode: str, runs_dir: Path, data_dir: Path):
        self.mode = mode
        self.runs_dir = runs_dir
        self.data_dir = data_dir

    def train(self, spec: RunSpec) -> float:
        overrides = spec.train_overrides(self.data_dir, self.runs_dir)
        run_dir = self.runs_dir / spec.name
        start = time.perf_counter()
        if self.mode == "inprocess":
            from ds_linclip.config import load_config
            from ds_linclip.train.loop import train

            code = train(load_config([], overrides))
            if code != 0:
                raise CompareError(f"training {spec.name} exited with code {code}")
        else:
            cmd = [sys.executable, "-m", "ds_linclip.train", *overrides]
            self._run(cmd, run_dir / "train.log", spec.name, "training", echo=lambda line: line.startswith("step "))
        return time.perf_counter() - start

    def evaluate(self, spec: RunSpec) -> dict[str, Any]:
        run_dir = self.runs_dir / spec.name
        overrides = spec.eval_overrides(self.data_dir)
        if self.mode == "inprocess":
            from ds_linclip.eval.job import score_checkpoint

            records = score_checkpoint(run_dir / "final", overrides=overrides, progress=False)
            return next(r for r in records if r["task"] == "zeroshot")
        cmd = [sys.executable, "-m", "ds_linclip.eval", "--checkpoint", str(run_dir / "final"), "--no-progress",
               *overrides]
        self._run(cmd, run_dir / "eval.log", spec.name, "eval", echo=lambda line: "zeroshot:" in line)
        result = run_dir / "eval" / "final_zeroshot.json"
        if not result.is_file():
            raise CompareError(f"eval of {spec.name} finished but wrote no {result}")
        return json.loads(result.read_text())

    @staticmethod
    def _run(cmd: list[str], log_path: Path, name: str, what: str, echo: Callable[[str], bool]) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        with open(log_path, "w") as log_file:
            log_file.write("$ " + shlex.join(cmd) + "\n")
            log_file.flush()
            # its own process group: if we are stopped, the trainer and its loader workers go too, instead
            # of finishing (and checkpointing) into a run folder the next invocation is about to reuse
            process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=child_env(), cwd=str(REPO_ROOT), start_new_session=True)
            assert process.stdout is not None
            try:
                for line in process.stdout:
                    log_file.write(line)
                    lines.append(line.rstrip())
                    lines = lines[-40:]
                    if echo(line):
                        _log(f"  {name}: {line.strip()}")
                code = process.wait()
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
        if code != 0:
            tail = "\n".join(lines[-25:])
            raise CompareError(f"{what} of {name} failed with exit code {code}; log {log_path}; last lines:\n{tail}")


def run_one(spec: RunSpec, launcher: Launcher) -> RunResult:
    """Train (unless an identical finished run exists), evaluate (unless already scored), collect numbers."""
    from ds_linclip.config import load_config
    from ds_linclip.models.flops import model_cost

    run_dir = launcher.runs_dir / spec.name
    overrides = spec.train_overrides(launcher.data_dir, launcher.runs_dir)
    reused = _same_config(run_dir, overrides)
    train_seconds = None
    if reused:
        _log(f"{spec.name}: reusing the finished run in {run_dir}")
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        _log(f"{spec.name}: training {spec.budget.steps} steps x batch {spec.budget.batch_size} "
             f"({spec.tokens} image tokens)")
        train_seconds = launcher.train(spec)
        _log(f"{spec.name}: trained in {train_seconds:.0f} s")

    eval_json = run_dir / "eval" / "final_zeroshot.json"
    record = json.loads(eval_json.read_text()) if (reused and eval_json.is_file()) else None
    expected_samples = spec.budget.eval_samples
    if record is not None and (expected_samples and record.get("num_samples") != expected_samples
                               or not expected_samples and record.get("num_samples", 0) < 10000
                               or record.get("templates") != spec.budget.eval_templates):
        record = None  # scored under other eval settings
    if record is None:
        _log(f"{spec.name}: zero-shot eval")
        record = launcher.evaluate(spec)
    top1, top5 = float(record["metrics"]["top1"]), float(record["metrics"]["top5"])
    _log(f"{spec.name}: zero-shot top-1 {100 * top1:.2f}%, top-5 {100 * top5:.2f}% on {record['num_samples']} images")

    scalars = read_scalars(run_dir / "tensorboard")
    if "train/loss" not in scalars:
        raise CompareError(f"{run_dir / 'tensorboard'} has no train/loss scalars")
    loss_curve = scalars["train/loss"]
    peak = scalars.get("memory/peak_mb")
    cost = model_cost(load_config([], spec.model_overrides()).model)
    forward = cost.image.flops + cost.text.flops
    return RunResult(
        name=spec.name, kind=spec.kind, image_size=spec.image_size, width=spec.width, tokens=spec.tokens,
        steps=spec.budget.steps, batch_size=spec.budget.batch_size, params=cost.params,
        attention_flops_per_image=cost.image.attention_flops, image_flops_per_image=cost.image.flops,
        forward_flops_per_sample=forward,
        train_flops=3.0 * forward * spec.budget.steps * spec.budget.batch_size,
        final_loss=tail_mean_loss(loss_curve, spec.budget.steps), loss_curve=loss_curve,
        trainer_images_per_s=median_window_rate(scalars.get("perf/images_per_s", [])),
        peak_memory_mib=(max(v for _, v in peak) if peak else None) if launcher.mode == "subprocess" else None,
        top1=top1, top5=top5, eval_samples=int(record["num_samples"]),
        train_seconds=train_seconds, reused=reused,
    )


# ----------------------------------------------------------------------------- interleaved timing


def saved_activation_bytes(step: Callable[[], Any], params: Iterable[Any]) -> tuple[int, Any]:
    """Bytes of the distinct tensor storages autograd saves for backward while `step()` builds the
    graph, parameters (and views of them) excluded. Returns (bytes, step's result)."""
    import torch

    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = step()
    return sum(saved.values()), out


def contrastive_loss(image_features, text_features, logit_scale):
    """CLIP's symmetric cross-entropy over the batch (what ds_linclip.train.loss computes on one rank)."""
    import torch
    import torch.nn.functional as F

    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def interleaved_timing(specs: Sequence[RunSpec], rounds: int, batch_size: int, progress: bool = True) -> dict[str, dict]:
    """Median training-step images/s and activation memory per run spec, kinds alternating.

    Specs are grouped by (image size, width); inside a group every round times one step of each
    kind, the order rotated by one each round so no kind always runs first (or right after the
    most expensive one). One untimed warm-up step per kind measures the activation memory.
    """
    import torch
    from tqdm import tqdm

    from ds_linclip.config import load_config
    from ds_linclip.models import build_model

    groups: dict[tuple[int, int], list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.image_size, spec.width), []).append(spec)
    results: dict[str, dict] = {}
    bar = tqdm(total=sum(len(g) * (rounds + 1) for g in groups.values()), desc="interleaved timing",
               disable=not progress, leave=False)
    for (image_size, _width), group in groups.items():
        states = {}
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        context = group[0].budget.context_length
        tokens = torch.randint(1, 49000, (batch_size, context), generator=generator)
        tokens[:, -1] = 49407  # EOT (the max id) last: the text tower pools there
        for spec in group:
            torch.manual_seed(spec.budget.seed)
            model = build_model(load_config([], spec.model_overrides()).model)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            states[spec.name] = (model, optimizer)

        def step(name: str, measure: bool = False) -> int:
            model, optimizer = states[name]
            optimizer.zero_grad(set_to_none=True)
            forward = lambda: contrastive_loss(*model(images, tokens))  # noqa: E731
            if measure:
                activation_bytes, loss = saved_activation_bytes(forward, model.parameters())
            else:
                activation_bytes, loss = 0, forward()
            loss.backward()
            optimizer.step()
            return activation_bytes

        for spec in group:  # warm-up (allocator, one-time kernels) + activation memory
            results[spec.name] = {"activation_mib": step(spec.name, measure=True) / 2**20, "seconds": []}
            bar.update()
        names = [s.name for s in group]
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                step(name)
                results[name]["seconds"].append(time.perf_counter() - start)
                bar.update()
                bar.set_postfix_str(f"{image_size}px round {round_index + 1}/{rounds}")
        for name in names:
            seconds = results[name]["seconds"]
            results[name]["images_per_s"] = batch_size / statistics.median(seconds) if seconds else None
            results[name]["batch_size"] = batch_size
        del states
    bar.close()
    return results


def _attention_flops(spec: RunSpec) -> int:
    from ds_linclip.config import load_config
    from ds_linclip.models.flops import attention_flops_per_image

    return attention_flops_per_image(load_config([], spec.model_overrides()).model)


def sweep_rows(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Markdown rows of the timing sweep: per kind, img/s at each size and the ratio to softmax."""
    sizes = sorted({p["image_size"] for p in sweep["points"]})
    kinds = list(dict.fromkeys(p["kind"] for p in sweep["points"]))
    at = {(p["kind"], p["image_size"]): p for p in sweep["points"]}
    tokens = {p["image_size"]: p["tokens"] for p in sweep["points"]}
    header = ["kind"] + [f"{s} px / {tokens[s]} tok: img/s" for s in sizes]
    rows = []
    for kind in kinds:
        cells = [kind]
        for size in sizes:
            rate = at[(kind, size)]["images_per_s"]
            base = at.get(("softmax", size), {}).get("images_per_s")
            cells.append(f"{rate:.1f}" + (f" ({rate / base:.2f}x)" if base and kind != "softmax" else ""))
        rows.append(cells)
    return header, rows


def plot_sweep(sweep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(p["kind"] for p in sweep["points"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    base = {p["image_size"]: p["images_per_s"] for p in sweep["points"] if p["kind"] == "softmax"}
    for kind in kinds:
        points = sorted((p for p in sweep["points"] if p["kind"] == kind), key=lambda p: p["tokens"])
        tokens = [p["tokens"] for p in points]
        axes[0].plot(tokens, [p["images_per_s"] for p in points], marker="o", label=kind, color=COLORS.get(kind))
        if base:
            axes[1].plot(tokens, [p["images_per_s"] / base[p["image_size"]] for p in points], marker="o", label=kind,
                         color=COLORS.get(kind))
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"training images/s (batch {sweep['batch_size']}, median of {sweep['rounds']})")
    axes[1].axhline(1.0, color="gray", linewidth=1)
    axes[1].set_ylabel("speed relative to softmax (>1: faster)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("image tokens (patches + CLS)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Training step speed vs token count, kinds interleaved (nothing trained)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- scaling fit


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of log10(loss) = log10(a) - b * log10(compute): loss = a * C^-b."""
    import numpy as np

    x, y = np.log10(np.asarray(compute, float)), np.log10(np.asarray(loss, float))
    slope, intercept = np.polyfit(x, y, 1)
    predicted = slope * x + intercept
    ss_res = float(((y - predicted) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"exponent": float(-slope), "coefficient": float(10 ** intercept),
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"), "points": len(x)}


# ----------------------------------------------------------------------------- outputs


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


TABLE_COLUMNS = [
    "kind", "image px", "tokens", "zero-shot top-1 %", "top-5 %", "final loss",
    "img/s interleaved", "img/s trainer", "activation MiB", "peak RSS MiB",
    "attn MFLOPs/image", "attn % of image fwd", "train TFLOPs",
]


def table_rows(results: Sequence[RunResult], timing: dict[str, dict]) -> list[list[str]]:
    rows = []
    for r in results:
        t = timing.get(r.name, {})
        rows.append([
            r.kind, str(r.image_size), str(r.tokens), _fmt(100 * r.top1, ".2f"), _fmt(100 * r.top5, ".2f"),
            _fmt(r.final_loss, ".4f"), _fmt(t.get("images_per_s"), ".1f"), _fmt(r.trainer_images_per_s, ".1f"),
            _fmt(t.get("activation_mib"), ".1f"), _fmt(r.peak_memory_mib, ".0f"),
            _fmt(r.attention_flops_per_image / 1e6, ".2f"),
            _fmt(100 * r.attention_flops_per_image / r.image_flops_per_image, ".1f"),
            _fmt(r.train_flops / 1e12, ".4g"),
        ])
    return rows


def summary_markdown(command: str, budget: Budget, results: Sequence[RunResult], timing: dict[str, dict]) -> str:
    """The compact table for a README: accuracy, loss, measured speed (and vs softmax), memory, attention FLOPs."""
    softmax_rate = {r.image_size: timing.get(r.name, {}).get("images_per_s") for r in results if r.kind == "softmax"}
    rows = []
    for r in results:
        rate = timing.get(r.name, {}).get("images_per_s")
        base = softmax_rate.get(r.image_size)
        rows.append([
            r.kind, f"{r.image_size} ({r.tokens})", _fmt(100 * r.top1, ".1f"), _fmt(100 * r.top5, ".1f"),
            _fmt(r.final_loss, ".3f"), _fmt(rate, ".1f") + (f" ({rate / base:.2f}x)" if rate and base and r.kind != "softmax" else ""),
            _fmt(timing.get(r.name, {}).get("activation_mib"), ".0f"), _fmt(r.attention_flops_per_image / 1e6, ".2f"),
        ])
    header = ["attention (both towers)", "px (tokens)", "zero-shot top-1 %", "top-5 %", "final loss",
              "train img/s (vs softmax)", "activations MiB", "attn MFLOPs/img"]
    return "\n".join([f"`{command}`", "", f"{budget.steps} steps x batch {budget.batch_size}, seed {budget.seed}, "
                      f"width {budget.width}, {budget.layers} layers per tower, patch {budget.patch_size}.", "",
                      markdown_table(header, rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def parse_markdown_table(text: str, first_header: str = "kind") -> list[dict[str, str]]:
    """Rows of the first markdown table whose first header cell is `first_header`, as dicts."""
    lines = [line.strip() for line in text.splitlines()]
    for index, line in enumerate(lines):
        cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("|") else []
        if cells and cells[0] == first_header:
            rows = []
            for row_line in lines[index + 2:]:
                if not row_line.startswith("|"):
                    break
                rows.append(dict(zip(cells, [c.strip() for c in row_line.strip("|").split("|")])))
            return rows
    raise ValueError(f"no markdown table with first column '{first_header}'")


def plot_loss(results: Sequence[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r.image_size for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False, sharey=True)
    for ax, size in zip(axes[0], sizes):
        for r in (r for r in results if r.image_size == size):
            steps, losses = zip(*r.loss_curve)
            ax.plot(steps, losses, label=f"{r.kind} (top-1 {100 * r.top1:.1f}%)", color=COLORS.get(r.kind))
        ax.set_title(f"{size} px, {next(r.tokens for r in results if r.image_size == size)} image tokens")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss (contrastive, batch mean)")
    fig.suptitle("Fashion-MNIST CLIP: training loss vs step, same data/steps/seed/batch per kind")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_compute(results: Sequence[RunResult], timing: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = ["o", "s", "^", "D", "v"]
    sizes = sorted({r.image_size for r in results})
    kinds = list(dict.fromkeys(r.kind for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        marker = markers[sizes.index(r.image_size) % len(markers)]
        # the linear kinds have equal FLOPs: spread them by 2% per kind so none hides another
        spread = 1.0 + 0.02 * (kinds.index(r.kind) - (len(kinds) - 1) / 2)
        axes[0].scatter(r.train_flops * spread, 100 * r.top1, color=COLORS.get(r.kind), marker=marker, s=60)
        seconds = timing.get(r.name, {}).get("images_per_s")
        if seconds:
            axes[1].scatter(r.steps * r.batch_size / seconds, 100 * r.top1, color=COLORS.get(r.kind), marker=marker, s=60)
    for ax, label in ((axes[0], "training compute (FLOPs, 3 x forward x samples; equal values spread 2%)"),
                      (axes[1], "training time at the interleaved img/s (s, steps x batch / img/s)")):
        ax.set_xscale("log")
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("zero-shot top-1 % (Fashion-MNIST test)")
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=COLORS.get(k), marker="o", linestyle="", label=k) for k in kinds]
    handles += [plt.Line2D([], [], color="gray", marker=markers[i % len(markers)], linestyle="", label=f"{s} px")
                for i, s in enumerate(sizes)]
    axes[1].legend(handles=handles, fontsize=8)
    fig.suptitle("Zero-shot accuracy vs compute, analytic (left) and measured (right); same steps and batch per kind")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(results: Sequence[RunResult], timing: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sizes = sorted({r.image_size for r in results})
    kinds = list(dict.fromkeys(r.kind for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        by_size = {r.image_size: r for r in results if r.kind == kind}
        xs = np.arange(len(sizes)) + i * width
        rates = [timing.get(by_size[s].name, {}).get("images_per_s") or 0 if s in by_size else 0 for s in sizes]
        memory = [timing.get(by_size[s].name, {}).get("activation_mib") or 0 if s in by_size else 0 for s in sizes]
        axes[0].bar(xs, rates, width, label=kind, color=COLORS.get(kind))
        axes[1].bar(xs, memory, width, label=kind, color=COLORS.get(kind))
    for ax, label in ((axes[0], "training images/s (interleaved, median)"),
                      (axes[1], "activation memory saved for backward (MiB/step)")):
        ax.set_xticks(np.arange(len(sizes)) + width * (len(kinds) - 1) / 2)
        ax.set_xticklabels([f"{s} px ({next(r.tokens for r in results if r.image_size == s)} tokens)" for s in sizes])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle("Training step cost per kind, measured side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(results: Sequence[RunResult], fits: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for kind, fit in fits.items():
        runs = sorted((r for r in results if r.kind == kind), key=lambda r: r.train_flops)
        color = COLORS.get(kind)
        for r in runs:  # the whole curve against cumulative compute, thin
            per_step = r.train_flops / r.steps
            steps, losses = zip(*r.loss_curve)
            ax.plot(np.asarray(steps) * per_step, losses, color=color, alpha=0.25, linewidth=1)
        xs = np.array([r.train_flops for r in runs])
        ax.scatter(xs, [r.final_loss for r in runs], color=color, s=50, zorder=3)
        for r in runs:
            ax.annotate(f"w{r.width}", (r.train_flops, r.final_loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
        grid = np.geomspace(xs.min(), xs.max(), 50)
        ax.plot(grid, fit["coefficient"] * grid ** (-fit["exponent"]), color=color, linestyle="--",
                label=f"{kind}: L = {fit['coefficient']:.3g}·C^(-b), b = {fit['exponent']:.3f} (R² {fit['r2']:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final training loss L")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Loss vs compute over three widths (fixed steps and batch)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_note() -> dict[str, Any]:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available(),
            "load_average_1m": round(load[0], 2)}


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO_ROOT, timeout=10).stdout.strip()
        return (commit + ("+uncommitted changes" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_report(out: Path, command: str, budget: Budget, results: Sequence[RunResult], timing: dict[str, dict],
                 timing_info: dict[str, Any], scale_results: Sequence[RunResult], fits: dict[str, dict],
                 meta: dict[str, Any], sweep: dict[str, Any] | None = None) -> dict[str, Path]:
    """compare.md, compare.json and the PNGs into `out`; returns {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    for optional in ("compare_sweep.png", "scale_loss_vs_compute.png"):  # from an earlier invocation: not ours now
        (out / optional).unlink(missing_ok=True)
    paths = {"markdown": out / "compare.md", "json": out / "compare.json", "loss_png": out / "compare_loss.png",
             "accuracy_png": out / "compare_accuracy_vs_compute.png", "throughput_png": out / "compare_throughput.png"}
    plot_loss(results, paths["loss_png"])
    plot_accuracy_vs_compute(results, timing, paths["accuracy_png"])
    plot_throughput(results, timing, paths["throughput_png"])
    if sweep:
        paths["sweep_png"] = out / "compare_sweep.png"
        plot_sweep(sweep, paths["sweep_png"])
    if scale_results:
        paths["scale_png"] = out / "scale_loss_vs_compute.png"
        plot_scaling(scale_results, fits, paths["scale_png"])

    b = budget
    eval_note = f"first {b.eval_samples} of the 10,000 test images" if b.eval_samples else "all 10,000 test images"
    md = [
        "# Softmax vs linear attention CLIP on Fashion-MNIST (the paper's comparison in miniature)",
        "",
        f"Command: `{command}`  ",
        f"Date: {meta['date']}, commit {meta.get('commit') or '?'}; machine: {meta['machine']['cpus']} CPUs, "
        f"torch {meta['machine']['torch']} with {meta['machine']['torch_threads']} threads, "
        f"CUDA {'yes' if meta['machine']['cuda'] else 'no'}; 1-min load average {meta['machine']['load_average_1m']} "
        f"at start, {meta.get('load_average_end', '?')} at the end (the machine is shared).",
        "",
        f"Budget, the same for every kind: {b.steps} steps x batch {b.batch_size} (one process, DeepSpeed ZeRO-0, fp32), "
        f"seed {b.seed}, AdamW lr {b.lr:g} (warm-up {b.warmup_steps} steps, then cosine), weight decay {b.weight_decay:g}; "
        f"both towers {b.layers} layers, width {b.width}, head dim {HEAD_DIM}; patch {b.patch_size}, "
        f"text context {b.context_length}. Both towers use the row's attention kind "
        "(`linear-affine-kernel` = linear-affine with `denominator=kernel`). Zero-shot: our eval job, "
        f"{eval_note}, templates `{b.eval_templates}`.",
        "",
        markdown_table(TABLE_COLUMNS, table_rows(results, timing)),
        "",
        "How each column was measured:",
        "",
        "- **zero-shot top-1/top-5**: `python -m ds_linclip.eval --checkpoint R/final` (R/eval/final_zeroshot.json).",
        f"- **final loss**: the trainer's `train/loss` averaged over the last {max(1, b.steps // 10)} steps (its logged "
        f"windows of {b.log_every} steps there), read from R/tensorboard with TensorBoard's EventAccumulator.",
        f"- **img/s interleaved**: one process, {timing_info.get('rounds', 0)} rounds; in each round one training step "
        "(forward, contrastive loss, backward, AdamW) of every kind at that image size, on a batch of "
        f"{timing_info.get('batch_size', '?')} inputs of the training shape, kinds alternating with the order rotated "
        "each round; median over rounds. Kinds share the machine's noise alike, so compare these across a row group.",
        "- **img/s trainer**: the trainer's own `perf/images_per_s` (median of its logged windows, the first left out); "
        "runs happen one after another, so load from other work on the machine can favour one run over another.",
        "- **activation MiB**: bytes of the tensors autograd saved for backward in one training step "
        "(distinct storages, parameters excluded), from the interleaved pass. On CPU, softmax runs "
        "PyTorch's fused scaled-dot-product attention, which does not keep the N x N matrix.",
        "- **peak RSS MiB**: the trainer's `memory/peak_mb` (process peak RSS on CPU: mostly torch + DeepSpeed); "
        "`-` when runs were trained in-process.",
        "- **attn MFLOPs/image**: image-tower token-mixing FLOPs per image (`ds_linclip.models.flops`): softmax "
        "4·N²·width per layer, linear 4·N·head_dim·width; **attn %**: of the image tower's forward FLOPs.",
        "- **train TFLOPs**: 3 x forward FLOPs (image + caption) x samples seen.",
    ]
    if sweep:
        header, rows = sweep_rows(sweep)
        md += [
            "",
            "## Where linear attention overtakes softmax: timing sweep over token counts",
            "",
            f"Nothing trained: the same interleaved training-step timing (batch {sweep['batch_size']}, "
            f"{sweep['rounds']} rounds, median) at more image sizes; in brackets the speed relative to softmax.",
            "",
            markdown_table(header, rows),
        ]
    if scale_results:
        md += [
            "",
            "## Scaling in miniature: loss vs training compute over three widths",
            "",
            f"Same budget, image size {scale_results[0].image_size} px, widths "
            f"{', '.join(str(w) for w in sorted({r.width for r in scale_results}))} (heads = width/{HEAD_DIM}, "
            "embed dim = width). Fit: final loss L = a·C^-b over the widths (least squares in log-log).",
            "",
            markdown_table(["kind", "width", "params (M)", "train TFLOPs", "final loss", "zero-shot top-1 %"],
                           [[r.kind, str(r.width), _fmt(r.params / 1e6, ".2f"), _fmt(r.train_flops / 1e12, ".4g"),
                             _fmt(r.final_loss, ".4f"), _fmt(100 * r.top1, ".2f")] for r in scale_results]),
            "",
            markdown_table(["fit", "exponent b", "coefficient a", "R²", "points"],
                           [[k, _fmt(f["exponent"], ".4f"), _fmt(f["coefficient"], ".4g"), _fmt(f["r2"], ".3f"),
                             str(f["points"])] for k, f in fits.items()]),
        ]
    md += ["", "Plots: " + ", ".join(f"`{p.name}`" for k, p in paths.items() if k.endswith("png")), ""]
    paths["summary"] = out / "compare_summary.md"
    paths["summary"].write_text(summary_markdown(command, budget, results, timing) + "\n")
    paths["markdown"].write_text("\n".join(md))
    payload = {
        "command": command, **meta, "budget": asdict(budget),
        "timing": {"info": timing_info, "per_run": timing},
        "runs": [asdict(r) for r in results],
        "sweep": sweep or {},
        "scale": {"runs": [asdict(r) for r in scale_results], "fits": fits},
    }
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n")
    return paths


# ----------------------------------------------------------------------------- CLI


QUICK = {"steps": 4, "batch_size": 8, "width": 32, "layers": 1, "image_sizes": [12, 24], "eval_samples": 200,
         "eval_templates": "simple", "eval_batch_size": 100, "timing_rounds": 2, "sweep_sizes": [12, 24],
         "sweep_batch": 4, "scale_widths": [32, 64, 96]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.experiments.compare",
        description=(
            "Train softmax and linear-attention CLIPs on Fashion-MNIST under the same budget (same shards, steps, "
            "batch, seed, schedule) with ds_linclip's trainer, score each with the eval job (zero-shot top-1/top-5 "
            "on the test split) and report per kind and image size: final loss, training images/s (the trainer's, "
            "and an interleaved side-by-side timing pass), activation and peak memory, attention FLOPs per image. "
            "Writes a markdown table, a JSON file and PNG plots to --out."
        ),
        epilog=(
            "examples:\n"
            "  python -m ds_linclip.experiments.compare --steps 200 --image-sizes 28 56\n"
            "  python -m ds_linclip.experiments.compare --scale --scale-widths 64 128 192\n"
            "  python -m ds_linclip.experiments.compare --quick --out /tmp/compare   # seconds-scale smoke run\n"
            "Finished runs in --runs-dir with the same resolved config are reused (delete the folder to retrain)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), choices=list(KINDS), metavar="KIND",
                        help=f"attention kinds (both towers); choices: {', '.join(KINDS)} "
                             "(linear-affine-kernel = linear-affine with denominator=kernel). Default: %(default)s")
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[28, 56], metavar="PX",
                        help="image sizes in pixels, multiples of the patch size (default: %(default)s -> 49 and 196 "
                             "patches with patch 4; the data pipeline resizes the 28 px images)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch per step (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (weights and data order) for every run")
    parser.add_argument("--lr", type=float, default=2.0e-3, help="peak learning rate (default %(default)s)")
    parser.add_argument("--width", type=int, default=128, help="tower width (default %(default)s; heads = width/32)")
    parser.add_argument("--layers", type=int, default=4, help="layers per tower (default %(default)s)")
    parser.add_argument("--context-length", type=int, default=16,
                        help="text context (default %(default)s: every caption and prompt here is at most 14 tokens)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="score only the first N test images (default: all 10,000)")
    parser.add_argument("--eval-templates", default="openai",
                        help="zero-shot prompt templates: openai | simple | a file (default %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=500, help="eval batch (default %(default)s)")
    parser.add_argument("--timing-rounds", type=int, default=5,
                        help="rounds of the interleaved timing pass (0 = skip it; default %(default)s)")
    parser.add_argument("--timing-batch", type=int, default=None,
                        help="batch of the interleaved timing pass (default: --batch-size)")
    parser.add_argument("--sweep-sizes", nargs="*", type=int, default=[28, 56, 84, 112], metavar="PX",
                        help="image sizes of an extra interleaved timing sweep (nothing trained): every kind at every "
                             "size on the same batch (--sweep-batch), to show where linear attention overtakes softmax "
                             "as the token count grows (default: %(default)s; none = skip)")
    parser.add_argument("--sweep-batch", type=int, default=16, help="batch of the timing sweep (default %(default)s)")
    parser.add_argument("--scale", action="store_true",
                        help="also train softmax and linear-affine at three widths (--scale-widths) on the first image "
                             "size and fit final loss against training compute (a power law per kind)")
    parser.add_argument("--scale-widths", nargs=3, type=int, default=[64, 128, 192], metavar="W",
                        help="widths for --scale (default: %(default)s)")
    parser.add_argument("--scale-kinds", nargs="+", default=list(SCALE_KINDS), choices=list(KINDS), metavar="KIND",
                        help="kinds for --scale (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("data/fmnist"),
                        help="Fashion-MNIST shard folder (train/, test/, classnames.txt); written if missing "
                             "(default: %(default)s)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/compare"),
                        help="where the training runs go (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"),
                        help="where compare.md, compare.json and the PNGs go (default: %(default)s)")
    parser.add_argument("--launcher", choices=("subprocess", "inprocess"), default=None,
                        help="run the trainer/eval as `python -m` subprocesses (default; per-run peak memory) or "
                             "in this process (faster start-up; the default with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny everything for tests: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                             + " (explicit options still win)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op CPU threads of every process (trainer, eval, timing; default %(default)s): on a "
                             "shared machine OpenMP threads that wait for each other under load make a step many times "
                             "slower (measured here: 2 threads 10x slower than 1 at load 8 on 2 cores); 0 = torch's default")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _terminate_on_sigterm() -> None:
    """SIGTERM -> KeyboardInterrupt-like exit, so a running trainer subprocess group is killed too."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _explicit(argv: Sequence[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _terminate_on_sigterm()
    if args.quick:
        for key, value in QUICK.items():
            if not _explicit(argv, "--" + key.replace("_", "-")):
                setattr(args, key, value)
    launcher_mode = args.launcher or ("inprocess" if args.quick else "subprocess")
    for size in args.image_sizes:
        if size % 4:
            print(f"error: --image-sizes {size} is not a multiple of the patch size 4", file=sys.stderr)
            return 2
    for width in [args.width] + (args.scale_widths if args.scale else []):
        if width % HEAD_DIM and width >= HEAD_DIM:
            print(f"error: width {width} is not a multiple of the head dim {HEAD_DIM}", file=sys.stderr)
            return 2
    if args.steps < 1 or args.batch_size < 1:
        print("error: --steps and --batch-size must be positive", file=sys.stderr)
        return 2

    import torch
    from tqdm import tqdm

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported (in-process runs)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    budget = Budget(steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr, layers=args.layers,
                    context_length=args.context_length,
                    width=args.width, eval_samples=args.eval_samples, eval_templates=args.eval_templates,
                    eval_batch_size=args.eval_batch_size)
    command = "python -m ds_linclip.experiments.compare " + shlex.join(argv)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "machine": machine_note(), "launcher": launcher_mode}
    data_dir = ensure_shards(args.data)
    runs_dir = args.runs_dir.expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(launcher_mode, runs_dir, data_dir)

    specs = [RunSpec(kind, size, args.width, budget) for size in args.image_sizes for kind in args.kinds]
    scale_specs: list[RunSpec] = []
    if args.scale:
        scale_budget = budget
        scale_specs = [RunSpec(kind, args.image_sizes[0], width, scale_budget)
                       for width in args.scale_widths for kind in args.scale_kinds]
    all_specs = specs + [s for s in scale_specs if s not in specs]
    _log(f"{len(all_specs)} runs ({len(specs)} comparison + {len(all_specs) - len(specs)} scaling), "
         f"{budget.steps} steps x batch {budget.batch_size} each; runs in {runs_dir}, results to {args.out}")

    done: dict[RunSpec, RunResult] = {}
    start = time.perf_counter()
    # the comparison's runs first, timed and reported; the scaling runs after, then the report again
    # with them: a long --scale never holds back the comparison's results
    bar = tqdm(total=len(all_specs), desc="runs", unit="run", disable=args.no_progress)
    for spec in specs:
        bar.set_postfix_str(spec.name)
        done[spec] = run_one(spec, launcher)
        bar.update()

    timing: dict[str, dict] = {}
    timing_batch = args.timing_batch or args.batch_size
    if args.timing_rounds > 0:
        _log(f"interleaved timing pass: {args.timing_rounds} rounds x {len(args.kinds)} kinds x "
             f"{len(args.image_sizes)} sizes, batch {timing_batch}")
        timing = interleaved_timing(specs, args.timing_rounds, timing_batch, progress=not args.no_progress)
        for spec in specs:
            t = timing[spec.name]
            _log(f"  {spec.name}: {t['images_per_s']:.1f} img/s (median of {len(t['seconds'])}), "
                 f"activations {t['activation_mib']:.1f} MiB")
    timing_info = {"rounds": args.timing_rounds, "batch_size": timing_batch,
                   "torch_threads": torch.get_num_threads()}
    sweep: dict[str, Any] = {}
    if args.sweep_sizes and args.timing_rounds > 0:
        sweep_specs = [RunSpec(kind, size, args.width, budget) for size in args.sweep_sizes for kind in args.kinds]
        _log(f"timing sweep: sizes {args.sweep_sizes} px, batch {args.sweep_batch}, {args.timing_rounds} rounds")
        per_run = interleaved_timing(sweep_specs, args.timing_rounds, args.sweep_batch, progress=not args.no_progress)
        sweep = {"batch_size": args.sweep_batch, "rounds": args.timing_rounds, "points": [
            {"kind": spec.kind, "image_size": spec.image_size, "tokens": spec.tokens,
             "images_per_s": per_run[spec.name]["images_per_s"], "activation_mib": per_run[spec.name]["activation_mib"],
             "attention_flops_per_image": _attention_flops(spec)} for spec in sweep_specs]}
        for size in args.sweep_sizes:
            points = {p["kind"]: p for p in sweep["points"] if p["image_size"] == size}
            _log(f"  {size} px ({points[args.kinds[0]]['tokens']} tokens): " + ", ".join(
                f"{k} {p['images_per_s']:.1f} img/s" for k, p in points.items()))

    results = [done[s] for s in specs]

    def report(scale_results: list[RunResult], fits: dict[str, dict]) -> None:
        meta["load_average_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        meta["wall_seconds"] = round(time.perf_counter() - start, 1)
        paths = write_report(args.out, command, budget, results, timing, timing_info, scale_results, fits, meta, sweep)
        _log("wrote " + ", ".join(str(p) for p in paths.values()) + f" ({meta['wall_seconds']:.0f} s)")

    report([], {})
    print(markdown_table(TABLE_COLUMNS, table_rows(results, timing)))
    if not scale_specs:
        bar.close()
        return 0
    for spec in scale_specs:
        bar.set_postfix_str(spec.name)
        if spec not in done:
            done[spec] = run_one(spec, launcher)
            bar.update()
    bar.close()
    fits: dict[str, dict] = {}
    scale_results = [done[s] for s in scale_specs]
    if scale_specs:
        for kind in args.scale_kinds:
            points = [r for r in scale_results if r.kind == kind]
            fits[kind] = fit_power_law([r.train_flops for r in points], [r.final_loss for r in points])
            _log(f"scaling fit {kind}: loss = a * C^(-b), b = {fits[kind]['exponent']:.4f}, "
                 f"a = {fits[kind]['coefficient']:.4g} (R² {fits[kind]['r2']:.3f})")

    report(scale_results, fits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
