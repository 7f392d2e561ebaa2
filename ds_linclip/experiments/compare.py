"""The paper's comparison in miniature: softmax vs linear attention CLIPs on Fashion-MNIST.

    python -m ds_linclip.experiments.compare                 # 4 kinds x 2 image sizes
    python -m ds_linclip.experiments.compare --scale         # + 3 widths, loss-vs-compute fits
    python -m ds_linclip.experiments.compare --quick --out /tmp/cmp   # tiny, for tests

Every run uses OUR trainer (`python -m ds_linclip.train`, one process, DeepSpeed, fp32 on CPU) and
OUR eval job (`python -m ds_linclip.eval --checkpoint R/final`, zero-shot top-1/top-5 on the
Fashion-MNIST test split) under the same budget: same shards, steps, batch, seed, learning-rate
schedule; only the attention variant (both towers, or `<image>+text-<text>`) and, with --scale,
the width change.

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
import functools
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ds_linclip.models.attention import (DEFAULT_FOCUSED_POWER, NAME_GRAMMAR, AttentionSpec, AttentionSpecError,
                                         parse_attention_name)

REPO_ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- attention variants
# A variant name is the row label and the run folder's prefix; parse_variant turns it into the trainer
# overrides of both towers; the grammar is the models' one (ds_linclip/models/attention.py).

TEXT_SEPARATOR = "+text-"  # `<image name>+text-<text name>`: a text tower that differs from the image one
VARIANT_GRAMMAR = (f"{NAME_GRAMMAR} for both towers, or <image name>{TEXT_SEPARATOR}<text name> (e.g. linear-affine, "
                   f"linear-affine-kernel, linear-focused-local3, linear-focused-local3{TEXT_SEPARATOR}softmax)")
BEST = "best"  # in --long-kinds/--scale-kinds/--sweep-kinds: the best linear variant of the comparison

DEFAULT_KINDS = ("softmax", "linear-affine", "linear-focused", "linear-focused-local3", "linear-affine-local3")
SCALE_KINDS = ("softmax", "linear-affine", BEST)
LONG_KINDS = ("softmax", "linear-affine", BEST)
HEAD_DIM = 32  # heads = width / 32 at every width, so only the width changes with --scale
COLORS = {"softmax": "tab:blue", "linear-affine": "tab:orange", "linear-affine-kernel": "tab:green",
          "linear-elu": "tab:red", "linear-relu": "tab:purple", "linear-focused": "tab:brown",
          "linear-focused-local3": "tab:pink", "linear-affine-local3": "tab:olive", "linear-focused-local5": "tab:cyan",
          "linear-affine-local5": "tab:gray"}
_EXTRA_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")


def color(kind: str) -> str:
    return COLORS.get(kind) or _EXTRA_COLORS[sum(map(ord, kind)) % len(_EXTRA_COLORS)]


class VariantError(ValueError):
    """A variant name outside the grammar; the message names it and gives the grammar."""


@dataclass(frozen=True)
class Variant:
    """One attention variant: the image and the text tower's AttentionSpec. A plain name gives both towers
    the same map and normaliser (the local branch goes to the image tower only: the text tower never gets
    one); `<image>+text-<text>` sets the text tower apart (e.g. linear image, softmax text)."""

    name: str
    image: AttentionSpec
    text: AttentionSpec

    @property
    def linear(self) -> bool:
        """Both towers linear: an O(N) model (what `best` is picked from)."""
        return self.image.linear is not None and self.text.linear is not None

    def overrides(self) -> list[str]:
        """Both towers' keys (`AttentionSpec.config_overrides`), the image's local branch last."""
        keys = {**replace(self.image, local_kernel=0).config_overrides("image"), **self.text.config_overrides("text"),
                **self.image.config_overrides("image")}
        return [f"{key}={value}" for key, value in keys.items()]


def _tower_spec(variant: str, name: str, causal: bool) -> AttentionSpec:
    try:
        spec = parse_attention_name(name, causal)
    except AttentionSpecError as err:
        raise VariantError(f"attention variant '{variant}': {err}; variants are {VARIANT_GRAMMAR}") from None
    if spec.linear is None and spec.local_kernel:
        raise VariantError(f"attention variant '{variant}': softmax takes no local branch; variants are {VARIANT_GRAMMAR}")
    if spec.linear is not None and spec.linear.power != DEFAULT_FOCUSED_POWER:
        raise VariantError(f"attention variant '{variant}': the comparison runs the default focused power only")
    return spec


@functools.lru_cache(maxsize=None)  # a pure function of the name, asked for several times per run
def parse_variant(name: str) -> Variant:
    """A variant name (VARIANT_GRAMMAR: the models' one grammar, `parse_attention_name`, optionally
    `+text-<name>` for the text tower) -> Variant.

    The overrides name the shorthand and the normaliser explicitly (not `attention=linear` +
    `feature_map`), so a run's resolved config says what it ran and earlier finished runs still match.
    """
    image_name, sep, text_name = name.partition(TEXT_SEPARATOR)
    image = _tower_spec(name, image_name, causal=False)
    if not sep:
        return Variant(name, image, replace(image, local_kernel=0))
    if TEXT_SEPARATOR in text_name:
        raise VariantError(f"attention variant '{name}': one '{TEXT_SEPARATOR}' at most; variants are {VARIANT_GRAMMAR}")
    text = _tower_spec(name, text_name, causal=True)  # refuses a local branch: the text tower is causal
    if text == replace(image, local_kernel=0):
        raise VariantError(f"attention variant '{name}': the text tower is the image tower's; write '{image_name}'")
    return Variant(name, image, text)


def variant_argument(name: str) -> str:
    """argparse type of a variant name (`best` is accepted where the option's help says so)."""
    if name == BEST:
        return name
    try:
        parse_variant(name)
    except VariantError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name


class CompareError(RuntimeError):
    """A run that failed or an input that cannot be used; the message names it."""


class MissingRun(CompareError):
    """--no-train and the run has not finished (with this config) in an earlier sitting."""


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


def shape_name(kind: str, image_size: int, width: int) -> str:
    """A variant at one shape: the timing pass's key and the run folder's prefix."""
    return f"{kind}-{image_size}px-w{width}"


@dataclass(frozen=True)
class RunSpec:
    kind: str
    image_size: int
    width: int
    budget: Budget

    @property
    def shape_name(self) -> str:
        """Variant and shapes only: what the interleaved timing pass measures (seed and steps do not matter)."""
        return shape_name(self.kind, self.image_size, self.width)

    @property
    def name(self) -> str:
        """The run folder: everything that makes a run differ, seed and steps included."""
        return f"{self.shape_name}-{self.budget.steps}steps-seed{self.budget.seed}"

    @property
    def tokens(self) -> int:
        return (self.image_size // self.budget.patch_size) ** 2 + 1

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

# trainer/eval subprocess groups in flight (--jobs runs them from threads): killed when we are stopped
_LIVE: set[int] = set()
_LIVE_LOCK = threading.Lock()


def kill_live_processes() -> None:
    with _LIVE_LOCK:
        groups = list(_LIVE)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


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
            with _LIVE_LOCK:
                _LIVE.add(process.pid)
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
            finally:
                with _LIVE_LOCK:
                    _LIVE.discard(process.pid)
        if code != 0:
            tail = "\n".join(lines[-25:])
            raise CompareError(f"{what} of {name} failed with exit code {code}; log {log_path}; last lines:\n{tail}")


def run_one(spec: RunSpec, launcher: Launcher, train: bool = True) -> RunResult:
    """Train (unless an identical finished run exists), evaluate (unless already scored), collect numbers.
    train=False: a run not finished with this resolved config raises MissingRun instead of training."""
    from ds_linclip.config import load_config
    from ds_linclip.models.flops import model_cost

    run_dir = launcher.runs_dir / spec.name
    overrides = spec.train_overrides(launcher.data_dir, launcher.runs_dir)
    reused = _same_config(run_dir, overrides)
    train_seconds = None
    if reused:
        _log(f"{spec.name}: reusing the finished run in {run_dir}")
    elif not train:
        raise MissingRun(f"{spec.name}: no finished run with this config in {run_dir} (--no-train)")
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
        steps=spec.budget.steps, seed=spec.budget.seed, batch_size=spec.budget.batch_size, params=cost.params,
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
    """Median training-step images/s and activation memory per run spec (keyed by its shape_name:
    seed and steps do not change a step's cost), kinds alternating.

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
            states[spec.shape_name] = (model, optimizer)

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
            results[spec.shape_name] = {"activation_mib": step(spec.shape_name, measure=True) / 2**20, "seconds": []}
            bar.update()
        names = [s.shape_name for s in group]
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
        axes[0].plot(tokens, [p["images_per_s"] for p in points], marker="o", label=kind, color=color(kind))
        if base:
            axes[1].plot(tokens, [p["images_per_s"] / base[p["image_size"]] for p in points], marker="o", label=kind,
                         color=color(kind))
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


# ----------------------------------------------------------------------------- seeds: rows of mean ± std


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (n - 1 in the denominator; None below 2 values) and count."""

    mean: float | None
    std: float | None
    n: int

    def cell(self, spec: str = ".2f", scale: float = 1.0) -> str:
        """'mean ± std (n)'; 'mean (1)' for one value; '-' for none."""
        if not self.n or self.mean is None:
            return "-"
        text = format(scale * self.mean, spec)
        if self.std is not None:
            text += " ± " + format(scale * self.std, spec)
        return f"{text} ({self.n})"


def mean_std(values: Iterable[float | None]) -> Stat:
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else None, len(kept))


@dataclass
class Row:
    """One table row: a variant at one image size, width and step count, over the seeds that finished."""

    kind: str
    image_size: int
    tokens: int
    width: int
    steps: int
    seeds_asked: list[int]
    runs: list[RunResult]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def shape_name(self) -> str:
        return shape_name(self.kind, self.image_size, self.width)

    def stat(self, field_name: str) -> Stat:
        return mean_std(getattr(r, field_name) for r in self.runs)

    def first(self, field_name: str) -> Any:
        return getattr(self.runs[0], field_name) if self.runs else None

    def seeds_cell(self) -> str:
        text = ",".join(map(str, self.seeds)) or "none"
        return text + (f" ({self.n} of {len(self.seeds_asked)})" if self.n < len(self.seeds_asked) else "")

    def summary(self) -> dict[str, Any]:
        out = {"kind": self.kind, "image_size": self.image_size, "tokens": self.tokens, "width": self.width,
               "steps": self.steps, "seeds_asked": self.seeds_asked, "seeds": self.seeds, "n": self.n}
        for name in ("top1", "top5", "final_loss", "trainer_images_per_s"):
            out[name] = asdict(self.stat(name))
        return out


def aggregate(specs: Sequence[RunSpec], done: dict[RunSpec, RunResult]) -> list[Row]:
    """Rows in the order of `specs`, one per (variant, image size, width, steps); each holds the runs of
    its seeds that are in `done` (a row whose seeds have not all finished has n < len(seeds_asked))."""
    rows: dict[tuple[str, int, int, int], Row] = {}
    for spec in specs:
        key = (spec.kind, spec.image_size, spec.width, spec.budget.steps)
        if key not in rows:
            rows[key] = Row(spec.kind, spec.image_size, spec.tokens, spec.width, spec.budget.steps, [], [])
        row = rows[key]
        if spec.budget.seed not in row.seeds_asked:
            row.seeds_asked.append(spec.budget.seed)
            if spec in done:
                row.runs.append(done[spec])
    return list(rows.values())


def pick_best(rows: Sequence[Row], steps: int) -> str | None:
    """The linear variant (both towers linear: an O(N) model) with the highest zero-shot top-1, averaged
    over the image sizes of the `steps`-step rows (each size's mean over seeds); only variants with runs at
    every size count."""
    sizes = {r.image_size for r in rows if r.steps == steps}
    scores: dict[str, list[float]] = {}
    for row in rows:
        if row.steps == steps and parse_variant(row.kind).linear and row.n:
            scores.setdefault(row.kind, []).append(row.stat("top1").mean)
    complete = {k: sum(v) / len(v) for k, v in scores.items() if len(v) == len(sizes)}
    return max(complete, key=complete.get) if complete else None


def _row(rows: Sequence[Row], kind: str, size: int, steps: int) -> Row | None:
    return next((r for r in rows if (r.kind, r.image_size, r.steps) == (kind, size, steps) and r.n), None)


def target_checks(rows: Sequence[Row], best: str | None, base_steps: int, long_steps: int | None,
                  fits: dict[str, dict], sweep: dict[str, Any], timing: dict[str, dict]) -> list[dict[str, Any]]:
    """Issue 11's targets for the best variant against softmax, each with the measured value and whether it is met:
    zero-shot top-1 no worse than softmax - 0.5 points (every size at the base steps, the long rows), loss-vs-compute
    exponent >= 0.9x softmax's, interleaved training images/s >= 1.0x at 197 tokens and >= 1.5x at 785 tokens."""
    if not best:
        return []
    checks = []
    sizes = sorted({r.image_size for r in rows})
    for steps in [base_steps] + ([long_steps] if long_steps and long_steps != base_steps else []):
        for size in sizes:
            ours, theirs = _row(rows, best, size, steps), _row(rows, "softmax", size, steps)
            if not ours or not theirs:
                continue
            delta = 100 * (ours.stat("top1").mean - theirs.stat("top1").mean)
            checks.append({
                "target": f"zero-shot top-1 at {ours.tokens} tokens, {steps} steps: {best} >= softmax - 0.5 points",
                "measured": f"{ours.stat('top1').cell(scale=100)} vs {theirs.stat('top1').cell(scale=100)}: "
                            f"{delta:+.2f} points", "value": delta, "threshold": -0.5, "met": delta >= -0.5,
                "n": [ours.n, theirs.n]})
    if best in fits and "softmax" in fits and fits["softmax"]["exponent"]:
        ratio = fits[best]["exponent"] / fits["softmax"]["exponent"]
        checks.append({"target": f"loss-vs-compute exponent over three widths: {best} >= 0.9x softmax",
                       "measured": f"{fits[best]['exponent']:.4f} vs {fits['softmax']['exponent']:.4f}: {ratio:.2f}x",
                       "value": ratio, "threshold": 0.9, "met": ratio >= 0.9})

    def speed(label: str, rate: float | None, base: float | None, threshold: float) -> None:
        if rate and base:
            checks.append({"target": f"training images/s, {label}: {best} >= {threshold:.1f}x softmax",
                           "measured": f"{rate:.1f} vs {base:.1f} img/s: {rate / base:.2f}x", "value": rate / base,
                           "threshold": threshold, "met": rate / base >= threshold})

    for row in rows:
        if row.kind == best and row.tokens == 197 and row.steps == base_steps:
            soft = timing.get(shape_name("softmax", row.image_size, row.width), {})
            speed(f"197 tokens (interleaved pass, batch {soft.get('batch_size', '?')})",
                  timing.get(row.shape_name, {}).get("images_per_s"), soft.get("images_per_s"), 1.0)
    points = {(p["kind"], p["tokens"]): p["images_per_s"] for p in (sweep or {}).get("points", [])}
    for tokens, threshold in ((197, 1.0), (785, 1.5)):
        speed(f"{tokens} tokens (timing sweep, batch {sweep.get('batch_size') if sweep else '?'})",
              points.get((best, tokens)), points.get(("softmax", tokens)), threshold)
    return checks


def targets_markdown(checks: Sequence[dict[str, Any]]) -> str:
    return markdown_table(["target", "measured (mean ± std (n))", "met"],
                          [[c["target"], c["measured"], "yes" if c["met"] else
                            f"no, by {abs(c['value'] - c['threshold']):.2f}" + (" points" if "top-1" in c["target"] else "x")]
                           for c in checks])


# ----------------------------------------------------------------------------- outputs


TABLE_COLUMNS = [
    "kind", "image px", "tokens", "steps", "seeds", "zero-shot top-1 %", "top-5 %", "final loss",
    "img/s interleaved", "img/s trainer", "activation MiB", "peak RSS MiB",
    "attn MFLOPs/image", "attn % of image fwd", "train TFLOPs",
]


def table_rows(rows: Sequence[Row], timing: dict[str, dict]) -> list[list[str]]:
    out = []
    for r in rows:
        t = timing.get(r.shape_name, {})
        attention, image = r.first("attention_flops_per_image"), r.first("image_flops_per_image")
        peak = [x.peak_memory_mib for x in r.runs if x.peak_memory_mib is not None]
        out.append([
            r.kind, str(r.image_size), str(r.tokens), str(r.steps), r.seeds_cell(),
            r.stat("top1").cell(".2f", 100), r.stat("top5").cell(".2f", 100), r.stat("final_loss").cell(".4f"),
            _fmt(t.get("images_per_s"), ".1f"), _fmt(r.stat("trainer_images_per_s").mean, ".1f"),
            _fmt(t.get("activation_mib"), ".1f"), _fmt(max(peak) if peak else None, ".0f"),
            _fmt(attention / 1e6 if attention else None, ".2f"),
            _fmt(100 * attention / image if attention and image else None, ".1f"),
            _fmt(r.first("train_flops") / 1e12 if r.runs else None, ".4g"),
        ])
    return out


SUMMARY_HEADER = ["attention (image[+text])", "px (tokens)", "steps", "zero-shot top-1 %", "top-5 %", "final loss",
                  "train img/s (vs softmax)", "activations MiB", "attn MFLOPs/img"]


def summary_markdown(command: str, budget: Budget, rows: Sequence[Row], timing: dict[str, dict]) -> str:
    """The compact table for a README: accuracy and loss (mean ± std (n) over seeds), measured speed
    (and vs softmax), memory, attention FLOPs."""
    out = []
    for r in rows:
        t = timing.get(r.shape_name, {})
        rate, base = t.get("images_per_s"), timing.get(shape_name("softmax", r.image_size, r.width), {}).get("images_per_s")
        attention = r.first("attention_flops_per_image")
        out.append([
            r.kind, f"{r.image_size} ({r.tokens})", str(r.steps), r.stat("top1").cell(".1f", 100),
            r.stat("top5").cell(".1f", 100), r.stat("final_loss").cell(".3f"),
            _fmt(rate, ".1f") + (f" ({rate / base:.2f}x)" if rate and base and r.kind != "softmax" else ""),
            _fmt(t.get("activation_mib"), ".0f"), _fmt(attention / 1e6 if attention else None, ".2f"),
        ])
    return "\n".join([f"`{command}`", "", f"batch {budget.batch_size}, width {budget.width}, {budget.layers} layers per "
                      f"tower, patch {budget.patch_size}; cells: mean ± std (n seeds).", "",
                      markdown_table(SUMMARY_HEADER, out)])


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


def _panels(rows: Sequence[Row]) -> list[tuple[int, int]]:
    return sorted({(r.image_size, r.steps) for r in rows if r.n}, key=lambda k: (k[1], k[0]))


def plot_loss(rows: Sequence[Row], path: Path) -> None:
    """Loss vs step per (image size, steps): the mean over seeds, shaded between the lowest and highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False, sharey=True)
    for ax, (size, steps) in zip(axes[0], panels):
        for r in (r for r in rows if (r.image_size, r.steps) == (size, steps) and r.n):
            common = sorted(set.intersection(*(set(s for s, _ in run.loss_curve) for run in r.runs)))
            curves = np.array([[dict(run.loss_curve)[s] for s in common] for run in r.runs])
            top1 = r.stat("top1")
            ax.plot(common, curves.mean(axis=0), color=color(r.kind),
                    label=f"{r.kind} (top-1 {top1.cell('.1f', 100)})")
            if r.n > 1:
                ax.fill_between(common, curves.min(axis=0), curves.max(axis=0), color=color(r.kind), alpha=0.15)
        tokens = next(r.tokens for r in rows if r.image_size == size)
        ax.set_title(f"{size} px ({tokens} image tokens), {steps} steps")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (mean over seeds; band: min-max)")
    fig.suptitle("Fashion-MNIST CLIP: training loss vs step, same data/steps/seeds/batch per variant")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_compute(rows: Sequence[Row], timing: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = ["o", "s", "^", "D", "v", "P", "X"]
    panels = _panels(rows)
    kinds = list(dict.fromkeys(r.kind for r in rows if r.n))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in (r for r in rows if r.n):
        marker = markers[panels.index((r.image_size, r.steps)) % len(markers)]
        # the linear variants have (nearly) equal FLOPs: spread them by 2% per variant so none hides another
        spread = 1.0 + 0.02 * (kinds.index(r.kind) - (len(kinds) - 1) / 2)
        top1 = r.stat("top1")
        error = 100 * top1.std if top1.std is not None else None
        axes[0].errorbar(r.first("train_flops") * spread, 100 * top1.mean, yerr=error, color=color(r.kind),
                         marker=marker, markersize=7, capsize=3, linestyle="")
        rate = timing.get(r.shape_name, {}).get("images_per_s")
        if rate:
            axes[1].errorbar(r.steps * r.first("batch_size") / rate * spread, 100 * top1.mean, yerr=error,
                             color=color(r.kind), marker=marker, markersize=7, capsize=3, linestyle="")
    for ax, label in ((axes[0], "training compute (FLOPs, 3 x forward x samples; equal values spread 2%)"),
                      (axes[1], "training time at the interleaved img/s (s, steps x batch / img/s)")):
        ax.set_xscale("log")
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("zero-shot top-1 % (mean ± std over seeds)")
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=color(k), marker="o", linestyle="", label=k) for k in kinds]
    handles += [plt.Line2D([], [], color="gray", marker=markers[i % len(markers)], linestyle="",
                           label=f"{size} px, {steps} steps") for i, (size, steps) in enumerate(panels)]
    axes[1].legend(handles=handles, fontsize=7)
    fig.suptitle("Zero-shot accuracy vs compute, analytic (left) and measured (right)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(rows: Sequence[Row], timing: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shapes = {(r.kind, r.image_size): r for r in rows}  # one bar per variant and size, whatever the steps
    sizes = sorted({s for _, s in shapes})
    kinds = list(dict.fromkeys(k for k, _ in shapes))
    tokens = {r.image_size: r.tokens for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        xs = np.arange(len(sizes)) + i * width
        at = [timing.get(shapes[(kind, s)].shape_name, {}) if (kind, s) in shapes else {} for s in sizes]
        axes[0].bar(xs, [t.get("images_per_s") or 0 for t in at], width, label=kind, color=color(kind))
        axes[1].bar(xs, [t.get("activation_mib") or 0 for t in at], width, label=kind, color=color(kind))
    for ax, label in ((axes[0], "training images/s (interleaved, median)"),
                      (axes[1], "activation memory saved for backward (MiB/step)")):
        ax.set_xticks(np.arange(len(sizes)) + width * (len(kinds) - 1) / 2)
        ax.set_xticklabels([f"{s} px ({tokens[s]} tokens)" for s in sizes])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle("Training step cost per variant, measured side by side")
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
        color_ = color(kind)
        for r in runs:  # the whole curve against cumulative compute, thin
            per_step = r.train_flops / r.steps
            steps, losses = zip(*r.loss_curve)
            ax.plot(np.asarray(steps) * per_step, losses, color=color_, alpha=0.25, linewidth=1)
        xs = np.array([r.train_flops for r in runs])
        ax.scatter(xs, [r.final_loss for r in runs], color=color_, s=50, zorder=3)
        for r in runs:
            ax.annotate(f"w{r.width}", (r.train_flops, r.final_loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
        grid = np.geomspace(xs.min(), xs.max(), 50)
        ax.plot(grid, fit["coefficient"] * grid ** (-fit["exponent"]), color=color_, linestyle="--",
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


def write_report(out: Path, command: str, budget: Budget, rows: Sequence[Row], timing: dict[str, dict],
                 timing_info: dict[str, Any], scale_results: Sequence[RunResult], fits: dict[str, dict],
                 meta: dict[str, Any], sweep: dict[str, Any] | None = None, best: str | None = None,
                 checks: Sequence[dict[str, Any]] = ()) -> dict[str, Path]:
    """compare.md, compare_summary.md, compare.json and the PNGs into `out`; returns {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    for optional in ("compare_sweep.png", "scale_loss_vs_compute.png"):  # from an earlier invocation: not ours now
        (out / optional).unlink(missing_ok=True)
    paths = {"markdown": out / "compare.md", "json": out / "compare.json", "loss_png": out / "compare_loss.png",
             "accuracy_png": out / "compare_accuracy_vs_compute.png", "throughput_png": out / "compare_throughput.png"}
    if any(r.n for r in rows):
        plot_loss(rows, paths["loss_png"])
        plot_accuracy_vs_compute(rows, timing, paths["accuracy_png"])
    if timing:
        plot_throughput(rows, timing, paths["throughput_png"])
    if sweep:
        paths["sweep_png"] = out / "compare_sweep.png"
        plot_sweep(sweep, paths["sweep_png"])
    if scale_results and fits:
        paths["scale_png"] = out / "scale_loss_vs_compute.png"
        plot_scaling(scale_results, fits, paths["scale_png"])

    b = budget
    eval_note = f"first {b.eval_samples} of the 10,000 test images" if b.eval_samples else "all 10,000 test images"
    steps = sorted({r.steps for r in rows})
    missing = [r for r in rows if r.n < len(r.seeds_asked)]
    md = [
        "# Softmax vs linear attention CLIP on Fashion-MNIST (the paper's comparison in miniature)",
        "",
        f"Command: `{command}`  ",
        f"Date: {meta['date']}, commit {meta.get('commit') or '?'}; machine: {meta['machine']['cpus']} CPUs, "
        f"torch {meta['machine']['torch']} with {meta['machine']['torch_threads']} threads, "
        f"CUDA {'yes' if meta['machine']['cuda'] else 'no'}; 1-min load average {meta['machine']['load_average_1m']} "
        f"at start, {meta.get('load_average_end', '?')} at the end (the machine is shared).",
        "",
        f"Budget, the same for every variant: {' or '.join(map(str, steps))} steps x batch {b.batch_size} (one process, "
        f"DeepSpeed ZeRO-0, fp32), AdamW lr {b.lr:g} (warm-up 10% of the steps, then cosine), weight decay "
        f"{b.weight_decay:g}; both towers {b.layers} layers, width {b.width}, head dim {HEAD_DIM}; patch {b.patch_size}, "
        f"text context {b.context_length}. Both towers use the row's attention variant (`{VARIANT_GRAMMAR}`; "
        "`-kernel`/`-count` set the normaliser, `-local3`/`-local5` add a depthwise k x k branch on V to the image "
        "tower). One run per (variant, image size, steps, seed); each seed sets the weights and the data order. "
        f"Zero-shot: our eval job, {eval_note}, templates `{b.eval_templates}`.",
        "",
        "Cells with several seeds read **mean ± std (n)**: mean and sample standard deviation over the n seeds that "
        "finished (the `seeds` column lists them; `(k of m)` when fewer than asked have finished so far)."
        + (f" Best linear variant (highest top-1 averaged over the image sizes at {min(steps)} steps): **{best}**."
           if best else ""),
        "",
        markdown_table(TABLE_COLUMNS, table_rows(rows, timing)),
        "",
    ]
    if missing:
        md += ["Not yet finished (rerun the command to fill them; finished runs are reused): " + "; ".join(
            f"{r.kind} {r.image_size} px {r.steps} steps seeds "
            + ",".join(str(s) for s in r.seeds_asked if s not in r.seeds) for r in missing) + ".", ""]
    if checks:
        md += ["## Targets (issue 11): the best linear variant against softmax", "", targets_markdown(checks), ""]
    md += [
        "How each column was measured:",
        "",
        "- **zero-shot top-1/top-5**: `python -m ds_linclip.eval --checkpoint R/final` (R/eval/final_zeroshot.json).",
        "- **final loss**: the trainer's `train/loss` averaged over the last 10% of the steps (its logged windows "
        "there), read from R/tensorboard with TensorBoard's EventAccumulator.",
        f"- **img/s interleaved**: one process, {timing_info.get('rounds', 0)} rounds; in each round one training step "
        "(forward, contrastive loss, backward, AdamW) of every variant at that image size, on a batch of "
        f"{timing_info.get('batch_size', '?')} inputs of the training shape, variants alternating with the order "
        "rotated each round; median over rounds. Variants share the machine's noise alike, so compare these across a "
        "row group. Seeds and steps do not change a step's cost: one measurement per variant and size.",
        "- **img/s trainer**: the trainer's own `perf/images_per_s` (median of its logged windows, the first left out; "
        "mean over seeds); runs happen one or two at a time, so load from other work can favour one run over another.",
        "- **activation MiB**: bytes of the tensors autograd saved for backward in one training step "
        "(distinct storages, parameters excluded), from the interleaved pass. On CPU, softmax runs "
        "PyTorch's fused scaled-dot-product attention, which does not keep the N x N matrix.",
        "- **peak RSS MiB**: the trainer's `memory/peak_mb` (process peak RSS on CPU: mostly torch + DeepSpeed; the "
        "highest over seeds); `-` when runs were trained in-process.",
        "- **attn MFLOPs/image**: image-tower token-mixing FLOPs per image (`ds_linclip.models.flops`): softmax "
        "4·N²·width per layer, linear 4·N·head_dim·width; **attn %**: of the image tower's forward FLOPs.",
        "- **train TFLOPs**: 3 x forward FLOPs (image + caption) x samples seen.",
    ]
    if sweep:
        header, sweep_table = sweep_rows(sweep)
        md += [
            "",
            "## Where linear attention overtakes softmax: timing sweep over token counts",
            "",
            f"Nothing trained: the same interleaved training-step timing (batch {sweep['batch_size']}, "
            f"{sweep['rounds']} rounds, median) at more image sizes; in brackets the speed relative to softmax.",
            "",
            markdown_table(header, sweep_table),
        ]
    if scale_results:
        md += [
            "",
            "## Scaling in miniature: loss vs training compute over three widths",
            "",
            f"Same budget ({scale_results[0].steps} steps, seed {scale_results[0].seed}), image size "
            f"{scale_results[0].image_size} px, widths "
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
    md += ["", "Plots: " + ", ".join(f"`{p.name}`" for k, p in paths.items() if k.endswith("png") and p.exists()), ""]
    paths["summary"] = out / "compare_summary.md"
    paths["summary"].write_text(summary_markdown(command, budget, rows, timing) + "\n")
    paths["markdown"].write_text("\n".join(md))
    payload = {
        "command": command, **meta, "budget": asdict(budget), "best": best, "targets": list(checks),
        "timing": {"info": timing_info, "per_run": timing},
        "rows": [r.summary() for r in rows],
        "runs": [asdict(run) for r in rows for run in r.runs],
        "sweep": sweep or {},
        "scale": {"runs": [asdict(r) for r in scale_results], "fits": fits},
    }
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n")
    return paths


# ----------------------------------------------------------------------------- CLI


QUICK = {"steps": 4, "batch_size": 8, "width": 32, "layers": 1, "image_sizes": [12, 24], "eval_samples": 200,
         "eval_templates": "simple", "eval_batch_size": 100, "timing_rounds": 2, "sweep_sizes": [12, 24],
         "sweep_batch": 4, "scale_widths": [32, 64, 96]}


def parse_seeds(values: Sequence[int]) -> list[int]:
    """--seeds N -> seeds 0..N-1; --seeds A B ... (two or more) -> exactly those."""
    if len(values) == 1:
        if values[0] < 1:
            raise CompareError(f"--seeds {values[0]}: give a count >= 1, or two or more seeds")
        return list(range(values[0]))
    if len(set(values)) != len(values) or min(values) < 0:
        raise CompareError(f"--seeds {' '.join(map(str, values))}: seeds must be distinct and >= 0")
    return list(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.experiments.compare",
        description=(
            "Train softmax and linear-attention CLIPs on Fashion-MNIST under the same budget (same shards, steps, "
            "batch, seeds, schedule) with ds_linclip's trainer, score each with the eval job (zero-shot top-1/top-5 "
            "on the test split) and report per variant, image size and step count, as mean ± std over seeds: "
            "zero-shot accuracy and final loss; plus training images/s (the trainer's, and an interleaved "
            "side-by-side timing pass), activation and peak memory, attention FLOPs per image, and issue 11's "
            "targets for the best linear variant. Writes markdown tables, a JSON file and PNG plots to --out."
        ),
        epilog=(
            f"attention variants: {VARIANT_GRAMMAR}\n"
            "examples:\n"
            "  python -m ds_linclip.experiments.compare --seeds 3 --steps 150 --image-sizes 28 56\n"
            "  python -m ds_linclip.experiments.compare --kinds softmax linear-affine linear-focused-local3 \\\n"
            "      --long-steps 600 --long-kinds softmax linear-affine best --long-size 56\n"
            "  python -m ds_linclip.experiments.compare --scale --scale-widths 32 64 128 --scale-kinds softmax best\n"
            "  python -m ds_linclip.experiments.compare --no-train ...   # report what earlier sittings finished\n"
            "  python -m ds_linclip.experiments.compare --quick --out /tmp/compare   # seconds-scale smoke run\n"
            "Each (variant, size, steps, seed) is one run folder in --runs-dir; a finished one with the same resolved "
            "config is reused, so the grid can be filled over several sittings (delete a folder to retrain it)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), type=variant_argument, metavar="VARIANT",
                        help="attention variants (grammar below; a plain name sets both towers). Default: %(default)s")
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[28, 56], metavar="PX",
                        help="image sizes in pixels, multiples of the patch size (default: %(default)s -> 49 and 196 "
                             "patches with patch 4; the data pipeline resizes the 28 px images)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch per step (default %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1], metavar="S",
                        help="--seeds N: seeds 0..N-1; --seeds A B ...: those seeds. Each seed sets the weights and the "
                             "data order of one run per (variant, size, steps); tables report mean ± std (n) "
                             "(default: 1, i.e. seed 0)")
    parser.add_argument("--long-steps", type=int, default=None,
                        help="also train --long-kinds for this many steps at --long-size (same seeds), reported as "
                             "their own rows (default: none)")
    parser.add_argument("--long-kinds", nargs="+", type=variant_argument, default=list(LONG_KINDS), metavar="VARIANT",
                        help=f"variants of the --long-steps rows; `{BEST}` = the best linear variant of the comparison "
                             "(see --best) (default: %(default)s)")
    parser.add_argument("--long-seeds", nargs="+", type=int, default=None, metavar="S",
                        help="seeds of the --long-steps rows, as --seeds (default: --seeds); fewer than --seeds "
                             "fill the long rows in a later sitting")
    parser.add_argument("--long-size", type=int, default=None,
                        help="image size of the --long-steps rows (default: the largest of --image-sizes)")
    parser.add_argument("--best", type=variant_argument, default=None, metavar="VARIANT",
                        help=f"the variant `{BEST}` stands for (default: the linear variant with the highest zero-shot "
                             "top-1 averaged over the image sizes at --steps, mean over seeds)")
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
                        help="image sizes of an extra interleaved timing sweep (nothing trained): every --sweep-kinds "
                             "variant at every size on the same batch (--sweep-batch), to show where linear attention "
                             "overtakes softmax as the token count grows (default: %(default)s; none = skip)")
    parser.add_argument("--sweep-kinds", nargs="+", type=variant_argument, default=None, metavar="VARIANT",
                        help=f"variants of the timing sweep (`{BEST}` allowed; default: --kinds)")
    parser.add_argument("--sweep-batch", type=int, default=16, help="batch of the timing sweep (default %(default)s)")
    parser.add_argument("--timing-from", type=Path, default=None, metavar="JSON",
                        help="take the interleaved timing pass and the sweep from an earlier compare.json instead of "
                             "measuring them again (the timing of a shape does not change with seeds or steps; the "
                             "pass is the one step that wants the machine to itself)")
    parser.add_argument("--scale", action="store_true",
                        help="also train --scale-kinds at three widths (--scale-widths) on the first image size, first "
                             "seed, and fit final loss against training compute (a power law per variant)")
    parser.add_argument("--scale-widths", nargs=3, type=int, default=[64, 128, 192], metavar="W",
                        help="widths for --scale (default: %(default)s)")
    parser.add_argument("--scale-kinds", nargs="+", default=list(SCALE_KINDS), type=variant_argument, metavar="VARIANT",
                        help=f"variants for --scale (`{BEST}` allowed; default: %(default)s)")
    parser.add_argument("--no-train", action="store_true",
                        help="train nothing: report the runs earlier sittings finished (scoring any not yet scored); "
                             "rows show how many of their seeds exist")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at the same time (subprocess launcher; default %(default)s). The "
                             "interleaved timing pass always runs alone, after them")
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
    """SIGTERM -> KeyboardInterrupt-like exit, so running trainer subprocess groups are killed too."""
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
    finally:
        kill_live_processes()


def run_specs(specs: Sequence[RunSpec], launcher: Launcher, done: dict[RunSpec, RunResult], jobs: int, train: bool,
              bar: Any) -> list[str]:
    """run_one for every spec not in `done` (at most `jobs` at a time), filling `done`. A run that fails
    is logged and left out (its row shows fewer seeds); returns the failure messages."""
    todo = [s for s in dict.fromkeys(specs) if s not in done]
    failures: list[str] = []

    def settle(spec: RunSpec, call: Callable[[], RunResult]) -> None:
        try:
            done[spec] = call()
        except MissingRun as err:
            _log(str(err))
        except CompareError as err:
            _log(f"FAILED {spec.name}: {err}")
            failures.append(f"{spec.name}: {err}")
        bar.update()

    if jobs <= 1:
        for spec in todo:
            bar.set_postfix_str(spec.name)
            settle(spec, lambda: run_one(spec, launcher, train))
        return failures
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(run_one, spec, launcher, train): spec for spec in todo}
        for future in as_completed(futures):
            settle(futures[future], future.result)
    except BaseException:
        kill_live_processes()  # the threads' subprocesses end, so the threads do too
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return failures


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _terminate_on_sigterm()
    if args.quick:
        for key, value in QUICK.items():
            if not _explicit(argv, "--" + key.replace("_", "-")):
                setattr(args, key, value)
    launcher_mode = args.launcher or ("inprocess" if args.quick else "subprocess")
    seeds = parse_seeds(args.seeds)
    long_seeds = parse_seeds(args.long_seeds) if args.long_seeds else seeds
    long_size = args.long_size or max(args.image_sizes)
    for size in args.image_sizes + [long_size]:
        if size % 4:
            print(f"error: --image-sizes {size} is not a multiple of the patch size 4", file=sys.stderr)
            return 2
    for width in [args.width] + (args.scale_widths if args.scale else []):
        if width % HEAD_DIM and width >= HEAD_DIM:
            print(f"error: width {width} is not a multiple of the head dim {HEAD_DIM}", file=sys.stderr)
            return 2
    if args.steps < 1 or args.batch_size < 1 or (args.long_steps is not None and args.long_steps < 1):
        print("error: --steps, --long-steps and --batch-size must be positive", file=sys.stderr)
        return 2
    if BEST in args.kinds:
        print(f"error: --kinds lists the variants the best is picked from; `{BEST}` is for --long-kinds, "
              "--scale-kinds and --sweep-kinds", file=sys.stderr)
        return 2
    jobs = args.jobs if launcher_mode == "subprocess" else 1  # in-process runs share one DeepSpeed process

    import torch
    from tqdm import tqdm

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported (in-process runs)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    budget = Budget(steps=args.steps, batch_size=args.batch_size, seed=seeds[0], lr=args.lr, layers=args.layers,
                    context_length=args.context_length,
                    width=args.width, eval_samples=args.eval_samples, eval_templates=args.eval_templates,
                    eval_batch_size=args.eval_batch_size)
    command = "python -m ds_linclip.experiments.compare " + shlex.join(argv)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "machine": machine_note(), "launcher": launcher_mode, "seeds": seeds, "long_seeds": long_seeds}
    data_dir = ensure_shards(args.data)
    runs_dir = args.runs_dir.expanduser().resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(launcher_mode, runs_dir, data_dir)

    def spec(kind: str, size: int, width: int = args.width, steps: int = args.steps, seed: int = seeds[0]) -> RunSpec:
        return RunSpec(kind, size, width, replace(budget, steps=steps, seed=seed))

    # seed-major, so a sitting that is stopped early leaves every variant with the same number of seeds
    specs = [spec(kind, size, seed=seed) for seed in seeds for size in args.image_sizes for kind in args.kinds]
    n_long = len(long_seeds) * len(args.long_kinds) if args.long_steps else 0
    n_scale = 2 * len(args.scale_kinds) if args.scale else 0  # the first width's runs may be comparison runs
    _log(f"{len(specs)} comparison runs ({len(args.kinds)} variants x {len(args.image_sizes)} sizes x seeds {seeds}, "
         f"{args.steps} steps x batch {args.batch_size})" + (f" + up to {n_long} runs of {args.long_steps} steps"
                                                               if n_long else "")
         + (f" + up to {n_scale} scaling runs" if n_scale else "") + f"; runs in {runs_dir}, results to {args.out}"
         + (" (--no-train: finished runs only)" if args.no_train else ""))

    done: dict[RunSpec, RunResult] = {}
    failures: list[str] = []
    start = time.perf_counter()
    bar = tqdm(total=len(specs) + n_long + n_scale, desc="runs", unit="run", disable=args.no_progress)
    failures += run_specs(specs, launcher, done, jobs, not args.no_train, bar)
    rows = aggregate(specs, done)
    best = args.best or pick_best(rows, args.steps)
    _log(f"best linear variant: {best}" + ("" if args.best else " (highest mean top-1 over the image sizes)"))

    def resolve(kinds: Sequence[str]) -> list[str]:
        if BEST in kinds and not best:
            _log(f"no best linear variant yet (no linear run finished at every size): `{BEST}` left out")
        return list(dict.fromkeys(best if k == BEST else k for k in kinds if k != BEST or best))

    long_specs: list[RunSpec] = []
    if args.long_steps:
        long_specs = [spec(kind, long_size, steps=args.long_steps, seed=seed)
                      for seed in long_seeds for kind in resolve(args.long_kinds)]
        failures += run_specs(long_specs, launcher, done, jobs, not args.no_train, bar)
    rows = aggregate(specs + long_specs, done)

    timing: dict[str, dict] = {}
    sweep: dict[str, Any] = {}
    timing_batch = args.timing_batch or args.batch_size
    timing_specs = [spec(kind, size) for size in args.image_sizes for kind in args.kinds]
    earlier = json.loads(args.timing_from.read_text()) if args.timing_from else None
    if earlier:
        timing, sweep = earlier["timing"]["per_run"], earlier.get("sweep") or {}
        timing_info = dict(earlier["timing"]["info"], source=f"{args.timing_from} ({earlier.get('date')})")
        _log(f"timing pass and sweep from {args.timing_from} ({earlier.get('date')})")
        absent = [s.shape_name for s in timing_specs if s.shape_name not in timing]
        if absent:
            _log(f"  not in it (shown as -): {', '.join(absent)}")
    else:
        timing_info = {"rounds": args.timing_rounds, "batch_size": timing_batch,
                       "torch_threads": torch.get_num_threads()}
    if not earlier and args.timing_rounds > 0:
        _log(f"interleaved timing pass: {args.timing_rounds} rounds x {len(args.kinds)} variants x "
             f"{len(args.image_sizes)} sizes, batch {timing_batch}")
        timing = interleaved_timing(timing_specs, args.timing_rounds, timing_batch, progress=not args.no_progress)
        for s in timing_specs:
            t = timing[s.shape_name]
            _log(f"  {s.shape_name}: {t['images_per_s']:.1f} img/s (median of {len(t['seconds'])}), "
                 f"activations {t['activation_mib']:.1f} MiB")
    if args.sweep_sizes and args.timing_rounds > 0 and not earlier:
        sweep_kinds = resolve(args.sweep_kinds or args.kinds)
        if "softmax" not in sweep_kinds:
            sweep_kinds.insert(0, "softmax")  # the reference every ratio is against
        sweep_specs = [spec(kind, size) for size in args.sweep_sizes for kind in sweep_kinds]
        _log(f"timing sweep: {sweep_kinds} at {args.sweep_sizes} px, batch {args.sweep_batch}, "
             f"{args.timing_rounds} rounds")
        per_run = interleaved_timing(sweep_specs, args.timing_rounds, args.sweep_batch, progress=not args.no_progress)
        sweep = {"batch_size": args.sweep_batch, "rounds": args.timing_rounds, "points": [
            {"kind": s.kind, "image_size": s.image_size, "tokens": s.tokens,
             "images_per_s": per_run[s.shape_name]["images_per_s"],
             "activation_mib": per_run[s.shape_name]["activation_mib"],
             "attention_flops_per_image": _attention_flops(s)} for s in sweep_specs]}
        for size in args.sweep_sizes:
            points = {p["kind"]: p for p in sweep["points"] if p["image_size"] == size}
            _log(f"  {size} px ({points['softmax']['tokens']} tokens): " + ", ".join(
                f"{k} {p['images_per_s']:.1f} img/s" for k, p in points.items()))

    def report(scale_results: list[RunResult], fits: dict[str, dict]) -> None:
        checks = target_checks(rows, best, args.steps, args.long_steps, fits, sweep, timing)
        meta["load_average_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        meta["wall_seconds"] = round(time.perf_counter() - start, 1)
        paths = write_report(args.out, command, budget, rows, timing, timing_info, scale_results, fits, meta, sweep,
                             best, checks)
        _log("wrote " + ", ".join(str(p) for p in paths.values()) + f" ({meta['wall_seconds']:.0f} s)")
        for check in checks:
            _log(f"  target {'met' if check['met'] else 'MISSED'}: {check['target']}: {check['measured']}")

    # the comparison is reported before --scale runs: a long --scale never holds back its results
    report([], {})
    print(markdown_table(TABLE_COLUMNS, table_rows(rows, timing)))
    if args.scale:
        scale_kinds = resolve(args.scale_kinds)
        scale_specs = [spec(kind, args.image_sizes[0], width=width) for width in args.scale_widths for kind in scale_kinds]
        failures += run_specs(scale_specs, launcher, done, jobs, not args.no_train, bar)
        scale_results = [done[s] for s in scale_specs if s in done]
        fits: dict[str, dict] = {}
        for kind in scale_kinds:
            points = [r for r in scale_results if r.kind == kind]
            if len(points) < len(args.scale_widths):
                _log(f"scaling fit {kind}: only {len(points)} of {len(args.scale_widths)} widths finished: no fit")
                continue
            fits[kind] = fit_power_law([r.train_flops for r in points], [r.final_loss for r in points])
            _log(f"scaling fit {kind}: loss = a * C^(-b), b = {fits[kind]['exponent']:.4f}, "
                 f"a = {fits[kind]['coefficient']:.4g} (R² {fits[kind]['r2']:.3f})")
        report(scale_results, fits)
    bar.close()
    if failures:
        print("error: some runs failed (left out of the tables):\n  " + "\n  ".join(f.splitlines()[0] for f in failures),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
