"""Zero-shot prompts: class-name lists and prompt templates, built in or read from a file.

The eval job builds its classifier from them; the trainer's preflight checks that the names a
config gives exist before a run starts. Problems are DataError naming the file (and line).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
from typing import Callable, Union

from ds_linclip.data.shards import DataError

Template = Union[str, Callable[[str], str]]

OPEN_CLIP_METADATA = "open_clip.zero_shot_metadata"
# built-in lists by name -> (module, attribute) that holds them, imported on first use
_CLASSNAME_SOURCES = {
    "imagenet1k": (OPEN_CLIP_METADATA, "IMAGENET_CLASSNAMES"),
    # the names the shard writer put into the training captions (and into DIR/classnames.txt)
    "fashion_mnist": ("ds_linclip.data.writer", "FASHION_MNIST_CLASSNAMES"),
}
_TEMPLATE_SOURCES = {
    "openai": (OPEN_CLIP_METADATA, "OPENAI_IMAGENET_TEMPLATES"),  # 80
    "simple": (OPEN_CLIP_METADATA, "SIMPLE_IMAGENET_TEMPLATES"),  # 7
}
BUILTIN_CLASSNAMES = tuple(_CLASSNAME_SOURCES)
BUILTIN_TEMPLATES = tuple(_TEMPLATE_SOURCES)


@functools.lru_cache(maxsize=None)
def open_clip_module(name: str):
    """open_clip's module `name` (`zero_shot_metadata`, `tokenizer`: no relative imports at module
    level), executed from its file without importing the open_clip package, whose __init__ imports
    every model and transformers: ~3 s per process (the shard writer, the eval job, each data-loader
    worker that tokenizes captions) against ~0.1 s for the file alone. Once per process and name."""
    package = importlib.util.find_spec("open_clip")
    if package is None or not package.submodule_search_locations:
        return importlib.import_module(f"open_clip.{name}")  # raises the usual ModuleNotFoundError
    path = Path(next(iter(package.submodule_search_locations))) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"ds_linclip_open_clip_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def open_clip_metadata():
    """open_clip's zero_shot_metadata: its class-name and template lists."""
    return open_clip_module("zero_shot_metadata")


def _builtin(sources: dict[str, tuple[str, str]], name: str) -> list:
    module, attribute = sources[name]
    package, _, submodule = module.partition(".")
    return list(getattr(open_clip_module(submodule) if package == "open_clip" else importlib.import_module(module),
                        attribute))


def _read_lines(path: Path, what: str, key: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-empty lines of a UTF-8 file; DataError if there are none."""
    if not path.is_file():
        raise DataError(
            f"{what} file not found: {path} (config key '{key}': use one of "
            f"{', '.join(BUILTIN_CLASSNAMES if key.endswith('classnames') else BUILTIN_TEMPLATES)} or a file)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{what} file {path} is not UTF-8 text: {err}") from err
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{what} file {path} has no {what}")
    return lines


def load_classnames(spec: str) -> list[str]:
    """Class names in label order: `imagenet1k`, `fashion_mnist`, or a file with one name per line.

    Blank lines are ignored. A name listed twice is an error (two labels would share one
    text embedding, so one of them could never be predicted).
    """
    if spec in _CLASSNAME_SOURCES:
        return _builtin(_CLASSNAME_SOURCES, spec)
    path = Path(spec).expanduser()
    lines = _read_lines(path, "class names", "eval.classnames")
    first_seen: dict[str, int] = {}
    duplicates: list[str] = []
    for lineno, name in lines:
        if name in first_seen:
            duplicates.append(f"'{name}' (lines {first_seen[name]} and {lineno})")
        else:
            first_seen[name] = lineno
    if duplicates:
        shown = ", ".join(duplicates[:5]) + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
        raise DataError(f"class names file {path} lists names more than once: {shown}")
    return [name for _, name in lines]


def load_templates(spec: str) -> list[Template]:
    """Prompt templates: `openai` (80), `simple` (7) from open_clip, or a file, one per line, `{}` = class."""
    if spec in _TEMPLATE_SOURCES:
        return _builtin(_TEMPLATE_SOURCES, spec)
    path = Path(spec).expanduser()
    lines = _read_lines(path, "templates", "eval.templates")
    for lineno, template in lines:
        if "{}" not in template:
            raise DataError(f"templates file {path} line {lineno}: '{template}' has no '{{}}' for the class name")
    return [template for _, template in lines]


def fill_template(template: Template, classname: str) -> str:
    # replace, not str.format: a literal brace elsewhere in a user template must not break it
    return template(classname) if callable(template) else template.replace("{}", classname)
