"""Dataloader throughput: ours vs open_clip's own webdataset loader, same shards/workers/transforms.

    python bench/dataloader.py                      # Fashion-MNIST shards (written if missing), 2 workers
    python bench/dataloader.py --shards 'laion/{00000..00099}.tar' --image-size 224 --workers 8

Both loaders read the same shards in epoch mode with the same worker count, batch size, train
transform (random resized crop, scale (0.9, 1.0), bicubic, CLIP mean/std) and BPE tokenizer
(open_clip's, same context length). Each is timed over whole batches from iter() (worker start
included) to the last sample; the runs alternate (ours, open_clip, ours, ...) and the best of
`--repeats` is kept for each, so noise from a shared machine hits both alike. Prints a table and
the ratio ours / open_clip (samples/s), of the best runs and of the medians.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import types
from argparse import Namespace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def open_clip_loader(args, samples: int):
    """open_clip_train.data.get_wds_dataset with its own train transform and tokenizer."""
    try:
        importlib.import_module("pandas")
    except ImportError:
        # open_clip_train.data imports pandas at the top but only its CSV dataset uses it
        sys.modules["pandas"] = types.ModuleType("pandas")
    import functools

    import open_clip
    import open_clip_train.data as oc_data
    from open_clip.tokenizer import SimpleTokenizer
    from webdataset.tariterators import tar_file_expander

    # webdataset >= 0.2.9x yields an end-of-shard marker `{}` that open_clip_train 3.3's
    # group_by_keys_nothrow does not expect (KeyError 'fname'); turn the marker off, as before
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    get_wds_dataset = oc_data.get_wds_dataset

    preprocess = open_clip.image_transform(args.image_size, is_train=True)  # scale (0.9, 1.0), bicubic
    tokenizer = SimpleTokenizer(context_length=args.context_length)
    oc_args = Namespace(
        train_data=args.shards, val_data=None, train_data_upsampling_factors=None, dataset_resampled=False,
        train_num_samples=samples, seed=0, batch_size=args.batch_size, workers=args.workers, world_size=1,
    )
    info = get_wds_dataset(oc_args, preprocess, is_train=True, epoch=0, floor=True, tokenizer=tokenizer)
    return info.dataloader, info.dataloader.num_batches


def our_loader(args, samples: int):
    from ds_linclip.config import load_config
    from ds_linclip.data.pipeline import build_train_loader

    cfg = load_config([], [
        # patch size 1 only so that any --image-size passes the schema's divisibility check
        f"model.image.image_size={args.image_size}", "model.image.patch_size=1",
        f"model.text.context_length={args.context_length}", f"train.micro_batch_size={args.batch_size}",
        f"data.workers={args.workers}", f"data.train_num_samples={samples}", "data.mode=epoch",
        f"data.shuffle_buffer={args.shuffle_buffer}",
    ])
    cfg.data.train_shards = args.shards
    loader = build_train_loader(cfg, rank=0, world_size=1)
    return loader, loader.batches_per_epoch


def time_epoch(make, args, samples: int) -> tuple[float, int]:
    loader, batches = make(args, samples)
    start = time.perf_counter()
    seen = 0
    for i, (images, tokens) in enumerate(loader):
        assert images.shape[1:] == (3, args.image_size, args.image_size) and tokens.shape[1] == args.context_length
        seen += images.shape[0]
        if i + 1 == batches:  # open_clip's WebLoader epoch is this many batches too
            break
    return seen / (time.perf_counter() - start), seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shards", default=None, help="shard spec (default: Fashion-MNIST train shards in --fmnist-dir)")
    parser.add_argument("--fmnist-dir", default="/tmp/ds_linclip_test_cache/fmnist",
                        help="where to find/write the default Fashion-MNIST shards (default %(default)s)")
    parser.add_argument("--samples", type=int, default=None, help="samples per timed epoch (default: sizes.json total)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for both (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="(default %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="output side in px (default %(default)s)")
    parser.add_argument("--context-length", type=int, default=77, help="tokens per caption (default %(default)s)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000,
                        help="our sample shuffle buffer (open_clip: 5000, filled to 1000 first; default %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per loader; the best counts")
    args = parser.parse_args(argv)

    if args.shards is None:
        from ds_linclip.data.writer import write_fashion_mnist

        out = write_fashion_mnist(args.fmnist_dir, train_samples=6000, shard_size=500, test_shard_size=1000)
        args.shards = str(out / "train/shard-{000000..000011}.tar")
    from ds_linclip.data.shards import expand_urls, num_samples

    samples = args.samples or num_samples(expand_urls(args.shards))
    if not samples:
        parser.error("no sizes.json beside the shards: give --samples")

    results: dict[str, list[float]] = {"ours": [], "open_clip": []}
    counts = {}
    for repeat in range(args.repeats):
        for name, make in (("ours", our_loader), ("open_clip", open_clip_loader)):
            rate, seen = time_epoch(make, args, samples)
            results[name].append(rate)
            counts[name] = seen
            print(f"  run {repeat + 1}: {name:9s} {rate:9.0f} samples/s ({seen} samples)", file=sys.stderr)
    best = {name: max(rates) for name, rates in results.items()}
    print(f"shards={args.shards} workers={args.workers} batch={args.batch_size} image={args.image_size}px "
          f"context={args.context_length}")
    print(f"{'loader':10s} {'best samples/s':>15s} {'all runs':>30s}")
    for name, rates in results.items():
        print(f"{name:10s} {best[name]:15.0f} {', '.join(f'{r:.0f}' for r in rates):>30s}")
    import statistics

    ratio = best["ours"] / best["open_clip"]
    median = statistics.median(results["ours"]) / statistics.median(results["open_clip"])
    print(f"ratio ours/open_clip: {ratio:.2f}x best-of-runs, {median:.2f}x median (target >= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
