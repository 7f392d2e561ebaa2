"""Shared fixtures. `fmnist_shards`: ONE set of real Fashion-MNIST shards per machine, reused.

Written once into ${DS_LINCLIP_TEST_CACHE:-/tmp/ds_linclip_test_cache}/fmnist by the real writer
(`python -m ds_linclip.data.writer fashion-mnist`), which locks the folder and reuses a complete
earlier output, so parallel test sessions share it safely. Layout (same brace ranges as
configs/data/fashion_mnist.yaml):

    train/shard-{000000..000011}.tar   6000 captioned samples, 500 per shard
    test/shard-{000000..000009}.tar    the 10000 test samples, `cls` + caption, 1000 per shard
    */sizes.json, classnames.txt
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FMNIST_TRAIN_SAMPLES = 6000
FMNIST_TRAIN_SHARD_SIZE = 500
FMNIST_TEST_SHARD_SIZE = 1000


def test_cache_dir() -> Path:
    return Path(os.environ.get("DS_LINCLIP_TEST_CACHE", "/tmp/ds_linclip_test_cache"))


test_cache_dir.__test__ = False  # not a test, despite the name


@pytest.fixture(scope="session")
def fmnist_shards() -> Path:
    """Path of the Fashion-MNIST shard folder (train/, test/, classnames.txt)."""
    from ds_linclip.data.writer import FASHION_MNIST_DIR, write_fashion_mnist

    if not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist (scripts/install.sh)")
    out = test_cache_dir() / "fmnist"
    return write_fashion_mnist(
        out, train_samples=FMNIST_TRAIN_SAMPLES, shard_size=FMNIST_TRAIN_SHARD_SIZE,
        test_shard_size=FMNIST_TEST_SHARD_SIZE,
    )


# ------------------------------------------------------------------ small synthetic shards (data tests)
def png_bytes(pixels, mode=None) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A webdataset tar of samples ({"__key__": ..., ext: bytes|str}), written with webdataset."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        writer = wds.TarWriter(handle)
        for sample in samples:
            writer.write(sample)
        writer.close()
    return path


def write_counted_shards(directory: Path, shard_sizes: list[int], image_size: int = 8, sizes_json: bool = True) -> list[str]:
    """Shards shard-NNNN.tar with samples keyed s{global index}, caption "sample {index}", and a
    small PNG whose pixels encode the index; sizes.json beside them. Returns the sample keys."""
    import json

    import numpy as np

    keys, index = [], 0
    sizes = {}
    for shard, count in enumerate(shard_sizes):
        samples = []
        for _ in range(count):
            pixels = np.full((image_size, image_size, 3), index % 251, dtype=np.uint8)
            pixels[0, 0] = (index // 251) % 251
            samples.append({"__key__": f"s{index:06d}", "png": png_bytes(pixels), "txt": f"sample {index}"})
            keys.append(f"s{index:06d}")
            index += 1
        write_tar(directory / f"shard-{shard:04d}.tar", samples)
        sizes[f"shard-{shard:04d}.tar"] = count
    if sizes_json:
        (directory / "sizes.json").write_text(json.dumps(sizes))
    return keys


def data_config(spec, *overrides: str):
    """The `tiny` config (32 px, context 32) pointed at `spec`, small batches."""
    from ds_linclip.config import load_config

    cfg = load_config([], ["model.preset=tiny", "train.micro_batch_size=8", "data.workers=2", *overrides])
    cfg.data.train_shards = str(spec)
    return cfg
