"""Shard specs: braces, globs, list files, `::` sources with weights, pipe: commands; the errors."""

from __future__ import annotations

import pytest
from conftest import data_config, write_counted_shards

from ds_linclip.data import shards as shardlib
from ds_linclip.data.pipeline import DataError, build_train_loader
from ds_linclip.data.shards import ShardSpecError, expand_urls, parse_spec


@pytest.fixture()
def two_dirs(tmp_path):
    write_counted_shards(tmp_path / "a", [3] * 4)
    write_counted_shards(tmp_path / "b", [5] * 2, sizes_json=False)
    return tmp_path


def test_brace_glob_list_and_sources(two_dirs):
    a = [str(two_dirs / f"a/shard-{i:04d}.tar") for i in range(4)]
    b = [str(two_dirs / f"b/shard-{i:04d}.tar") for i in range(2)]
    assert expand_urls(f"{two_dirs}/a/shard-{{0000..0003}}.tar") == a
    assert expand_urls(f"{two_dirs}/a/shard-000[0-3].tar") == a
    assert expand_urls(f"{two_dirs}/*/shard-*.tar") == a + b
    assert expand_urls([a[0], f"{two_dirs}/b/*.tar"]) == [a[0]] + b
    (two_dirs / "list.txt").write_text("# my shards\na/shard-0001.tar\nb/shard-{0000..0001}.tar\n")
    assert expand_urls(str(two_dirs / "list.txt")) == [a[1]] + b
    sources = parse_spec(f"{two_dirs}/a/shard-{{0000..0003}}.tar@3::{two_dirs}/b/shard-{{0000..0001}}.tar")
    assert [(len(s.urls), s.weight, s.weighted) for s in sources] == [(4, 3.0, True), (2, 1.0, False)]
    pipes = expand_urls("pipe:aws s3 cp s3://bucket/{00000..00002}.tar -")
    assert pipes == [f"pipe:aws s3 cp s3://bucket/{i:05d}.tar -" for i in range(3)]


def test_sizes_from_sizes_json(two_dirs):
    urls = expand_urls(f"{two_dirs}/a/shard-{{0000..0003}}.tar")
    assert shardlib.num_samples(urls) == 12
    assert shardlib.num_samples(urls + expand_urls(f"{two_dirs}/b/*.tar")) is None  # b has no sizes.json
    assert shardlib.num_samples(["pipe:cat x.tar"]) is None


@pytest.mark.parametrize("spec", ["", "   ", None, " :: "])
def test_empty_spec_is_a_clear_error(spec):
    with pytest.raises(ShardSpecError, match="empty shard spec"):
        parse_spec(spec)


def test_spec_that_matches_nothing_names_the_spec(tmp_path):
    for spec in (f"{tmp_path}/nothing-{{00..09}}.tar", f"{tmp_path}/*.tar", f"{tmp_path}/x.tar"):
        with pytest.raises(ShardSpecError, match="matches no shards") as err:
            parse_spec(spec)
        assert spec in str(err.value)
    cfg = data_config(f"{tmp_path}/nothing-{{00..09}}.tar")
    with pytest.raises(ShardSpecError, match="nothing-"):
        build_train_loader(cfg, 0, 1)


def test_too_few_shards_for_ranks_x_workers_is_a_clear_error(tmp_path):
    write_counted_shards(tmp_path, [10] * 3)
    cfg = data_config(tmp_path / "shard-{0000..0002}.tar")  # 2 workers
    build_train_loader(cfg, 0, 1)  # 3 shards >= 1 x 2: fine
    with pytest.raises(ShardSpecError, match=r"3 shard\(s\).*< 2 rank\(s\) x 2 worker\(s\) = 4.*resampled"):
        build_train_loader(cfg, 1, 2)
    resampled = data_config(tmp_path / "shard-{0000..0002}.tar", "data.mode=resampled", "data.train_num_samples=64")
    assert build_train_loader(resampled, 1, 2).batches_per_epoch == 4  # 64 // (2 ranks x 2 workers x 8) x 2 workers


def test_unknown_or_too_small_epoch_is_a_clear_error(two_dirs):
    with pytest.raises(DataError, match="data.train_num_samples"):
        build_train_loader(data_config(f"{two_dirs}/b/shard-{{0000..0001}}.tar"), 0, 1)
    with pytest.raises(DataError, match="do not fill one batch per worker"):
        build_train_loader(data_config(f"{two_dirs}/a/shard-{{0000..0003}}.tar"), 0, 1)  # 12 < 2 x 8


def test_epoch_split_is_a_partition(tmp_path):
    urls = [f"s{i}" for i in range(13)]
    for epoch in range(3):
        parts = [shardlib.worker_shards(urls, 5, epoch, r, 2, w, 3) for r in range(2) for w in range(3)]
        assert sorted(u for p in parts for u in p) == sorted(urls)
        assert all(len(p) >= 2 for p in parts)
    assert shardlib.epoch_shard_order(urls, 5, 0) != shardlib.epoch_shard_order(urls, 5, 1)
