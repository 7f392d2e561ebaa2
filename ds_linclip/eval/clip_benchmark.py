"""Our checkpoints scored by CLIP_benchmark's own code (`clip-benchmark` on PyPI, 1.6.x).

CLIP_benchmark is the suite people report CLIP numbers with. This adapter hands it our model
(`encode_image` / `encode_text`), our tokenizer and our eval transform, and lets its dataset
builder (`build_wds_dataset`, a local folder in its webdataset layout) and its metrics
(`metrics.zeroshot_classification.evaluate`, `metrics.zeroshot_retrieval.evaluate`) do the rest,
so a number printed here is CLIP_benchmark's number for our model. Our own eval job reads the same
folders (`eval.zeroshot_data=FOLDER eval.classnames=dataset eval.templates=dataset`); the tests
check that both give the same top-1.

    python -m ds_linclip.eval.clip_benchmark --checkpoint RUN/final --dataset-dir wds_cifar10 \
        --task zeroshot_classification
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ds_linclip.config import ConfigError
from ds_linclip.data.benchmark_layout import LayoutError, read_layout
from ds_linclip.data.pipeline import eval_transform, tokenize
from ds_linclip.eval.checkpoint import LoadedCheckpoint, load_checkpoint
from ds_linclip.eval.errors import EvalError, exit_with

TASKS = ("zeroshot_classification", "zeroshot_retrieval")


def _accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """CLIP_benchmark's top-k accuracy, returning Python floats."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum().item()) / n for k in topk]


@contextlib.contextmanager
def _numpy2_accuracy() -> Iterator[None]:
    """clip-benchmark 1.6.2's `zeroshot_classification.accuracy` calls `float()` on a one-element
    NumPy array, which NumPy 2 rejects; while CLIP_benchmark scores, its `accuracy` is the same
    computation returning floats. The only place we touch CLIP_benchmark's code."""
    from clip_benchmark.metrics import zeroshot_classification

    original = zeroshot_classification.accuracy
    zeroshot_classification.accuracy = _accuracy
    try:
        yield
    finally:
        zeroshot_classification.accuracy = original


def evaluate(
    loaded: LoadedCheckpoint,
    dataset_dir: str | Path,
    task: str = "zeroshot_classification",
    split: str = "test",
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
    recall_k: Sequence[int] = (1, 5, 10),
) -> dict[str, Any]:
    """Run CLIP_benchmark's `task` on a local folder in its webdataset layout -> its metrics dict
    (classification: acc1, acc5, mean_per_class_recall; retrieval: image/text_retrieval_recall@K)."""
    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    if task not in TASKS:
        raise EvalError(f"unknown CLIP_benchmark task {task!r} (known: {', '.join(TASKS)})")
    try:
        layout = read_layout(str(dataset_dir), split)  # our checks first: errors name the file
    except LayoutError as err:
        raise EvalError(str(err)) from err
    cfg, model = loaded.cfg, loaded.model.to(device).eval()
    # CLIP_benchmark's dataset name only picks its wds builder here; the data is the local folder
    dataset = build_wds_dataset("wds/local", transform=eval_transform(cfg.model.image.image_size),
                                split=split, data_dir=str(layout.root))
    # as CLIP_benchmark's own CLI loads a `wds/` dataset
    loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False,
                                         num_workers=workers)
    tokenizer = partial(tokenize, context_length=cfg.model.text.context_length)
    with torch.no_grad():
        if task == "zeroshot_classification":
            if not (layout.classnames and layout.templates):
                raise EvalError(f"{layout.root} needs classnames.txt and zeroshot_classification_templates.txt")
            loader.dataset.classes = list(layout.classnames)  # CLIP_benchmark reads the class count here
            templates = [t.replace("{}", "{c}") for t in layout.templates]
            with _numpy2_accuracy():
                return zeroshot_classification.evaluate(model, loader, tokenizer, list(layout.classnames), templates,
                                                        device, amp=False)
        return zeroshot_retrieval.evaluate(model, loader, tokenizer, device, amp=False, recall_k_list=list(recall_k))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.eval.clip_benchmark",
        description=("Score one checkpoint with CLIP_benchmark's own zero-shot classification or retrieval code "
                     "on a local dataset folder in CLIP_benchmark's webdataset layout (SPLIT/nshards.txt, "
                     "SPLIT/{0..n-1}.tar, classnames.txt, zeroshot_classification_templates.txt, dataset_type.txt). "
                     "Prints CLIP_benchmark's metrics as JSON. Nothing is downloaded."),
    )
    parser.add_argument("--checkpoint", required=True,
                        help="a DeepSpeed tag, a run's checkpoints/ folder, an export (R/final) or a run folder")
    parser.add_argument("--dataset-dir", required=True, help="the dataset folder in CLIP_benchmark's layout")
    parser.add_argument("--task", choices=TASKS, default="zeroshot_classification")
    parser.add_argument("--split", default="test", help="the split subfolder (default: test)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="also write the metrics JSON to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        loaded = load_checkpoint(args.checkpoint)
        metrics = evaluate(loaded, args.dataset_dir, args.task, args.split, args.batch_size, args.workers, args.device)
    except (ConfigError, EvalError) as err:
        return exit_with(err)
    text = json.dumps({"task": args.task, "dataset_dir": str(args.dataset_dir), "split": args.split,
                       "checkpoint": str(args.checkpoint), "metrics": metrics}, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
