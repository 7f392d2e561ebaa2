"""CLIP_benchmark's webdataset layout, read from a local copy.

CLIP_benchmark (`clip-benchmark` on PyPI, `clip_benchmark.datasets.builder.build_wds_dataset`)
publishes its evaluation sets as one folder per dataset:

    ROOT/
        dataset_type.txt                          optional: classification (default) | retrieval | multilabel
        classnames.txt                            class names in label order, one per line
        zeroshot_classification_templates.txt     prompts with `{c}` for the class name
        test/nshards.txt                          the number of shards n of the split
        test/0.tar ... test/{n-1}.tar             `webp|png|jpg|jpeg` + `cls` (label) or `txt` (captions, one per line)

`read_layout` turns such a folder into what the eval job needs: the split's shard spec, the class
names and the templates in our `{}` form. Nothing is downloaded: ROOT is a local folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NSHARDS_FILE = "nshards.txt"
TYPE_FILE = "dataset_type.txt"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPES = ("classification", "retrieval", "multilabel")


class LayoutError(ValueError):
    """A CLIP_benchmark folder that cannot be read; the message names the file."""


@dataclass(frozen=True)
class BenchmarkLayout:
    """One split of a CLIP_benchmark dataset folder."""

    root: Path
    split: str
    dataset_type: str
    num_shards: int
    classnames: tuple[str, ...] | None
    templates: tuple[str, ...] | None  # `{}` marks the class name (our form)

    @property
    def shard_spec(self) -> str:
        """The split's shards as a brace range our shard parser (and webdataset) expands."""
        last = self.num_shards - 1
        name = "0.tar" if last == 0 else f"{{0..{last}}}.tar"
        return str(self.root / self.split / name)


def is_benchmark_layout(spec: str) -> bool:
    """A local folder in CLIP_benchmark's layout: it has a split folder with `nshards.txt`."""
    root = Path(str(spec)).expanduser()
    return root.is_dir() and any((child / NSHARDS_FILE).is_file() for child in root.iterdir() if child.is_dir())


def _lines(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LayoutError(f"{path} is not UTF-8 text: {err}") from err
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _our_template(template: str, path: Path, lineno: int) -> str:
    """CLIP_benchmark's `{c}` -> our `{}`; any other brace would break str.format, so refuse it."""
    if "{c}" not in template:
        raise LayoutError(f"{path} line {lineno}: '{template}' has no '{{c}}' for the class name")
    rest = template.replace("{c}", "")
    if "{" in rest or "}" in rest:
        raise LayoutError(f"{path} line {lineno}: '{template}' has braces other than '{{c}}'")
    return template.replace("{c}", "{}")


def read_layout(spec: str, split: str = "test") -> BenchmarkLayout:
    """Read ROOT's metadata for `split`; LayoutError naming the file if something is missing or bad."""
    root = Path(str(spec)).expanduser()
    nshards_path = root / split / NSHARDS_FILE
    if not nshards_path.is_file():
        splits = sorted(child.name for child in root.iterdir() if (child / NSHARDS_FILE).is_file()) if root.is_dir() else []
        raise LayoutError(f"{nshards_path} not found (eval.split={split!r}; splits here: {', '.join(splits) or 'none'})")
    try:
        num_shards = int(nshards_path.read_text().strip())
    except ValueError:
        raise LayoutError(f"{nshards_path} must hold the number of shards, got {nshards_path.read_text()[:40]!r}") from None
    if num_shards < 1:
        raise LayoutError(f"{nshards_path} says {num_shards} shards; a split needs at least one")
    missing = [i for i in range(num_shards) if not (root / split / f"{i}.tar").is_file()]
    if missing:
        raise LayoutError(f"{root / split} lacks {len(missing)} of the {num_shards} shards {NSHARDS_FILE} announces "
                          f"(first: {missing[0]}.tar)")
    type_path = root / TYPE_FILE
    dataset_type = type_path.read_text().strip().lower() if type_path.is_file() else "classification"
    if dataset_type not in DATASET_TYPES:
        raise LayoutError(f"{type_path} says {dataset_type!r}; expected one of {', '.join(DATASET_TYPES)}")
    classnames_path, templates_path = root / CLASSNAMES_FILE, root / TEMPLATES_FILE
    classnames = _lines(classnames_path) if classnames_path.is_file() else None
    templates = None
    if templates_path.is_file():
        raw = templates_path.read_text(encoding="utf-8").splitlines()
        templates = tuple(_our_template(line.strip(), templates_path, n) for n, line in enumerate(raw, 1) if line.strip())
    return BenchmarkLayout(root, split, dataset_type, num_shards, classnames, templates)
