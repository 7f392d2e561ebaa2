"""The eval job: score one checkpoint, or watch a run folder and score each new checkpoint once.

Side effects live here (files, TensorBoard, console); the scoring itself is in zeroshot.py and
retrieval.py. Per checkpoint and task it writes `R/eval/<tag>_<task>.json` and TensorBoard
scalars `eval/<task>/<metric>` at the checkpoint's training step into `R/tensorboard/eval/`:
a folder of its own inside the run's log dir, so `tensorboard --logdir R/tensorboard` shows them
beside the training curves while the trainer's event file stays the only one in `R/tensorboard`
(TensorBoard only keeps polling the newest event file of a folder).

Before anything is loaded, the config and the file system are checked
(`ds_linclip.train.preflight.check_eval_inputs`): an eval data spec that matches nothing or a
class-name/template file that does not exist is one line naming the key, exit 2. Each DeepSpeed
checkpoint of a run the job is done with is marked `R/eval/scored/<tag>`, which the trainer's
pruning reads (train.keep_unscored_max) so it never deletes a checkpoint before it was scored.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from omegaconf import DictConfig

from ds_linclip.config import ConfigError, add_config_arguments, load_config, to_yaml
from ds_linclip.eval.checkpoint import (
    EXPORT_FILE,
    LoadedCheckpoint,
    checkpoint_config,
    load_checkpoint,
    resolve_checkpoint,
    tag_step,
)
from ds_linclip.eval.errors import EvalError, exit_with
from ds_linclip.train import checkpoint as train_ckpt
from ds_linclip.train.preflight import check_eval_inputs

log = logging.getLogger("ds_linclip.eval")

TASKS = ("zeroshot", "retrieval")
STATE_FILE = train_ckpt.WATCH_STATE
STOP_FILE = "STOP"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- scoring


def tasks_for(cfg: DictConfig) -> list[str]:
    """The tasks whose dataset is configured; ConfigError if none is (a config problem, exit 2)."""
    tasks = [t for t, key in (("zeroshot", "zeroshot_data"), ("retrieval", "retrieval_data")) if cfg.eval[key]]
    if not tasks:
        raise ConfigError(
            "nothing to evaluate: set eval.zeroshot_data (labelled shards or an ImageFolder) and/or "
            "eval.retrieval_data (captioned shards), e.g. eval.zeroshot_data=DIR/test/shard-{000000..000009}.tar",
            key="eval.zeroshot_data",
        )
    if cfg.eval.precision not in PRECISIONS:
        raise ConfigError(f"'{cfg.eval.precision}' is not one of {', '.join(PRECISIONS)}", key="eval.precision")
    return tasks


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"eval.device={spec} but CUDA is not available here")
    return torch.device(spec)


def _autocast(cfg: DictConfig, device: torch.device):
    dtype = PRECISIONS[cfg.eval.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _tokenizer(cfg: DictConfig):
    from ds_linclip.data.pipeline import tokenize

    return partial(tokenize, context_length=cfg.model.text.context_length)


def benchmark_layout(cfg: DictConfig, spec: str, kind: str):
    """The CLIP_benchmark folder `spec` (its `eval.split`), or None when `spec` is not one."""
    from ds_linclip.data.benchmark_layout import LayoutError, is_benchmark_layout, read_layout

    if not is_benchmark_layout(spec):
        return None
    try:
        layout = read_layout(spec, cfg.eval.split)
    except LayoutError as err:
        raise EvalError(str(err)) from err
    if layout.dataset_type != kind:
        raise EvalError(f"{spec} is a CLIP_benchmark {layout.dataset_type} dataset, not a {kind} one "
                        f"(multilabel sets are not scored here)")
    return layout


def _loader(cfg: DictConfig, spec: str, kind: str, layout=None):
    from ds_linclip.data.pipeline import build_eval_loader
    from ds_linclip.data.imagefolder import ImageFolderLoader, is_image_folder

    if kind == "classification" and layout is None and is_image_folder(spec):
        return ImageFolderLoader(spec, cfg.model.image.image_size, cfg.eval.batch_size, cfg.eval.workers)

    try:
        return build_eval_loader(
            layout.shard_spec if layout is not None else spec, image_size=cfg.model.image.image_size,
            batch_size=cfg.eval.batch_size, workers=cfg.eval.workers, kind=kind,
        )
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(f"cannot open {kind} dataset '{spec}': {err}") from err


def _from_layout(layout, key: str, value: str):
    """`eval.classnames`/`eval.templates` = dataset: the CLIP_benchmark folder's own file."""
    if layout is None:
        raise EvalError(f"{key}=dataset needs eval.zeroshot_data to be a CLIP_benchmark folder")
    names = layout.classnames if key == "eval.classnames" else layout.templates
    if not names:
        raise EvalError(f"{key}=dataset but {layout.root} has no "
                        f"{'classnames.txt' if key == 'eval.classnames' else 'zeroshot_classification_templates.txt'}")
    return list(names)


def _num_samples(loader) -> int | None:
    for name in ("num_samples", "__len__"):
        value = getattr(loader, name, None)
        try:
            return int(value() if callable(value) else value) if value is not None else None
        except (TypeError, ValueError):
            continue
    return None


def score_task(task: str, loaded: LoadedCheckpoint, device: torch.device, progress: bool = True) -> dict[str, Any]:
    """Run one task on a loaded checkpoint -> {metrics, num_samples, and task-specific fields}."""
    from ds_linclip.data.pipeline import DataError

    try:
        return _score_task(task, loaded, device, progress)
    except DataError as err:  # unreadable or empty data, class-name/template files: the message names them
        raise EvalError(f"{task} data: {err}") from err


def _score_task(task: str, loaded: LoadedCheckpoint, device: torch.device, progress: bool) -> dict[str, Any]:
    from ds_linclip.eval.retrieval import encode_pairs, retrieval_recall
    from ds_linclip.data.prompts import load_classnames, load_templates
    from ds_linclip.eval.zeroshot import build_classifier, run_zeroshot

    cfg = loaded.cfg
    model = loaded.model.to(device)
    tokenizer = _tokenizer(cfg)
    with torch.inference_mode(), _autocast(cfg, device):
        if task == "zeroshot":
            layout = benchmark_layout(cfg, cfg.eval.zeroshot_data, "classification")
            loader = _loader(cfg, cfg.eval.zeroshot_data, "classification", layout)
            folder_classes = getattr(loader, "classes", None)  # an ImageFolder's sorted class folders
            if cfg.eval.classnames == "folders":
                if folder_classes is None:
                    raise EvalError("eval.classnames=folders needs eval.zeroshot_data to be an ImageFolder")
                classnames = [name.replace("_", " ") for name in folder_classes]
            elif cfg.eval.classnames == "dataset":
                classnames = _from_layout(layout, "eval.classnames", cfg.eval.classnames)
            else:
                classnames = load_classnames(cfg.eval.classnames)
            if folder_classes is not None and len(folder_classes) != len(classnames):
                raise EvalError(
                    f"ImageFolder {cfg.eval.zeroshot_data} has {len(folder_classes)} class folders but "
                    f"eval.classnames={cfg.eval.classnames} gives {len(classnames)} names"
                )
            if layout is not None and layout.classnames and len(layout.classnames) != len(classnames):
                raise EvalError(
                    f"{layout.root} has {len(layout.classnames)} classes but eval.classnames={cfg.eval.classnames} "
                    f"gives {len(classnames)} names (eval.classnames=dataset uses the folder's classnames.txt)"
                )
            if cfg.eval.templates == "dataset":
                templates = _from_layout(layout, "eval.templates", cfg.eval.templates)
            else:
                templates = load_templates(cfg.eval.templates)
            classifier = build_classifier(
                model.encode_text, tokenizer, classnames, templates,
                texts_per_batch=cfg.eval.batch_size, device=device, progress=progress,
            )
            metrics, predictions = run_zeroshot(
                model.encode_image, classifier, loader, device=device, max_samples=cfg.eval.max_samples,
                total=_num_samples(loader), progress=progress,
            )
            return {
                "metrics": metrics, "num_samples": len(predictions), "dataset": cfg.eval.zeroshot_data,
                "classnames": cfg.eval.classnames, "num_classes": len(classnames), "templates": cfg.eval.templates,
                "num_templates": len(templates),
            }
        if task == "retrieval":
            layout = benchmark_layout(cfg, cfg.eval.retrieval_data, "retrieval")
            loader = _loader(cfg, cfg.eval.retrieval_data, "retrieval", layout)
            image_features, text_features, text_to_image = encode_pairs(
                model.encode_image, model.encode_text, tokenizer, loader, device=device,
                max_samples=cfg.eval.max_samples, total=_num_samples(loader), progress=progress,
                captions_per_line=layout is not None,
            )
            metrics = retrieval_recall(image_features, text_features, text_to_image, chunk_size=cfg.eval.chunk_size)
            return {"metrics": metrics, "num_samples": len(image_features), "num_captions": len(text_features),
                    "dataset": cfg.eval.retrieval_data}
    raise EvalError(f"unknown eval task '{task}' (known: {', '.join(TASKS)})")


def result_record(task: str, loaded: LoadedCheckpoint, outcome: dict[str, Any], seconds: float,
                  device: torch.device) -> dict[str, Any]:
    model = loaded.cfg.model
    return {
        "task": task,
        "tag": loaded.ref.tag,
        "checkpoint": str(loaded.ref.path),
        "checkpoint_kind": loaded.ref.kind,
        "step": loaded.step,
        "samples_seen": loaded.samples_seen,
        **outcome,
        "model": {
            "preset": model.preset,
            "embed_dim": model.embed_dim,
            "image_attention": model.image.attention,
            "text_attention": model.text.attention,
            "image_size": model.image.image_size,
        },
        "config_hash": loaded.train_config_hash,
        "device": str(device),
        "precision": loaded.cfg.eval.precision,
        "seconds": round(seconds, 3),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- outputs


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class ResultSink:
    """Writes result JSONs into `results_dir` and TensorBoard scalars into `tensorboard_dir`."""

    def __init__(self, results_dir: Path, tensorboard_dir: Path):
        self.results_dir = results_dir
        self.tensorboard_dir = tensorboard_dir
        self._writer = None

    def write(self, record: dict[str, Any]) -> Path:
        path = self.results_dir / f"{record['tag']}_{record['task']}.json"
        _atomic_write_json(path, record)
        if record["step"] is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
            for name, value in record["metrics"].items():
                self._writer.add_scalar(f"eval/{record['task']}/{name}", value, global_step=record["step"])
            self._writer.flush()
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def output_dirs(ref_run_dir: Path | None, checkpoint_path: Path, results_dir: str | None) -> tuple[Path, Path]:
    """(results dir, TensorBoard dir): R/eval and R/tensorboard/eval for a run, else beside the checkpoint."""
    if results_dir:
        base = Path(results_dir)
        return base, base / "tensorboard"
    if ref_run_dir is not None:
        return ref_run_dir / "eval", ref_run_dir / "tensorboard" / "eval"
    folder = checkpoint_path.parent if checkpoint_path.is_file() else checkpoint_path
    return folder / "eval", folder / "eval" / "tensorboard"


_METRIC_COLUMNS = {
    "zeroshot": [("top1", "top-1"), ("top5", "top-5"), ("mean_per_class_recall", "mean recall")],
    "retrieval": [(f"{d}_R@{k}", f"{a} R@{k}") for d, a in (("image_to_text", "i→t"), ("text_to_image", "t→i"))
                  for k in (1, 5, 10)],
}


def print_summary(records: Sequence[dict[str, Any]], failures: Sequence[tuple[str, str]] = (), file=None) -> None:
    """One table per task: checkpoint, step, dataset size and the metrics in percent."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=160)
    for task in TASKS:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        table = Table(title=f"{task} — {rows[0]['dataset']}", title_justify="left")
        for header in ("checkpoint", "step", "samples seen", "images"):
            table.add_column(header, justify="right" if header != "checkpoint" else "left")
        for _, header in _METRIC_COLUMNS[task]:
            table.add_column(f"{header} %", justify="right")
        for r in rows:
            seen = r["samples_seen"]
            table.add_row(
                r["tag"], str(r["step"]), f"{seen:,}" if seen is not None else "-", f"{r['num_samples']:,}",
                *(f"{100 * r['metrics'][key]:.2f}" for key, _ in _METRIC_COLUMNS[task]),
            )
        console.print(table)
    for tag, error in failures:
        console.print(f"[bold red]FAILED[/] {tag}: {error}", highlight=False)


def score_checkpoint(
    path: str | Path,
    config_files: Sequence[str] = (),
    overrides: Sequence[str] = (),
    results_dir: str | None = None,
    progress: bool = True,
    sink: ResultSink | None = None,
) -> list[dict[str, Any]]:
    """Load a checkpoint, run every configured task, write JSON + TensorBoard; return the records.

    Config and inputs are checked before the weights are loaded (ConfigError). A DeepSpeed
    checkpoint of a run is marked scored (ok, or failed on an EvalError) for the trainer's pruning.
    """
    ref = resolve_checkpoint(path)
    cfg, _ = checkpoint_config(ref, config_files, overrides)
    check_eval_inputs(cfg, tasks_for(cfg))
    try:
        records = _score_loaded(path, config_files, overrides, results_dir, progress, sink)
    except EvalError as err:
        _mark_scored(ref, f"failed: {err}")
        raise
    _mark_scored(ref, "ok")
    return records


def _mark_scored(ref, status: str) -> None:
    if ref.kind == "deepspeed" and ref.run_dir is not None:
        try:
            train_ckpt.mark_scored(ref.run_dir, ref.tag, status.splitlines()[0][:500])
        except OSError as err:  # a read-only run folder: the results are what matters
            log.warning("could not mark %s scored in %s: %s", ref.tag, ref.run_dir, err)


def _score_loaded(path, config_files, overrides, results_dir, progress, sink) -> list[dict[str, Any]]:
    loaded = load_checkpoint(path, config_files, overrides)
    tasks = tasks_for(loaded.cfg)
    device = pick_device(loaded.cfg.eval.device)
    own_sink = sink is None
    if own_sink:
        sink = ResultSink(*output_dirs(loaded.ref.run_dir, loaded.ref.path, results_dir))
    records = []
    try:
        for task in tasks:
            start = time.perf_counter()
            log.info("scoring %s (step %s) on %s: %s", loaded.ref.tag, loaded.step, device, task)
            outcome = score_task(task, loaded, device, progress)
            record = result_record(task, loaded, outcome, time.perf_counter() - start, device)
            written = sink.write(record)
            log.info("%s %s: %s -> %s", loaded.ref.tag, task,
                     ", ".join(f"{k}={v:.4f}" for k, v in record["metrics"].items()), written)
            records.append(record)
    finally:
        if own_sink:
            sink.close()
    return records


# ----------------------------------------------------------------------------- watcher


def complete_checkpoints(run_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of the DeepSpeed checkpoints whose write has finished, in step order.

    The trainer writes `checkpoints/latest` only after every rank finished a save, so every tag
    whose step is at most that of `latest` is complete; newer tag folders are still being written.
    """
    save_dir = run_dir / "checkpoints"
    latest_file = save_dir / "latest"
    if not latest_file.is_file():
        return []
    latest_step = tag_step(latest_file.read_text().strip())
    found = []
    for folder in save_dir.iterdir():
        step = tag_step(folder.name)
        if folder.is_dir() and step is not None and latest_step is not None and step <= latest_step:
            found.append((step, folder.name))
    return sorted(found)


class WatchState:
    """R/eval/watch_state.json: every tag the watcher finished with, ok or failed, and when.

    Written atomically after each checkpoint (results are written before it), so a restarted
    watcher continues with the first tag not recorded: nothing is scored twice or skipped.
    """

    def __init__(self, path: Path):
        self.path = path
        self.checkpoints: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                self.checkpoints = json.loads(path.read_text())["checkpoints"]
            except (ValueError, KeyError, TypeError) as err:
                raise EvalError(f"watch state file {path} is unreadable ({err}); move it away to rescore the run") from err

    def __contains__(self, tag: str) -> bool:
        return tag in self.checkpoints

    def record(self, tag: str, step: int | None, status: str, **details: Any) -> None:
        self.checkpoints[tag] = {
            "step": step, "status": status,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **details,
        }
        _atomic_write_json(self.path, {"checkpoints": self.checkpoints})


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EvalError(f"another watcher is already running on this run (lock {lock_path})") from None
        yield


def run_config(run_dir: Path, config_files: Sequence[str] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """The run's R/config.yaml with the user's files and overrides on top."""
    own = run_dir / "config.yaml"
    if not own.is_file() and not config_files:
        raise EvalError(f"{own} not found; pass the training config with --config")
    return load_config([*([own] if own.is_file() else []), *config_files], overrides)


def _read_done(run_dir: Path) -> dict[str, Any] | None:
    done_file = run_dir / "DONE"
    if not done_file.is_file():
        return None
    try:
        return json.loads(done_file.read_text() or "{}")
    except ValueError:
        return {}


def watch(
    run_dir: str | Path,
    config_files: Sequence[str] = (),
    overrides: Sequence[str] = (),
    poll_seconds: float = 30.0,
    once: bool = False,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Score each complete checkpoint of `run_dir` once, in step order, until the run is DONE.

    Stops after the final scan once `R/DONE` exists, after one scan with `once`, when
    `R/eval/STOP` appears (removed when honoured), or on SIGTERM/SIGINT (after the checkpoint in
    progress). Returns the records and the (tag, error) failures of this session; failures are
    recorded in the state file like successes, so they are not retried.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise EvalError(f"run folder not found: {run_dir}")
    # A config problem (no eval data set, a bad key) would fail every checkpoint alike: refuse to
    # start instead of recording each one as failed.
    cfg = run_config(run_dir, config_files, overrides)
    check_eval_inputs(cfg, tasks_for(cfg))
    results_dir, tensorboard_dir = output_dirs(run_dir, run_dir, None)
    stop_file = results_dir / STOP_FILE
    stop_requested = {"signal": None}

    def request_stop(signum, _frame):
        stop_requested["signal"] = signum
        log.warning("signal %s: stopping after the checkpoint in progress", signal.Signals(signum).name)

    records: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    sink = ResultSink(results_dir, tensorboard_dir)
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # the lock file also tells the trainer's pruning that a watcher follows this run
        with _exclusive(results_dir / train_ckpt.WATCH_LOCK):
            state = WatchState(results_dir / STATE_FILE)

            def score(tag: str, step: int | None, path: Path) -> None:
                try:
                    new = score_checkpoint(path, config_files, overrides, progress=progress, sink=sink)
                except (EvalError, ConfigError) as err:
                    log.error("checkpoint %s failed: %s", tag, err)
                    failures.append((tag, str(err)))
                    state.record(tag, step, "failed", error=str(err))
                    return
                except Exception as err:  # noqa: BLE001 - one bad checkpoint must not stop the watcher
                    log.exception("checkpoint %s failed unexpectedly", tag)
                    message = f"{type(err).__name__}: {err}"
                    failures.append((tag, message))
                    state.record(tag, step, "failed", error=message)
                    return
                records.extend(new)
                state.record(tag, step, "ok", results=[f"{r['tag']}_{r['task']}.json" for r in new])

            def stopping() -> bool:
                return stop_requested["signal"] is not None or stop_file.exists()

            log.info("watching %s (state %s)", run_dir, state.path)
            while True:
                done = _read_done(run_dir)  # read before the scan: a DONE run's last checkpoint is complete
                for step, tag in complete_checkpoints(run_dir):
                    if stopping():
                        break
                    # a tag pruned since the scan (train.keep_unscored_max reached) is not a failure
                    if tag not in state and (run_dir / "checkpoints" / tag).is_dir():
                        score(tag, step, run_dir / "checkpoints" / tag)
                if stopping():
                    if stop_file.exists():  # honoured: the next watcher must not stop at once
                        stop_file.unlink(missing_ok=True)
                    log.info("stop requested; scored so far is recorded in %s", state.path)
                    break
                if done is not None:
                    final_tag = str(done.get("final_tag") or "final")
                    export = run_dir / "final" / EXPORT_FILE
                    # a run that ended without its last step as a DeepSpeed tag: score the export
                    if final_tag not in state and not (run_dir / "checkpoints" / final_tag).is_dir() and export.is_file():
                        score(final_tag, done.get("step"), export)
                    log.info("run is DONE; every checkpoint is scored")
                    break
                if once:
                    break
                time.sleep(poll_seconds)
    finally:
        sink.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return records, failures


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.eval",
        description=(
            "Score CLIP checkpoints: zero-shot classification (top-1, top-5, mean per-class recall) "
            "and image<->text retrieval (Recall@1/5/10). The model config is read from the config.yaml "
            "beside the checkpoint; --config files and key=value overrides go on top (eval.* keys choose "
            "datasets, class names, templates, batch size, device). Results: R/eval/<tag>_<task>.json and "
            "TensorBoard scalars eval/<task>/<metric> in R/tensorboard/eval."
        ),
        epilog=(
            "examples:\n"
            "  python -m ds_linclip.eval --checkpoint runs/demo/final eval.zeroshot_data='shards/test/shard-{000000..000009}.tar' "
            "eval.classnames=shards/classnames.txt\n"
            "  python -m ds_linclip.eval --watch runs/demo eval.zeroshot_data=... eval.templates=simple\n"
            "exit codes: 0 ok; 1 a checkpoint problem, or data/class file contents (the watcher: any checkpoint "
            "failed); 2 a config error, including an eval data spec or class-name/template file that does not exist"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", metavar="PATH",
                        help="a DeepSpeed checkpoint folder (R/checkpoints/step_N or R/checkpoints for latest), "
                             "an exported model.safetensors (or R/final), or a run folder R")
    target.add_argument("--watch", metavar="RUN_DIR",
                        help="score every new complete checkpoint of a training run once, in step order, until R/DONE")
    parser.add_argument("--results-dir", metavar="DIR",
                        help="--checkpoint only: where result JSONs go (default R/eval, or beside the checkpoint)")
    parser.add_argument("--poll-seconds", type=float, default=30.0, help="--watch: seconds between scans (default 30)")
    parser.add_argument("--once", action="store_true",
                        help="--watch: score what is complete now and exit instead of waiting for R/DONE "
                             f"(a running watcher also stops when R/eval/{STOP_FILE} appears)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ds_linclip.train.engine import quiet_dependency_output

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_dependency_output()  # the focused map's TorchInductor compile would log the CUDA-toolkit note
    progress = not args.no_progress
    try:
        if args.print_config:
            if args.checkpoint:
                cfg, _ = checkpoint_config(resolve_checkpoint(args.checkpoint), args.config, args.overrides)
            else:
                cfg = run_config(Path(args.watch), args.config, args.overrides)
            print(to_yaml(cfg), end="")
            return 0
        if args.checkpoint:
            records = score_checkpoint(args.checkpoint, args.config, args.overrides, args.results_dir, progress)
            print_summary(records)
            return 0
        records, failures = watch(args.watch, args.config, args.overrides, args.poll_seconds, args.once, progress)
        print_summary(records, failures)
        return 1 if failures else 0
    except (ConfigError, EvalError) as err:
        return exit_with(err)
