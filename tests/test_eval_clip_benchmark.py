"""CLIP_benchmark's webdataset layout and its own metrics against our eval job.

The classification set is Fashion-MNIST test images written by CLIP_benchmark's own writer
(`clip_benchmark.webdataset_builder.convert_dataset`); the retrieval set is written in the layout
its `build_wds_dataset` reads (several captions per image, one per line). The model is our tiny
preset with weights spread wide enough that its predictions differ image to image. Our eval job
and CLIP_benchmark's `evaluate` must then agree on every metric.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("clip_benchmark")

from ds_linclip.config import load_config, to_yaml  # noqa: E402
from ds_linclip.data.benchmark_layout import LayoutError, read_layout  # noqa: E402
from ds_linclip.data.writer import FASHION_MNIST_CLASSNAMES, FASHION_MNIST_DIR, read_idx  # noqa: E402
from ds_linclip.eval import clip_benchmark as adapter  # noqa: E402
from ds_linclip.eval import job  # noqa: E402
from ds_linclip.eval.checkpoint import load_checkpoint  # noqa: E402
from ds_linclip.models import build_model  # noqa: E402

NUM_IMAGES = 200
TEMPLATES = ("a photo of a {c}.", "a low resolution photo of the {c}.", "a {c} on a plain background.")


class _ImageLabels(list):
    """(PIL image, label) pairs with the `.classes` / `.templates` CLIP_benchmark's writer saves."""

    classes = list(FASHION_MNIST_CLASSNAMES)
    templates = list(TEMPLATES)


def _fmnist_images(count: int):
    from PIL import Image

    images = read_idx(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz")[:count]
    labels = read_idx(Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz")[:count]
    return [Image.fromarray(pixels).convert("RGB") for pixels in images], [int(label) for label in labels]


@pytest.fixture(scope="module")
def classification_dir(tmp_path_factory) -> Path:
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    root = tmp_path_factory.mktemp("wds_fashion_mnist")
    images, labels = _fmnist_images(NUM_IMAGES)
    # max_count 64: several shards, so nshards.txt and the brace range are exercised
    convert_dataset(_ImageLabels(zip(images, labels)), "test", str(root), transform=PIL_to_bytes("webp"),
                    max_count=64, verbose=False)
    return root


@pytest.fixture(scope="module")
def retrieval_dir(tmp_path_factory) -> Path:
    import webdataset as wds
    from clip_benchmark.webdataset_builder import PIL_to_bytes

    root = tmp_path_factory.mktemp("wds_fmnist_captions")
    images, labels = _fmnist_images(60)
    (root / "test").mkdir()
    to_png = PIL_to_bytes("png")
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=25) as sink:
        for index, (image, label) in enumerate(zip(images, labels)):
            name = FASHION_MNIST_CLASSNAMES[label]
            captions = [f"a photo of a {name}", f"item {index}: {name}"] + ([f"the {name}, again"] if index % 2 else [])
            sink.write({"__key__": f"s{index:07d}", "png": to_png(image), "txt": "\n".join(captions)})
        shards = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


@pytest.fixture(scope="module")
def export_run(tmp_path_factory) -> Path:
    """Our tiny model (32 px), weights spread so predictions vary, saved as the trainer's export."""
    from safetensors.torch import save_file

    cfg = load_config([], ["model.preset=tiny"])
    torch.manual_seed(0)
    model = build_model(cfg.model, load_pretrained_weights=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1 and "embed" not in name:
                param.normal_(0.0, 0.3)
    run = tmp_path_factory.mktemp("export") / "run"
    (run / "final").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run / "final" / "model.safetensors")
    for path in (run / "config.yaml", run / "final" / "config.yaml"):
        path.write_text(to_yaml(cfg))
    return run


def _ours(export_run: Path, tmp_path: Path, task: str, *overrides: str) -> dict:
    code = job.main(["--checkpoint", str(export_run / "final"), "--results-dir", str(tmp_path), "--no-progress",
                     "eval.workers=0", "eval.batch_size=48", "eval.device=cpu", *overrides])
    assert code == 0
    return json.loads((tmp_path / f"final_{task}.json").read_text())


def test_layout_is_read_as_clip_benchmark_writes_it(classification_dir):
    layout = read_layout(str(classification_dir))
    assert layout.dataset_type == "classification" and layout.num_shards == 4  # 200 images, 64 a shard
    assert layout.classnames == FASHION_MNIST_CLASSNAMES
    assert layout.templates == tuple(t.replace("{c}", "{}") for t in TEMPLATES)
    assert layout.shard_spec.endswith("test/{0..3}.tar")


def test_zero_shot_equals_clip_benchmark(export_run, classification_dir, tmp_path):
    record = _ours(export_run, tmp_path, "zeroshot", f"eval.zeroshot_data={classification_dir}",
                   "eval.classnames=dataset", "eval.templates=dataset")
    assert record["num_samples"] == NUM_IMAGES and record["num_classes"] == 10 and record["num_templates"] == 3
    theirs = adapter.evaluate(load_checkpoint(export_run / "final"), classification_dir, batch_size=48)
    ours = record["metrics"]
    assert ours["top1"] == pytest.approx(theirs["acc1"], abs=1e-12)
    assert ours["top5"] == pytest.approx(theirs["acc5"], abs=1e-12)
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-12)
    # a model that predicts one class everywhere would agree trivially: this one does not
    assert 0.0 < ours["top1"] < 1.0 and ours["top5"] > ours["top1"]
    assert ours["mean_per_class_recall"] != pytest.approx(0.1)


def test_retrieval_equals_clip_benchmark(export_run, retrieval_dir, tmp_path):
    record = _ours(export_run, tmp_path, "retrieval", f"eval.retrieval_data={retrieval_dir}")
    assert record["num_samples"] == 60 and record["num_captions"] == 60 * 2 + 30
    theirs = adapter.evaluate(load_checkpoint(export_run / "final"), retrieval_dir, task="zeroshot_retrieval",
                              batch_size=16)
    for k in (1, 5, 10):
        # CLIP_benchmark's "image retrieval" is a caption finding its image (our text_to_image)
        assert record["metrics"][f"text_to_image_R@{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"])
        assert record["metrics"][f"image_to_text_R@{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"])
    assert 0.0 < record["metrics"]["text_to_image_R@5"] < 1.0


def test_adapter_cli_prints_clip_benchmark_metrics(export_run, classification_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert adapter.main(["--checkpoint", str(export_run / "final"), "--dataset-dir", str(classification_dir),
                         "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert set(printed["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}


def test_bad_layouts_name_the_file(export_run, classification_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(classification_dir, broken)
    (broken / "test" / "2.tar").unlink()
    with pytest.raises(LayoutError, match=r"lacks 1 of the 4 shards .*first: 2\.tar"):
        read_layout(str(broken))
    with pytest.raises(LayoutError, match=r"train/nshards\.txt not found .*splits here: test"):
        read_layout(str(classification_dir), "train")
    shutil.copy(classification_dir / "test" / "2.tar", broken / "test" / "2.tar")
    (broken / "zeroshot_classification_templates.txt").write_text("a photo of a {}.\n")
    with pytest.raises(LayoutError, match=r"zeroshot_classification_templates\.txt line 1: .* no '\{c\}'"):
        read_layout(str(broken), "test")
    # the eval job checks before loading weights: exit 2 naming the key
    code = job.main(["--checkpoint", str(export_run / "final"), "--results-dir", str(tmp_path / "r"),
                     f"eval.zeroshot_data={classification_dir}", "eval.split=val", "eval.classnames=dataset"])
    assert code == 2 and "eval.split" in capsys.readouterr().err
    # class names that do not fit the folder's classes
    code = job.main(["--checkpoint", str(export_run / "final"), "--results-dir", str(tmp_path / "r"), "--no-progress",
                     f"eval.zeroshot_data={classification_dir}", "eval.classnames=imagenet1k", "eval.workers=0"])
    assert code == 1 and "has 10 classes but eval.classnames=imagenet1k gives 1000 names" in capsys.readouterr().err


def test_numpy2_workaround_matches_clip_benchmark_accuracy():
    """Our stand-in for CLIP_benchmark 1.6.2's `accuracy` computes the same numbers (its own code,
    run on a one-element-safe path, is the reference)."""
    from clip_benchmark.metrics import zeroshot_classification

    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 7, generator=generator), torch.randint(0, 7, (50,), generator=generator)
    ours = adapter._accuracy(logits, target, topk=(1, 5))
    try:
        reference = zeroshot_classification.accuracy(logits, target, topk=(1, 5))
    except TypeError:  # NumPy 2 refuses float() of a 1-element array: the bug the stand-in exists for
        pred = logits.topk(5, 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        reference = [float(np.asarray(correct[:k].reshape(-1).float().sum()).item()) / 50 for k in (1, 5)]
    assert ours == pytest.approx(reference)
    assert zeroshot_classification.accuracy is not adapter._accuracy  # restored after use
