"""The options every linear-attention backend takes besides q, k, v, and the one keyword signature they share.

`kernels.linear_attention` checks the options once and calls a backend; each backend body is written as
`body(q, k, v, options: LinearOptions)` and `@linear_backend` gives it the keyword signature
`(q, k, v, feature_map, denominator, causal, scale, power, eps)` whose defaults are LinearOptions'.
"""

import functools
import inspect
from typing import Callable, NamedTuple

import torch


class LinearOptions(NamedTuple):
    """One linear-attention call's variant and settings (q, k, v aside); the backends trust them (see
    `kernels.reference.check_linear_args`). A tuple: a body unpacks what it reads in one line."""

    feature_map: str = "affine"  # kernels.reference.FEATURE_MAPS
    denominator: str = "count"  # kernels.reference.DENOMINATORS
    causal: bool = False  # token i attends to tokens j <= i
    scale: torch.Tensor | None = None  # (heads, head_dim), positive: the focused map's s (only that map's)
    power: float | torch.Tensor = 3.0  # the focused map's p, or pola's (heads, head_dim) tensor
    eps: float = 1e-6  # added to the kernel normaliser's sum (every map but affine)


def linear_backend(body: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`body(q, k, v, options)` -> `entry(q, k, v, feature_map=..., denominator=..., causal=..., scale=...,
    power=..., eps=...)`, positional or keyword in that order, defaults from `LinearOptions`.

    q, k: (batch, heads, tokens, head_dim); v: (batch, heads, tokens, value_dim) -> (batch, heads, tokens, value_dim).
    """

    @functools.wraps(body)
    def entry(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return body(q, k, v, LinearOptions(*args, **kwargs))

    tensors = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor)
               for name in ("q", "k", "v")]
    entry.__signature__ = inspect.Signature(
        tensors + list(inspect.signature(LinearOptions).parameters.values()), return_annotation=torch.Tensor)
    return entry


__all__ = ["LinearOptions", "linear_backend"]
