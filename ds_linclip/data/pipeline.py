"""webdataset shards -> batches of (images, tokens) for training, (images, labels|captions) for eval.

Per DataLoader worker the training stream is

    shards (epoch order or resampled) -> tar members (webdataset's gopen: local/pipe:/URLs; our
      tarfile stream reader, tar_members) -> samples grouped by key (webdataset's base_plus_ext)
      -> cheap checks (image/caption present, caption non-empty)
      -> seeded shuffle buffer -> [skip what a resumed run already consumed]
      -> decode + crop + resize (PIL, one resize per image) -> batch: normalise, tokenize (batched)

Everything random is derived from (seed, epoch, rank, worker, pass, batch index), so a stream is a
pure function of the config and the data. That is what makes mid-epoch resume exact: a worker
replays its raw sample stream and drops the first `worker_samples[w]` entries without decoding
them (raw tar reads only), then continues exactly where the checkpointed run stopped.

Epoch mode splits shards by rank then worker (shards.worker_shards); every worker yields the same
number of batches, so every rank does. Resampled mode draws shards with replacement, seeded.

Bad input never stops training: each skipped sample is counted by reason (see REASONS) in the
worker, the counts travel with the next batch it yields, and the loader in the main process
sums them (`TrainLoader.skipped`), so they are exact across DataLoader worker processes.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import math
import random
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ds_linclip.data import shards as shardlib
from ds_linclip.data.shards import DataError, ShardSpecError  # noqa: F401 - DataError: re-exported

log = logging.getLogger(__name__)

# open_clip's OPENAI_DATASET_MEAN / STD
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

REASONS = (
    "unreadable_shard",  # the shard could not be opened / read at all
    "truncated_shard",  # the tar ended in the middle (the samples before it are used)
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_caption",  # caption not UTF-8 / json without the caption field
    "missing_label",  # eval classification: no (valid) `cls`
    "decode_error",  # image bytes PIL cannot decode
)
# a worker whose shards ran out before its quota wraps around; each re-used sample is counted
REPEATED = "repeated_to_fill"
# consecutive undecodable images after which a worker gives up (the data is not images); at a
# 1% failure rate 200 in a row has probability 1e-400, so this never fires on real data
MAX_CONSECUTIVE_DECODE_ERRORS = 200


# ----------------------------------------------------------------------------------------- tokens
_TOKENIZERS: dict[int, Any] = {}


def _tokenizer(context_length: int):
    if context_length not in _TOKENIZERS:
        from ds_linclip.data.prompts import open_clip_module

        _TOKENIZERS[context_length] = open_clip_module("tokenizer").SimpleTokenizer(context_length=context_length)
    return _TOKENIZERS[context_length]


def tokenize(texts: Sequence[str] | str, context_length: int = 77) -> torch.Tensor:
    """open_clip's BPE tokens, (len(texts), context_length) int64; SOT first, EOT (= 49407, the
    largest id, so argmax pools at EOT) last, truncated captions end in EOT too."""
    if isinstance(texts, str):
        texts = [texts]
    return _tokenizer(context_length)(list(texts), context_length=context_length)


# ----------------------------------------------------------------------------------------- images
def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16/32-bit grey scaled down (not clipped), transparency over
    white, palette/CMYK/YCbCr/LAB converted."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image).astype(np.float64)
        top = values.max() if values.size else 0
        if top > 255:
            values = values * (255.0 / (65535.0 if top <= 65535 else top))
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image, EXIF orientation applied. Raises on undecodable bytes.

    `min_size`: lets the JPEG decoder downscale by DCT (draft) while keeping both sides >= it.
    """
    image = Image.open(io.BytesIO(data))
    if min_size and image.format == "JPEG":
        image.draft("RGB", (min_size, min_size))
    image.load()  # decode now so truncated/corrupt data raises here
    if image.format in ("JPEG", "MPO", "WEBP", "TIFF") or "exif" in image.info:  # others carry no EXIF
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block should not cost the image
            pass
    return to_rgb(image)


def random_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.9, 1.0),
                    ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, on a numpy Generator; returns (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The square centre crop that open_clip's eval transform (resize short side, centre crop) keeps."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_resize(image: Image.Image, box, size: int) -> np.ndarray:
    """Crop `box` and resize to (size, size) bicubic in one PIL call -> (size, size, 3) uint8."""
    return np.asarray(image.resize((size, size), Image.BICUBIC, box=box))


_MEAN_255 = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0
_INV_STD_255 = 1.0 / (torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0)


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> contiguous (B, 3, S, S) float32, (x/255 - mean) / std with CLIP's mean/std."""
    # transpose the 1-byte pixels, not the floats; then one subtract and one multiply in place
    images = images_uint8.permute(0, 3, 1, 2).contiguous().float()
    return images.sub_(_MEAN_255).mul_(_INV_STD_255)


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> (3, S, S) float32: the eval loaders' resize-short-side + centre crop + CLIP
    normalisation, for code that hands us PIL images (CLIP_benchmark's datasets)."""

    def transform(image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        pixels = crop_resize(image, center_crop_box(*image.size), image_size)
        return normalise(torch.tensor(pixels)[None])[0]  # a copy: PIL's array is read-only

    return transform


# ---------------------------------------------------------------------------------------- samples
def _split_keys(keys: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(keys, str):
        keys = keys.split(";")
    return tuple(k.strip().lower() for k in keys if k.strip())


class TruncatedTar(EOFError):
    """The tar stream ends inside a header or member; `member` is the name being read, if known."""

    def __init__(self, message: str, member: str | None):
        super().__init__(message + (f" ({member})" if member else ""))
        self.member = member


class _CountingReader:
    """A read-only stream that counts the bytes it hands out (to tell a cut tar from a whole one)."""

    def __init__(self, stream):
        self.stream, self.total, self.head = stream, 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.total < 2:
            self.head = (self.head + data)[:2]
        self.total += len(data)
        return data


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream (ustar, GNU or pax; gzip too), in order.

    Python's `tarfile` in stream mode (`r|*`), so pipes and object-store streams work. Raises
    TruncatedTar when the archive breaks off inside a member or a header, ValueError when the
    stream is no tar archive at all.
    """
    counted = _CountingReader(stream)
    try:
        archive = tarfile.open(fileobj=counted, mode="r|*")
    except tarfile.ReadError as err:
        raise ValueError(f"not a tar archive ({err})") from err
    name = None
    try:
        for member in archive:
            if not member.isreg():
                continue
            name = member.name
            data = archive.extractfile(member).read()
            if len(data) < member.size:
                raise TruncatedTar("tar archive truncated inside a member", name)
            yield name, data
            name = None
    except (tarfile.ReadError, EOFError) as err:  # the data of a member (or a gzip stream) ends early
        raise TruncatedTar(f"tar archive truncated ({err})", name) from err
    # tarfile ends quietly on a header cut short; every tar writer pads to 512-byte blocks, so a
    # plain (not gzip) stream whose length is no multiple of 512 was cut inside a header.
    while counted.read(1 << 16):
        pass
    if counted.head != b"\x1f\x8b" and counted.total % 512:
        raise TruncatedTar("tar archive truncated inside a header", None)


def read_shard(url: str, counts: Counter) -> Iterator[dict]:
    """Samples ({"__key__", "__url__", ext: bytes}) of one tar shard, in tar order.

    Opened with webdataset's gopen (local paths, file:, pipe:, URLs). An unopenable shard counts
    `unreadable_shard`; a tar that breaks off counts `truncated_shard`: the complete samples before
    the break are yielded, only the one being read is lost.
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext

    members_read = 0
    current: dict | None = None
    stream = None
    try:
        stream = gopen(url, "rb")
        for name, data in tar_members(stream):
            members_read += 1
            if name.startswith("__") or "/__" in name:  # webdataset metadata files
                continue
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            if current is None or current["__key__"] != prefix:
                if current is not None:
                    yield current
                current = {"__key__": prefix, "__url__": url}
            current[suffix.lower()] = data
        if current is not None:
            yield current
        current = None
        stream.close()  # pipe: checks the command's exit status here
        stream = None
    except TruncatedTar as err:
        counts["truncated_shard"] += 1  # counted before the last complete sample goes out
        log.warning("shard %s: truncated_shard (%s)", url, err)
        if current is not None and (err.member is None or base_plus_ext(err.member)[0] != current["__key__"]):
            yield current  # complete: the cut is in the next sample (or between headers)
    except Exception as err:  # noqa: BLE001 - any failure of one shard is a counted skip
        reason = "truncated_shard" if members_read else "unreadable_shard"
        counts[reason] += 1
        log.warning("shard %s: %s (%s: %s)", url, reason, type(err).__name__, err)
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass


@dataclass
class SampleFormat:
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    caption_keys: tuple[str, ...] = ("txt", "json")
    caption_json_field: str = "caption"
    need_caption: bool = True
    need_label: bool = False

    def check(self, sample: dict, counts: Counter) -> tuple | None:
        """Cheap checks before the shuffle buffer: -> (key, image bytes, caption|None, label|None)."""
        image = next((sample[k] for k in self.image_keys if k in sample), None)
        if image is None:
            counts["missing_image"] += 1
            return None
        caption = None
        if self.need_caption:
            caption_key = next((k for k in self.caption_keys if k in sample), None)
            if caption_key is None:
                counts["missing_caption"] += 1
                return None
            try:
                if caption_key == "json":
                    caption = json.loads(sample["json"]).get(self.caption_json_field)
                    if not isinstance(caption, str):
                        raise ValueError(f"no string field {self.caption_json_field!r}")
                else:
                    caption = sample[caption_key].decode("utf-8")
            except (ValueError, AttributeError):
                counts["bad_caption"] += 1
                return None
            caption = caption.strip()
            if not caption:
                counts["empty_caption"] += 1
                return None
        label = None
        if self.need_label:
            try:
                label = int(sample["cls"].decode("utf-8").strip())
            except (KeyError, ValueError, AttributeError):
                counts["missing_label"] += 1
                return None
        return sample["__key__"], image, caption, label


def _shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Seeded shuffle buffer (webdataset's algorithm, but with our own RNG so it can be replayed)."""
    if bufsize <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < bufsize:
            buffer.append(item)
            continue
        index = rng.randrange(bufsize)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


# ------------------------------------------------------------------------------------ train stream
@dataclass
class StreamConfig:
    sources: list  # list[shards.Source]
    mode: str
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers (>= 1)
    batch_size: int
    worker_batches: int  # quota per worker per epoch
    image_size: int
    context_length: int
    shuffle_buffer: int
    crop_scale: tuple[float, float]
    fmt: SampleFormat
    spec: str


class TrainStream(IterableDataset):
    """One rank's training batches for one epoch; DataLoader workers each run one logical worker.

    Yields dicts: images (B,3,S,S) float, tokens (B,ctx) long, worker, batch (index within the
    worker's epoch), samples (raw samples the worker consumed so far), counts (skips since its
    previous batch), keys (sample keys).
    """

    def __init__(self, cfg: StreamConfig):
        self.cfg = cfg
        self.epoch = 0
        self.rotation = 0  # physical DataLoader worker p plays logical worker (p + rotation) % K
        self.skip_samples: dict[int, int] = {}  # logical worker -> raw samples to drop (fast resume)
        self.skip_batches: dict[int, int] = {}  # logical worker -> batches already delivered

    @property
    def urls(self) -> list[str]:
        return [u for s in self.cfg.sources for u in s.urls]

    def _raw_stream(self, worker: int, counts: Counter) -> Iterator[tuple]:
        """Checked samples of this (rank, worker) for the epoch, shuffled; endless (wraps/resamples)."""
        c, fmt = self.cfg, self.cfg.fmt
        if c.mode == "resampled":
            rng = random.Random(f"buffer/{c.seed}/{self.epoch}/{c.rank}/{worker}")
            shard_stream = shardlib.resampled_shards(c.sources, c.seed, self.epoch, c.rank, worker)
            patience = max(10, 2 * len(self.urls))

            def samples():
                barren = 0  # consecutive shards without one usable sample
                for url in shard_stream:
                    found = False
                    for sample in read_shard(url, counts):
                        checked = fmt.check(sample, counts)
                        if checked is not None:
                            found = True
                            yield checked
                    barren = 0 if found else barren + 1
                    if barren >= patience:
                        raise DataError(
                            f"{barren} shards in a row of {c.spec!r} gave no usable sample "
                            f"(skipped so far: {dict(counts)})"
                        )

            yield from _shuffled(samples(), c.shuffle_buffer, rng)
            return

        my_shards = shardlib.worker_shards(self.urls, c.seed, self.epoch, c.rank, c.world_size, worker, c.workers)
        borrowing = False  # own shards gave nothing (all unreadable/bad): refill from every shard
        for repeat in range(1 << 30):
            order = list(self.urls if borrowing else my_shards)
            if repeat:
                random.Random(f"refill/{c.seed}/{self.epoch}/{c.rank}/{worker}/{repeat}").shuffle(order)
            rng = random.Random(f"buffer/{c.seed}/{self.epoch}/{c.rank}/{worker}/{repeat}")
            found = 0

            def samples():
                nonlocal found
                for url in order:
                    for sample in read_shard(url, counts):
                        checked = fmt.check(sample, counts)
                        if checked is not None:
                            found += 1
                            yield checked

            for item in _shuffled(samples(), c.shuffle_buffer, rng):
                if repeat:
                    counts[REPEATED] += 1
                yield item
            if not found and not borrowing and len(my_shards) < len(self.urls):
                log.warning("rank %d worker %d: no usable sample in its shards %s; filling from all shards",
                            c.rank, worker, my_shards)
                borrowing = True
                continue
            if not found:
                raise DataError(
                    f"rank {c.rank} worker {worker}: its shards of {c.spec!r} gave no usable sample "
                    f"(shards: {order[:4]}{'...' if len(order) > 4 else ''}; skipped: {dict(counts)})"
                )

    def _decode(self, raw: tuple, box_rng: np.random.Generator | None) -> np.ndarray:
        c = self.cfg
        # JPEG draft size: the smallest random crop (area scale_min, aspect 3/4) still >= image_size px
        draft = int(math.ceil(c.image_size / math.sqrt(c.crop_scale[0] * 3 / 4)))
        image = decode_image(raw[1], min_size=draft)
        if box_rng is None:
            box = center_crop_box(*image.size)
        else:
            box = random_crop_box(*image.size, box_rng, scale=c.crop_scale)
        return crop_resize(image, box, c.image_size)

    def worker_batches(self, worker: int) -> Iterator[dict]:
        """The batches of one logical worker for the current epoch, from its resume point on."""
        c = self.cfg
        counts: Counter = Counter()
        raw = self._raw_stream(worker, counts)
        consumed = 0
        first_batch = self.skip_batches.get(worker, 0)
        fast_skip = self.skip_samples.get(worker)
        if fast_skip is not None:  # exact position known: drop raw samples, no decoding
            for _ in range(fast_skip):
                next(raw)
            consumed = fast_skip
            counts.clear()  # these were counted before the checkpoint (restored from the state)
        bad_in_a_row = 0
        for batch_index in range(first_batch if fast_skip is not None else 0, c.worker_batches):
            box_rng = np.random.default_rng([c.seed, self.epoch, c.rank, worker, batch_index])
            images, captions, keys = [], [], []
            while len(images) < c.batch_size:
                item = next(raw)
                consumed += 1
                try:
                    images.append(self._decode(item, box_rng))
                except Exception as err:  # noqa: BLE001 - undecodable image: skip and count
                    counts["decode_error"] += 1
                    bad_in_a_row += 1
                    if bad_in_a_row >= MAX_CONSECUTIVE_DECODE_ERRORS:
                        raise DataError(
                            f"{bad_in_a_row} images in a row from {c.spec!r} failed to decode "
                            f"(last: {item[0]} in {err}); is this image data?"
                        ) from err
                    continue
                bad_in_a_row = 0
                captions.append(item[2])
                keys.append(item[0])
            if batch_index < first_batch:  # slow resume: replayed to learn the raw position
                continue
            batch = {
                "images": normalise(torch.from_numpy(np.stack(images))),
                "tokens": tokenize(captions, c.context_length),
                "worker": worker,
                "batch": batch_index,
                "samples": consumed,
                "counts": dict(counts),
                "keys": keys,
            }
            counts.clear()
            yield batch

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.rotation) % self.cfg.workers
        if info is not None:
            torch.set_num_threads(1)
        return self.worker_batches(worker)


def _kill_leftover_workers() -> None:
    """At exit, SIGKILL daemonic children (loader workers whose iterator was never released, e.g. held
    by a traceback): multiprocessing would SIGTERM and join them, and our workers ignore SIGTERM."""
    import multiprocessing
    import signal

    children = [p for p in multiprocessing.active_children() if p.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report them as failures
        for process in children:
            process.kill()


# atexit runs handlers last-in first-out: this one runs before multiprocessing's join of children
atexit.register(_kill_leftover_workers)


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: ignore SIGTERM/SIGUSR1.

    Slurm (scancel, preemption, time limits) signals every process of a job step, workers included;
    a worker killed by it makes the trainer raise instead of checkpointing. The main process
    handles the signal (checkpoint, exit 75) and shuts its workers down itself.
    """
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _iterate_and_shut_down(loader: DataLoader):
    """Iterate `loader`, shutting its workers down as soon as the iteration ends, however it ends: a
    worker's DataError, an error or early stop in the consumer. Left to garbage collection, a failed
    iteration's workers did not get the DataLoader's stop message: each was joined for 5 s, sent
    SIGTERM (which they ignore, `_worker_ignores_stop_signals`) and joined for 5 s more, so an error
    took ~20 s to leave a 2-worker loader. Done right away, the shutdown takes milliseconds."""
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        shut_down = getattr(iterator, "_shutdown_workers", None)  # the multi-process iterator only
        if shut_down is not None:
            shut_down()  # a no-op after a completed epoch: the DataLoader already did it


class TrainLoader:
    """Iterate for one epoch of `batches_per_epoch` batches of (images (B,3,S,S) float32, tokens
    (B,ctx) int64); the next `iter()` starts the next epoch. Resumes exactly from `state_dict()`.

    The same number of batches on every rank: each of the `world_size * workers` workers yields
    `samples_per_epoch // (world_size * workers * batch_size)` batches; a worker with more data
    drops its tail for the epoch (drop_last), one with less wraps around its shards (counted as
    `repeated_to_fill`).
    """

    def __init__(self, stream: TrainStream, num_workers: int, samples_per_epoch: int, with_keys: bool = False):
        self.stream = stream
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.with_keys = with_keys
        self.epoch = 0
        self.batches_done = 0  # in the current epoch, on this rank
        K = stream.cfg.workers
        self.worker_samples = [0] * K
        self.worker_batch_counts = [0] * K
        self.counters: Counter = Counter()

    # ----------------------------------------------------------------------------- properties
    @property
    def batches_per_epoch(self) -> int:
        return self.stream.cfg.worker_batches * self.stream.cfg.workers

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples/shards by reason on this rank (all workers), since the run started."""
        return {k: int(v) for k, v in sorted(self.counters.items()) if k != REPEATED}

    def set_image_size(self, size: int) -> None:
        """Images of `size` px from the next `iter()` on (a training phase's resolution). Call it
        between iterations: a new iter() goes on from the last batch delivered (the raw positions
        are known in this process), so no sample is repeated or skipped by the change."""
        self.stream.cfg.image_size = int(size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset_position()

    def _reset_position(self):
        K = self.stream.cfg.workers
        self.batches_done = 0
        self.worker_samples = [0] * K
        self.worker_batch_counts = [0] * K

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """This rank's position: epoch, batches delivered in it, raw samples each worker consumed,
        skip counters. Any rank's state resumes every rank exactly (all ranks are in lockstep);
        this rank's own state, or `merge_rank_states` of all of them, resumes without re-decoding."""
        c = self.stream.cfg
        return {
            "version": 1,
            "mode": c.mode,
            "seed": c.seed,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "rank": c.rank,
            "world_size": c.world_size,
            "workers": c.workers,
            "batch_size": c.batch_size,
            "worker_batches": c.worker_batches,
            "worker_samples": list(self.worker_samples),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state: this rank's own (fast, exact raw positions), any other rank's
        (same epoch/batches; positions found by replaying the decode), or {"ranks": {r: state}}."""
        c = self.stream.cfg
        if "ranks" in state:
            ranks = {int(k): v for k, v in state["ranks"].items()}
            state = ranks.get(c.rank) or next(iter(ranks.values()))
        geometry = ("mode", "seed", "world_size", "workers", "batch_size", "worker_batches")
        now = {"mode": c.mode, "seed": c.seed, "world_size": c.world_size, "workers": c.workers,
               "batch_size": c.batch_size, "worker_batches": c.worker_batches}
        changed = {k: (state.get(k), now[k]) for k in geometry if state.get(k) != now[k]}
        self.epoch = int(state["epoch"])
        self._reset_position()
        if changed:
            # positions inside an epoch mean nothing under another split: start the next epoch
            warnings.warn(
                f"data loader state was saved with different {changed} (saved, now); resuming at the "
                f"start of epoch {self.epoch + (1 if state['batches_done'] else 0)} instead of mid-epoch"
            )
            if state["batches_done"]:
                self.epoch += 1
            return
        K = c.workers
        b = int(state["batches_done"])
        if b >= self.batches_per_epoch:
            self.epoch += 1
            return
        self.batches_done = b
        self.worker_batch_counts = [b // K + (1 if w < b % K else 0) for w in range(K)]
        if int(state.get("rank", -1)) == c.rank:
            self.worker_samples = list(state["worker_samples"])
            self.counters = Counter(state.get("counters", {}))
        else:  # another rank's positions mean nothing here: each worker replays its batches
            self.worker_samples = [None] * K

    # ----------------------------------------------------------------------------- iteration
    def forever(self):
        """Epoch after epoch without end (for step-based training loops)."""
        while True:
            yield from self

    def __iter__(self):
        s, K = self.stream, self.stream.cfg.workers
        if self.batches_done >= self.batches_per_epoch:
            self.epoch += 1
            self._reset_position()
        s.epoch = self.epoch
        s.rotation = self.batches_done % K
        s.skip_batches = {w: n for w, n in enumerate(self.worker_batch_counts)}
        # raw positions known (this rank's state, or a break in this process) -> drop raw samples;
        # unknown (None: resumed from another rank's state, no batch from that worker since) -> replay
        s.skip_samples = {w: n for w, n in enumerate(self.worker_samples) if n is not None and self.batches_done}
        loader = DataLoader(
            s, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None, pin_memory=torch.cuda.is_available(),
            worker_init_fn=_worker_ignores_stop_signals,
        )
        for item in _iterate_and_shut_down(loader):
            w = int(item["worker"])
            self.worker_samples[w] = int(item["samples"])
            self.worker_batch_counts[w] += 1
            self.batches_done += 1
            self.counters.update(item["counts"])
            if self.with_keys:
                yield item["images"], item["tokens"], item["keys"]
            else:
                yield item["images"], item["tokens"]
        if self.batches_done != self.batches_per_epoch:
            raise DataError(
                f"rank {s.cfg.rank} got {self.batches_done} of {self.batches_per_epoch} batches in epoch "
                f"{self.epoch}; a dataloader worker stopped early"
            )
        self.epoch += 1
        self._reset_position()


def merge_rank_states(states: Sequence[dict]) -> dict:
    """All ranks' `state_dict()`s (e.g. from torch.distributed.all_gather_object) as one state that
    `build_train_loader(..., start_state=...)` accepts on every rank: {"ranks": {rank: state}}."""
    return {"ranks": {int(state["rank"]): state for state in states}}


def build_train_loader(cfg, rank: int, world_size: int, start_state: dict | None = None,
                       with_keys: bool = False) -> TrainLoader:
    """The training loader of one rank (see TrainLoader). Raises ShardSpecError/DataError early
    for a spec that matches nothing, too few shards for the workers, or an unknown epoch size."""
    spec = cfg.data.train_shards
    sources = shardlib.parse_spec(spec)
    urls = [u for s in sources for u in s.urls]
    mode = cfg.data.mode
    workers = int(cfg.data.workers)
    logical_workers = max(1, workers)
    batch_size = int(cfg.train.micro_batch_size)
    spec_text = spec if isinstance(spec, str) else "::".join(map(str, spec))
    if mode == "epoch":
        if any(s.weighted for s in sources):
            raise ShardSpecError(
                f"shard spec {spec_text!r}: source weights (`@w`) need data.mode=resampled; an epoch reads each shard once"
            )
        shardlib.check_enough_shards(len(urls), world_size, logical_workers, spec_text)
    samples_per_epoch = cfg.data.train_num_samples
    if samples_per_epoch is None:
        samples_per_epoch = shardlib.num_samples(urls)
        if samples_per_epoch is None:
            raise DataError(
                f"samples per epoch unknown for {spec_text!r}: no sizes.json listing every shard beside "
                "the shards (remote/pipe: shards never have one); set data.train_num_samples"
            )
    worker_batches = int(samples_per_epoch) // (world_size * logical_workers * batch_size)
    if worker_batches < 1:
        raise DataError(
            f"{samples_per_epoch} samples per epoch of {spec_text!r} do not fill one batch per worker: "
            f"{world_size} rank(s) x {logical_workers} worker(s) x micro_batch_size {batch_size}"
        )
    fmt = SampleFormat(
        image_keys=_split_keys(cfg.data.image_keys),
        caption_keys=_split_keys(cfg.data.caption_keys),
        caption_json_field=cfg.data.caption_json_field,
    )
    stream = TrainStream(StreamConfig(
        sources=sources, mode=mode, seed=int(cfg.train.seed), rank=rank, world_size=world_size,
        workers=logical_workers, batch_size=batch_size, worker_batches=worker_batches,
        image_size=int(cfg.model.image.image_size), context_length=int(cfg.model.text.context_length),
        shuffle_buffer=int(cfg.data.shuffle_buffer),
        crop_scale=(float(cfg.data.crop_scale_min), float(cfg.data.crop_scale_max)), fmt=fmt, spec=spec_text,
    ))
    _tokenizer(int(cfg.model.text.context_length))  # load the BPE once; forked workers inherit it
    loader = TrainLoader(stream, workers, int(samples_per_epoch), with_keys=with_keys)
    if start_state:
        loader.load_state_dict(start_state)
    return loader


# ------------------------------------------------------------------------------------- eval stream
class EvalStream(IterableDataset):
    """Every sample once. DataLoader worker w decodes shards w, w+K, ...; each item is tagged with
    (shard index, part index, last part of the shard?) so the EvalLoader can put them back in
    spec order whatever order the workers finish in."""

    def __init__(self, urls, image_size, batch_size, fmt: SampleFormat, kind: str):
        self.urls, self.image_size, self.batch_size, self.fmt, self.kind = urls, image_size, batch_size, fmt, kind

    def _part(self, shard, part, items, counts, last):
        images, targets = [], []
        for key, data, caption, label in items:
            try:
                image = decode_image(data, min_size=self.image_size)
                images.append(crop_resize(image, center_crop_box(*image.size), self.image_size))
            except Exception:  # noqa: BLE001 - undecodable: skip and count
                counts["decode_error"] += 1
                continue
            targets.append(label if self.kind == "classification" else caption)
        out = {
            "shard": shard, "part": part, "last": last, "targets": targets, "counts": dict(counts),
            "images": normalise(torch.from_numpy(np.stack(images))) if images else None,
        }
        counts.clear()
        return out

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        counts: Counter = Counter()
        for shard in range(worker, len(self.urls), workers):
            pending, part = [], 0
            for sample in read_shard(self.urls[shard], counts):
                checked = self.fmt.check(sample, counts)
                if checked is not None:
                    pending.append(checked)
                if len(pending) == self.batch_size:
                    yield self._part(shard, part, pending, counts, last=False)
                    pending, part = [], part + 1
            yield self._part(shard, part, pending, counts, last=True)


class EvalLoader:
    """Iterate (images (B,3,S,S) float32, labels (B,) int64 | captions list[str]) in spec order,
    every usable sample once, B = batch_size (the last batch smaller)."""

    def __init__(self, stream: EvalStream, workers: int, spec: str):
        self.stream, self.workers, self.spec = stream, workers, spec
        self.counters: Counter = Counter()
        self.num_samples = shardlib.num_samples(stream.urls)

    @property
    def skipped(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counters.items())}

    def _in_order(self):
        workers = min(self.workers, len(self.stream.urls))
        loader = DataLoader(self.stream, batch_size=None, num_workers=workers, persistent_workers=False,
                            prefetch_factor=4 if workers else None, worker_init_fn=_worker_ignores_stop_signals)
        waiting: dict[tuple[int, int], dict] = {}
        shard, part = 0, 0
        for item in _iterate_and_shut_down(loader):
            self.counters.update(item["counts"])
            waiting[(item["shard"], item["part"])] = item
            while (shard, part) in waiting:
                ready = waiting.pop((shard, part))
                yield ready
                shard, part = (shard + 1, 0) if ready["last"] else (shard, part + 1)

    def __iter__(self):
        self.counters = Counter()
        size, kind = self.stream.batch_size, self.stream.kind
        images: list[torch.Tensor] = []
        targets: list = []
        held, seen = 0, 0

        def take(n):
            nonlocal images, targets, held
            stacked = torch.cat(images) if len(images) > 1 else images[0]
            out_images, out_targets = stacked[:n], targets[:n]
            images = [stacked[n:]] if n < len(stacked) else []
            targets, held = targets[n:], held - n
            if kind == "classification":
                return out_images, torch.tensor(out_targets, dtype=torch.long)
            return out_images, list(out_targets)

        for item in self._in_order():
            if item["images"] is None:
                continue
            images.append(item["images"])
            targets.extend(item["targets"])
            held += len(item["targets"])
            seen += len(item["targets"])
            while held >= size:
                yield take(size)
        if held:
            yield take(held)
        if not seen:
            raise DataError(f"eval data {self.spec!r} gave no usable sample (skipped: {self.skipped})")


def build_eval_loader(spec, image_size: int, batch_size: int, workers: int, kind: str = "classification",
                      image_keys: str = "jpg;jpeg;png;webp", caption_keys: str = "txt;json",
                      caption_json_field: str = "caption") -> EvalLoader:
    """Eval batches, every sample once, in shard order: `kind="classification"` needs a `cls` key
    (int label) per sample, `kind="retrieval"` a caption. Resize short side + centre crop."""
    if kind not in ("classification", "retrieval"):
        raise ValueError(f"kind must be 'classification' or 'retrieval', got {kind!r}")
    urls = shardlib.expand_urls(spec)
    fmt = SampleFormat(
        image_keys=_split_keys(image_keys), caption_keys=_split_keys(caption_keys),
        caption_json_field=caption_json_field, need_caption=kind == "retrieval",
        need_label=kind == "classification",
    )
    spec_text = spec if isinstance(spec, str) else "::".join(map(str, spec))
    return EvalLoader(EvalStream(urls, int(image_size), int(batch_size), fmt, kind), int(workers), spec_text)
