"""Zero-shot data from an ImageFolder (`root/<class>/<image>`, e.g. an ImageNet val folder sorted
into synset folders): torchvision's `ImageFolder` finds the files and labels (sorted folder order,
which for ImageNet is the order of open_clip's class names); images get the same eval transform as
shards (the data pipeline's decode, centre crop, resize, CLIP normalisation)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ds_linclip.data.pipeline import DataError, center_crop_box, crop_resize, decode_image, normalise


def is_image_folder(spec: str) -> bool:
    """A local folder with class sub-folders (and no tar shards at its top)."""
    path = Path(spec).expanduser()
    return path.is_dir() and not any(path.glob("*.tar")) and any(child.is_dir() for child in path.iterdir())


def _read_bytes(path: str) -> tuple[str, bytes]:
    with open(path, "rb") as handle:
        return path, handle.read()


def _transform(item: tuple[str, bytes], image_size: int) -> np.ndarray:
    path, data = item
    try:
        image = decode_image(data, min_size=image_size)
    except Exception as err:
        raise DataError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err
    return crop_resize(image, center_crop_box(*image.size), image_size)  # (S, S, 3) uint8


def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = normalise(torch.from_numpy(np.stack([image for image, _ in samples])))
    return images, torch.tensor([label for _, label in samples], dtype=torch.long)


class ImageFolderLoader:
    """Iterate (images (B,3,S,S) float32, labels (B,) long) over an ImageFolder, in file order."""

    def __init__(self, root: str, image_size: int, batch_size: int, workers: int):
        from torchvision.datasets import ImageFolder

        try:
            self.dataset = ImageFolder(root, loader=_read_bytes, transform=partial(_transform, image_size=image_size))
        except (FileNotFoundError, OSError) as err:  # no class folders, or class folders without images
            raise DataError(f"ImageFolder {root}: {err}") from err
        self.classes: list[str] = list(self.dataset.classes)
        self.num_samples = len(self.dataset)
        self.batch_size, self.workers = batch_size, workers

    def __iter__(self):
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                            shuffle=False, collate_fn=_collate)
        yield from loader
