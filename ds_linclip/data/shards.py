"""Shard specs -> shard URLs, sample counts, and which shards each rank/worker reads.

A spec is one string (or a list of strings). Grammar:

    spec    := source ("::" source)*
    source  := pattern ["@" weight]          weight: sampling weight (resampled mode only)
    pattern := brace range / list            data/{00000..00099}.tar, data/{a,b}.tar
             | glob                          data/part-*/shard-*.tar
             | list file                     shards.txt (one URL or pattern per line, # comments)
             | pipe: command                 pipe:aws s3 cp s3://bucket/{00000..00009}.tar -
             | any URL webdataset's gopen opens (file:, http:, ...)

Splitting (epoch mode): the shard list is shuffled with (seed, epoch), then dealt round-robin
to the `world_size * workers` global workers (rank-major: node first, then worker), like
webdataset's split_by_node + split_by_worker, but with the count checked up front: plain
webdataset leaves a worker with no shards silently empty and every rank then hangs in the next
collective.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import braceexpand

_WEIGHT = re.compile(r"^(?P<pattern>.+?)@(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_LIST_SUFFIXES = (".txt", ".lst", ".list")


class ShardSpecError(ValueError):
    """A shard spec that cannot be used (matches nothing, too few shards, bad weights)."""


class DataError(RuntimeError):
    """The data cannot produce batches at all (nothing usable), with the spec in the message. Defined here,
    below the torch-using pipeline, so that the writer and the prompt lists raise it without importing torch."""


@dataclass(frozen=True)
class Source:
    """One `::`-separated part of a spec: its shard URLs and sampling weight."""

    spec: str
    urls: tuple[str, ...]
    weight: float = 1.0
    weighted: bool = False  # True when the spec gave `@weight` explicitly


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) is not None and not url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _expand_pattern(pattern: str, depth: int = 0) -> list[str]:
    pattern = pattern.strip()
    if not pattern:
        return []
    if pattern.startswith("pipe:") or _is_remote(pattern):
        # remote: brace ranges only (a glob cannot be listed without the store's API)
        return list(braceexpand.braceexpand(pattern))
    urls: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        path = _local_path(item)
        if _GLOB_CHARS.search(path):
            urls.extend(sorted(glob.glob(os.path.expanduser(path))))
        elif path.endswith(_LIST_SUFFIXES) and os.path.isfile(path) and depth < 3:
            base = os.path.dirname(path)
            for line in Path(path).read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    # relative entries in a list file are relative to the list file
                    if not _is_remote(line) and not os.path.isabs(line):
                        line = os.path.join(base, line)
                    urls.extend(_expand_pattern(line, depth + 1))
        else:
            urls.append(os.path.expanduser(item))
    return urls


def parse_spec(spec: str | Sequence[str] | None) -> list[Source]:
    """Expand a shard spec into sources with their URLs; raise ShardSpecError if nothing matches.

    Local URLs that do not exist are kept only when at least one URL of the source exists
    (a missing shard inside a range is read as an unreadable shard and counted, not fatal).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise ShardSpecError("empty shard spec: set data.train_shards (e.g. 'data/train/shard-{000000..000011}.tar')")
    parts: list[str] = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        parts.extend(p for p in str(item).split("::") if p.strip())
    if not parts:
        raise ShardSpecError(f"empty shard spec {spec!r}")
    sources = []
    for part in parts:
        part = part.strip()
        weight, weighted = 1.0, False
        match = _WEIGHT.match(part)
        if match and not _GLOB_CHARS.search(match.group("weight")):
            part, weight, weighted = match.group("pattern"), float(match.group("weight")), True
            if weight <= 0:
                raise ShardSpecError(f"shard source {part!r}: weight must be > 0, got {weight}")
        urls = _expand_pattern(part)
        local = [u for u in urls if not _is_remote(u)]
        if not urls or (local and len(local) == len(urls) and not any(os.path.exists(_local_path(u)) for u in local)):
            raise ShardSpecError(f"shard spec {part!r} (in {spec!r}) matches no shards")
        sources.append(Source(spec=part, urls=tuple(urls), weight=weight, weighted=weighted))
    return sources


def expand_urls(spec: str | Sequence[str] | None) -> list[str]:
    """All shard URLs of a spec, in spec order (sources concatenated)."""
    return [u for s in parse_spec(spec) for u in s.urls]


def read_sizes(urls: Sequence[str]) -> dict[str, int] | None:
    """Samples per shard from `sizes.json` files beside the shards (open_clip's format:
    {"shard-000000.tar": 500, ...}); None if any local shard has no entry (or it is remote)."""
    cache: dict[str, dict] = {}
    sizes: dict[str, int] = {}
    for url in urls:
        if _is_remote(url):
            return None
        path = _local_path(url)
        directory, name = os.path.split(path)
        if directory not in cache:
            sizes_file = os.path.join(directory or ".", "sizes.json")
            try:
                cache[directory] = json.loads(Path(sizes_file).read_text())
            except (OSError, ValueError):
                cache[directory] = {}
        if name not in cache[directory]:
            return None
        sizes[url] = int(cache[directory][name])
    return sizes


def num_samples(urls: Sequence[str]) -> int | None:
    """Total samples of the shards per their sizes.json, or None if unknown."""
    sizes = read_sizes(urls)
    return None if sizes is None else sum(sizes.values())


def epoch_shard_order(urls: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The shards of one epoch, shuffled deterministically by (seed, epoch)."""
    order = list(urls)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def worker_shards(
    urls: Sequence[str], seed: int, epoch: int, rank: int, world_size: int, worker: int, workers: int
) -> list[str]:
    """Epoch mode: this global worker's shards (split by node, then by worker, round robin)."""
    check_enough_shards(len(urls), world_size, workers)
    global_worker = rank * workers + worker
    return epoch_shard_order(urls, seed, epoch)[global_worker :: world_size * workers]


def check_enough_shards(num_shards: int, world_size: int, workers: int, spec: str | None = None) -> None:
    needed = world_size * max(1, workers)
    if num_shards < needed:
        raise ShardSpecError(
            f"epoch mode needs at least one shard per dataloader worker: {num_shards} shard(s)"
            f"{' in ' + repr(spec) if spec else ''} < {world_size} rank(s) x {max(1, workers)} worker(s) = {needed}. "
            "Use fewer data.workers or ranks, write smaller shards, or set data.mode=resampled."
        )


def resampled_shards(sources: Sequence[Source], seed: int, epoch: int, rank: int, worker: int):
    """Resampled mode: an endless, seeded stream of shard URLs for one (rank, worker).

    Picks a source by weight, then a shard uniformly within it (weights are per source,
    as in open_clip's upsampling factors, so a source's share does not depend on its shard count).
    """
    rng = random.Random(f"resample/{seed}/{epoch}/{rank}/{worker}")
    weights = [s.weight for s in sources]
    while True:
        source = rng.choices(sources, weights=weights)[0] if len(sources) > 1 else sources[0]
        yield source.urls[rng.randrange(len(source.urls))]
