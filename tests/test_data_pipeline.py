"""Training/eval loaders on real tar shards: exactly-once epochs over 2 ranks x 2 workers, seeded
determinism, exact mid-epoch resume (epoch and resampled mode), equal batches per rank."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import data_config, write_counted_shards

from ds_linclip.data.pipeline import (
    CLIP_MEAN, CLIP_STD, REPEATED, build_eval_loader, build_train_loader, merge_rank_states, tokenize,
)


def run_epoch(loader, limit=None):
    """(keys in delivery order, batches) of one epoch (or its first `limit` batches)."""
    keys, batches = [], []
    for i, (images, tokens, batch_keys) in enumerate(loader):
        keys.extend(batch_keys)
        batches.append((images, tokens))
        if limit is not None and i + 1 == limit:
            break
    return keys, batches


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("eight")
    keys = write_counted_shards(directory, [24] * 8)
    return directory, keys


def test_tokenize_is_open_clip_and_eot_is_argmax():
    import open_clip

    texts = ["a photo of a dress.", "An ankle boot, seen from the side!", ""]
    ours = tokenize(texts, 32)
    assert ours.dtype == torch.long and ours.shape == (3, 32)
    assert torch.equal(ours, open_clip.tokenize(texts, context_length=32))
    eot = 49407
    for row in ours:
        assert row.argmax().item() == (row == eot).nonzero()[0].item()
    assert tokenize(["word " * 100], 16)[0, -1].item() == eot  # truncated captions still end in EOT


def test_tokenizing_does_not_import_the_open_clip_package():
    """Each data-loader worker and eval process tokenizes: open_clip's tokenizer is loaded from its file,
    not through the package (whose __init__ imports every model and transformers, ~3 s per process)."""
    import subprocess
    import sys

    code = ("import sys; from ds_linclip.data.pipeline import tokenize; tokens = tokenize(['a dress'], 8); "
            "print(tokens.tolist(), sorted(m for m in ('open_clip', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("[]"), result.stdout
    assert result.stdout.startswith("[[49406, 320, 2595, 49407, 0, 0, 0, 0]]"), result.stdout


def test_epoch_every_sample_exactly_once_2_ranks_x_2_workers(eight_shards):
    directory, all_keys = eight_shards
    cfg = data_config(directory / "shard-{0000..0007}.tar")
    loaders = [build_train_loader(cfg, rank, 2, with_keys=True) for rank in range(2)]
    assert [l.batches_per_epoch for l in loaders] == [12, 12]  # 192 / (2 ranks x 8), same on both ranks
    epochs = []
    for _ in range(2):
        keys = []
        for loader in loaders:
            rank_keys, batches = run_epoch(loader)
            assert len(batches) == 12
            images, tokens = batches[0]
            assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and images.is_contiguous()
            assert tokens.shape == (8, 32) and tokens.dtype == torch.long
            keys.extend(rank_keys)
        assert sorted(keys) == all_keys  # every sample once: no repeats, no gaps
        epochs.append(keys)
    assert epochs[0] != epochs[1]  # a new shuffle each epoch
    assert all(l.skipped == {} and l.epoch == 2 for l in loaders)


def test_images_are_normalised_pixels_and_tokens_match_captions(eight_shards):
    directory, _ = eight_shards
    cfg = data_config(directory / "shard-{0000..0007}.tar", "data.workers=0")
    loader = build_train_loader(cfg, 0, 1, with_keys=True)
    images, tokens, keys = next(iter(loader))
    index = int(keys[0][1:])
    # a flat image stays flat under crop+resize (the top-left marker pixel aside)
    value = (index % 251) / 255.0
    expected = (torch.full((3,), value) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    centre = images[0, :, 16, 16]
    assert torch.allclose(centre, expected, atol=0.02)
    assert torch.equal(tokens[0], tokenize([f"sample {index}"], 32)[0])


def test_same_seed_same_stream_other_seed_other_stream(eight_shards):
    directory, _ = eight_shards
    spec = directory / "shard-{0000..0007}.tar"
    first = run_epoch(build_train_loader(data_config(spec), 1, 2, with_keys=True))
    again = run_epoch(build_train_loader(data_config(spec), 1, 2, with_keys=True))
    other = run_epoch(build_train_loader(data_config(spec, "train.seed=1"), 1, 2, with_keys=True))
    assert first[0] == again[0]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[1], again[1]))
    assert first[0] != other[0]


@pytest.mark.parametrize("own_rank_state", [True, False], ids=["own-rank-state", "rank0-state"])
def test_mid_epoch_resume_continues_without_repeats_or_gaps(eight_shards, own_rank_state):
    directory, _ = eight_shards
    cfg = data_config(directory / "shard-{0000..0007}.tar")
    uninterrupted = build_train_loader(cfg, 1, 2, with_keys=True)
    reference_keys, reference = run_epoch(uninterrupted)
    next_epoch_keys, _ = run_epoch(uninterrupted)

    interrupted = build_train_loader(cfg, 1, 2, with_keys=True)
    done_keys, _ = run_epoch(interrupted, limit=5)  # odd: the next batch comes from worker 1
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 5
    assert state["worker_samples"] == [24, 16]  # 3 and 2 batches of 8
    if not own_rank_state:  # e.g. only rank 0's loader state was checkpointed: replay by decoding
        state = dict(state, rank=0, worker_samples=[999, 999])
    resumed = build_train_loader(cfg, 1, 2, with_keys=True, start_state=state)
    first_keys, first = run_epoch(resumed, limit=1)  # and break again right away (worker 1 only)
    more_keys, more = run_epoch(resumed)
    rest_keys, rest = first_keys + more_keys, first + more
    assert len(rest) == 7
    assert done_keys + rest_keys == reference_keys  # same order, nothing repeated or skipped
    for (images, tokens), (ref_images, ref_tokens) in zip(rest, reference[5:]):
        assert torch.equal(images, ref_images) and torch.equal(tokens, ref_tokens)  # same crops too
    assert run_epoch(resumed)[0] == next_epoch_keys  # and the next epoch is the uninterrupted one


def test_resume_after_a_break_in_the_same_process(eight_shards):
    directory, _ = eight_shards
    cfg = data_config(directory / "shard-{0000..0007}.tar")
    reference_keys, _ = run_epoch(build_train_loader(cfg, 0, 2, with_keys=True))
    loader = build_train_loader(cfg, 0, 2, with_keys=True)
    head, _ = run_epoch(loader, limit=3)
    tail, _ = run_epoch(loader)
    assert head + tail == reference_keys


def test_resampled_mode_continues_identically(eight_shards):
    directory, _ = eight_shards
    cfg = data_config(directory / "shard-{0000..0007}.tar", "data.mode=resampled", "data.train_num_samples=320",
                      "data.shuffle_buffer=16")
    reference_keys, reference = run_epoch(build_train_loader(cfg, 0, 2, with_keys=True))
    assert len(reference) == 20
    assert len(set(reference_keys)) < len(reference_keys)  # sampling with replacement
    interrupted = build_train_loader(cfg, 0, 2, with_keys=True)
    head, _ = run_epoch(interrupted, limit=7)
    other = build_train_loader(cfg, 1, 2, with_keys=True)
    run_epoch(other, limit=7)  # what rank 1 would checkpoint next to it
    gathered = merge_rank_states([other.state_dict(), interrupted.state_dict()])
    resumed = build_train_loader(cfg, 0, 2, with_keys=True, start_state=gathered)
    tail, rest = run_epoch(resumed)
    assert head + tail == reference_keys
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, reference[7:]))
    other_rank = run_epoch(build_train_loader(cfg, 1, 2, with_keys=True))[0]
    assert other_rank != reference_keys  # ranks draw different shards


def test_weighted_sources_in_resampled_mode(tmp_path):
    write_counted_shards(tmp_path / "a", [20] * 2)
    write_counted_shards(tmp_path / "b", [20] * 2)
    spec = f"{tmp_path}/a/shard-{{0000..0001}}.tar@9::{tmp_path}/b/shard-{{0000..0001}}.tar@1"
    cfg = data_config(spec, "data.mode=resampled", "data.train_num_samples=800", "data.shuffle_buffer=0",
                      "data.workers=0")
    loader = build_train_loader(cfg, 0, 1, with_keys=True)
    urls = []
    stream = loader.stream
    from ds_linclip.data import shards as shardlib

    draws = shardlib.resampled_shards(stream.cfg.sources, 0, 0, 0, 0)
    urls = [next(draws) for _ in range(2000)]
    share_a = sum("/a/" in u for u in urls) / len(urls)
    assert 0.86 < share_a < 0.94  # weight 9 : 1
    assert len(run_epoch(loader)[1]) == 100
    with pytest.raises(ValueError, match="need data.mode=resampled"):
        build_train_loader(data_config(spec), 0, 1)


def test_uneven_shards_still_give_equal_batches_per_rank(tmp_path):
    write_counted_shards(tmp_path, [40, 8, 30, 10, 25, 7, 12, 28])  # 160 samples
    cfg = data_config(tmp_path / "shard-{0000..0007}.tar")
    counts, keys, repeats = [], [], 0
    for rank in range(2):
        loader = build_train_loader(cfg, rank, 2, with_keys=True)
        rank_keys, batches = run_epoch(loader)
        counts.append(len(batches))
        keys.extend(rank_keys)
        repeats += loader.counters.get(REPEATED, 0)
    assert counts == [10, 10]  # 160 // (2 ranks x 8) on both ranks: nobody waits at the epoch end
    # workers short of data wrap around (counted), the others drop their tail for this epoch
    assert len(keys) - len(set(keys)) <= repeats


def test_eval_loader_in_order_every_sample_once(fmnist_shards):
    from ds_linclip.data.writer import FASHION_MNIST_CLASSNAMES, FASHION_MNIST_DIR, read_idx

    spec = str(fmnist_shards / "test/shard-{000000..000009}.tar")
    labels = torch.cat([lab for _, lab in build_eval_loader(spec, 32, 500, workers=2)])
    expected = torch.from_numpy(read_idx(f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz").astype(np.int64))
    assert torch.equal(labels, expected)
    loader = build_eval_loader(str(fmnist_shards / "test/shard-000003.tar"), 32, 256, workers=2, kind="retrieval")
    batches = list(loader)
    captions = [c for _, caps in batches for c in caps]
    assert len(captions) == 1000 and loader.skipped == {}
    assert captions[0] == f"a photo of a {FASHION_MNIST_CLASSNAMES[int(expected[3000])]}."
    assert batches[0][0].shape == (256, 3, 32, 32)


def test_fmnist_train_loader_end_to_end(fmnist_shards):
    cfg = data_config(fmnist_shards / "train/shard-{000000..000011}.tar", "train.micro_batch_size=64")
    loader = build_train_loader(cfg, 0, 1)
    assert loader.batches_per_epoch == 6000 // 64 // 2 * 2
    n = 0
    for images, tokens in loader:
        n += 1
        assert images.shape == (64, 3, 32, 32) and tokens.shape == (64, 32)
    assert n == loader.batches_per_epoch and loader.skipped == {}
    # Fashion-MNIST is dark background: most normalised pixels are at the black level
    black = (0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert (images[:, 0] - black).abs().lt(0.05).float().mean() > 0.3
    assert Counter(tokens[:, 0].tolist()) == {49406: 64}
