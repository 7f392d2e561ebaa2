"""Write webdataset tar shards (+ sizes.json) from Fashion-MNIST, an image folder, or img2dataset output.

    python -m ds_linclip.data.writer fashion-mnist --out data/fmnist
    python -m ds_linclip.data.writer imagefolder --images DIR [--captions captions.csv] --out DIR
    python -m ds_linclip.data.writer img2dataset --input 'laion/{00000..00099}.tar' --out DIR --shard-size 10000
    python -m ds_linclip.data.writer synthetic --out DIR --samples 2048 --image-size 64
    python -m ds_linclip.data.writer fashion-mnist-canvas --out data/fmnist-canvas --canvas 56 --item-size 8

Every shard is written under a hidden temporary name and renamed when complete, so a crash never
leaves a half-written tar under a name a shard spec matches. `sizes.json` (open_clip's format,
shard file name -> samples) and `manifest.json` (the arguments) are written last; a re-run with
the same arguments finds the manifest and reuses the output (idempotent), with other arguments
it rewrites the split. A file lock makes concurrent writers (parallel test sessions) safe.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import gzip
import io
import json
import os
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Zalando's class names, written the way a caption says them (index = label)
FASHION_MNIST_CLASSNAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
SHARD_PATTERN = "shard-{:06d}.tar"
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp",
                    ".gif": "gif", ".tif": "tiff", ".tiff": "tiff"}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".writer.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_complete(out: Path, manifest: dict) -> bool:
    """True when `out` holds a finished split written with exactly these arguments."""
    try:
        saved = json.loads((out / "manifest.json").read_text())
        sizes = json.loads((out / "sizes.json").read_text())
    except (OSError, ValueError):
        return False
    return saved.get("args") == manifest and all((out / name).is_file() for name in sizes)


def write_shards(samples: Iterable[dict], out: Path, shard_size: int, manifest: dict,
                 total: int | None = None, desc: str = "shards") -> dict[str, int]:
    """Write samples ({"__key__": str, ext: bytes|str}) into out/shard-NNNNNN.tar, `shard_size` each.

    Returns sizes {shard file name: samples}. Reuses a complete earlier output (same manifest).
    """
    import webdataset as wds
    from tqdm import tqdm

    out = Path(out)
    with _locked(out):
        if is_complete(out, manifest):
            print(f"{out}: up to date ({manifest})", file=sys.stderr)
            return json.loads((out / "sizes.json").read_text())
        # earlier output and temporaries of a crashed writer (we hold the lock: nobody else writes)
        stale_files = list(out.glob("shard-*.tar")) + list(out.glob(".shard-*.tmp-*"))
        for stale in stale_files + [out / "manifest.json", out / "sizes.json"]:
            stale.unlink(missing_ok=True)
        sizes: dict[str, int] = {}
        writer = handle = tmp = None
        name = ""

        def close():
            nonlocal writer, handle, tmp
            if writer is not None:
                writer.close()
                handle.close()
                os.replace(tmp, out / name)  # complete: now under its final name
                writer = handle = tmp = None

        try:
            for sample in tqdm(samples, total=total, desc=f"{desc} -> {out}", unit="img", mininterval=1.0):
                if writer is None or sizes[name] >= shard_size:
                    close()
                    name = SHARD_PATTERN.format(len(sizes))
                    tmp = out / f".{name}.tmp-{os.getpid()}"
                    handle = open(tmp, "wb")
                    writer = wds.TarWriter(handle)
                    sizes[name] = 0
                writer.write(sample)
                sizes[name] += 1
            close()
        finally:
            if tmp is not None:  # an exception mid-shard: drop the partial tar
                if writer is not None:
                    try:
                        writer.close()
                    finally:
                        handle.close()
                tmp.unlink(missing_ok=True)
        if not sizes:
            raise ValueError(f"no samples to write into {out}")
        _atomic_write_text(out / "sizes.json", json.dumps(sizes, indent=1))
        _atomic_write_text(out / "manifest.json", json.dumps({"args": manifest, "samples": sum(sizes.values())}, indent=1))
        print(f"{out}: {sum(sizes.values())} samples in {len(sizes)} shards", file=sys.stderr)
        return sizes


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------- synthetic
SYNTHETIC_WORDS = ("red", "green", "blue", "striped", "dotted", "square", "round", "small", "large", "bright")


def synthetic_samples(samples: int, image_size: int, seed: int) -> Iterator[dict]:
    """Noise images with a coloured block and a caption naming its colour and place: data for
    throughput runs on machines without a dataset (the images are decoded and resized like real ones)."""
    rng = np.random.default_rng(seed)
    for index in range(samples):
        pixels = rng.integers(0, 64, (image_size, image_size, 3), dtype=np.uint8)
        channel, row, col = int(rng.integers(3)), int(rng.integers(2)), int(rng.integers(2))
        half = image_size // 2
        pixels[row * half:(row + 1) * half, col * half:(col + 1) * half, channel] = 255
        words = " ".join(SYNTHETIC_WORDS[i] for i in rng.integers(len(SYNTHETIC_WORDS), size=3))
        caption = f"a {('red', 'green', 'blue')[channel]} block at the {('top', 'bottom')[row]} {('left', 'right')[col]}, {words}"
        yield {"__key__": f"synthetic{index:08d}", "png": encode_png(pixels), "txt": caption}


def write_synthetic(out: str | Path, samples: int = 2048, image_size: int = 64, shard_size: int = 512,
                    seed: int = 0) -> Path:
    """OUT/train/shard-*.tar of `samples` synthetic captioned images (+ sizes.json); reused when present."""
    out = Path(out)
    manifest = {"dataset": "synthetic", "samples": samples, "image_size": image_size, "shard_size": shard_size,
                "seed": seed, "format": 1}
    write_shards(synthetic_samples(samples, image_size, seed), out / "train", shard_size, manifest,
                 total=samples, desc="synthetic")
    return out


# ---------------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def caption_templates():
    from ds_linclip.data.prompts import open_clip_metadata

    return open_clip_metadata().OPENAI_IMAGENET_TEMPLATES


def fashion_mnist_samples(images: Iterable[np.ndarray], labels: np.ndarray, split: str, seed: int) -> Iterator[dict]:
    templates = caption_templates()
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    choice = rng.integers(0, len(templates), size=len(labels))
    for index, (pixels, label) in enumerate(zip(images, labels)):
        name = FASHION_MNIST_CLASSNAMES[int(label)]
        sample = {"__key__": f"{split}{index:06d}", "png": encode_png(pixels)}
        if split == "train":
            sample["txt"] = templates[int(choice[index])](name)
        else:
            sample["txt"] = f"a photo of a {name}."
            sample["cls"] = str(int(label))
        yield sample


def _write_fashion_mnist_splits(out: Path, source: Path, train_samples: int | None, test_samples: int | None,
                                shard_size: int, test_shard_size: int, seed: int, dataset: str,
                                drawing: dict | None = None, draw=None) -> Path:
    """out/train, out/test, out/classnames.txt from the first N samples of each split; `draw(images, split)`
    (optional) turns the 28 px images into what is written, `drawing` its arguments for the manifest."""
    for split, prefix, count, size in (
        ("train", "train", train_samples, shard_size),
        ("test", "t10k", test_samples, test_shard_size),
    ):
        images_file = source / f"{prefix}-images-idx3-ubyte.gz"
        labels_file = source / f"{prefix}-labels-idx1-ubyte.gz"
        for f in (images_file, labels_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found (Debian: apt-get install dataset-fashion-mnist, or --source DIR)")
        manifest = {"dataset": dataset, "split": split, "samples": count, "shard_size": size, **(drawing or {}),
                    "seed": seed, "format": 1}
        if is_complete(out / split, manifest):
            print(f"{out / split}: up to date", file=sys.stderr)
            continue
        images, labels = read_idx(images_file), read_idx(labels_file)
        if count is not None:
            images, labels = images[:count], labels[:count]
        drawn = draw(images, split) if draw else images
        write_shards(fashion_mnist_samples(drawn, labels, split, seed), out / split, size, manifest,
                     total=len(labels), desc=f"{dataset} {split}")
    _atomic_write_text(out / "classnames.txt", "\n".join(FASHION_MNIST_CLASSNAMES) + "\n")
    return out


def write_fashion_mnist(out: str | Path, source: str | Path = FASHION_MNIST_DIR, train_samples: int | None = None,
                        test_samples: int | None = None, shard_size: int = 5000, test_shard_size: int = 1000,
                        seed: int = 0) -> Path:
    """out/train (captions from open_clip's OpenAI templates around the class name), out/test
    (`cls` label + "a photo of a {name}."), out/classnames.txt. The first N samples of each split."""
    return _write_fashion_mnist_splits(Path(out), Path(source), train_samples, test_samples, shard_size,
                                       test_shard_size, seed, "fashion-mnist")


# ---------------------------------------------------------------------------- Fashion-MNIST canvas
def canvas_images(images: np.ndarray, canvas: int, item_size: int, clutter: int, seed: int) -> Iterator[np.ndarray]:
    """Each Fashion-MNIST item shrunk to `item_size` px (antialiased) and pasted at a uniformly random
    place on a dark `canvas` x `canvas` px image with `clutter` faint rectangles (intensity 16-48).
    Deterministic in `seed`. Why: at half the canvas resolution the item is item_size / 2 px and loses
    the detail that tells the classes apart, so more tokens (a higher input resolution at a fixed
    patch size) can pay. Yields (canvas, canvas) uint8 arrays."""
    if not 0 < item_size <= canvas:
        raise ValueError(f"item size {item_size} must be in 1..canvas ({canvas})")
    rng = np.random.default_rng(seed)
    for pixels in images:
        image = np.zeros((canvas, canvas), dtype=np.uint8)
        for _ in range(clutter):
            top, left = rng.integers(0, canvas, size=2)
            height, width = rng.integers(2, canvas // 4 + 1, size=2)
            image[top:top + height, left:left + width] = rng.integers(16, 49)
        item = np.asarray(Image.fromarray(pixels).resize((item_size, item_size), Image.Resampling.BOX))
        top, left = rng.integers(0, canvas - item_size + 1, size=2)
        region = image[top:top + item_size, left:left + item_size]
        np.maximum(region, item, out=region)  # the item drawn over the clutter
        yield image


def write_fashion_mnist_canvas(out: str | Path, source: str | Path = FASHION_MNIST_DIR, canvas: int = 56,
                               item_size: int = 8, clutter: int = 3, train_samples: int | None = None,
                               test_samples: int | None = None, shard_size: int = 5000,
                               test_shard_size: int = 1000, seed: int = 0) -> Path:
    """Like `write_fashion_mnist` (same captions, `cls` labels, classnames.txt) with every item drawn
    small at a random place on a larger canvas (`canvas_images`; the test split draws with its own seed)."""
    def draw(images: np.ndarray, split: str) -> Iterator[np.ndarray]:
        return canvas_images(images, canvas, item_size, clutter, seed * 2 + (split == "test"))

    return _write_fashion_mnist_splits(Path(out), Path(source), train_samples, test_samples, shard_size,
                                       test_shard_size, seed, "fashion-mnist-canvas",
                                       {"canvas": canvas, "item_size": item_size, "clutter": clutter}, draw)


# ------------------------------------------------------------------------------------ image folder
def _read_table(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in text.splitlines()[0] and "," not in text.splitlines()[0]) else ","
    return list(csv.DictReader(io.StringIO(text), delimiter=delimiter))


def imagefolder_samples(images: Path, captions: Path | None, path_column: str, caption_column: str,
                        label_column: str | None, skipped: Counter) -> tuple[list[dict], list[str] | None]:
    """Sample descriptions (not yet read) and class names (folder mode) for an image folder."""
    rows: list[dict] = []
    classnames = None
    if captions is not None:
        table = _read_table(captions)
        if not table:
            raise ValueError(f"{captions}: no rows")
        for column in [path_column, caption_column] + ([label_column] if label_column else []):
            if column not in table[0]:
                raise ValueError(f"{captions}: no column {column!r} (columns: {list(table[0])})")
        for row in table:
            rows.append({"path": images / row[path_column], "caption": row[caption_column],
                         "label": row.get(label_column) if label_column else None})
    else:  # ImageFolder layout: images/<class>/<file>; caption from the class name
        classnames = sorted(d.name for d in images.iterdir() if d.is_dir())
        if not classnames:
            raise ValueError(f"{images}: no class sub-folders and no --captions file")
        for label, name in enumerate(classnames):
            for f in sorted((images / name).rglob("*")):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    rows.append({"path": f, "caption": f"a photo of a {name.replace('_', ' ')}.", "label": label})
    return rows, classnames


def _folder_stream(rows: list[dict], skipped: Counter) -> Iterator[dict]:
    for index, row in enumerate(rows):
        path: Path = row["path"]
        ext = IMAGE_EXTENSIONS.get(path.suffix.lower())
        caption = (row["caption"] or "").strip()
        if ext is None:
            skipped["not_an_image_file"] += 1
            continue
        if not caption:
            skipped["empty_caption"] += 1
            continue
        try:
            data = path.read_bytes()
        except OSError:
            skipped["missing_image"] += 1
            continue
        if ext not in ("jpg", "png", "webp"):  # keep readers to the common keys: re-encode as PNG
            try:
                data = encode_png(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            except Exception:  # noqa: BLE001
                skipped["decode_error"] += 1
                continue
            ext = "png"
        sample = {"__key__": f"{index:09d}", ext: data, "txt": caption}
        if row.get("label") not in (None, ""):
            sample["cls"] = str(int(row["label"]))
        yield sample


# ----------------------------------------------------------------------------------- img2dataset
def reshard_samples(spec: str, skipped: Counter) -> Iterator[dict]:
    """img2dataset (or any webdataset) shards -> samples with an image, all their files kept."""
    from ds_linclip.data.pipeline import read_shard
    from ds_linclip.data.shards import expand_urls

    image_keys = ("jpg", "jpeg", "png", "webp")
    index = 0
    for url in expand_urls(spec):
        for sample in read_shard(url, skipped):
            if not any(k in sample for k in image_keys):
                skipped["missing_image"] += 1
                continue
            record = {k: v for k, v in sample.items() if not k.startswith("__")}
            record["__key__"] = f"{index:09d}"
            index += 1
            yield record


# ------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.data.writer",
        description="Write webdataset tar shards + sizes.json (atomic, idempotent).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fm = sub.add_parser("fashion-mnist", help="Debian's dataset-fashion-mnist -> captioned train + labelled test shards")
    fm.add_argument("--out", required=True, help="output dir: OUT/train, OUT/test, OUT/classnames.txt")
    fm.add_argument("--source", default=FASHION_MNIST_DIR, help="dir with the *-idx?-ubyte.gz files (default: %(default)s)")
    fm.add_argument("--train-samples", type=int, default=None, help="first N of the 60000 train images (default all)")
    fm.add_argument("--test-samples", type=int, default=None, help="first N of the 10000 test images (default all)")
    fm.add_argument("--shard-size", type=int, default=5000, help="samples per train shard (default %(default)s)")
    fm.add_argument("--test-shard-size", type=int, default=1000, help="samples per test shard (default %(default)s)")
    fm.add_argument("--seed", type=int, default=0, help="seed for the caption template choice")

    canvas = sub.add_parser("fashion-mnist-canvas",
                            help="Fashion-MNIST items drawn small at random places on a larger canvas (detail needs tokens)")
    canvas.add_argument("--out", required=True, help="output dir: OUT/train, OUT/test, OUT/classnames.txt")
    canvas.add_argument("--source", default=FASHION_MNIST_DIR, help="dir with the *-idx?-ubyte.gz files (default: %(default)s)")
    canvas.add_argument("--canvas", type=int, default=56, help="canvas size in px (default %(default)s)")
    canvas.add_argument("--item-size", type=int, default=8, help="item size in px on the canvas (default %(default)s)")
    canvas.add_argument("--clutter", type=int, default=3, help="faint rectangles per image (default %(default)s)")
    canvas.add_argument("--train-samples", type=int, default=None, help="first N of the 60000 train images (default all)")
    canvas.add_argument("--test-samples", type=int, default=None, help="first N of the 10000 test images (default all)")
    canvas.add_argument("--shard-size", type=int, default=5000, help="samples per train shard (default %(default)s)")
    canvas.add_argument("--test-shard-size", type=int, default=1000, help="samples per test shard (default %(default)s)")
    canvas.add_argument("--seed", type=int, default=0, help="seed for placement, clutter and caption templates")

    folder = sub.add_parser("imagefolder", help="an image folder (+ captions CSV/TSV, or class sub-folders) -> shards")
    folder.add_argument("--images", required=True, help="root folder of the images")
    folder.add_argument("--captions", default=None,
                        help="CSV/TSV with a path column (relative to --images) and a caption column; "
                             "without it, sub-folders are classes (cls label + 'a photo of a {class}.')")
    folder.add_argument("--path-column", default="filepath")
    folder.add_argument("--caption-column", default="caption")
    folder.add_argument("--label-column", default=None, help="optional integer label column -> `cls`")
    folder.add_argument("--out", required=True)
    folder.add_argument("--shard-size", type=int, default=10000)

    re_shard = sub.add_parser("img2dataset", help="re-shard img2dataset webdataset output (drops samples without image)")
    re_shard.add_argument("--input", required=True, help="shard spec of the img2dataset tars, e.g. 'laion/{00000..00099}.tar'")
    re_shard.add_argument("--out", required=True)
    re_shard.add_argument("--shard-size", type=int, default=10000)

    synthetic = sub.add_parser("synthetic", help="noise images with a captioned coloured block -> OUT/train (throughput runs)")
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--samples", type=int, default=2048)
    synthetic.add_argument("--image-size", type=int, default=64, help="stored size; the trainer resizes to its own")
    synthetic.add_argument("--shard-size", type=int, default=512)
    synthetic.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    skipped: Counter = Counter()
    if args.command == "synthetic":
        write_synthetic(args.out, args.samples, args.image_size, args.shard_size, args.seed)
    elif args.command == "fashion-mnist":
        write_fashion_mnist(args.out, args.source, args.train_samples, args.test_samples, args.shard_size,
                            args.test_shard_size, args.seed)
    elif args.command == "fashion-mnist-canvas":
        write_fashion_mnist_canvas(args.out, args.source, args.canvas, args.item_size, args.clutter,
                                   args.train_samples, args.test_samples, args.shard_size, args.test_shard_size,
                                   args.seed)
    elif args.command == "imagefolder":
        images = Path(args.images)
        if not images.is_dir():
            parser.error(f"--images {images}: not a directory")
        captions = Path(args.captions) if args.captions else None
        rows, classnames = imagefolder_samples(images, captions, args.path_column, args.caption_column,
                                               args.label_column, skipped)
        manifest = {"dataset": "imagefolder", "images": str(images.resolve()),
                    "captions": str(captions.resolve()) if captions else None, "rows": len(rows),
                    "shard_size": args.shard_size, "format": 1}
        write_shards(_folder_stream(rows, skipped), Path(args.out), args.shard_size, manifest, total=len(rows),
                     desc="imagefolder")
        if classnames:
            _atomic_write_text(Path(args.out) / "classnames.txt", "\n".join(classnames) + "\n")
    else:
        manifest = {"dataset": "img2dataset", "input": args.input, "shard_size": args.shard_size, "format": 1}
        write_shards(reshard_samples(args.input, skipped), Path(args.out), args.shard_size, manifest,
                     desc="img2dataset")
    if skipped:
        print(f"skipped: {dict(skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
