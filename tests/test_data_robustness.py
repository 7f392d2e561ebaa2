"""Bad input never stops training: a shard zoo with every kind of bad sample (good samples all
arrive, per-reason counters exact across worker processes); odd image modes decode correctly;
data with nothing usable is an error, not an endless or empty loop."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import data_config, png_bytes, write_tar
from PIL import Image

from ds_linclip.data.pipeline import DataError, build_eval_loader, build_train_loader, decode_image


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def odd_images() -> dict[str, tuple[str, bytes]]:
    """name -> (extension, bytes) for image encodings that must all decode to RGB."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    grey16 = (np.arange(144, dtype=np.uint16).reshape(12, 12) * 450).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(grey16).save(buffer, format="PNG")  # a 16-bit greyscale PNG
    grey16_png = buffer.getvalue()
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    rotated = Image.fromarray(np.zeros((6, 12, 3), dtype=np.uint8))  # wide; EXIF says rotate 90
    exif = Image.Exif()
    exif[0x0112] = 6
    webp = io.BytesIO()
    Image.fromarray(rgb).save(webp, format="WEBP")
    return {
        "grey": ("png", png_bytes(rgb[..., 0])),
        "rgba": ("png", png_bytes(np.dstack([rgb, np.full((12, 12), 128, np.uint8)]))),
        "palette": ("png", buffer.getvalue()),
        "cmyk": ("jpg", jpeg_bytes(Image.fromarray(rgb).convert("CMYK"))),
        "grey16": ("png", grey16_png),
        "exif_rotated": ("jpeg", jpeg_bytes(rotated, exif=exif.tobytes())),
        "webp": ("webp", webp.getvalue()),
    }


def test_decode_handles_every_mode():
    images = odd_images()
    for name, (_, data) in images.items():
        image = decode_image(data)
        assert image.mode == "RGB", name
    assert decode_image(images["exif_rotated"][1]).size == (6, 12)  # rotated upright
    grey16 = np.asarray(decode_image(images["grey16"][1]))[..., 0]
    assert grey16.max() > 240 and grey16.min() == 0 and len(np.unique(grey16)) > 100  # scaled, not clipped
    rgba = Image.fromarray(np.zeros((2, 2, 4), np.uint8), "RGBA")  # fully transparent black
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert np.asarray(decode_image(buffer.getvalue())).min() == 255  # transparency over white
    for bad in (b"not an image", png_bytes(np.zeros((8, 8), np.uint8))[:40]):
        with pytest.raises(Exception):
            decode_image(bad)


def zoo_shard(path, prefix: str, truncate: bool) -> tuple[list[str], Counter]:
    """One shard holding good samples (all image kinds) and one of each bad kind; returns the good
    keys and the skips it must cause."""
    good_pixels = np.full((10, 10, 3), 77, np.uint8)
    samples, good = [], []

    def add(key, **files):
        samples.append({"__key__": f"{prefix}{key}", **files})

    # bad ones first: with the shuffle buffer off, a worker consumes them before its quota is full
    add("corrupt", png=b"\x89PNG\r\n\x1a\n garbage", txt="corrupt bytes")
    add("half_png", png=png_bytes(good_pixels)[:50], txt="truncated png")
    add("no_image", txt="caption without image")
    add("no_caption", png=png_bytes(good_pixels))
    add("empty_caption", png=png_bytes(good_pixels), txt="   \n")
    add("json_no_field", png=png_bytes(good_pixels), json=json.dumps({"url": "x"}))
    add("not_utf8", png=png_bytes(good_pixels), txt=b"\xff\xfe\xfa")
    for i in range(5):
        add(f"good{i}", png=png_bytes(good_pixels), txt=f"good {i}")
        good.append(f"{prefix}good{i}")
    for name, (ext, data) in odd_images().items():
        add(f"odd_{name}", **{ext: data, "txt": f"an odd {name} image"})
        good.append(f"{prefix}odd_{name}")
    add("json_caption", png=png_bytes(good_pixels), json=json.dumps({"caption": "from json"}))
    good.append(f"{prefix}json_caption")
    expected = Counter(decode_error=2, missing_image=1, missing_caption=1, empty_caption=1, bad_caption=2)
    if truncate:
        add("lost", png=png_bytes(good_pixels), txt="cut off by the truncation")
    write_tar(path, samples)
    if truncate:  # cut the tar inside the last sample's image: the samples before it survive
        data = path.read_bytes()
        cut = data.rfind(b"lost.png") + 512 + 20  # past its tar header, inside the PNG data
        path.write_bytes(data[:cut])
        expected["truncated_shard"] += 1
    return good, expected


def test_zoo_good_samples_all_arrive_and_counters_match(tmp_path):
    """2 workers (separate processes), one zoo shard each: counters are summed exactly."""
    good_a, expected_a = zoo_shard(tmp_path / "zoo-0.tar", "a", truncate=True)
    good_b, expected_b = zoo_shard(tmp_path / "zoo-1.tar", "b", truncate=False)
    good = good_a + good_b
    cfg = data_config(tmp_path / "zoo-{0..1}.tar", f"train.micro_batch_size={len(good_a) // 1}",
                      f"data.train_num_samples={len(good)}", "data.shuffle_buffer=0")
    loader = build_train_loader(cfg, 0, 1, with_keys=True)
    assert loader.batches_per_epoch == 2
    keys = [k for _, _, batch_keys in loader for k in batch_keys]
    assert sorted(keys) == sorted(good)
    assert loader.skipped == dict(expected_a + expected_b)
    assert "repeated_to_fill" not in loader.counters


def test_unreadable_shards_are_skipped_and_counted(tmp_path):
    good = [{"__key__": f"g{i}", "png": png_bytes(np.full((8, 8), i, np.uint8)), "txt": f"g {i}"} for i in range(16)]
    write_tar(tmp_path / "s-0.tar", good)
    (tmp_path / "s-1.tar").write_bytes(b"this is not a tar file" * 100)
    # s-2.tar is missing although the brace range names it
    cfg = data_config(tmp_path / "s-{0..2}.tar", "data.workers=0", "data.train_num_samples=16")
    loader = build_train_loader(cfg, 0, 1, with_keys=True)
    keys = [k for _, _, batch_keys in loader for k in batch_keys]
    assert sorted(keys) == sorted(s["__key__"] for s in good)
    assert loader.skipped == {"unreadable_shard": 2}


def test_a_failing_pipe_command_is_an_unreadable_shard(tmp_path):
    good = [{"__key__": f"g{i}", "png": png_bytes(np.full((8, 8), i, np.uint8)), "txt": f"g {i}"} for i in range(8)]
    write_tar(tmp_path / "ok.tar", good)
    spec = f"pipe:cat {tmp_path}/ok.tar::pipe:cat {tmp_path}/missing.tar"
    cfg = data_config(spec, "data.workers=0", "data.train_num_samples=8")
    loader = build_train_loader(cfg, 0, 1, with_keys=True)
    keys = [k for _, _, batch_keys in loader for k in batch_keys]
    assert sorted(keys) == sorted(s["__key__"] for s in good)
    assert loader.skipped == {"unreadable_shard": 1}


def _live_children() -> set[int]:
    """pids of this process's descendants that still run (exited or reaped ones are skipped)."""
    import psutil

    live = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                live.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return live


@pytest.mark.parametrize("workers", [0, 2])
def test_nothing_usable_is_an_error_not_a_hang(tmp_path, workers):
    """A DataError, and the loader's workers are gone when it arrives (not ~20 s later, at garbage collection)."""
    before = _live_children()
    bad = [{"__key__": f"b{i}", "png": b"junk", "txt": "x"} for i in range(4)]
    bad += [{"__key__": f"c{i}", "txt": "no image"} for i in range(4)]
    for shard in range(2):
        write_tar(tmp_path / f"bad-{shard}.tar", bad)
    cfg = data_config(tmp_path / "bad-{0..1}.tar", f"data.workers={workers}", "data.train_num_samples=64")
    with pytest.raises(Exception, match="failed to decode|no usable sample"):
        list(build_train_loader(cfg, 0, 1))
    assert not _live_children() - before
    no_images = [{"__key__": f"c{i}", "txt": "no image"} for i in range(4)]
    write_tar(tmp_path / "none-0.tar", no_images)
    write_tar(tmp_path / "none-1.tar", no_images)
    cfg = data_config(tmp_path / "none-{0..1}.tar", f"data.workers={workers}", "data.train_num_samples=64",
                      "data.mode=resampled")
    with pytest.raises(Exception, match="no usable sample"):
        list(build_train_loader(cfg, 0, 1))
    assert not _live_children() - before
    with pytest.raises(DataError, match="no usable sample"):
        list(build_eval_loader(str(tmp_path / "none-{0..1}.tar"), 32, 8, workers, kind="retrieval"))
    assert not _live_children() - before


def test_eval_loader_skips_and_counts(tmp_path):
    samples = []
    for i in range(10):
        samples.append({"__key__": f"k{i}", "png": png_bytes(np.full((8, 8), 10 * i, np.uint8)), "cls": str(i % 3)})
    samples.insert(3, {"__key__": "nolabel", "png": png_bytes(np.zeros((8, 8), np.uint8))})
    samples.insert(5, {"__key__": "corrupt", "png": b"junk", "cls": "1"})
    write_tar(tmp_path / "e-0.tar", samples[:6])
    write_tar(tmp_path / "e-1.tar", samples[6:])
    loader = build_eval_loader(str(tmp_path / "e-{0..1}.tar"), 16, 4, workers=2)
    batches = list(loader)
    assert [len(lab) for _, lab in batches] == [4, 4, 2]
    labels = torch.cat([lab for _, lab in batches]).tolist()
    assert labels == [i % 3 for i in range(10)]  # in order, the bad ones left out
    assert loader.skipped == {"decode_error": 1, "missing_label": 1}


def test_a_worker_whose_shards_are_all_unreadable_borrows_instead_of_stopping(tmp_path):
    good = [{"__key__": f"g{i}", "png": png_bytes(np.full((8, 8), i, np.uint8)), "txt": f"g {i}"} for i in range(16)]
    write_tar(tmp_path / "s-0.tar", good)
    (tmp_path / "s-1.tar").write_bytes(b"\0" * 100)  # not a tar: one of the two workers gets only this
    cfg = data_config(tmp_path / "s-{0..1}.tar", "train.micro_batch_size=4", "data.train_num_samples=16")
    loader = build_train_loader(cfg, 0, 1, with_keys=True)
    keys = [k for _, _, batch_keys in loader for k in batch_keys]
    assert len(keys) == 16 and set(keys) <= {s["__key__"] for s in good}
    assert loader.skipped["unreadable_shard"] >= 1
    assert loader.counters["repeated_to_fill"] == 8  # the borrowing worker's samples are repeats


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax", "pax-gz"])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    """tar_members returns what tarfile reads, for each tar dialect (+ gzip)."""
    import gzip
    import tarfile

    from ds_linclip.data.pipeline import tar_members

    rng = np.random.default_rng(1)
    files = {
        "a/b/0001.png": rng.bytes(1000), "a/b/0001.txt": "ünïcode caption".encode(),
        "x" * 90 + "/" + "y" * 60 + ".jpg": rng.bytes(512),  # > 100 chars: prefix / long name / pax path
        "empty.txt": b"", "big.bin": rng.bytes(70000),
    }
    tar_format = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT}.get(fmt, tarfile.PAX_FORMAT)
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        dir_info = tarfile.TarInfo("a")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if fmt.endswith("gz"):
        path.write_bytes(gzip.compress(path.read_bytes()))
    with open(path, "rb") as stream:
        assert dict(tar_members(stream)) == files
    with tarfile.open(path) as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar if m.isreg()} == files


def test_tar_cut_inside_a_header_is_truncated(tmp_path):
    """A stream cut in the middle of a header block keeps the members before it and says so."""
    import tarfile

    from ds_linclip.data.pipeline import TruncatedTar, tar_members

    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("0.txt", "1.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    whole = path.read_bytes()
    cut = io.BytesIO(whole[: 1024 + 200])  # header 0, data 0, then 200 bytes of header 1
    got = []
    with pytest.raises(TruncatedTar):
        for name, data in tar_members(cut):
            got.append((name, data))
    assert got == [("0.txt", b"abc")]
    assert list(tar_members(io.BytesIO(whole))) == [("0.txt", b"abc"), ("1.txt", b"abc")]
