"""Shard writer: Fashion-MNIST (the shared fixture), image folders with captions, img2dataset
re-sharding; sizes.json, idempotent re-runs, no half-written shard under a final name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import FMNIST_TRAIN_SAMPLES, png_bytes, write_tar
from PIL import Image

from ds_linclip.data import writer
from ds_linclip.data.pipeline import read_shard
from ds_linclip.data.writer import FASHION_MNIST_CLASSNAMES, FASHION_MNIST_DIR, read_idx

REPO = Path(__file__).resolve().parents[1]


def shard_samples(path) -> list[dict]:
    counts = Counter()
    samples = list(read_shard(str(path), counts))
    assert not counts
    return samples


def test_fashion_mnist_shards_match_the_source(fmnist_shards):
    train_sizes = json.loads((fmnist_shards / "train/sizes.json").read_text())
    test_sizes = json.loads((fmnist_shards / "test/sizes.json").read_text())
    assert list(train_sizes) == [f"shard-{i:06d}.tar" for i in range(12)]
    assert sum(train_sizes.values()) == FMNIST_TRAIN_SAMPLES and set(train_sizes.values()) == {500}
    assert list(test_sizes) == [f"shard-{i:06d}.tar" for i in range(10)] and sum(test_sizes.values()) == 10000
    assert (fmnist_shards / "classnames.txt").read_text().splitlines() == list(FASHION_MNIST_CLASSNAMES)

    images = read_idx(f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz")
    labels = read_idx(f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz")
    test = shard_samples(fmnist_shards / "test/shard-000002.tar")
    assert len(test) == 1000
    for offset in (0, 517, 999):
        sample, index = test[offset], 2000 + offset
        assert int(sample["cls"]) == labels[index]
        assert np.array_equal(np.asarray(Image.open(__import__("io").BytesIO(sample["png"]))), images[index])
        assert sample["txt"].decode() == f"a photo of a {FASHION_MNIST_CLASSNAMES[labels[index]]}."

    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    train_labels = read_idx(f"{FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz")
    train = shard_samples(fmnist_shards / "train/shard-000001.tar")
    captions = [s["txt"].decode() for s in train]
    for offset, caption in enumerate(captions):
        name = FASHION_MNIST_CLASSNAMES[train_labels[500 + offset]]
        assert caption in {t(name) for t in OPENAI_IMAGENET_TEMPLATES}
    assert len(set(captions)) > 100  # varied templates, not one caption per class
    assert "cls" not in train[0]


def test_rerun_reuses_complete_output_and_other_args_rewrite(tmp_path):
    out = tmp_path / "fm"
    writer.write_fashion_mnist(out, train_samples=300, test_samples=200, shard_size=100, test_shard_size=100)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    assert len(before) == 5
    writer.write_fashion_mnist(out, train_samples=300, test_samples=200, shard_size=100, test_shard_size=100)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == before  # untouched
    writer.write_fashion_mnist(out, train_samples=300, test_samples=200, shard_size=150, test_shard_size=100)
    assert json.loads((out / "train/sizes.json").read_text()) == {"shard-000000.tar": 150, "shard-000001.tar": 150}
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]


def test_a_crash_leaves_no_partial_shard_under_a_final_name(tmp_path):
    def samples():
        for i in range(25):
            yield {"__key__": f"{i:04d}", "png": png_bytes(np.zeros((4, 4), np.uint8)), "txt": "x"}
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        writer.write_shards(samples(), tmp_path, 10, {"test": 1})
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".writer"))
    assert names == ["shard-000000.tar", "shard-000001.tar"]  # the complete ones; no tmp, no sizes.json
    for name in names:
        assert len(tarfile.open(tmp_path / name).getnames()) == 20
    assert not writer.is_complete(tmp_path, {"test": 1})
    (tmp_path / ".shard-000007.tar.tmp-12345").write_bytes(b"left by a killed writer")
    good = ({"__key__": f"{i:04d}", "txt": "x"} for i in range(12))
    assert writer.write_shards(good, tmp_path, 10, {"test": 1}) == {"shard-000000.tar": 10, "shard-000001.tar": 2}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".writer")) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar", "sizes.json"]


def test_imagefolder_with_captions_tsv_via_cli(tmp_path):
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    rows = []
    for i in range(7):
        name = f"sub/{i}.png" if i % 2 else f"{i}.jpg"
        Image.fromarray(np.full((6, 6, 3), i * 30, np.uint8)).save(images / name)
        rows.append(f"{name}\tcaption number {i}\t{i % 3}")
    rows.append("missing.png\ta caption for nothing\t0")
    rows.append("sub/1.png\t   \t0")
    (tmp_path / "captions.tsv").write_text("filepath\tcaption\tlabel\n" + "\n".join(rows) + "\n")
    out = tmp_path / "shards"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "ds_linclip.data.writer", "imagefolder", "--images", str(images), "--captions",
         str(tmp_path / "captions.tsv"), "--label-column", "label", "--out", str(out), "--shard-size", "3"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped: {'missing_image': 1, 'empty_caption': 1}" in result.stderr
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    samples = [s for name in sizes for s in shard_samples(out / name)]
    assert [s["txt"].decode() for s in samples] == [f"caption number {i}" for i in range(7)]
    assert [int(s["cls"]) for s in samples] == [i % 3 for i in range(7)]
    assert [("png" if i % 2 else "jpg") in samples[i] for i in range(7)] == [True] * 7


def test_imagefolder_class_subfolders(tmp_path):
    for cls in ("cat", "dog_house"):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "in" / cls / f"{i}.png")
    assert writer.main(["imagefolder", "--images", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    samples = shard_samples(tmp_path / "out/shard-000000.tar")
    assert [(int(s["cls"]), s["txt"].decode()) for s in samples] == [
        (0, "a photo of a cat."), (0, "a photo of a cat."), (1, "a photo of a dog house."), (1, "a photo of a dog house.")]
    assert (tmp_path / "out/classnames.txt").read_text().split("\n")[:2] == ["cat", "dog_house"]


def test_img2dataset_reshard(tmp_path):
    # img2dataset layout: NNNNN.tar with key.jpg/.txt/.json; failed downloads have no image
    for shard in range(3):
        samples = []
        for i in range(5):
            key = f"{shard:05d}{i:04d}"
            sample = {"__key__": key, "txt": f"caption {key}", "json": json.dumps({"key": key, "status": "success"})}
            if i != 4:
                sample["jpg"] = png_bytes(np.zeros((4, 4), np.uint8))
            samples.append(sample)
        write_tar(tmp_path / "in" / f"{shard:05d}.tar", samples)
    assert writer.main(["img2dataset", "--input", str(tmp_path / "in/{00000..00002}.tar"), "--out",
                        str(tmp_path / "out"), "--shard-size", "5"]) == 0
    sizes = json.loads((tmp_path / "out/sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 5, "shard-000001.tar": 5, "shard-000002.tar": 2}
    samples = [s for name in sizes for s in shard_samples(tmp_path / "out" / name)]
    assert [json.loads(s["json"])["key"] for s in samples] == [f"{sh:05d}{i:04d}" for sh in range(3) for i in range(4)]
    assert all({"jpg", "txt", "json"} <= set(s) for s in samples)


def test_cli_help_answers():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args in ([], ["fashion-mnist"], ["imagefolder"], ["img2dataset"]):
        result = subprocess.run([sys.executable, "-m", "ds_linclip.data.writer", *args, "--help"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout
    assert "--train-samples" in subprocess.run(
        [sys.executable, "-m", "ds_linclip.data.writer", "fashion-mnist", "--help"], env=env, capture_output=True,
        text=True, timeout=120).stdout


def test_fashion_mnist_canvas_draws_each_item_small_and_is_deterministic(tmp_path):
    import io

    writer.write_fashion_mnist_canvas(tmp_path / "a", canvas=32, item_size=8, clutter=3, train_samples=40,
                                      test_samples=30, shard_size=20, test_shard_size=10)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "ds_linclip.data.writer", "fashion-mnist-canvas", "--out", str(tmp_path / "b"),
                    "--canvas", "32", "--item-size", "8", "--train-samples", "40", "--test-samples", "30",
                    "--shard-size", "20", "--test-shard-size", "10"], env=env, check=True, timeout=300,
                   capture_output=True)
    for split, shards in (("train", 2), ("test", 3)):
        sizes = json.loads((tmp_path / "a" / split / "sizes.json").read_text())
        assert list(sizes) == [f"shard-{i:06d}.tar" for i in range(shards)]
        for name in sizes:  # the same arguments give the same samples (the tar headers hold write times)
            first, second = (shard_samples(tmp_path / out / split / name) for out in ("a", "b"))
            assert [dict(s, __url__=None) for s in first] == [dict(s, __url__=None) for s in second]
    assert (tmp_path / "a" / "classnames.txt").read_text().splitlines() == list(FASHION_MNIST_CLASSNAMES)

    images = read_idx(f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz")
    labels = read_idx(f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz")
    test = [s for i in range(3) for s in shard_samples(tmp_path / "a" / "test" / f"shard-{i:06d}.tar")]
    corners = set()
    for index, sample in enumerate(test):
        assert int(sample["cls"]) == labels[index]
        assert sample["txt"].decode() == f"a photo of a {FASHION_MNIST_CLASSNAMES[labels[index]]}."
        canvas = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert canvas.shape == (32, 32) and canvas.dtype == np.uint8
        item = np.asarray(Image.fromarray(images[index]).resize((8, 8), Image.Resampling.BOX))
        bright = np.argwhere(canvas > 48)  # clutter is at most 48: what is brighter is the item
        top, left = bright.min(axis=0)
        assert (bright.max(axis=0) - bright.min(axis=0) < 8).all()  # the item fits in an 8 x 8 box
        # somewhere the 8 x 8 box holds the shrunk item (over the clutter: the brighter of the two)
        fits = [(t, l) for t in range(max(0, top - 7), top + 1) for l in range(max(0, left - 7), left + 1)
                if t + 8 <= 32 and l + 8 <= 32
                and np.array_equal(np.maximum(canvas[t:t + 8, l:l + 8], item), canvas[t:t + 8, l:l + 8])
                and (canvas[t:t + 8, l:l + 8][item > 48] == item[item > 48]).all()]
        assert fits, f"test sample {index}: the shrunk item is not on the canvas"
        corners.add(fits[0])
    assert len(corners) > 10  # placed at random, not at one spot


def test_writer_and_prompt_lists_load_without_torch_or_the_open_clip_package():
    """open_clip's templates and class names come from its zero_shot_metadata file, the lists equal to the
    package's, without its __init__ (torch, transformers, every model: ~5 s a writer run does not need)."""
    code = ("import sys\n"
            "from ds_linclip.data.writer import caption_templates\n"
            "from ds_linclip.data.prompts import load_classnames, load_templates\n"
            "assert len(caption_templates()) == len(load_templates('openai')) == 80\n"
            "assert len(load_classnames('imagenet1k')) == 1000 and len(load_templates('simple')) == 7\n"
            "print(sorted(m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    import open_clip.zero_shot_metadata as metadata

    from ds_linclip.data.prompts import load_classnames, load_templates

    assert load_classnames("imagenet1k") == list(metadata.IMAGENET_CLASSNAMES)
    assert [t("cat") for t in load_templates("openai")] == [t("cat") for t in metadata.OPENAI_IMAGENET_TEMPLATES]
