"""Attention variant names: one name per row of a study and per run folder prefix.

A plain name (the models' grammar, ds_linclip.models.attention.NAME_GRAMMAR) sets both towers;
`<image name>+text-<text name>` sets the text tower apart. `parse_variant(name).overrides()` are the
config overrides of both towers.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, replace

from ds_linclip.models.attention import (DEFAULT_FOCUSED_POWER, NAME_GRAMMAR, AttentionSpec, AttentionSpecError,
                                         parse_attention_name)

# A variant name is a row label and the run folder's prefix; parse_variant turns it into the trainer
# overrides of both towers; the grammar is the models' one (ds_linclip/models/attention.py).

TEXT_SEPARATOR = "+text-"  # `<image name>+text-<text name>`: a text tower that differs from the image one
VARIANT_GRAMMAR = (f"{NAME_GRAMMAR} for both towers, or <image name>{TEXT_SEPARATOR}<text name> (e.g. linear-affine, "
                   f"linear-affine-kernel, linear-focused-local3, linear-focused-local3{TEXT_SEPARATOR}softmax)")
HEAD_DIM = 32  # heads = width / 32 at every width, so a width change changes only the width


class VariantError(ValueError):
    """A variant name outside the grammar; the message names it and gives the grammar."""


@dataclass(frozen=True)
class Variant:
    """One attention variant: the image and the text tower's AttentionSpec. A plain name gives both towers
    the same map and normaliser (the local branch goes to the image tower only: the text tower never gets
    one); `<image>+text-<text>` sets the text tower apart (e.g. linear image, softmax text)."""

    name: str
    image: AttentionSpec
    text: AttentionSpec

    @property
    def linear(self) -> bool:
        """Both towers linear: an O(N) model."""
        return self.image.linear is not None and self.text.linear is not None

    def overrides(self) -> list[str]:
        """Both towers' keys (`AttentionSpec.config_overrides`), the image's local branch last."""
        keys = {**replace(self.image, local_kernel=0).config_overrides("image"), **self.text.config_overrides("text"),
                **self.image.config_overrides("image")}
        return [f"{key}={value}" for key, value in keys.items()]


def _tower_spec(variant: str, name: str, causal: bool) -> AttentionSpec:
    try:
        spec = parse_attention_name(name, causal)
    except AttentionSpecError as err:
        raise VariantError(f"attention variant '{variant}': {err}; variants are {VARIANT_GRAMMAR}") from None
    if spec.linear is None and spec.local_kernel:
        raise VariantError(f"attention variant '{variant}': softmax takes no local branch; variants are {VARIANT_GRAMMAR}")
    if spec.linear is not None and spec.linear.power != DEFAULT_FOCUSED_POWER:
        raise VariantError(f"attention variant '{variant}': the experiments run the default focused power only")
    return spec


@functools.lru_cache(maxsize=None)  # a pure function of the name, asked for several times per run
def parse_variant(name: str) -> Variant:
    """A variant name (VARIANT_GRAMMAR: the models' one grammar, `parse_attention_name`, optionally
    `+text-<name>` for the text tower) -> Variant.

    The overrides name the shorthand and the normaliser explicitly (not `attention=linear` +
    `feature_map`), so a run's resolved config says what it ran and earlier finished runs still match.
    """
    image_name, sep, text_name = name.partition(TEXT_SEPARATOR)
    image = _tower_spec(name, image_name, causal=False)
    if not sep:
        return Variant(name, image, replace(image, local_kernel=0))
    if TEXT_SEPARATOR in text_name:
        raise VariantError(f"attention variant '{name}': one '{TEXT_SEPARATOR}' at most; variants are {VARIANT_GRAMMAR}")
    text = _tower_spec(name, text_name, causal=True)  # refuses a local branch: the text tower is causal
    if text == replace(image, local_kernel=0):
        raise VariantError(f"attention variant '{name}': the text tower is the image tower's; write '{image_name}'")
    return Variant(name, image, text)


def variant_argument(name: str, allowed: tuple[str, ...] = ()) -> str:
    """argparse type of a variant name (names in `allowed`, e.g. compare's `best`, pass as they are)."""
    if name in allowed:
        return name
    try:
        parse_variant(name)
    except VariantError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name
