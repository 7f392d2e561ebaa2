"""Zero-shot prompts: class-name lists and prompt templates, built in or read from a file.

The eval job builds its classifier from them; the trainer's preflight checks that the names a
config gives exist before a run starts. Problems are DataError naming the file (and line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Union

from ds_linclip.data.pipeline import DataError

Template = Union[str, Callable[[str], str]]

BUILTIN_CLASSNAMES = ("imagenet1k", "fashion_mnist")
BUILTIN_TEMPLATES = ("openai", "simple")


def _read_lines(path: Path, what: str, key: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-empty lines of a UTF-8 file."""
    if not path.is_file():
        raise DataError(
            f"{what} file not found: {path} (config key '{key}': use one of "
            f"{', '.join(BUILTIN_CLASSNAMES if key.endswith('classnames') else BUILTIN_TEMPLATES)} or a file)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{what} file {path} is not UTF-8 text: {err}") from err
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def load_classnames(spec: str) -> list[str]:
    """Class names in label order: `imagenet1k`, `fashion_mnist`, or a file with one name per line.

    Blank lines are ignored. A name listed twice is an error (two labels would share one
    text embedding, so one of them could never be predicted).
    """
    if spec == "imagenet1k":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if spec == "fashion_mnist":
        # the names the shard writer put into the training captions (and into DIR/classnames.txt)
        from ds_linclip.data.writer import FASHION_MNIST_CLASSNAMES

        return list(FASHION_MNIST_CLASSNAMES)
    path = Path(spec).expanduser()
    lines = _read_lines(path, "class names", "eval.classnames")
    if not lines:
        raise DataError(f"class names file {path} has no class names")
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
    if spec == "openai":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

        return list(SIMPLE_IMAGENET_TEMPLATES)
    path = Path(spec).expanduser()
    lines = _read_lines(path, "templates", "eval.templates")
    if not lines:
        raise DataError(f"templates file {path} has no templates")
    for lineno, template in lines:
        if "{}" not in template:
            raise DataError(f"templates file {path} line {lineno}: '{template}' has no '{{}}' for the class name")
    return [template for _, template in lines]


def fill_template(template: Template, classname: str) -> str:
    # replace, not str.format: a literal brace elsewhere in a user template must not break it
    return template(classname) if callable(template) else template.replace("{}", classname)
